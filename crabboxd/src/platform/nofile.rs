//! The open-file limit: raise the soft `RLIMIT_NOFILE` to the hard limit at start (systemd user units start at 1024, launchd at 256), and size the egress destination-socket budget from it so the API always has descriptors in reserve.

use std::sync::OnceLock;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors never handed to egress destination sockets: the API socket's
/// accepts, log and state files, the coordinator's connections.
pub const RESERVE: u64 = 256;

/// What [`raise`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

static SOFT: OnceLock<u64> = OnceLock::new();

/// Raises the soft limit to the hard one (capped at 1 Mi descriptors); remembers the result.
pub fn raise() -> std::io::Result<Nofile> {
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    let want = hard.min(1 << 20).max(before);
    let soft = if want > before {
        match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            Ok(()) => want,
            // macOS refuses more than OPEN_MAX (10240) even under an unlimited hard limit.
            Err(_) if want > 10240 && setrlimit(Resource::RLIMIT_NOFILE, 10240, hard).is_ok() => {
                10240
            }
            Err(_) => before,
        }
    } else {
        before
    };
    let _ = SOFT.set(soft);
    Ok(Nofile { before, soft, hard })
}

/// The soft limit in force (as raised at start, else read now).
pub fn soft_limit() -> u64 {
    *SOFT.get_or_init(|| {
        getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024)
    })
}

/// Destination sockets all egress bridges together may hold: the soft limit
/// minus [`RESERVE`], or half of it when the limit is small.
pub fn egress_socket_budget() -> usize {
    let soft = soft_limit();
    let budget = if soft > 2 * RESERVE {
        soft - RESERVE
    } else {
        soft / 2
    };
    budget.max(16) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_a_reserve() {
        let b = egress_socket_budget() as u64;
        assert!(b + RESERVE.min(soft_limit() / 2) <= soft_limit().max(32));
    }
}
