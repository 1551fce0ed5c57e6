//! `proxy::local::serve`: one proxy connection over an in-memory duplex or a TCP pair, answered with the host side's policy and dialer (no bridge).

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crabbox_egress::proxy::{LocalConfig, LocalProxy, serve};
use crabbox_egress::{Policy, SessionStats};
use support::{WAIT, echo_origin, http_origin, loopback_policy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};

fn proxy_with(policy: Arc<Policy>, tweak: impl FnOnce(&mut LocalConfig)) -> Arc<LocalProxy> {
    let mut cfg = LocalConfig::default();
    tweak(&mut cfg);
    Arc::new(LocalProxy::new(policy, cfg))
}

/// One connection served on a fresh in-memory duplex; returns the browser's end.
fn duplex_conn(proxy: &Arc<LocalProxy>) -> DuplexStream {
    let (browser, served) = tokio::io::duplex(64 * 1024);
    let proxy = proxy.clone();
    tokio::spawn(async move { serve(served, &proxy).await });
    browser
}

async fn read_all<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("connection closed in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

async fn connect_echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, dest: std::net::SocketAddr) {
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(s).await;
    assert_eq!(head.as_bytes(), crabbox_egress::proxy::CONNECT_OK);
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut got = [0u8; 20];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping over the tunnel");
}

#[tokio::test]
async fn connect_allowed_tunnels_and_counts() {
    let echo = echo_origin().await;
    let stats = Arc::new(SessionStats::new());
    let proxy = proxy_with(loopback_policy(), |c| c.stats = stats.clone());
    let mut browser = duplex_conn(&proxy);
    connect_echo(&mut browser, echo).await;
    let snap = stats.snapshot();
    assert_eq!(snap.active_streams, 1);
    assert_eq!(snap.total_streams, 1);
    assert!(snap.bytes_out >= 20 && snap.bytes_in >= 20, "{snap:?}");
    assert_eq!(snap.recent_hosts[0].host, "127.0.0.1");
    drop(browser);
    support::wait_until(|| stats.snapshot().active_streams == 0).await;
}

#[tokio::test]
async fn connect_over_a_tcp_pair() {
    let echo = echo_origin().await;
    let proxy = proxy_with(loopback_policy(), |_| {});
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = proxy.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let p = p.clone();
            tokio::spawn(async move { serve(sock, &p).await });
        }
    });
    let mut browser = TcpStream::connect(addr).await.unwrap();
    connect_echo(&mut browser, echo).await;
    // Half-close: the origin echoes to EOF, then closes; the browser sees EOF.
    browser.shutdown().await.unwrap();
    let rest = read_all(&mut browser).await;
    assert_eq!(rest, "");
}

#[tokio::test]
async fn host_outside_the_allowlist_gets_403_naming_it() {
    let echo = echo_origin().await;
    let stats = Arc::new(SessionStats::new());
    let proxy = proxy_with(
        Arc::new(Policy::builder().allow(["example.com"]).build().unwrap()),
        |c| {
            c.stats = stats.clone();
            c.allow_hint = "allow it with `--allow {host}`".into();
        },
    );
    let mut browser = duplex_conn(&proxy);
    browser
        .write_all(b"CONNECT blocked.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let resp = read_all(&mut browser).await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(
        resp.contains("blocked.example is not on this egress session's allowlist")
            && resp.contains("`--allow blocked.example`"),
        "{resp}"
    );
    // An IP literal that is not listed is refused the same way.
    let mut browser = duplex_conn(&proxy);
    browser
        .write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_all(&mut browser).await.starts_with("HTTP/1.1 403 "));
    let snap = stats.snapshot();
    assert_eq!((snap.rejected_streams, snap.total_streams), (2, 0));
}

#[tokio::test]
async fn absolute_form_get_is_forwarded_once_with_connection_close() {
    let (origin, count) = http_origin("local").await;
    let proxy = proxy_with(loopback_policy(), |_| {});
    let mut browser = duplex_conn(&proxy);
    browser
        .write_all(
            format!(
                "GET http://{origin}/some/path?q=1 HTTP/1.1\r\nHost: {origin}\r\nProxy-Connection: keep-alive\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let resp = read_all(&mut browser).await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("Connection: close\r\n"), "{resp}");
    assert!(
        resp.ends_with("origin=local path=/some/path?q=1\n"),
        "{resp}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn head_too_large_slow_and_malformed_heads() {
    let proxy = proxy_with(loopback_policy(), |c| {
        c.max_head_bytes = 1024;
        c.head_timeout = Duration::from_millis(300);
    });
    let mut big = duplex_conn(&proxy);
    let _ = big
        .write_all(
            format!(
                "GET http://a/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "x".repeat(4096)
            )
            .as_bytes(),
        )
        .await;
    assert!(read_all(&mut big).await.starts_with("HTTP/1.1 431 "));
    let mut slow = duplex_conn(&proxy);
    slow.write_all(b"GET http://a/ HTTP/1.1\r\n").await.unwrap();
    assert!(read_all(&mut slow).await.starts_with("HTTP/1.1 408 "));
    let mut bad = duplex_conn(&proxy);
    bad.write_all(b"CONNECT nohostport HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_all(&mut bad).await.as_bytes(),
        crabbox_egress::proxy::BAD_REQUEST
    );
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let echo = echo_origin().await;
    let stats = Arc::new(SessionStats::new());
    let proxy = proxy_with(loopback_policy(), |c| {
        c.first_byte_timeout = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(500);
        c.stats = stats.clone();
    });
    // Nothing sent: closed silently after the first-byte deadline.
    let mut silent = duplex_conn(&proxy);
    assert_eq!(read_all(&mut silent).await, "");
    // An open tunnel with no bytes either way ends after the idle timeout.
    let mut tunnel = duplex_conn(&proxy);
    connect_echo(&mut tunnel, echo).await;
    let quiet = Instant::now();
    assert_eq!(read_all(&mut tunnel).await, "");
    assert!(
        quiet.elapsed() >= Duration::from_millis(400),
        "{:?}",
        quiet.elapsed()
    );
    support::wait_until(|| stats.snapshot().active_streams == 0).await;
}

/// A forwarded (plain `http://`) request whose destination accepts and never
/// answers is closed after the idle timeout, and its socket is given back.
#[tokio::test]
async fn a_forwarded_request_to_a_silent_destination_ends_after_the_idle_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            kept.push(sock);
        }
    });
    let stats = Arc::new(SessionStats::new());
    let proxy = proxy_with(loopback_policy(), |c| {
        c.idle_timeout = Duration::from_millis(500);
        c.stats = stats.clone();
    });
    let mut browser = duplex_conn(&proxy);
    browser
        .write_all(format!("GET http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let asked = Instant::now();
    assert_eq!(read_all(&mut browser).await, "");
    assert!(
        asked.elapsed() >= Duration::from_millis(400),
        "{:?}",
        asked.elapsed()
    );
    support::wait_until(|| stats.snapshot().active_streams == 0).await;
    held.abort();
}

#[tokio::test]
async fn streams_beyond_the_cap_get_503_and_heads_hold_no_slot() {
    let echo = echo_origin().await;
    let proxy = proxy_with(loopback_policy(), |c| c.max_streams = 1);
    // A connection that has not finished its head holds no stream slot.
    let mut half = duplex_conn(&proxy);
    half.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut first = duplex_conn(&proxy);
    connect_echo(&mut first, echo).await;
    let mut second = duplex_conn(&proxy);
    second
        .write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_all(&mut second).await;
    assert!(
        resp.starts_with("HTTP/1.1 503 ") && resp.contains("too many concurrent connections"),
        "{resp}"
    );
}

#[tokio::test]
async fn the_socket_budget_is_shared_and_refuses_with_503() {
    let echo = echo_origin().await;
    let budget = Arc::new(tokio::sync::Semaphore::new(1));
    let proxy = proxy_with(loopback_policy(), |c| {
        c.socket_budget = Some(budget.clone())
    });
    let mut first = duplex_conn(&proxy);
    connect_echo(&mut first, echo).await;
    assert_eq!(budget.available_permits(), 0);
    let mut second = duplex_conn(&proxy);
    second
        .write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_all(&mut second).await;
    assert!(
        resp.starts_with("HTTP/1.1 503 ") && resp.contains("destination sockets"),
        "{resp}"
    );
    drop(first);
    support::wait_until(|| budget.available_permits() == 1).await;
}

#[tokio::test]
async fn an_upload_into_a_destination_that_never_reads_is_closed_after_the_stall_deadline() {
    // A destination that accepts and never reads: its socket buffers fill.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = sink.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = sink.accept().await {
            kept.push(s);
        }
    });
    let echo = echo_origin().await;
    let stats = Arc::new(SessionStats::new());
    let proxy = proxy_with(loopback_policy(), |c| {
        c.stall = Some(Duration::from_millis(300));
        // Far beyond the test: only the stall deadline can close the stream.
        c.idle_timeout = Duration::from_secs(600);
        c.stats = stats.clone();
    });
    let mut upload = duplex_conn(&proxy);
    upload
        .write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        read_head(&mut upload).await.as_bytes(),
        crabbox_egress::proxy::CONNECT_OK
    );
    let (mut down, mut up) = tokio::io::split(upload);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0u64;
        // Bounded, so a broken deadline cannot make the test write forever.
        while sent < 1 << 30 {
            if up.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        sent
    });
    // While the upload is stalled another connection still tunnels.
    let mut other = duplex_conn(&proxy);
    connect_echo(&mut other, echo).await;
    // The stalled stream is closed: the browser sees EOF well within WAIT.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, down.read_to_end(&mut rest))
        .await
        .expect("the stalled upload was closed")
        .unwrap();
    let sent = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the upload's writer ended")
        .unwrap();
    assert!(sent < 1 << 30, "the writer never blocked ({sent} bytes)");
    support::wait_until(|| stats.snapshot().active_streams <= 1).await;
    held.abort();
}
