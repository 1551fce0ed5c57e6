//! No secret in any log at `trace`: the real coordinator binary, the real
//! daemon (started at `trace` and set to `trace` again with
//! `crabboxctl log-level`) and the real helper (at `trace`) run a full egress
//! session — keep the lease, host egress, mint a client ticket, start the
//! helper, curl through it — and then every log is searched for the
//! coordinator token and for every bridge ticket, plain, base64 and
//! percent-encoded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crabbox_coordinator::testing::request_to;
use crabbox_tests::TestDaemon;
use crabbox_tests::bins::bin;
use crabbox_tests::egress::{Origin, curl_via};
use tokio::io::{AsyncBufReadExt, BufReader};

const LEASE: &str = "cbx_00000000e5ec";

fn b64(input: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// The spellings a secret can take in a log line.
fn spellings(secret: &str) -> Vec<String> {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut v = vec![secret.to_owned()];
    for s in [
        format!("Bearer {secret}"),
        format!(":{secret}"),
        secret.to_owned(),
    ] {
        v.push(b64(s.as_bytes(), STD, true));
        v.push(b64(s.as_bytes(), URL, false));
    }
    let pct: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    v.push(pct);
    // A trace of raw bytes: `[101, 103, …]` style dumps of the first bytes.
    v.push(format!("{:?}", &secret.as_bytes()[..8.min(secret.len())]));
    v
}

/// Every `egress_` + 32 hex (the ticket form) in `text`.
fn tickets_in(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("egress_") {
        let start = i + pos + "egress_".len();
        let hex = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        if hex >= 32 {
            out.push(text[start - 7..start + 32].to_owned());
        }
        i = start;
    }
    out
}

struct Coordinator {
    addr: std::net::SocketAddr,
    log: PathBuf,
    _child: tokio::process::Child,
}

async fn coordinator(dir: &Path, token: &str) -> Coordinator {
    let log = dir.join("coordinator.log");
    let child = tokio::process::Command::new(bin("crabbox-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(dir.join("coordinator.db"))
        .env_remove("CRABBOX_ADMIN_TOKEN")
        .env_remove("CRABBOX_SESSION_SECRET")
        .env("CRABBOX_SHARED_TOKEN", token)
        .env("CRABBOX_SHARED_OWNER", "secrets@example.com")
        .env("CRABBOX_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn crabbox-coordinator");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text
            .lines()
            .find(|l| l.contains("crabbox-coordinator listening"))
            .and_then(|l| l.split("listen=").nth(1))
        {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordinator never listened:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Coordinator {
        addr,
        log,
        _child: child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_ticket_in_any_log_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("tok-{}-secret", std::process::id() as u64 * 7919 + 424_242);
    let coord = coordinator(dir.path(), &token).await;
    let base = format!("http://{}", coord.addr);
    let (s, v) = request_to(
        coord.addr,
        "PUT",
        &format!("/v1/leases/{LEASE}/registration"),
        &token,
        &serde_json::json!({"provider": "ssh", "host": "127.0.0.1", "slug": "secrets",
            "ttlSeconds": 3600, "idleTimeoutSeconds": 1800}),
    )
    .await
    .unwrap();
    assert!(s == 201 || s == 200, "{s} {v}");

    let daemon = TestDaemon::builder()
        .coordinator(&base, &token)
        .env("CRABBOX_LOG", "trace")
        .start()
        .await;
    let out = daemon.ctl(&["log-level", "trace"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.keep_lease_fast(LEASE).await;

    let origin = Origin::start().await;
    let v = daemon
        .ctl_json(&[
            "egress",
            "host",
            "--id",
            LEASE,
            "--allow",
            &origin.addr.ip().to_string(),
            "--allow-private",
            "--json",
        ])
        .await;
    let session = v["session_id"].as_str().unwrap().to_owned();
    daemon
        .ctl_json_until(
            &["egress", "status", "--id", LEASE, "--json"],
            "the host bridge",
            Duration::from_secs(30),
            |v| v["coordinator"]["hostConnected"] == true,
        )
        .await;
    let ticket_file = daemon.home().join("client-ticket");
    let out = daemon
        .ctl(&[
            "egress",
            "ticket",
            "--id",
            LEASE,
            "--role",
            "client",
            "--out",
            ticket_file.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client_ticket = std::fs::read_to_string(&ticket_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        tickets_in(&client_ticket),
        vec![client_ticket.clone()],
        "ticket form"
    );

    // The helper at trace, its stderr captured whole.
    let helper_log = dir.path().join("helper.log");
    let mut helper = tokio::process::Command::new(bin("crabbox-egress-client"))
        .args([
            "--coordinator",
            &base,
            "--id",
            LEASE,
            "--session",
            &session,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--ticket-file")
        .arg(&ticket_file)
        .arg("--control")
        .arg(dir.path().join("helper.sock"))
        .env_remove("CRABBOX_EGRESS_TICKET")
        .env("CRABBOX_LOG", "trace")
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn crabbox-egress-client");
    let mut lines = BufReader::new(helper.stderr.take().unwrap()).lines();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let log_path = helper_log.clone();
    tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push_str(&line);
            all.push('\n');
            let _ = std::fs::write(&log_path, &all);
            let _ = tx.send(line);
        }
    });
    let listen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            if line.contains("listening")
                && let Some(rest) = line.split("listen=").nth(1)
            {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("helper exited before listening");
    })
    .await
    .expect("helper listens");
    let proxy = format!("http://{listen}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, body, err) = curl_via(&proxy, &origin.url("index.html")).await;
        if ok && body == origin.body {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "curl never succeeded: {err} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the last lines reach the files.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let logs = [
        ("coordinator", std::fs::read_to_string(&coord.log).unwrap()),
        ("daemon", daemon.stderr()),
        ("helper", std::fs::read_to_string(&helper_log).unwrap()),
    ];
    // The daemon's log really is at trace (else the test proves little).
    assert!(
        logs[1].1.contains("TRACE") || logs[1].1.contains("DEBUG"),
        "the daemon log is not verbose:\n{}",
        &logs[1].1[..logs[1].1.len().min(2000)]
    );
    let mut secrets = vec![
        ("coordinator token", token.clone()),
        ("client ticket", client_ticket),
    ];
    for (_, text) in &logs {
        for t in tickets_in(text) {
            secrets.push(("a bridge ticket", t));
        }
    }
    for (name, text) in &logs {
        for (what, secret) in &secrets {
            for spelling in spellings(secret) {
                if let Some(at) = text.find(&spelling) {
                    let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                    panic!(
                        "{what} appears in the {name} log as {spelling:?}:\n{}",
                        &text[line..end.min(line + 600)]
                    );
                }
            }
        }
    }
    let sizes: Vec<String> = logs
        .iter()
        .map(|(n, t)| format!("{n} {} lines", t.lines().count()))
        .collect();
    eprintln!(
        "searched {} for {} secrets",
        sizes.join(", "),
        secrets.len()
    );
    drop(helper);
}
