//! The API from clients that are not ours, and from users who are not the
//! daemon's: a generic Python gRPC client using server reflection, and a
//! connection from another uid.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use crabbox_tests::TestDaemon;

/// Whether a prerequisite that CI installs may be skipped when missing:
/// only outside CI, so CI can never silently skip these tests.
fn may_skip() -> bool {
    std::env::var_os("CI").is_none()
}

#[tokio::test]
async fn python_grpcio_client_discovers_and_calls_the_api() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            may_skip(),
            "python3 with grpcio and grpcio-reflection is required in CI"
        );
        eprintln!(
            "SKIP: python3 with grpcio + grpcio-reflection not installed (pip install grpcio grpcio-reflection)"
        );
        return;
    }
    let d = TestDaemon::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/generic_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&d.socket)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // One service per domain, listed by both reflection versions.
    for reflection in ["services", "services_v1"] {
        let services: Vec<&str> = v[reflection]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for service in ["Daemon", "Leases", "Egress", "Runs", "Ssh", "Desktop"] {
            assert!(
                services.contains(&format!("crabbox.daemon.v1.{service}").as_str()),
                "{reflection}: {services:?}"
            );
        }
    }
    assert_eq!(v["status"]["pid"], d.pid());
    // Times are Timestamps: the reflected descriptor set holds the
    // well-known types, so a generic client renders RFC 3339 text.
    let started = v["status"]["started_at"].as_str().unwrap();
    assert!(
        started.len() >= 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started}"
    );
    assert!(
        v["tasks"]["tasks"][0]["since"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    // The other services answer too (nothing kept, no host bridges).
    assert_eq!(v["leases"], serde_json::json!({}), "{v}");
    assert_eq!(v["egress_hosts"], serde_json::json!({}), "{v}");
    assert_eq!(v["status"]["version"], crabbox_api::VERSION);
    assert_eq!(v["status"]["protocol"], crabbox_api::PROTOCOL);
    assert_eq!(v["status"]["phase"], "PHASE_RUNNING");
    assert_eq!(v["tasks"]["tasks"][0]["kind"], "TASK_KIND_API_SERVER");
    assert_eq!(
        v["metadata"]["x-crabbox-daemon-version"],
        crabbox_api::VERSION
    );
}

/// Speaks just enough HTTP/2 to see whether the server answers: the client
/// preface and an empty SETTINGS frame, then one read. A server that accepts
/// the connection sends its own SETTINGS frame; a refused one reads as EOF.
const H2_PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    data = s.recv(64)
except OSError as e:
    print("io-error", e.errno); sys.exit(0)
print("answered" if data else "closed")
"#;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn another_user_is_refused_with_a_log_line() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            may_skip(),
            "the other-uid test needs root, which CI has: it must not skip there"
        );
        eprintln!("SKIP: needs root to run a client as another uid (setpriv)");
        return;
    }
    let python = Path::new("/usr/bin/python3");
    if !python.exists() || !Path::new("/usr/bin/setpriv").exists() {
        assert!(
            may_skip(),
            "/usr/bin/python3 and setpriv are required in CI"
        );
        eprintln!("SKIP: /usr/bin/python3 or setpriv missing");
        return;
    }
    let d = TestDaemon::start().await;
    // Open the path and the socket to everyone, so the only wall left is the
    // daemon's peer-uid check — that is the wall under test.
    let mut p = d.socket.parent().unwrap().to_path_buf();
    chmod(&d.socket, 0o666);
    while p.starts_with(d.home()) {
        chmod(&p, 0o711);
        if !p.pop() {
            break;
        }
    }

    // Our own uid gets an HTTP/2 answer.
    let same = Command::new(python)
        .args(["-c", H2_PROBE])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&same.stdout).trim(), "answered");

    // nobody (65534) is cut off without an answer.
    let other = Command::new("/usr/bin/setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            H2_PROBE,
        ])
        .arg(&d.socket)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&other.stdout).trim().to_owned();
    assert!(
        said == "closed" || said.starts_with("io-error"),
        // A write or read error (EPIPE, ECONNRESET) also means the daemon
        // hung up without answering.
        "another uid got: {said:?} {}",
        String::from_utf8_lossy(&other.stderr)
    );
    // The daemon says so in its log, naming the uid.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d
        .stderr()
        .contains("refused API connection from another user")
    {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(d.stderr().contains("peer_uid=65534"), "{}", d.stderr());
    // And keeps serving its own user.
    d.client().await.status().await.unwrap();
}
