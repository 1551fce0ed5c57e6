//! `Secret`: a string that never prints. Tokens live in this type from the
//! moment they are read until the moment they are put on the wire.

use std::fmt;

/// A secret string (a coordinator token, a ticket). `Debug` and `Display`
/// print a mask, so a secret that ends up in a log line, an error message or
/// a `{:?}` of a config struct shows nothing of its value.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// What `Debug` and `Display` print instead of the value.
    pub const MASK: &'static str = "********";

    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that sends it (an `Authorization` header).
    /// Call sites of this method are the whole list of places a secret leaves
    /// the type; keep it short.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("cbxu_very-secret");
        assert_eq!(format!("{s}"), Secret::MASK);
        assert_eq!(format!("{s:?}"), Secret::MASK);
        assert_eq!(format!("{:?}", Some(&s)), format!("Some({})", Secret::MASK));
        assert_eq!(s.expose(), "cbxu_very-secret");
    }
}
