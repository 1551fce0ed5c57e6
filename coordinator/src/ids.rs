//! Random identifiers (tickets, session ids, run ids, UUIDs) and their shape checks.

use rand::RngCore;

fn hex_bytes(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A random v4 UUID in canonical lowercase form.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `s` is a canonical v4 UUID.
pub fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 36 {
        return false;
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *c == b'-',
            14 => *c == b'4',
            19 => matches!(c.to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b'),
            _ => c.is_ascii_hexdigit(),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `egress_` + 32 lowercase hex: a one-use bridge ticket.
pub fn egress_ticket() -> String {
    format!("egress_{}", hex_bytes(16))
}

/// `egress_` + 12 lowercase hex: a server-chosen egress session id.
pub fn egress_session() -> String {
    format!("egress_{}", hex_bytes(6))
}

/// `run_` + 12 lowercase hex.
pub fn run_id() -> String {
    format!("run_{}", hex_bytes(6))
}

/// Whether `s` has the ticket shape `egress_` + 32 lowercase hex.
pub fn is_ticket(s: &str) -> bool {
    s.strip_prefix("egress_").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// `^egress_[A-Za-z0-9_.:-]{6,80}$`.
pub fn is_session_id(s: &str) -> bool {
    s.strip_prefix("egress_").is_some_and(|r| {
        (6..=80).contains(&r.len())
            && r.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(&c))
    })
}

/// `^cbx_[a-f0-9]{12}$`: the lease id form runs accept.
pub fn is_cbx_lease_id(s: &str) -> bool {
    s.strip_prefix("cbx_").is_some_and(|h| {
        h.len() == 12
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// `^[A-Za-z0-9][A-Za-z0-9_.:-]{2,127}$`: ids accepted for registered leases.
pub fn is_registered_lease_id(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(c))
}

/// Normalise a slug: lowercase, each run of non `[a-z0-9]` → one `-`, trim dashes.
pub fn normalize_slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut dash = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(is_uuid_v4(&uuid_v4()));
        assert!(is_ticket(&egress_ticket()));
        assert!(is_session_id(&egress_session()));
        assert!(!is_session_id("egress_abc"));
        assert!(is_cbx_lease_id("cbx_0123456789ab"));
        assert!(!is_cbx_lease_id("cbx_0123456789aB"));
        assert_eq!(normalize_slug("  Blue__Lobster!! 2 "), "blue-lobster-2");
    }
}
