//! v1 interop: a JSON-only peer written from the reference spec drives our client end, and another drives our host end; covers the §7.2 agent rows.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crabbox_egress::memory::MemoryRelay;
use crabbox_egress::proxy::{BAD_GATEWAY, CONNECT_OK};
use crabbox_egress::{BridgeConfig, ClientConfig, HostConfig, ProxyServer, Role, SessionStats};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Our client end attached to a relay whose host end is a JSON-only fake.
async fn client_with_fake_host(bridge: BridgeConfig) -> (JsonPeer, SocketAddr, Arc<ProxyServer>) {
    let relay = MemoryRelay::new();
    let fake = JsonPeer::join(&relay, Role::Host).await;
    let (proxy, addr) = start_proxy(ClientConfig {
        bridge,
        ..ClientConfig::default()
    })
    .await;
    attach(&proxy, relay.connect(Role::Client).await);
    wait_until(|| relay.is_connected(Role::Client)).await;
    wait_until(|| proxy.is_bridged()).await;
    (fake, addr, proxy)
}

async fn send_connect(proxy: SocketAddr, dest: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn small_buffer_connect(proxy: SocketAddr, dest: &str) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn accept_open(fake: &mut JsonPeer) -> String {
    let open = fake.recv_kind("open", None).await;
    let id = open["id"].as_str().unwrap().to_owned();
    fake.send(json!({"type": "open_ok", "id": id})).await;
    id
}

#[tokio::test]
async fn open_frame_has_string_port_lowercase_host_and_unique_ids() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let _a = send_connect(proxy, "Discord.COM:443").await;
    let first = fake.recv_kind("open", None).await;
    assert_eq!(first["host"], "discord.com");
    assert_eq!(first["port"], json!("443"), "port must be a JSON string");
    assert!(
        first.get("body").is_none() && first.get("error").is_none(),
        "empty fields are omitted"
    );
    let _b = send_connect(proxy, "discord.com:443").await;
    let second = fake.recv_kind("open", None).await;
    assert_ne!(first["id"], second["id"]);
}

#[tokio::test]
async fn server_first_banner_never_precedes_the_200() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let mut browser = send_connect(proxy, "127.0.0.1:22").await;
    let open = fake.recv_kind("open", None).await;
    let id = open["id"].as_str().unwrap().to_owned();
    // open_ok and the banner back to back, as an SSH server would.
    fake.send(json!({"type": "open_ok", "id": id})).await;
    fake.send_data(&id, b"SSH-2.0-test\r\n").await;
    let mut want = CONNECT_OK.to_vec();
    want.extend_from_slice(b"SSH-2.0-test\r\n");
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, browser.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, want);
}

#[tokio::test]
async fn failed_open_gets_the_exact_502_and_a_policy_refusal_a_403() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let mut browser = send_connect(proxy, "evil.example:443").await;
    let open = fake.recv_kind("open", None).await;
    fake.send(json!({"type": "error", "id": open["id"], "error": "dial allowed destination: connection refused"}))
        .await;
    assert_eq!(read_to_end(&mut browser).await, BAD_GATEWAY);
    // "host not allowed" is what every host (the reference's too) says for a policy refusal.
    let mut browser = send_connect(proxy, "evil.example:443").await;
    let open = fake.recv_kind("open", None).await;
    fake.send(json!({"type": "error", "id": open["id"], "error": "host not allowed"}))
        .await;
    let resp = String::from_utf8(read_to_end(&mut browser).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(
        resp.contains("evil.example is not on") && resp.contains("--allow evil.example"),
        "{resp}"
    );
}

#[tokio::test]
async fn close_is_applied_after_queued_data() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let mut browser = send_connect(proxy, "127.0.0.1:80").await;
    let id = accept_open(&mut fake).await;
    for part in [&b"one "[..], b"two ", b"three"] {
        fake.send_data(&id, part).await;
    }
    fake.send(json!({"type": "close", "id": id})).await;
    let mut want = CONNECT_OK.to_vec();
    want.extend_from_slice(b"one two three");
    assert_eq!(read_to_end(&mut browser).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_local_socket_does_not_block_other_streams() {
    let mut cfg = BridgeConfig::client();
    cfg.v1_queue_cap = 64 << 20; // big enough that the stalled stream is not closed
    let (mut fake, proxy, _p) = client_with_fake_host(cfg).await;
    let _stalled = small_buffer_connect(proxy, "127.0.0.1:1").await;
    let a = accept_open(&mut fake).await;
    let mut other = send_connect(proxy, "127.0.0.1:2").await;
    let b = accept_open(&mut fake).await;
    assert!(read_head(&mut other).await.starts_with("HTTP/1.1 200"));
    // 16 MiB towards a socket nobody reads: far beyond the kernel buffers.
    let chunk = vec![7u8; 32 * 1024];
    for _ in 0..512 {
        fake.send_data(&a, &chunk).await;
    }
    fake.send_data(&b, b"still flowing").await;
    let mut got = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), other.read_exact(&mut got))
        .await
        .expect("other stream was blocked")
        .unwrap();
    assert_eq!(&got, b"still flowing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_queue_closes_only_that_stream() {
    // v1 backpressure: the bridge reader waits for the full queue, then closes
    // just that stream after the stall timeout; the others carry on.
    let mut cfg = BridgeConfig::client();
    cfg.v1_stall_timeout = Duration::from_secs(1);
    let (mut fake, proxy, _p) = client_with_fake_host(cfg).await;
    let _stalled = small_buffer_connect(proxy, "127.0.0.1:1").await;
    let a = accept_open(&mut fake).await;
    let mut other = send_connect(proxy, "127.0.0.1:2").await;
    let b = accept_open(&mut fake).await;
    assert!(read_head(&mut other).await.starts_with("HTTP/1.1 200"));
    let chunk = vec![7u8; 32 * 1024];
    for _ in 0..512 {
        fake.send_data(&a, &chunk).await;
    }
    let closed = fake.recv_kind("close", None).await;
    assert_eq!(
        closed["id"],
        a.as_str(),
        "only the overflowing stream is closed"
    );
    fake.send_data(&b, b"pong").await;
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, other.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"pong");
    other.write_all(b"up").await.unwrap();
    let data = fake.recv_kind("data", Some(&b)).await;
    assert_eq!(JsonPeer::decode_body(&data), b"up");
}

#[tokio::test]
async fn handshake_write_failure_closes_the_destination() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let browser = send_connect(proxy, "127.0.0.1:443").await;
    let open = fake.recv_kind("open", None).await;
    let id = open["id"].as_str().unwrap().to_owned();
    // The browser vanishes with a reset before the 200 can be written.
    browser.set_zero_linger().unwrap();
    drop(browser);
    fake.send(json!({"type": "open_ok", "id": id})).await;
    let closed = fake.recv_kind("close", Some(&id)).await;
    assert_eq!(closed["id"], id.as_str());
}

#[tokio::test]
async fn late_open_ok_after_timeout_gets_close() {
    let mut cfg = BridgeConfig::client();
    cfg.open_timeout = Duration::from_millis(300);
    cfg.unpaired_open_timeout = Duration::from_millis(300);
    let (mut fake, proxy, _p) = client_with_fake_host(cfg).await;
    let mut browser = send_connect(proxy, "slow.example:443").await;
    let open = fake.recv_kind("open", None).await;
    let id = open["id"].as_str().unwrap().to_owned();
    assert_eq!(read_to_end(&mut browser).await, BAD_GATEWAY);
    // The abandoned open is released right away…
    fake.recv_kind("close", Some(&id)).await;
    // …and a late open_ok is answered with close again, so the host never leaks the connection.
    fake.send(json!({"type": "open_ok", "id": id})).await;
    fake.recv_kind("close", Some(&id)).await;
}

#[tokio::test]
async fn absolute_form_body_streams_in_bounded_frames() {
    let (mut fake, proxy, _p) = client_with_fake_host(BridgeConfig::client()).await;
    let mut browser = TcpStream::connect(proxy).await.unwrap();
    let body = vec![b'b'; 200 * 1024];
    let head = format!(
        "POST http://upload.example/u?x=1 HTTP/1.1\r\nHost: upload.example\r\nProxy-Connection: keep-alive\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    browser.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        browser.write_all(&body).await.unwrap();
        browser
    });
    let open = fake.recv_kind("open", None).await;
    assert_eq!(
        (open["host"].as_str(), open["port"].as_str()),
        (Some("upload.example"), Some("80"))
    );
    let id = open["id"].as_str().unwrap().to_owned();
    fake.send(json!({"type": "open_ok", "id": id})).await;
    let mut got = Vec::new();
    let want_len = 200 * 1024;
    while !got.windows(4).any(|w| w == b"\r\n\r\n")
        || got.len() < got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + want_len
    {
        let frame = fake.recv_kind("data", Some(&id)).await;
        let bytes = JsonPeer::decode_body(&frame);
        assert!(
            bytes.len() <= 32 * 1024,
            "a data frame carried {} bytes",
            bytes.len()
        );
        got.extend_from_slice(&bytes);
    }
    let text = String::from_utf8_lossy(&got[..120]).to_string();
    assert!(
        text.starts_with("POST /u?x=1 HTTP/1.1\r\nHost: upload.example\r\n"),
        "{text}"
    );
    assert!(
        !String::from_utf8_lossy(&got)
            .to_ascii_lowercase()
            .contains("proxy-connection")
    );
    fake.send_data(&id, b"HTTP/1.1 204 No Content\r\n\r\n")
        .await;
    fake.send(json!({"type": "close", "id": id})).await;
    let mut browser = writer.await.unwrap();
    let resp = String::from_utf8(read_to_end(&mut browser).await).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 204 No Content\r\n") && resp.contains("Connection: close"),
        "{resp}"
    );
}

// === host end driven by a JSON-only client ===

async fn host_with_fake_client() -> (JsonPeer, Arc<SessionStats>) {
    host_with_fake_client_cfg(BridgeConfig::host()).await
}

async fn host_with_fake_client_cfg(bridge: BridgeConfig) -> (JsonPeer, Arc<SessionStats>) {
    let relay = MemoryRelay::new();
    let stats = Arc::new(SessionStats::new());
    let cfg = HostConfig {
        bridge,
        stats: stats.clone(),
        ..HostConfig::default()
    };
    spawn_host_with(&relay, loopback_policy(), cfg).await;
    let fake = JsonPeer::join(&relay, Role::Client).await;
    wait_until(|| relay.is_connected(Role::Host) && relay.is_connected(Role::Client)).await;
    (fake, stats)
}

#[tokio::test]
async fn host_opens_relays_and_closes() {
    let origin = echo_origin().await;
    let (mut fake, stats) = host_with_fake_client().await;
    fake.send(json!({"type": "open", "id": "conn_1", "host": "127.0.0.1", "port": origin.port().to_string()})).await;
    let ok = fake.recv().await;
    assert_eq!(ok, json!({"type": "open_ok", "id": "conn_1"}));
    fake.send_data("conn_1", b"hello").await;
    let echoed = fake.recv_kind("data", Some("conn_1")).await;
    assert_eq!(JsonPeer::decode_body(&echoed), b"hello");
    fake.send(json!({"type": "close", "id": "conn_1"})).await;
    wait_until(|| stats.snapshot().active_streams == 0).await;
    let snap = stats.snapshot();
    assert_eq!(snap.protocol_version, 1);
    assert_eq!(snap.recent_hosts[0].host, "127.0.0.1");
    assert_eq!((snap.bytes_in, snap.bytes_out), (5, 5));
}

#[tokio::test]
async fn host_refuses_unlisted_and_private_destinations() {
    let origin = echo_origin().await;
    let (mut fake, stats) = host_with_fake_client().await;
    for (id, host) in [
        ("c1", "example.com"),
        ("c2", "127.0.0.2"),
        ("c3", "localhost"),
    ] {
        fake.send(
            json!({"type": "open", "id": id, "host": host, "port": origin.port().to_string()}),
        )
        .await;
        let err = fake.recv_kind("error", Some(id)).await;
        assert_eq!(err["error"], "host not allowed", "{host}");
    }
    fake.send(json!({"type": "open", "id": "c4", "host": "127.0.0.1", "port": "0"}))
        .await;
    assert_eq!(
        fake.recv_kind("error", Some("c4")).await["error"],
        "invalid destination port"
    );
    assert_eq!(stats.snapshot().rejected_streams, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_slow_destination_does_not_block_other_streams() {
    let stalled = stalled_origin().await;
    let echo = echo_origin().await;
    let mut bridge = BridgeConfig::host();
    bridge.v1_queue_cap = 64 << 20; // the stalled stream must stay open, just stalled
    let (mut fake, _stats) = host_with_fake_client_cfg(bridge).await;
    fake.send(json!({"type": "open", "id": "slow", "host": "127.0.0.1", "port": stalled.port().to_string()})).await;
    fake.recv_kind("open_ok", Some("slow")).await;
    fake.send(
        json!({"type": "open", "id": "fast", "host": "127.0.0.1", "port": echo.port().to_string()}),
    )
    .await;
    fake.recv_kind("open_ok", Some("fast")).await;
    // 16 MiB towards a destination that never reads: far over the socket buffers.
    let chunk = vec![1u8; 32 * 1024];
    for _ in 0..512 {
        fake.send_data("slow", &chunk).await;
    }
    fake.send_data("fast", b"ping").await;
    let echoed = tokio::time::timeout(Duration::from_secs(5), fake.recv_kind("data", Some("fast")))
        .await
        .expect("fast stream was blocked");
    assert_eq!(JsonPeer::decode_body(&echoed), b"ping");
}

#[tokio::test]
async fn host_limits_concurrent_v1_streams() {
    let origin = echo_origin().await;
    let mut bridge = BridgeConfig::host();
    bridge.max_streams = 2;
    let (mut fake, _stats) = host_with_fake_client_cfg(bridge).await;
    for id in ["a", "b"] {
        fake.send(json!({"type": "open", "id": id, "host": "127.0.0.1", "port": origin.port().to_string()})).await;
        fake.recv_kind("open_ok", Some(id)).await;
    }
    fake.send(
        json!({"type": "open", "id": "c", "host": "127.0.0.1", "port": origin.port().to_string()}),
    )
    .await;
    assert_eq!(
        fake.recv_kind("error", Some("c")).await["error"],
        "too many streams"
    );
    // Closing one frees a slot.
    fake.send(json!({"type": "close", "id": "a"})).await;
    fake.send(
        json!({"type": "open", "id": "d", "host": "127.0.0.1", "port": origin.port().to_string()}),
    )
    .await;
    fake.recv_kind("open_ok", Some("d")).await;
}
