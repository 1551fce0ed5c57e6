//! Real `curl` through our proxy, paired in-process to our host end: CONNECT to a TLS origin with a test CA, plain HTTP absolute-form, two hosts in one curl run, and pipelined requests that must not leak to the first destination.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn have_curl() -> bool {
    let ok = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: curl is not installed (apt-get install -y curl)");
    }
    ok
}

async fn curl(proxy: SocketAddr, extra: &[&str], urls: &[String]) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "--proxy",
            &format!("http://{proxy}"),
        ])
        .args(extra)
        .args(urls)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A TLS origin on 127.0.0.1 whose certificate is issued by a fresh test CA; returns the CA's PEM.
async fn tls_origin() -> (SocketAddr, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "crabbox egress test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 2048];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = "hello over tls\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca_cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_connect_to_a_tls_origin_v1_and_v2() {
    if !have_curl() {
        return;
    }
    let (origin, ca_pem) = tls_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    for v2 in [true, false] {
        let p = pair(v2, v2, false).await;
        if v2 {
            wait_until(|| p.proxy.stats().protocol_version() == 2).await;
        }
        let ca = ca_path.to_str().unwrap();
        let body = curl(
            p.proxy_addr,
            &["--cacert", ca],
            &[format!("https://127.0.0.1:{}/secure", origin.port())],
        )
        .await;
        assert_eq!(body, "hello over tls\n", "v2={v2}");
        assert_eq!(p.proxy.stats().protocol_version(), if v2 { 2 } else { 1 });
    }
    assert!(Path::new(&ca_path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_plain_http_absolute_form_and_two_hosts() {
    if !have_curl() {
        return;
    }
    for v2 in [true, false] {
        let p = pair(v2, v2, false).await;
        let (a, a_count) = http_origin("a").await;
        let (b, b_count) = http_origin("b").await;
        let one = curl(
            p.proxy_addr,
            &[],
            &[format!("http://127.0.0.1:{}/first?x=1", a.port())],
        )
        .await;
        assert_eq!(one, "origin=a path=/first?x=1\n");
        // Two different destinations in one curl run (curl reuses the proxy connection when it may).
        let both = curl(
            p.proxy_addr,
            &[],
            &[
                format!("http://127.0.0.1:{}/one", a.port()),
                format!("http://127.0.0.1:{}/two", b.port()),
            ],
        )
        .await;
        assert_eq!(both, "origin=a path=/one\norigin=b path=/two\n", "v2={v2}");
        assert_eq!(a_count.load(Ordering::SeqCst), 2);
        assert_eq!(b_count.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn pipelined_requests_never_tunnel_to_the_first_destination() {
    let p = pair(true, true, false).await;
    let (a, a_count) = http_origin("a").await;
    let (b, b_count) = http_origin("b").await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let reqs = format!(
        "GET http://127.0.0.1:{}/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET http://127.0.0.1:{}/2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        a.port(),
        b.port()
    );
    s.write_all(reqs.as_bytes()).await.unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    // One answer, marked Connection: close; the second request is not sent to origin a.
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("Connection: close\r\n"), "{resp}");
    assert!(resp.ends_with("origin=a path=/1\n"), "{resp}");
    assert_eq!(a_count.load(Ordering::SeqCst), 1);
    assert_eq!(b_count.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn request_head_timeout_and_size_cap() {
    let mut cfg = crabbox_egress::ClientConfig {
        max_head_bytes: 1024,
        ..Default::default()
    };
    cfg.head_timeout = std::time::Duration::from_millis(200);
    let (_proxy, addr) = start_proxy(cfg).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET http://a/ HTTP/1.1\r\n").await.unwrap();
    assert!(
        String::from_utf8(read_to_end(&mut slow).await)
            .unwrap()
            .starts_with("HTTP/1.1 408 ")
    );
    let mut big = TcpStream::connect(addr).await.unwrap();
    let _ = big
        .write_all(
            format!(
                "GET http://a/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "x".repeat(4096)
            )
            .as_bytes(),
        )
        .await;
    assert!(
        String::from_utf8(read_to_end(&mut big).await)
            .unwrap()
            .starts_with("HTTP/1.1 431 ")
    );
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(b"CONNECT nohostport HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_to_end(&mut bad).await,
        crabbox_egress::proxy::BAD_REQUEST
    );
}

#[tokio::test]
async fn connection_limit_counts_only_complete_heads() {
    let cfg = crabbox_egress::ClientConfig {
        max_connections: 1,
        ..Default::default()
    };
    let (_proxy, addr) = start_proxy(cfg).await;
    // Idle connections (nothing sent, or half a head) hold no slot.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET http://a/ HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // A complete request still gets through to the bridge check (no bridge here: 503 naming that).
    let mut real = TcpStream::connect(addr).await.unwrap();
    real.write_all(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8(read_to_end(&mut real).await).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 503 ") && resp.contains("not connected"),
        "{resp}"
    );
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_first_byte_deadline() {
    let cfg = crabbox_egress::ClientConfig {
        first_byte_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let (_proxy, addr) = start_proxy(cfg).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let got = read_to_end(&mut silent).await;
    assert!(
        got.is_empty(),
        "a silent connection is closed without an answer"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
