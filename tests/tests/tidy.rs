//! Tidy checks over the source tree: every Rust file opens with a `//!` line
//! saying what it owns, `crabboxctl` depends on `crabbox-api` only, proto
//! types stay in `crabboxd/src/api/`, and the clippy rules that enforce the
//! daemon's invariants are lifted only in the modules that own them.

use std::{
    fs,
    path::{Path, PathBuf},
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with('.') || name == "target" || name == "corpus" || name == "artifacts" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    let missing: Vec<String> = files
        .iter()
        .filter(|p| {
            let text = fs::read_to_string(p).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` line saying what they own:\n{}",
        missing.join("\n")
    );
}

#[test]
fn crabboxctl_depends_on_the_api_crate_only() {
    let manifest = fs::read_to_string(workspace_root().join("crabboxctl/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    for forbidden in ["crabboxd", "crabbox-egress", "crabbox-coordinator"] {
        assert!(
            !deps.lines().any(|l| l.trim_start().starts_with(forbidden)),
            "crabboxctl must not depend on {forbidden}: all behaviour lives in the daemon"
        );
    }
    assert!(deps.contains("crabbox-api"));
}

#[test]
fn only_api_module_knows_proto_types() {
    let src = workspace_root().join("crabboxd/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|p| !p.starts_with(src.join("api")))
        .filter(|p| fs::read_to_string(p).unwrap().contains("crabbox_api::v1"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "proto types outside crabboxd/src/api: {offenders:?}"
    );
}

/// The build enforces the daemon's invariants with clippy
/// (`crabboxd/clippy.toml`: environment reads, task spawning, coordinator
/// HTTP types); an `expect`/`allow` of those lints is the only way around
/// them, so it may appear only in the modules the invariants name.
#[test]
fn invariant_lints_are_lifted_only_where_the_invariants_allow() {
    let root = workspace_root();
    let daemon = root.join("crabboxd");
    let allowed: [(&str, &[&str]); 2] = [
        (
            "clippy::disallowed_methods",
            &[
                "src/config/",
                "src/telemetry.rs",
                "src/supervisor/",
                "tests/",
            ],
        ),
        ("clippy::disallowed_types", &["src/coordinator/", "tests/"]),
    ];
    let mut files = Vec::new();
    rust_files(&daemon, &mut files);
    let mut offenders = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&daemon)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = fs::read_to_string(path).unwrap();
        for (lint, places) in allowed {
            if text.contains(lint) && !places.iter().any(|p| rel.starts_with(p)) {
                offenders.push(format!("crabboxd/{rel}: {lint}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "these files lift an architecture lint outside the modules that own it \
         (see crabboxd/clippy.toml and docs/ARCHITECTURE.md):\n{}",
        offenders.join("\n")
    );

    // Clippy reads only the nearest clippy.toml, so the daemon's file must
    // carry every workspace rule as well as its own.
    let workspace = fs::read_to_string(root.join("clippy.toml")).unwrap();
    let own = fs::read_to_string(daemon.join("clippy.toml")).unwrap();
    for rule in workspace.lines().filter(|l| l.contains("path = ")) {
        assert!(
            own.contains(rule.trim()),
            "crabboxd/clippy.toml lacks the workspace rule {rule:?}"
        );
    }
    for rule in ["std::env::var", "tokio::task::spawn", "reqwest::Client"] {
        assert!(
            own.contains(&format!("path = \"{rule}\"")),
            "crabboxd/clippy.toml lacks {rule}"
        );
    }
}
