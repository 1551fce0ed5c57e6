//! The `crabbox-coordinator` binary: token issuing and refusals at startup.

use std::process::Command;

use crabbox_coordinator::Secret;
use crabbox_coordinator::auth::verify_user_token;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_crabbox-coordinator"));
    for var in [
        "CRABBOX_ADMIN_TOKEN",
        "CRABBOX_SHARED_TOKEN",
        "CRABBOX_SESSION_SECRET",
        "CRABBOX_SHARED_OWNER",
        "CRABBOX_DEFAULT_ORG",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn token_issue_prints_a_verifiable_user_token() {
    let out = bin()
        .env("CRABBOX_SESSION_SECRET", "cli-secret")
        .args([
            "token",
            "issue",
            "--owner",
            "alice@example.com",
            "--org",
            "acme",
            "--login",
            "alice",
            "--ttl",
            "30d",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("cbxu_"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = verify_user_token(&Secret::new("cli-secret"), &token, now).expect("valid token");
    assert_eq!(
        (
            claims.owner.as_str(),
            claims.org.as_str(),
            claims.login.as_str()
        ),
        ("alice@example.com", "acme", "alice")
    );
    assert!((claims.exp - now - 30 * 86_400).abs() < 5);
}

#[test]
fn token_issue_needs_a_secret() {
    let out = bin()
        .args([
            "token", "issue", "--owner", "a", "--org", "b", "--login", "c",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CRABBOX_SESSION_SECRET"));
}

#[test]
fn refuses_to_start_without_a_token_or_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let out = bin()
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token configured"));
    let out = bin()
        .env("CRABBOX_ADMIN_TOKEN", "x")
        .args(["--listen", "0.0.0.0:0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public"));
}
