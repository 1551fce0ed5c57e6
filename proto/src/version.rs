//! Version constants and the metadata keys that carry them on every call, and
//! the one place that turns a version skew into a sentence.

use std::fmt;

/// The local API protocol number this crate speaks (`crabbox.daemon.v1`).
///
/// It changes only when a change is not additive; additive changes (new
/// fields, new RPCs) keep the number and are told apart by [`VERSION`].
pub const PROTOCOL: u32 = 1;

/// The version of this crate, shared by `crabboxd` and `crabboxctl` built
/// from the same workspace.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Request metadata: the client's package version.
pub const CLIENT_VERSION_KEY: &str = "x-crabbox-client-version";
/// Response metadata: the daemon's package version.
pub const DAEMON_VERSION_KEY: &str = "x-crabbox-daemon-version";
/// Request and response metadata: the protocol number of the sender.
pub const PROTOCOL_KEY: &str = "x-crabbox-protocol";

/// How a daemon's version relates to this client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skew {
    /// Same version and protocol.
    None,
    /// The daemon is another version of the same protocol: everything works,
    /// but newer features may be missing on the older side.
    Minor {
        /// The daemon's version.
        daemon: String,
    },
    /// The daemon speaks another protocol number: calls may fail.
    Protocol {
        /// The daemon's version.
        daemon: String,
        /// The daemon's protocol number.
        daemon_protocol: u32,
    },
}

impl Skew {
    /// Compares a daemon's reported version and protocol with this crate's.
    pub fn of(daemon_version: &str, daemon_protocol: u32) -> Self {
        if daemon_protocol != PROTOCOL {
            Skew::Protocol {
                daemon: daemon_version.to_owned(),
                daemon_protocol,
            }
        } else if daemon_version != VERSION {
            Skew::Minor {
                daemon: daemon_version.to_owned(),
            }
        } else {
            Skew::None
        }
    }

    /// Whether the skew breaks the protocol (as opposed to a harmless
    /// version difference).
    pub fn is_breaking(&self) -> bool {
        matches!(self, Skew::Protocol { .. })
    }
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skew::None => write!(f, "crabboxd and crabboxctl are both version {VERSION}"),
            Skew::Minor { daemon } => write!(
                f,
                "crabboxd is version {daemon} but crabboxctl is {VERSION}; \
                 run `crabboxctl daemon restart` so the running daemon matches the installed CLI"
            ),
            Skew::Protocol {
                daemon,
                daemon_protocol,
            } => write!(
                f,
                "crabboxd {daemon} speaks local API protocol {daemon_protocol} but crabboxctl {VERSION} \
                 speaks protocol {PROTOCOL}; install matching versions and run `crabboxctl daemon restart`"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_classification() {
        assert_eq!(Skew::of(VERSION, PROTOCOL), Skew::None);
        assert!(matches!(
            Skew::of("0.0.0-old", PROTOCOL),
            Skew::Minor { .. }
        ));
        let s = Skew::of("9.9.9", PROTOCOL + 1);
        assert!(s.is_breaking());
        assert!(s.to_string().contains("crabboxctl daemon restart"));
    }
}
