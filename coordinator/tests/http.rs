//! HTTP routes against a real in-process coordinator: shapes, status codes,
//! the auth matrix, expiry timing and persistence across a restart.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use crabbox_coordinator::Secret;
use crabbox_coordinator::auth::issue_user_token;
use crabbox_coordinator::testing::{DEFAULT_ORG, SHARED_OWNER, TestCoordinator};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "test-session-secret";

async fn start() -> TestCoordinator {
    TestCoordinator::start_with(|c| c.session_secret = Some(Secret::new(SECRET))).await
}

#[tokio::test]
async fn health_and_edge_errors() {
    let coord = start().await;
    let http = http();
    let (s, v) = call(&http, &coord, "GET", "/v1/health", None, None).await;
    assert_eq!(
        (s, v),
        (200, json!({"ok": true, "service": "crabbox-coordinator"}))
    );
    let (s, v) = call(&http, &coord, "GET", "/v1/nope", None, None).await;
    assert_eq!((s, v), (401, json!({"error": "unauthorized"})));
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/nope",
        Some(&coord.admin_token),
        None,
    )
    .await;
    assert_eq!((s, v), (404, json!({"error": "not_found"})));
    let (s, v) = call(
        &http,
        &coord,
        "DELETE",
        "/v1/leases",
        Some(&coord.admin_token),
        None,
    )
    .await;
    assert_eq!((s, v), (404, json!({"error": "not_found"})));
    // The control route needs an upgrade once authenticated.
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/control",
        Some(&coord.admin_token),
        None,
    )
    .await;
    assert_eq!((s, v), (426, json!({"error": "websocket_required"})));
    let (s, _) = call(&http, &coord, "GET", "/v1/control", None, None).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn registration_lookup_and_list() {
    let coord = start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    let bob = coord.user_token("bob@example.com", "acme", "bob");
    let body = json!({"provider":"ssh","target":"linux","host":"10.0.0.5","sshUser":"crab","sshPort":"2222",
        "slug":"Blue Lobster","ttlSeconds":600,"idleTimeoutSeconds":300});
    let (s, v) = call(
        &http,
        &coord,
        "PUT",
        "/v1/leases/cbx_0123456789ab/registration",
        Some(&alice),
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let l = &v["lease"];
    assert_eq!(l["id"], "cbx_0123456789ab");
    assert_eq!(l["lifecycle"], "registered");
    assert_eq!(l["state"], "active");
    assert_eq!(l["slug"], "blue-lobster");
    assert_eq!(l["sshPort"], "2222");
    assert_eq!(l["owner"], "alice@example.com");
    assert_eq!(l["org"], "acme");
    assert_eq!(l["ttlSeconds"], 600);
    assert_eq!(l["idleTimeoutSeconds"], 300);
    assert!(l["serverID"].is_i64());
    for k in ["createdAt", "updatedAt", "lastTouchedAt", "expiresAt"] {
        assert!(l[k].as_str().unwrap().ends_with('Z'), "{k}");
    }
    let (s, _) = call(
        &http,
        &coord,
        "PUT",
        "/v1/leases/cbx_0123456789ab/registration",
        Some(&alice),
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = call(
        &http,
        &coord,
        "PUT",
        "/v1/leases/cbx_0123456789ab/registration",
        Some(&bob),
        Some(body.clone()),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("lease_conflict")));
    let (s, v) = call(
        &http,
        &coord,
        "PUT",
        "/v1/leases/-bad/registration",
        Some(&alice),
        Some(body.clone()),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_lease_id")));
    let (s, v) = call(
        &http,
        &coord,
        "PUT",
        "/v1/leases/cbx_aaaaaaaaaaaa/registration",
        Some(&alice),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_registration"))
    );
    assert!(v["message"].is_string());

    // Lookup by id and by slug (any spelling that normalises the same).
    for ident in ["cbx_0123456789ab", "blue-lobster", "Blue_Lobster"] {
        let (s, v) = call(
            &http,
            &coord,
            "GET",
            &format!("/v1/leases/{ident}"),
            Some(&alice),
            None,
        )
        .await;
        assert_eq!(
            (s, v["lease"]["id"].as_str()),
            (200, Some("cbx_0123456789ab")),
            "{ident}"
        );
    }
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/blue-lobster",
        Some(&bob),
        None,
    )
    .await;
    assert_eq!((s, v), (404, json!({"error": "not_found"})));

    // A second live lease with the same slug makes the slug ambiguous.
    register(
        &http,
        &coord,
        &alice,
        "cbx_0123456789ac",
        "blue-lobster",
        600,
        300,
    )
    .await;
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/blue-lobster",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, 500);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("ambiguous slug blue-lobster: cbx_0123456789ab:alice@example.com"),
        "{v}"
    );

    let (s, v) = call(&http, &coord, "GET", "/v1/leases", Some(&alice), None).await;
    assert_eq!((s, v["leases"].as_array().unwrap().len()), (200, 2));
    let (_, v) = call(&http, &coord, "GET", "/v1/leases", Some(&bob), None).await;
    assert_eq!(v["leases"].as_array().unwrap().len(), 0);
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases",
        Some(&coord.admin_token),
        None,
    )
    .await;
    assert_eq!(v["leases"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn heartbeat_and_release() {
    let coord = start().await;
    let http = http();
    let t = coord.user_token("alice@example.com", "acme", "alice");
    register(&http, &coord, &t, "cbx_000000000001", "hb", 3600, 600).await;
    let hb = "/v1/leases/cbx_000000000001/heartbeat";

    let (s, v) = call(
        &http,
        &coord,
        "POST",
        hb,
        Some(&t),
        Some(json!({"expectedProvider":"ssh"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["lease"]["state"], "active");
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        hb,
        Some(&t),
        Some(json!({"expectedProvider":"aws"})),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            409,
            json!({"error":"provider_identity_mismatch","message":"expectedProvider does not match the lease provider"})
        )
    );
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        hb,
        Some(&t),
        Some(json!({"expectedProvider":"Not A Provider!"})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_expected_provider"))
    );

    // Idle override is clamped to a day; telemetry is sanitised.
    let telemetry = json!({"capturedAt":"bogus","source":"x".repeat(40),"load1":-1,"load5":20000,
        "memoryPercent":150,"cpuCount":2.7,"diskUsedBytes":123.9});
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        hb,
        Some(&t),
        Some(json!({"idleTimeoutSeconds":999999,"telemetry":telemetry})),
    )
    .await;
    assert_eq!(s, 200);
    let l = &v["lease"];
    assert_eq!(l["idleTimeoutSeconds"], 86400);
    let tel = &l["telemetry"];
    assert!(tel.get("load1").is_none());
    assert_eq!(tel["load5"], 10000.0);
    assert_eq!(tel["memoryPercent"], 100.0);
    assert_eq!(tel["cpuCount"], 2);
    assert_eq!(tel["diskUsedBytes"], 123);
    assert_eq!(tel["source"].as_str().unwrap().len(), 32);
    assert!(tel["capturedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(l["telemetryHistory"].as_array().unwrap().len(), 1);
    // Registered expiry = last touch + min(ttl, idle): the TTL wins now.
    let touched =
        crabbox_coordinator::clock::parse_iso(l["lastTouchedAt"].as_str().unwrap()).unwrap();
    let expires = crabbox_coordinator::clock::parse_iso(l["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires - touched, 3_600_000);

    // Without a JSON content type the body is ignored, like the reference.
    let resp = http
        .post(format!("{}{hb}", coord.base_url))
        .bearer_auth(&t)
        .body(r#"{"expectedProvider":"aws"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/hb/release",
        Some(&t),
        Some(json!({"delete":false})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["lease"]["state"], "released");
    assert!(v["lease"]["releasedAt"].is_string());
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_000000000001/release",
        Some(&t),
        None,
    )
    .await;
    assert_eq!((s, v["lease"]["state"].as_str()), (200, Some("released")));
    let (s, v) = call(&http, &coord, "POST", hb, Some(&t), None).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("lease_ended")));
    // A released lease no longer resolves by slug.
    let (s, _) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/hb/heartbeat",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_ffffffffffff/heartbeat",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn lease_expires_on_time() {
    let coord = start().await;
    let http = http();
    let t = coord.user_token("alice@example.com", "acme", "alice");
    let l = register(&http, &coord, &t, "cbx_000000000002", "soon", 1, 1).await;
    let deadline = crabbox_coordinator::clock::parse_iso(l["expiresAt"].as_str().unwrap()).unwrap();
    let start = Instant::now();
    loop {
        let (_, v) = call(
            &http,
            &coord,
            "GET",
            "/v1/leases/cbx_000000000002",
            Some(&t),
            None,
        )
        .await;
        if v["lease"]["state"] == "expired" {
            let late = coord.clock.now_ms() - deadline;
            assert!(late < 500, "expired {late} ms after its deadline");
            assert!(v["lease"]["endedAt"].is_string());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_000000000002/heartbeat",
        Some(&t),
        None,
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("lease_ended")));

    // With the injectable clock, a long idle timeout expires without waiting.
    register(&http, &coord, &t, "cbx_000000000003", "later", 3600, 600).await;
    coord.clock.advance(Duration::from_secs(601));
    eventually(|| async {
        let (_, v) = call(
            &http,
            &coord,
            "GET",
            "/v1/leases/cbx_000000000003",
            Some(&t),
            None,
        )
        .await;
        v["lease"]["state"] == "expired"
    })
    .await;
}

#[tokio::test]
async fn runs_events_finish_logs() {
    let coord = start().await;
    let http = http();
    let a = coord.user_token("alice@example.com", "acme", "alice");
    let b = coord.user_token("bob@example.com", "acme", "bob");
    let body = json!({"leaseID":"cbx_0123456789ab","provider":"ssh","class":"small","serverType":"x","command":["make","test"]});
    let (s, v) = call(&http, &coord, "POST", "/v1/runs", Some(&a), Some(body)).await;
    assert_eq!(s, 201, "{v}");
    let run = &v["run"];
    let id = run["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("run_") && id.len() == 16);
    assert_eq!(run["state"], "running");
    assert_eq!(run["command"], json!(["make", "test"]));
    assert_eq!(run["logBytes"], 0);
    assert_eq!(run["logTruncated"], false);
    assert_eq!(run["owner"], "alice@example.com");

    let ev_path = format!("/v1/runs/{id}/events");
    let big = "é".repeat(10_000); // 20 000 bytes, cut at a character boundary
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        &ev_path,
        Some(&a),
        Some(json!({"type":"stdout","stream":"stdout","data":big,"provider":"nope"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let ev = &v["event"];
    assert_eq!(ev["seq"], 2);
    assert_eq!(ev["runID"], id.as_str());
    assert_eq!(ev["data"].as_str().unwrap().len(), 16 * 1024);
    assert!(ev.get("provider").is_none());
    let (s, v) = call(&http, &coord, "POST", &ev_path, Some(&a), Some(json!({}))).await;
    assert_eq!((s, v["event"]["type"].as_str()), (201, Some("event")));
    let (s, _) = call(
        &http,
        &coord,
        "POST",
        &ev_path,
        Some(&b),
        Some(json!({"type":"x"})),
    )
    .await;
    assert_eq!(s, 404);

    let (s, v) = call(&http, &coord, "GET", &ev_path, Some(&a), None).await;
    assert_eq!(s, 200);
    let seqs: Vec<i64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(v["events"][0]["type"], "run.started");
    assert_eq!(v["events"][0]["phase"], "starting");
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        &format!("{ev_path}?after=1&limit=1"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["seq"], 2);
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        &format!("{ev_path}?after=junk&limit=0"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(
        v["events"].as_array().unwrap().len(),
        3,
        "bad after → 0, limit 0 → max"
    );

    let (s, v) = call(&http, &coord, "POST", &format!("/v1/runs/{id}/finish"), Some(&a),
        Some(json!({"exitCode":0,"syncMs":5,"commandMs":7,"logChunks":["hello ","world"],"logTruncated":false,"results":null}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["run"]["state"], "succeeded");
    assert_eq!(v["run"]["exitCode"], 0);
    assert_eq!(v["run"]["logBytes"], 11);
    assert!(v["run"]["endedAt"].is_string());
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{id}/finish"),
        Some(&a),
        Some(json!({"exitCode":1})),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("run_finished")));
    let (_, v) = call(&http, &coord, "GET", &ev_path, Some(&a), None).await;
    let last = v["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["type"].as_str(),
            last["phase"].as_str(),
            last["exitCode"].as_i64()
        ),
        (Some("command.finished"), Some("succeeded"), Some(0))
    );
    let resp = http
        .get(format!("{}/v1/runs/{id}/logs", coord.base_url))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(resp.text().await.unwrap(), "hello world");

    // run.failed flips a run to failed; a big log is capped at 8 MiB.
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&a),
        Some(json!({"command":["x"]})),
    )
    .await;
    let id2 = v["run"]["id"].as_str().unwrap().to_owned();
    call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{id2}/events"),
        Some(&a),
        Some(json!({"type":"run.failed","message":"boom"})),
    )
    .await;
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        &format!("/v1/runs/{id2}"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(v["run"]["state"], "failed");
    let log = "x".repeat(9 * 1024 * 1024);
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{id2}/finish"),
        Some(&a),
        Some(json!({"exitCode":0,"log":log})),
    )
    .await;
    assert_eq!(v["run"]["state"], "failed");
    assert_eq!(v["run"]["logBytes"], 8 * 1024 * 1024);
    assert_eq!(v["run"]["logTruncated"], true);
}

fn admin_claim_token(owner: &str, org: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = json!({"typ":"crabbox-user","version":3,"ownerSource":"github-verified-email",
        "jti":crabbox_coordinator::ids::uuid_v4(),"owner":owner,"org":org,"login":"mallory",
        "iat":now,"exp":now+3600,"admin":true});
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(p.as_bytes());
    format!(
        "cbxu_{p}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn auth_matrix() {
    let coord = start().await;
    let http = http();
    let now = coord.clock.now_ms() / 1000;
    let a = coord.user_token("alice@example.com", "acme", "alice");
    let b = coord.user_token("bob@example.com", "acme", "bob");
    let a_other_org = coord.user_token("alice@example.com", "other", "alice");
    let forged = issue_user_token(
        &Secret::new("not-the-secret"),
        "alice@example.com",
        "acme",
        "alice",
        now,
        3600,
    );
    let expired = issue_user_token(
        &Secret::new(SECRET),
        "alice@example.com",
        "acme",
        "alice",
        now - 7200,
        3600,
    );
    let claim = admin_claim_token("alice@example.com", "acme");
    let admin = coord.admin_token.clone();
    let shared = coord.shared_token.clone();

    register(&http, &coord, &a, "cbx_00000000000a", "alpha", 3600, 600).await;
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&a),
        Some(json!({"leaseID":"cbx_00000000000a","command":["x"]})),
    )
    .await;
    let run = v["run"]["id"].as_str().unwrap().to_owned();

    // (name, token) × (method, path, body) → expected status, in table form.
    let callers: Vec<(&str, Option<&str>)> = vec![
        ("admin", Some(&admin)),
        ("shared", Some(&shared)),
        ("userA", Some(&a)),
        ("userB", Some(&b)),
        ("userA-other-org", Some(&a_other_org)),
        ("none", None),
        ("forged", Some(&forged)),
        ("expired", Some(&expired)),
        ("admin-claim", Some(&claim)),
        ("garbage", Some("cbxu_x.y")),
    ];
    let routes: Vec<(&str, String, Option<Value>, [u16; 10])> = vec![
        //                                                    admin shared  A    B   A/org none forg exp claim garb
        (
            "GET",
            "/v1/leases/cbx_00000000000a".into(),
            None,
            [404, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            "/v1/leases/alpha".into(),
            None,
            [404, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            "/v1/leases/cbx_00000000000a/heartbeat".into(),
            Some(json!({})),
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            "/v1/leases/alpha/heartbeat".into(),
            Some(json!({})),
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            "/v1/leases".into(),
            None,
            [200, 200, 200, 200, 200, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            "/v1/leases/cbx_00000000000a/egress/ticket".into(),
            Some(json!({"role":"host"})),
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            "/v1/leases/cbx_00000000000a/egress/status".into(),
            None,
            [404, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            format!("/v1/runs/{run}"),
            None,
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            format!("/v1/runs/{run}/events"),
            None,
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            format!("/v1/runs/{run}/events"),
            Some(json!({"type":"x"})),
            [201, 404, 201, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "GET",
            format!("/v1/runs/{run}/logs"),
            None,
            [200, 404, 200, 404, 404, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            "/v1/runs".into(),
            Some(json!({"command":["y"]})),
            [201, 201, 201, 201, 201, 401, 401, 401, 401, 401],
        ),
        (
            "POST",
            "/v1/leases/cbx_00000000000a/release".into(),
            Some(json!({})),
            [0, 404, 0, 404, 404, 401, 401, 401, 401, 401],
        ),
        ("GET", "/v1/health".into(), None, [200; 10]),
    ];
    for (method, path, body, expect) in &routes {
        for (i, (name, token)) in callers.iter().enumerate() {
            if expect[i] == 0 {
                continue; // release by a permitted caller is exercised below
            }
            let (s, v) = call(&http, &coord, method, path, *token, body.clone()).await;
            assert_eq!(s, expect[i], "{name} {method} {path}: {v}");
            if s == 401 {
                assert_eq!(
                    v,
                    json!({"error": "unauthorized"}),
                    "{name} {method} {path}"
                );
            }
        }
    }
    // Lists only show what the caller may see.
    for (token, n) in [(&a, 1), (&b, 0), (&shared, 0), (&admin, 1)] {
        let (_, v) = call(&http, &coord, "GET", "/v1/leases", Some(token), None).await;
        assert_eq!(v["leases"].as_array().unwrap().len(), n);
    }
    // The shared token's identity is pinned: owner/org headers are ignored.
    let resp = http
        .put(format!(
            "{}/v1/leases/cbx_00000000000s/registration",
            coord.base_url
        ))
        .bearer_auth(&shared)
        .header("x-crabbox-owner", "alice@example.com")
        .header("x-crabbox-org", "acme")
        .header("content-type", "application/json")
        .body(json!({"host":"h"}).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["lease"]["owner"].as_str(), v["lease"]["org"].as_str()),
        (Some(SHARED_OWNER), Some(DEFAULT_ORG))
    );
    // Admin identity comes from the headers.
    let resp = http
        .put(format!(
            "{}/v1/leases/cbx_0000000000ad/registration",
            coord.base_url
        ))
        .bearer_auth(&admin)
        .header("x-crabbox-owner", "root@example.com")
        .header("x-crabbox-org", "ops")
        .header("content-type", "application/json")
        .body(json!({"host":"h"}).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["lease"]["owner"].as_str(), v["lease"]["org"].as_str()),
        (Some("root@example.com"), Some("ops"))
    );
    // Control socket: users in, bad tokens out.
    let auth = format!("Bearer {forged}");
    let err = ws_connect(&coord.ws_url("/v1/control"), &[("authorization", &auth)])
        .await
        .unwrap_err();
    assert_eq!(handshake_status(&err), 401);
    let err = ws_connect(&coord.ws_url("/v1/control"), &[])
        .await
        .unwrap_err();
    assert_eq!(handshake_status(&err), 401);
    drop(control(&coord, &a).await);
    // Finally admin releases anyone's lease.
    let (s, _) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_00000000000a/release",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn user_tokens_need_a_distinct_secret() {
    // A session secret equal to the shared token is a configuration error.
    let cfg_err = {
        let mut c = crabbox_coordinator::Config::new("/nonexistent/x.db");
        c.shared_token = Some(Secret::new("same"));
        c.session_secret = Some(Secret::new("same"));
        c.validate().unwrap_err().to_string()
    };
    assert!(cfg_err.contains("must differ"), "{cfg_err}");
}

#[tokio::test]
async fn state_survives_restart() {
    let coord = start().await;
    let http = http();
    let a = coord.user_token("alice@example.com", "acme", "alice");
    register(&http, &coord, &a, "cbx_00000000000b", "persist", 3600, 600).await;
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&a),
        Some(json!({"command":["x"]})),
    )
    .await;
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    for i in 0..5 {
        call(
            &http,
            &coord,
            "POST",
            &format!("/v1/runs/{run}/events"),
            Some(&a),
            Some(json!({"type":"step","message":i.to_string()})),
        )
        .await;
    }
    let (_, v) = ticket(
        &http,
        &coord,
        &a,
        "cbx_00000000000b",
        "host",
        Some("egress_first-session"),
    )
    .await;
    assert_eq!(v["sessionID"], "egress_first-session");
    let (_, v) = ticket(
        &http,
        &coord,
        &a,
        "cbx_00000000000b",
        "host",
        Some("egress_second-session"),
    )
    .await;
    assert_eq!(v["sessionID"], "egress_second-session");

    let coord = coord.restart().await;
    let (s, v) = call(&http, &coord, "GET", "/v1/leases/persist", Some(&a), None).await;
    assert_eq!((s, v["lease"]["state"].as_str()), (200, Some("active")));
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        &format!("/v1/runs/{run}/events"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 6);
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/cbx_00000000000b/egress/status",
        Some(&a),
        None,
    )
    .await;
    assert_eq!(
        (v["active"].as_bool(), v["sessionID"].as_str()),
        (Some(true), Some("egress_second-session"))
    );
    assert_eq!(
        (v["hostConnected"].as_bool(), v["clientConnected"].as_bool()),
        (Some(false), Some(false))
    );
    // The tombstone survived too.
    let (s, v) = ticket(
        &http,
        &coord,
        &a,
        "cbx_00000000000b",
        "client",
        Some("egress_first-session"),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("egress_session_replaced"))
    );
    // Heartbeats still work and new events continue the sequence.
    let (s, _) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/persist/heartbeat",
        Some(&a),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{run}/events"),
        Some(&a),
        Some(json!({"type":"after"})),
    )
    .await;
    assert_eq!(v["event"]["seq"], 7);
}

#[tokio::test]
async fn testing_helpers_register_without_a_client() {
    let coord = TestCoordinator::start().await;
    let t = coord.user_token("dana@example.com", "acme", "dana");
    let lease = coord
        .register_lease(&t, "cbx_00000000da7a", "dana-box")
        .await
        .unwrap();
    assert_eq!(
        (lease["id"].as_str(), lease["state"].as_str()),
        (Some("cbx_00000000da7a"), Some("active"))
    );
    let (status, v) = coord
        .request("POST", "/v1/leases/dana-box/heartbeat", &t, &json!({}))
        .await
        .unwrap();
    assert_eq!(
        (status, v["lease"]["slug"].as_str()),
        (200, Some("dana-box"))
    );
    let (status, v) = coord
        .request("POST", "/v1/leases/dana-box/heartbeat", "wrong", &json!({}))
        .await
        .unwrap();
    assert_eq!((status, v), (401, json!({"error":"unauthorized"})));
}
