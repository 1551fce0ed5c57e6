//! The coordinator's portal over plain HTTP against the real coordinator on
//! port 0: sign-in redirects, owner scoping, cross-site form refusals, cookie
//! attributes, input bounds, and pages that never hold a token or ticket.

mod portal_common;

use std::time::Duration;

use crabbox_coordinator::testing::{DEFAULT_ORG, TestCoordinator};
use futures::StreamExt;
use portal_common::*;
use serde_json::json;

const ALICE_LEASE: &str = "cbx_a11ce0000001";
const BOB_LEASE: &str = "cbx_b0b000000001";

#[tokio::test]
async fn unauthenticated_requests_redirect_to_sign_in() {
    let coord = TestCoordinator::start().await;
    let http = http();
    coord
        .register_lease(&coord.admin_token, ALICE_LEASE, "alpha")
        .await
        .unwrap();
    for path in [
        "/portal",
        &format!("/portal/leases/{ALICE_LEASE}"),
        "/portal/runs/run_0123456789ab",
        "/portal/live",
        &format!("/portal/leases/{ALICE_LEASE}/live"),
        "/portal/runs/run_0123456789ab/live",
    ] {
        let page = get(&http, &coord, path, None).await;
        assert_eq!(page.status, 303, "{path}: {}", page.body);
        assert_eq!(page.location(), "/portal/login", "{path}");
        // A bearer token is the API's credential, not the portal's.
        let resp = http
            .get(format!("{}{path}", coord.base_url))
            .bearer_auth(&coord.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 303, "{path} with a bearer token");
        // A cookie that is not ours (forged, or signed by another coordinator).
        let forged = Session {
            cookie: "crabbox_portal=eyJrIjoiYSJ9.AAAA".into(),
            set_cookie: String::new(),
            csrf: String::new(),
        };
        let page = get(&http, &coord, path, Some(&forged)).await;
        assert_eq!(page.status, 303, "{path} with a forged cookie");
    }
    // The API itself still answers 401 JSON without a token.
    let resp = http
        .get(format!("{}/v1/leases", coord.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // The sign-in page and the stylesheet need no session.
    assert_eq!(get(&http, &coord, "/portal/login", None).await.status, 200);
    let css = get(&http, &coord, "/portal/static/portal.css", None).await;
    assert_eq!(css.status, 200);
    assert!(
        css.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
}

#[tokio::test]
async fn another_owners_lease_and_run_are_never_visible() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    let bob = coord.user_token("bob@example.com", "acme", "bob");
    coord
        .register_lease(&alice, ALICE_LEASE, "alpha")
        .await
        .unwrap();
    coord
        .register_lease(&bob, BOB_LEASE, "bravo")
        .await
        .unwrap();
    let alice_run = create_run(&coord, &alice, ALICE_LEASE, &["echo", "alice"]).await;
    let bob_run = create_run(&coord, &bob, BOB_LEASE, &["echo", "bob"]).await;

    let s = sign_in(&http, &coord, &alice).await;
    let index = get(&http, &coord, "/portal", Some(&s)).await;
    assert!(
        index
            .body
            .contains(&format!("data-lease=\"{ALICE_LEASE}\""))
    );
    assert!(
        !index.body.contains(BOB_LEASE),
        "bob's lease on alice's index"
    );
    assert!(!index.body.contains("bravo"));

    let lease = get(
        &http,
        &coord,
        &format!("/portal/leases/{ALICE_LEASE}"),
        Some(&s),
    )
    .await;
    assert_eq!(lease.status, 200);
    assert!(lease.body.contains(&format!("data-run=\"{alice_run}\"")));
    assert!(!lease.body.contains(&bob_run));
    let run = get(
        &http,
        &coord,
        &format!("/portal/runs/{alice_run}"),
        Some(&s),
    )
    .await;
    assert_eq!(run.status, 200);
    assert!(run.body.contains("run.started"));

    // By id, by slug, and the live streams: all 404, naming nothing of bob's.
    for path in [
        format!("/portal/leases/{BOB_LEASE}"),
        "/portal/leases/bravo".to_owned(),
        format!("/portal/runs/{bob_run}"),
        format!("/portal/leases/{BOB_LEASE}/live"),
        format!("/portal/runs/{bob_run}/live"),
    ] {
        let page = get(&http, &coord, &path, Some(&s)).await;
        assert_eq!(page.status, 404, "{path}: {}", page.body);
        assert!(!page.body.contains("bob@example.com"), "{path}");
        assert!(!page.body.contains("echo bob"), "{path}");
    }

    // Bob's lease changing does not wake alice's index with his rows.
    let mut live = http
        .get(format!("{}/portal/live", coord.base_url))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200);
    api(
        &coord,
        "POST",
        &format!("/v1/leases/{BOB_LEASE}/heartbeat"),
        &bob,
        json!({}),
    )
    .await;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, live.chunk()).await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains(ALICE_LEASE),
        "the stream renders alice's rows: {seen}"
    );
    assert!(!seen.contains(BOB_LEASE), "bob's lease on alice's stream");

    // An admin sees every owner's leases on the index.
    let admin = sign_in(&http, &coord, &coord.admin_token).await;
    let index = get(&http, &coord, "/portal", Some(&admin)).await;
    assert!(index.body.contains(ALICE_LEASE) && index.body.contains(BOB_LEASE));
    let page = get(
        &http,
        &coord,
        &format!("/portal/runs/{bob_run}"),
        Some(&admin),
    )
    .await;
    assert_eq!(page.status, 200);

    // The shared token's pinned identity owns neither.
    let shared = sign_in(&http, &coord, &coord.shared_token).await;
    let index = get(&http, &coord, "/portal", Some(&shared)).await;
    assert!(!index.body.contains(ALICE_LEASE) && !index.body.contains(BOB_LEASE));
    assert!(
        index.body.contains(DEFAULT_ORG),
        "the header names the shared identity"
    );
}

#[tokio::test]
async fn cross_site_form_posts_are_refused() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    let origin = coord.base_url.clone();

    // Sign-in posted from another site, or without this browser's form.
    let (login_cookie, csrf) = login_form(&http, &coord).await;
    for (cookie, csrf, headers, why) in [
        (
            Some(login_cookie.as_str()),
            csrf.as_str(),
            vec![("origin", "http://evil.example")],
            "foreign Origin",
        ),
        (
            Some(login_cookie.as_str()),
            csrf.as_str(),
            vec![("sec-fetch-site", "cross-site")],
            "cross-site fetch",
        ),
        (
            Some(login_cookie.as_str()),
            csrf.as_str(),
            vec![("origin", "null")],
            "opaque Origin",
        ),
        (
            None,
            csrf.as_str(),
            vec![("origin", origin.as_str())],
            "no login cookie",
        ),
        (
            Some(login_cookie.as_str()),
            "forged",
            vec![("origin", origin.as_str())],
            "bad form token",
        ),
    ] {
        let page = post_form(
            &http,
            &coord,
            "/portal/login",
            cookie,
            &[("token", &alice), ("csrf", csrf)],
            &headers,
        )
        .await;
        assert_eq!(page.status, 403, "{why}: {}", page.body);
        assert!(
            set_cookie(&page.headers, "crabbox_portal").is_none(),
            "{why}"
        );
    }

    // Sign-out posted from another site leaves the session alone.
    let s = sign_in(&http, &coord, &alice).await;
    for (csrf, headers, why) in [
        (
            s.csrf.as_str(),
            vec![("origin", "http://evil.example")],
            "foreign Origin",
        ),
        (
            s.csrf.as_str(),
            vec![("sec-fetch-site", "same-site")],
            "sibling site",
        ),
        ("", vec![("origin", origin.as_str())], "no form token"),
    ] {
        let page = post_form(
            &http,
            &coord,
            "/portal/logout",
            Some(&s.cookie),
            &[("csrf", csrf)],
            &headers,
        )
        .await;
        assert_eq!(page.status, 403, "{why}: {}", page.body);
        assert_eq!(
            get(&http, &coord, "/portal", Some(&s)).await.status,
            200,
            "{why}"
        );
    }
    // Another session's token does not sign this one out.
    let other = sign_in(&http, &coord, &alice).await;
    let page = post_form(
        &http,
        &coord,
        "/portal/logout",
        Some(&s.cookie),
        &[("csrf", &other.csrf)],
        &[],
    )
    .await;
    assert_eq!(page.status, 403);

    // A real sign-out clears the cookie and revokes it server side.
    let page = post_form(
        &http,
        &coord,
        "/portal/logout",
        Some(&s.cookie),
        &[("csrf", &s.csrf)],
        &[
            ("origin", origin.as_str()),
            ("sec-fetch-site", "same-origin"),
        ],
    )
    .await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/portal/login");
    let (cleared, line) = set_cookie(&page.headers, "crabbox_portal").unwrap();
    assert_eq!(cleared, "crabbox_portal=");
    assert!(line.contains("Max-Age=0"));
    let replay = get(&http, &coord, "/portal", Some(&s)).await;
    assert_eq!(replay.status, 303, "a signed-out cookie replayed");
    assert_eq!(
        get(&http, &coord, "/portal", Some(&other)).await.status,
        200
    );
}

#[tokio::test]
async fn cookie_attributes_bounds_and_expiry() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let s = sign_in(&http, &coord, &coord.admin_token).await;
    let line = s.set_cookie.clone();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/portal",
        "Max-Age=43200",
    ] {
        assert!(line.contains(attr), "{attr} missing: {line}");
    }
    assert!(!line.contains("Secure"), "plain http: {line}");
    // A cbxu_ token's session ends with the token.
    let short = coord.user_token_with_ttl("a@example.com", "acme", "a", Duration::from_secs(90));
    let s2 = sign_in(&http, &coord, &short).await;
    let max_age: i64 = s2
        .set_cookie
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=90).contains(&max_age), "{}", s2.set_cookie);
    coord.clock.advance(Duration::from_secs(91));
    assert_eq!(
        get(&http, &coord, "/portal", Some(&s2)).await.status,
        303,
        "expired session"
    );

    // Bounded inputs: an oversized form is refused before it is read,
    // an oversized token is refused without being echoed.
    let (login_cookie, csrf) = login_form(&http, &coord).await;
    let big = "x".repeat(20 * 1024);
    let page = post_form(
        &http,
        &coord,
        "/portal/login",
        Some(&login_cookie),
        &[("token", &big), ("csrf", &csrf)],
        &[],
    )
    .await;
    assert_eq!(page.status, 413, "{}", page.body);
    let long = format!("cbxu_{}", "y".repeat(9 * 1024));
    let page = post_form(
        &http,
        &coord,
        "/portal/login",
        Some(&login_cookie),
        &[("token", &long), ("csrf", &csrf)],
        &[],
    )
    .await;
    assert_eq!(page.status, 401);
    assert!(!page.body.contains("yyyyyyyy"));
    let page = get(
        &http,
        &coord,
        &format!("/portal/leases/{}", "z".repeat(300)),
        Some(&s),
    )
    .await;
    assert_eq!(page.status, 404);

    // Behind a trusted https proxy the cookie is Secure; an untrusted header changes nothing.
    let proxied = TestCoordinator::start_with(|c| c.trust_forwarded_proto = true).await;
    let https_origin = proxied.base_url.replace("http://", "https://");
    let s = sign_in_with(
        &http,
        &proxied,
        &proxied.admin_token,
        &https_origin,
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(s.set_cookie.ends_with("; Secure"), "{}", s.set_cookie);
    let s = sign_in_with(
        &http,
        &coord,
        &coord.admin_token,
        &coord.base_url,
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(!s.set_cookie.contains("Secure"), "{}", s.set_cookie);
}

#[tokio::test]
async fn page_source_never_contains_a_token_or_ticket() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    coord
        .register_lease(&alice, ALICE_LEASE, "alpha")
        .await
        .unwrap();
    let (host_ticket, session) = ticket(
        &coord,
        &alice,
        ALICE_LEASE,
        json!({"role": "host", "profile": "discord", "allow": ["discord.com", "cdn.discord.com", "gateway.discord.gg", "media.discordapp.net"]}),
    )
    .await;
    let _host = bridge(&coord, ALICE_LEASE, "host", &host_ticket).await;
    let (client_ticket, _) = ticket(
        &coord,
        &alice,
        ALICE_LEASE,
        json!({"role": "client", "sessionID": session}),
    )
    .await;
    let run = create_run(&coord, &alice, ALICE_LEASE, &["sh", "-c", "echo hi"]).await;
    api(
        &coord,
        "POST",
        &format!("/v1/runs/{run}/events"),
        &alice,
        json!({"type": "stdout", "data": "hi\n"}),
    )
    .await;

    // A failed sign-in does not echo the pasted text.
    let (login_cookie, csrf) = login_form(&http, &coord).await;
    let wrong = format!("{alice}x");
    let failed = post_form(
        &http,
        &coord,
        "/portal/login",
        Some(&login_cookie),
        &[("token", &wrong), ("csrf", &csrf)],
        &[],
    )
    .await;
    assert_eq!(failed.status, 401);

    let s = sign_in(&http, &coord, &alice).await;
    let mut pages = vec![failed.body];
    for path in [
        "/portal".to_owned(),
        format!("/portal/leases/{ALICE_LEASE}"),
        "/portal/leases/alpha".to_owned(),
        format!("/portal/runs/{run}"),
        "/portal/login".to_owned(),
    ] {
        let page = get(&http, &coord, &path, Some(&s)).await;
        assert!(
            page.status == 200 || page.status == 303,
            "{path}: {}",
            page.status
        );
        let csp = page
            .headers
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            csp.is_some_and(|c| c.contains("script-src 'self'")),
            "{path}: no CSP"
        );
        assert_eq!(page.headers["cache-control"], "no-store", "{path}");
        pages.push(page.body);
    }
    // The first frames of the live streams too.
    for path in [
        format!("/portal/leases/{ALICE_LEASE}/live"),
        format!("/portal/runs/{run}/live"),
    ] {
        let resp = http
            .get(format!("{}{path}", coord.base_url))
            .header("cookie", &s.cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains("event: replace"), "{path}: {text}");
        pages.push(text);
    }
    let lease_page = &pages[2];
    assert!(lease_page.contains("discord"), "the profile is shown");
    assert!(lease_page.contains("discord.com, cdn.discord.com, gateway.discord.gg +1"));
    assert!(lease_page.contains("host ready"), "{lease_page}");
    assert!(lease_page.contains(&format!("crabboxctl egress status --id {ALICE_LEASE}")));
    assert!(lease_page.contains(&format!("crabboxctl egress stop --id {ALICE_LEASE}")));
    assert!(lease_page.contains(&format!("crabboxctl lease release --id {ALICE_LEASE}")));
    assert!(lease_page.contains(&format!("crabboxctl attach {run}")));
    let cookie_value = s.cookie.split_once('=').unwrap().1.to_owned();
    for (i, page) in pages.iter().enumerate() {
        for (what, secret) in [
            ("user token", alice.as_str()),
            ("admin token", coord.admin_token.as_str()),
            ("shared token", coord.shared_token.as_str()),
            ("host ticket", host_ticket.as_str()),
            ("client ticket", client_ticket.as_str()),
            ("egress session id", session.as_str()),
            ("session cookie", cookie_value.as_str()),
        ] {
            assert!(!page.contains(secret), "page {i} holds the {what}");
        }
        assert!(!page.contains("ticket"), "page {i} mentions a ticket");
        assert!(
            !page.contains("127.0.0.1:3128"),
            "page {i} holds a proxy URL"
        );
    }
}

#[tokio::test]
async fn run_stream_resumes_after_last_event_id_and_ends_with_the_run() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    coord
        .register_lease(&alice, ALICE_LEASE, "alpha")
        .await
        .unwrap();
    let run = create_run(&coord, &alice, ALICE_LEASE, &["make"]).await;
    for line in ["one\n", "two\n", "three\n"] {
        api(
            &coord,
            "POST",
            &format!("/v1/runs/{run}/events"),
            &alice,
            json!({"type": "stdout", "data": line}),
        )
        .await;
    }
    api(
        &coord,
        "POST",
        &format!("/v1/runs/{run}/finish"),
        &alice,
        json!({"exitCode": 3}),
    )
    .await;
    let s = sign_in(&http, &coord, &alice).await;
    // Events 1 (run.started) and 2 ("one") were seen before the reconnect.
    let resp = http
        .get(format!("{}/portal/runs/{run}/live?after=0", coord.base_url))
        .header("cookie", &s.cookie)
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // The stream ends by itself once the finished run's last event is out.
    let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the stream of a finished run ends")
        .unwrap();
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["3", "4", "5"], "{text}");
    assert!(
        text.contains("\\\"two\\n\\\"") || text.contains("\"text\":\"two\\n\""),
        "{text}"
    );
    assert!(!text.contains("\"text\":\"one\\n\""), "{text}");
    assert!(text.contains("command.finished"));
    assert!(text.contains("event: end"));
    assert!(
        text.contains("data-state=\\\"failed\\\""),
        "the header says failed: {text}"
    );
}

#[tokio::test]
async fn signing_out_ends_open_live_streams() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    coord
        .register_lease(&alice, ALICE_LEASE, "alpha")
        .await
        .unwrap();
    let s = sign_in(&http, &coord, &alice).await;
    let resp = http
        .get(format!(
            "{}/portal/leases/{ALICE_LEASE}/live",
            coord.base_url
        ))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let origin = coord.base_url.clone();
    let out = post_form(
        &http,
        &coord,
        "/portal/logout",
        Some(&s.cookie),
        &[("csrf", &s.csrf)],
        &[("origin", origin.as_str())],
    )
    .await;
    assert_eq!(out.status, 303);
    // The next change the stream wakes for finds the session gone and ends it.
    api(
        &coord,
        "POST",
        &format!("/v1/leases/{ALICE_LEASE}/heartbeat"),
        &alice,
        json!({}),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("a signed-out session's stream ends")
        .unwrap();
    // The signed-out cookie still verifies, but it is no session: the
    // sign-in page shows its form instead of bouncing back to /portal
    // (which would send it straight back here).
    let login = http
        .get(format!("{}/portal/login", coord.base_url))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 200, "a redirect loop");
}

/// A live page open at shutdown ends with it: the graceful shutdown waits
/// for in-flight requests, and a live stream would otherwise last an hour.
#[tokio::test]
async fn an_open_live_page_does_not_hold_the_shutdown() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    let s = sign_in(&http, &coord, &alice).await;
    let mut live = http
        .get(format!("{}/portal/live", coord.base_url))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), coord.stop())
        .await
        .expect("the coordinator stopped with a live page open")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The stream ended rather than being cut mid-event.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = live.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the live stream did not end");
}
