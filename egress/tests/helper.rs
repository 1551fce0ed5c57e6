//! The `crabbox-egress-client` binary as a process: loopback-only listen, ticket only in the upgrade header (never argv, URL or log), healing through a fresh ticket on the control socket, and exit 4 on replacement.

// The handshake callback signature is tungstenite's; its large error type is not ours to shrink.
#![allow(clippy::result_large_err)]

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crabbox_egress::memory::ws_config;
use crabbox_egress::{HostConfig, run_host};
use futures::SinkExt;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const BIN: &str = env!("CARGO_BIN_EXE_crabbox-egress-client");
const LEASE: &str = "cbx_0123456789ab";

struct Upgrade {
    uri: String,
    ticket: Option<String>,
    ws: WebSocketStream<TcpStream>,
}

/// A coordinator stand-in that accepts bridge upgrades and hands them to the test.
async fn fake_coordinator() -> (String, mpsc::UnboundedReceiver<Upgrade>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = Arc::new(Mutex::new((String::new(), None)));
            let record = seen.clone();
            let callback = move |req: &Request, resp: Response| {
                let ticket = req
                    .headers()
                    .get("x-crabbox-bridge-ticket")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                *record.lock().unwrap() = (req.uri().to_string(), ticket);
                Ok(resp)
            };
            if let Ok(ws) =
                tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(ws_config()))
                    .await
            {
                let (uri, ticket) = seen.lock().unwrap().clone();
                let _ = tx.send(Upgrade { uri, ticket, ws });
            }
        }
    });
    (url, rx)
}

async fn next_upgrade(rx: &mut mpsc::UnboundedReceiver<Upgrade>) -> Upgrade {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("helper did not connect")
        .unwrap()
}

#[tokio::test]
async fn refuses_non_loopback_listen_with_exit_2() {
    for listen in ["0.0.0.0:3128", ":3128", "192.168.1.10:3128"] {
        let out = tokio::process::Command::new(BIN)
            .args([
                "--coordinator",
                "http://127.0.0.1:9",
                "--id",
                LEASE,
                "--session",
                "egress_test_1",
                "--listen",
                listen,
            ])
            .env("CRABBOX_EGRESS_TICKET", "egress_x")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{listen}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("loopback"),
            "{listen}"
        );
    }
}

#[tokio::test]
async fn refuses_a_group_readable_ticket_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticket");
    std::fs::write(&file, "egress_secret").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args([
            "--coordinator",
            "http://127.0.0.1:9",
            "--id",
            LEASE,
            "--session",
            "egress_test_1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--ticket-file")
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

async fn control(path: &std::path::Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).await.unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_heals_and_never_exposes_the_ticket() {
    let tickets = [
        "egress_0123456789abcdef0123456789abcdef",
        "egress_fedcba9876543210fedcba9876543210",
        "egress_aaaabbbbccccddddeeeeffff00001111",
    ];
    let (url, mut upgrades) = fake_coordinator().await;
    let origin = echo_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--coordinator",
            &url,
            "--id",
            LEASE,
            "--session",
            "egress_test_1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--control")
        .arg(&ctl)
        .env("CRABBOX_EGRESS_TICKET", tickets[0])
        .env("CRABBOX_LOG", "debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push_str(&line);
            sink.lock().unwrap().push('\n');
            let _ = line_tx.send(line);
        }
    });
    // The helper logs its bound address (port 0 was requested).
    let listen = loop {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .unwrap()
            .expect("helper exited");
        if let Some(rest) = line.split(" listen=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<std::net::SocketAddr>()
                .unwrap();
        }
    };

    // First bridge: the ticket travels only in the dedicated header, the URL has no query.
    let up = next_upgrade(&mut upgrades).await;
    assert_eq!(up.uri, format!("/v1/leases/{LEASE}/egress/client"));
    assert_eq!(up.ticket.as_deref(), Some(tickets[0]));
    let host = tokio::spawn(run_host(up.ws, loopback_policy(), HostConfig::default()));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    for t in tickets {
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(t),
            "ticket in argv"
        );
    }
    // The coordinator side sees the upgrade before the helper has read the 101; wait for the helper.
    wait_until_async(|| async { control(&ctl, "status").await.contains("\"bridged\":true") }).await;
    let (mut s, head) = connect_via(listen, origin).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_roundtrip(&mut s, b"through the helper").await;
    wait_until_async(|| async {
        control(&ctl, "status")
            .await
            .contains("\"protocol_version\":2")
    })
    .await;

    // The host goes away: the listener stays, new connections get a fast 503.
    host.abort();
    let _ = host.await;
    wait_until_async(|| async { control(&ctl, "status").await.contains("\"bridged\":false") })
        .await;
    assert!(
        exchange_text(listen, &format!("CONNECT {origin} HTTP/1.1\r\n\r\n"))
            .await
            .starts_with("HTTP/1.1 503")
    );

    // The daemon supplies a fresh ticket over the 0600 control socket; the pair heals.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        control(&ctl, &format!("ticket {}", tickets[1])).await,
        "ok\n"
    );
    let up = next_upgrade(&mut upgrades).await;
    assert_eq!(up.ticket.as_deref(), Some(tickets[1]));
    let host = tokio::spawn(run_host(up.ws, loopback_policy(), HostConfig::default()));
    wait_until_async(|| async { control(&ctl, "status").await.contains("\"bridged\":true") }).await;
    let (mut s, head) = connect_via(listen, origin).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_roundtrip(&mut s, b"healed").await;
    host.abort();
    let _ = host.await;

    // A replacement close is terminal: exit 4.
    wait_until_async(|| async { control(&ctl, "status").await.contains("\"bridged\":false") })
        .await;
    assert_eq!(
        control(&ctl, &format!("ticket {}", tickets[2])).await,
        "ok\n"
    );
    let mut up = next_upgrade(&mut upgrades).await;
    let frame = CloseFrame {
        code: 1012.into(),
        reason: "replaced by a newer egress session".into(),
    };
    up.ws.send(Message::Close(Some(frame))).await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(4));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = log.lock().unwrap().clone();
    assert!(log.contains("host=127.0.0.1"), "logs name hostnames: {log}");
    for t in tickets {
        assert!(!log.contains(t), "ticket leaked into the log");
    }
}

async fn wait_until_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
