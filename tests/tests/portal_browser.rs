//! The portal in headless Chromium (driven over WebDriver by chromedriver)
//! against the real coordinator: sign in, see a lease appear live, watch an
//! egress session's host/client state change as raw bridge sockets come and
//! go, and follow a run's output live. Assertions are on the DOM; each stage
//! is saved as a screenshot under `target/portal-screenshots/`.
//!
//! Skips (with a reason) when Chromium or chromedriver is missing, except
//! under `CI=true`, where they must be present.

mod portal_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use fantoccini::{Client, ClientBuilder, Locator};
use portal_common::*;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const LEASE: &str = "cbx_b40000000001";
const LATER_LEASE: &str = "cbx_b40000000002";
/// How long the DOM may take to reflect a change (generous: loaded 2-core machines).
const DOM_WAIT: Duration = Duration::from_secs(30);

fn browser_available() -> bool {
    let present = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !present && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true but {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
        );
    }
    if !present {
        eprintln!(
            "skipping: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
        );
    }
    present
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("portal-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> (Self, Client) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = http();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("WebDriver session");
        (
            Self {
                _child: child,
                _profile: profile,
            },
            client,
        )
    }
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

async fn wait_css(c: &Client, css: &str) -> fantoccini::elements::Element {
    match c
        .wait()
        .at_most(DOM_WAIT)
        .every(Duration::from_millis(100))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let src = c.source().await.unwrap_or_default();
            panic!("{css} never appeared ({e}); page:\n{src}");
        }
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + DOM_WAIT;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && t.contains(needle)
        {
            return t;
        }
        if tokio::time::Instant::now() > deadline {
            let src = c.source().await.unwrap_or_default();
            panic!("{css} never held {needle:?}; page:\n{src}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn portal_in_a_real_browser_follows_leases_egress_and_runs_live() {
    if !browser_available() {
        return;
    }
    let coord = TestCoordinator::start().await;
    let token = coord.user_token("ada@example.com", "acme", "ada");
    coord
        .register_lease(&token, LEASE, "ada-box")
        .await
        .unwrap();
    let (_driver, c) = Driver::start().await;

    // Unauthenticated: sent to sign-in. Paste the token, sign in.
    c.goto(&format!("{}/portal", coord.base_url)).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/portal/login");
    shot(&c, "01-sign-in").await;
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(&token)
        .await
        .unwrap();
    c.find(Locator::Css("#sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_css(&c, &format!("tr[data-lease='{LEASE}']")).await;
    assert_eq!(c.current_url().await.unwrap().path(), "/portal");
    assert!(text(&c, "#who").await.contains("ada@example.com"));
    // The live stream is open before anything changes.
    wait_css(&c, "body[data-stream='open']").await;

    // A lease registered now shows up without a reload.
    coord
        .register_lease(&token, LATER_LEASE, "ada-later")
        .await
        .unwrap();
    wait_css(&c, &format!("tr[data-lease='{LATER_LEASE}']")).await;
    let rows = c.find_all(Locator::Css("tr.lease")).await.unwrap();
    assert_eq!(
        rows[0].attr("data-lease").await.unwrap().as_deref(),
        Some(LATER_LEASE),
        "newest first"
    );
    shot(&c, "02-index-live").await;

    // The lease page: no egress session yet.
    c.find(Locator::Css(&format!("a[href='/portal/leases/{LEASE}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_css(&c, "#egress[data-status='no session']").await;
    wait_css(&c, "body[data-stream='open']").await;

    // An egress session appears, then its host and client connect, live.
    let (host_ticket, session) = ticket(
        &coord,
        &token,
        LEASE,
        json!({"role": "host", "profile": "discord", "allow": ["discord.com", "cdn.discord.com"]}),
    )
    .await;
    wait_css(&c, "#egress[data-status='waiting for host']").await;
    assert_eq!(text(&c, "#egress-profile").await, "discord");
    assert!(text(&c, "#egress-allow").await.contains("cdn.discord.com"));
    let mut host = bridge(&coord, LEASE, "host", &host_ticket).await;
    wait_css(
        &c,
        "#egress[data-status='host ready'][data-host='true'][data-client='false']",
    )
    .await;
    assert!(text(&c, "#egress-host").await.starts_with("connected"));
    assert_eq!(text(&c, "#egress-client").await, "not connected");
    shot(&c, "03-egress-host-ready").await;
    let (client_ticket, _) = ticket(
        &coord,
        &token,
        LEASE,
        json!({"role": "client", "sessionID": session}),
    )
    .await;
    let _client = bridge(&coord, LEASE, "client", &client_ticket).await;
    wait_css(
        &c,
        "#egress[data-status='client active'][data-client='true']",
    )
    .await;
    assert_eq!(text(&c, "#egress-badge").await, "connected");
    shot(&c, "04-egress-client-active").await;
    // The host leaves: the relay ends the pair and the page says so.
    host.close(None).await.unwrap();
    wait_css(
        &c,
        "#egress[data-status='waiting for host'][data-host='false']",
    )
    .await;
    shot(&c, "05-egress-host-gone").await;
    let source = c.source().await.unwrap();
    for (what, secret) in [
        ("token", token.as_str()),
        ("host ticket", &host_ticket),
        ("client ticket", &client_ticket),
        ("session", &session),
    ] {
        assert!(!source.contains(secret), "the page holds the {what}");
    }

    // A run appears on the lease page; its page follows output live.
    let run = create_run(
        &coord,
        &token,
        LEASE,
        &["sh", "-c", "echo hello; echo oops >&2"],
    )
    .await;
    let link = wait_css(&c, &format!("tr[data-run='{run}'] a")).await;
    link.click().await.unwrap();
    wait_css(&c, "#run-head[data-state='running']").await;
    wait_css(&c, "body[data-stream='open']").await;
    for (kind, data) in [
        ("stdout", "hello from stdout\n"),
        ("stderr", "oops on stderr\n"),
        ("stdout", "second line\n"),
    ] {
        api(
            &coord,
            "POST",
            &format!("/v1/runs/{run}/events"),
            &token,
            json!({"type": kind, "data": data}),
        )
        .await;
    }
    let out = wait_text(&c, "#stdout", "second line").await;
    assert!(out.contains("hello from stdout"), "{out}");
    assert!(!out.contains("oops"), "stderr on stdout: {out}");
    let err = wait_text(&c, "#stderr", "oops on stderr").await;
    assert!(!err.contains("hello"), "stdout on stderr: {err}");
    assert!(text(&c, "#events").await.contains("run.started"));
    shot(&c, "06-run-following").await;
    api(
        &coord,
        "POST",
        &format!("/v1/runs/{run}/finish"),
        &token,
        json!({"exitCode": 0, "log": "hello\n"}),
    )
    .await;
    wait_css(&c, "#run-head[data-state='succeeded'][data-ended='true']").await;
    wait_css(&c, "body[data-stream='ended']").await;
    assert_eq!(text(&c, "#run-exit").await, "0");
    assert!(text(&c, "#events").await.contains("command.finished"));
    // Output arrived once each, in order.
    assert_eq!(
        text(&c, "#stdout")
            .await
            .matches("hello from stdout")
            .count(),
        1
    );
    shot(&c, "07-run-finished").await;

    // Sign out: back to the sign-in page, and the portal is closed again.
    c.find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_css(&c, "#sign-in").await;
    c.goto(&format!("{}/portal", coord.base_url)).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/portal/login");
    c.close().await.unwrap();
}
