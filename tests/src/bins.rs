//! Locating the workspace's binaries from inside a test.

use std::path::PathBuf;

/// The path of a workspace binary (`crabboxd`, `crabboxctl`, …) in the
/// target directory this test was built into.
///
/// Panics with instructions when it is missing, because every test that
/// needs it would fail in a more confusing way.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build every binary first: `cargo build --workspace` \
         (cargo nextest run --workspace does this)",
        path.display()
    );
    path
}
