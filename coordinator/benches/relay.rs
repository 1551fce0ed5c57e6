//! Relay and heartbeat benchmark (not a test): egress relay throughput and
//! round trip through a paired session versus a naive tokio-tungstenite
//! relay in the same run, and heartbeat latency over HTTP and the control socket.
//!
//! Run: `cargo bench -p crabbox-coordinator --bench relay` (prints a Markdown table).
#![allow(missing_docs)]

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const FRAME: usize = 32 * 1024;
const TOTAL: usize = 256 * 1024 * 1024;
const RTT_ROUNDS: usize = 2000;
const HB_ROUNDS: usize = 2000;

fn cfg() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

async fn connect(url: &str, headers: &[(&str, String)]) -> Ws {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    tokio_tungstenite::connect_async_with_config(req, Some(cfg()), true)
        .await
        .unwrap()
        .0
}

/// A naive relay: accept two sockets, forward every message each way.
async fn naive_relay() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let accept = |s: TcpStream| async move {
            s.set_nodelay(true).unwrap();
            tokio_tungstenite::accept_async_with_config(s, Some(cfg()))
                .await
                .unwrap()
        };
        let a = accept(listener.accept().await.unwrap().0).await;
        let b = accept(listener.accept().await.unwrap().0).await;
        let (mut aw, mut ar) = a.split();
        let (mut bw, mut br) = b.split();
        tokio::spawn(async move {
            while let Some(Ok(m)) = ar.next().await {
                if m.is_close() || bw.send(m).await.is_err() {
                    break;
                }
            }
        });
        while let Some(Ok(m)) = br.next().await {
            if m.is_close() || aw.send(m).await.is_err() {
                break;
            }
        }
    });
    format!("ws://{addr}/")
}

/// MiB/s of `TOTAL` bytes in `FRAME`-sized binary frames from `tx` to `rx`.
async fn throughput(tx: &mut Ws, rx: &mut Ws) -> f64 {
    let frame = bytes_frame();
    let n = TOTAL / FRAME;
    let start = Instant::now();
    let send = async {
        for _ in 0..n {
            tx.feed(Message::Binary(frame.clone())).await.unwrap();
        }
        tx.flush().await.unwrap();
    };
    let recv = async {
        let mut got = 0;
        while got < TOTAL {
            match rx.next().await.unwrap().unwrap() {
                Message::Binary(b) => got += b.len(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("{other:?}"),
            }
        }
    };
    tokio::join!(send, recv);
    TOTAL as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

fn bytes_frame() -> tokio_tungstenite::tungstenite::Bytes {
    (0..FRAME).map(|i| i as u8).collect::<Vec<u8>>().into()
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// 64-byte round trips: `a` sends, `b` echoes.
async fn rtt(a: &mut Ws, b: &mut Ws) -> Vec<Duration> {
    let payload = tokio_tungstenite::tungstenite::Bytes::from(vec![42u8; 64]);
    let mut out = Vec::with_capacity(RTT_ROUNDS);
    for _ in 0..RTT_ROUNDS {
        let t = Instant::now();
        a.send(Message::Binary(payload.clone())).await.unwrap();
        let m = loop {
            match b.next().await.unwrap().unwrap() {
                m @ Message::Binary(_) => break m,
                _ => continue,
            }
        };
        b.send(m).await.unwrap();
        loop {
            if let Message::Binary(_) = a.next().await.unwrap().unwrap() {
                break;
            }
        }
        out.push(t.elapsed());
    }
    out
}

async fn post(http: &reqwest::Client, url: String, token: &str, body: Value) -> Value {
    http.post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let coord = TestCoordinator::start().await;
        let http = reqwest::Client::new();
        let t = coord.user_token("bench@example.com", "acme", "bench");
        let lease = "cbx_00000000be00";
        let url = |p: &str| format!("{}{}", coord.base_url, p);
        let put = http
            .put(url(&format!("/v1/leases/{lease}/registration")))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(json!({"host":"127.0.0.1","ttlSeconds":86400,"idleTimeoutSeconds":86400}).to_string())
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success());
        let h = post(&http, url(&format!("/v1/leases/{lease}/egress/ticket")), &t, json!({"role":"host"})).await;
        let sid = h["sessionID"].as_str().unwrap().to_owned();
        let c = post(&http, url(&format!("/v1/leases/{lease}/egress/ticket")), &t, json!({"role":"client","sessionID":sid})).await;
        let bridge = |role: &str, tk: &Value| {
            let url = coord.ws_url(&format!("/v1/leases/{lease}/egress/{role}"));
            let tk = tk["ticket"].as_str().unwrap().to_owned();
            async move { connect(&url, &[("x-crabbox-bridge-ticket", tk)]).await }
        };
        let mut host = bridge("host", &h).await;
        let mut client = bridge("client", &c).await;
        tokio::time::sleep(Duration::from_millis(100)).await; // both ends registered

        let naive_url = naive_relay().await;
        let mut na = connect(&naive_url, &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await; // accept order: a first
        let mut nb = connect(&naive_url, &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        // Warm up both, then alternate measurements so background load hits both alike.
        throughput(&mut host, &mut client).await;
        throughput(&mut na, &mut nb).await;
        let mut ours = Vec::new();
        let mut naive = Vec::new();
        for _ in 0..3 {
            ours.push(throughput(&mut host, &mut client).await);
            naive.push(throughput(&mut na, &mut nb).await);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (ours_tp, naive_tp) = (med(ours), med(naive));
        let ours_rtt = rtt(&mut host, &mut client).await;
        let naive_rtt = rtt(&mut na, &mut nb).await;

        // Heartbeats: HTTP, then the control socket.
        let mut hb_http = Vec::with_capacity(HB_ROUNDS);
        for _ in 0..HB_ROUNDS {
            let s = Instant::now();
            let r = http.post(url(&format!("/v1/leases/{lease}/heartbeat"))).bearer_auth(&t).send().await.unwrap();
            assert!(r.status().is_success());
            let _ = r.bytes().await.unwrap();
            hb_http.push(s.elapsed());
        }
        let mut ctl = connect(&coord.ws_url("/v1/control"), &[("authorization", format!("Bearer {t}"))]).await;
        let _hello = ctl.next().await;
        let mut hb_ws = Vec::with_capacity(HB_ROUNDS);
        let frame = json!({"type":"heartbeat","leaseID":lease}).to_string();
        for _ in 0..HB_ROUNDS {
            let s = Instant::now();
            ctl.send(Message::Text(frame.clone().into())).await.unwrap();
            loop {
                if let Message::Text(t) = ctl.next().await.unwrap().unwrap() {
                    assert!(t.as_str().contains("\"ok\":true"));
                    break;
                }
            }
            hb_ws.push(s.elapsed());
        }

        println!("| measurement | crabbox-coordinator | naive tokio-tungstenite relay | ratio |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| relay throughput, 32 KiB binary frames, {} MiB (median of 3) | {:.0} MiB/s | {:.0} MiB/s | {:.2}× |",
            TOTAL >> 20,
            ours_tp,
            naive_tp,
            ours_tp / naive_tp
        );
        println!(
            "| 64-byte round trip p50 / p99 ({RTT_ROUNDS} rounds) | {:.3} / {:.3} ms | {:.3} / {:.3} ms | {:.2}× (p50) |",
            pct(ours_rtt.clone(), 0.5),
            pct(ours_rtt.clone(), 0.99),
            pct(naive_rtt.clone(), 0.5),
            pct(naive_rtt.clone(), 0.99),
            pct(naive_rtt, 0.5) / pct(ours_rtt, 0.5)
        );
        println!(
            "| heartbeat over HTTP p50 / p99 ({HB_ROUNDS} sequential) | {:.3} / {:.3} ms | — | — |",
            pct(hb_http.clone(), 0.5),
            pct(hb_http, 0.99)
        );
        println!(
            "| heartbeat over the control socket p50 / p99 ({HB_ROUNDS} sequential) | {:.3} / {:.3} ms | — | — |",
            pct(hb_ws.clone(), 0.5),
            pct(hb_ws, 0.99)
        );
    });
}
