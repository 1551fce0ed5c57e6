//! `crabbox-tests`: the end-to-end harness. It starts the real binaries —
//! `crabboxd` on a temp socket in a temp home, `crabboxctl` against it — and
//! waits for readiness the way systemd does (an `sd_notify` READY=1 on a
//! socket the test owns), never by sleeping until something is bound.
//!
//! The binaries are found next to the test executable (`target/<profile>/`);
//! `cargo nextest run --workspace` / `cargo test --workspace` builds them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bins;
pub mod daemon;
pub mod egress;
pub mod fakessh;
pub mod lease;
pub mod netns;
pub mod page;
pub mod proxy;
pub mod sshd;

pub use daemon::{TestDaemon, TestDaemonBuilder};
pub use sshd::TestSshd;

/// Whether a process whose command line matches `pattern` (an extended
/// regular expression, as `pgrep -f` takes) runs on this machine: the
/// "far side" of a loopback sshd is this machine too.
pub fn pgrep(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A process's output bytes as text (lossy), for assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn show(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}
