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
