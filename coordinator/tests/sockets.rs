//! WebSockets against a real in-process coordinator: the control socket and
//! egress bridges (pairing, relay, close codes, tickets, replacement).

mod common;

use std::time::Duration;

use common::*;
use crabbox_coordinator::testing::TestCoordinator;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

fn refusal(err: &tungstenite::Error) -> (u16, Value) {
    match err {
        tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn setup() -> (TestCoordinator, reqwest::Client, String) {
    let coord = TestCoordinator::start().await;
    let http = http();
    let t = coord.user_token("alice@example.com", "acme", "alice");
    register(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "egress-box",
        3600,
        600,
    )
    .await;
    (coord, http, t)
}

async fn pair(
    coord: &TestCoordinator,
    http: &reqwest::Client,
    t: &str,
    session: Option<&str>,
) -> (Ws, Ws, String) {
    let (s, h) = ticket(http, coord, t, "cbx_0000000000e1", "host", session).await;
    assert_eq!(s, 200, "{h}");
    let sid = h["sessionID"].as_str().unwrap().to_owned();
    let (_, c) = ticket(http, coord, t, "cbx_0000000000e1", "client", Some(&sid)).await;
    let host = bridge(
        coord,
        "cbx_0000000000e1",
        "host",
        h["ticket"].as_str().unwrap(),
    )
    .await;
    let client = bridge(
        coord,
        "cbx_0000000000e1",
        "client",
        c["ticket"].as_str().unwrap(),
    )
    .await;
    // Both ends are registered once status says so.
    eventually(|| async {
        let (_, v) = call(
            http,
            coord,
            "GET",
            "/v1/leases/cbx_0000000000e1/egress/status",
            Some(t),
            None,
        )
        .await;
        v["hostConnected"] == true && v["clientConnected"] == true
    })
    .await;
    (host, client, sid)
}

#[tokio::test]
async fn control_socket_messages() {
    let (coord, http, t) = setup().await;
    let mut ws = control(&coord, &t).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 1);
    assert!(crabbox_coordinator::ids::is_uuid_v4(
        hello["clientID"].as_str().unwrap()
    ));

    send_json(&mut ws, json!({"type":"ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong"}));
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"error","code":"invalid_message","message":"expected JSON text"})
    );
    ws.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"error","code":"invalid_json","message":"invalid JSON"})
    );
    send_json(&mut ws, json!({"type":"dance"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"error","code":"unknown_type","message":"unknown control message"})
    );
    send_json(
        &mut ws,
        json!({"type":"subscribe_run","runID":"run_000000000000","after":0}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"error","code":"not_found","message":"run not found"})
    );

    // Heartbeats: ok, provider mismatch, unknown lease, ended lease. One
    // sent by slug is answered with the lease's canonical id.
    send_json(&mut ws, json!({"type":"heartbeat","leaseID":"egress-box","expectedProvider":"ssh","idleTimeoutSeconds":900})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        (r["type"].as_str(), r["leaseID"].as_str(), r["ok"].as_bool()),
        (Some("heartbeat"), Some("cbx_0000000000e1"), Some(true))
    );
    assert!(r["expiresAt"].as_str().unwrap().ends_with('Z'));
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/egress-box",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(v["lease"]["idleTimeoutSeconds"], 900);
    send_json(
        &mut ws,
        json!({"type":"heartbeat","leaseID":"egress-box","expectedProvider":"aws"}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"heartbeat","leaseID":"egress-box","ok":false,"error":"provider_identity_mismatch"})
    );
    send_json(
        &mut ws,
        json!({"type":"heartbeat","leaseID":"cbx_ffffffffffff"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["error"], "not_found");
    call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_0000000000e1/release",
        Some(&t),
        None,
    )
    .await;
    send_json(
        &mut ws,
        json!({"type":"heartbeat","leaseID":"cbx_0000000000e1"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["error"], "lease_ended");
    // Another user cannot heartbeat alice's lease over the socket either.
    let bob = coord.user_token("bob@example.com", "acme", "bob");
    let mut ws_b = control(&coord, &bob).await;
    next_json(&mut ws_b).await;
    send_json(
        &mut ws_b,
        json!({"type":"heartbeat","leaseID":"cbx_0000000000e1"}),
    )
    .await;
    assert_eq!(next_json(&mut ws_b).await["error"], "not_found");
}

#[tokio::test]
async fn control_pushes_and_paging_under_concurrent_appends() {
    let (coord, http, t) = setup().await;
    let (_, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&t),
        Some(json!({"command":["x"]})),
    )
    .await;
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    let events = format!("/v1/runs/{run}/events");

    // Live push after a subscribe.
    let mut ws = control(&coord, &t).await;
    next_json(&mut ws).await;
    send_json(
        &mut ws,
        json!({"type":"subscribe_run","runID":run,"after":0,"limit":100}),
    )
    .await;
    let page = next_json(&mut ws).await;
    assert_eq!(
        (
            page["type"].as_str(),
            page["runID"].as_str(),
            page["nextSeq"].as_i64()
        ),
        (Some("run_events"), Some(run.as_str()), Some(1))
    );
    call(
        &http,
        &coord,
        "POST",
        &events,
        Some(&t),
        Some(json!({"type":"stdout","data":"hi"})),
    )
    .await;
    let push = next_json(&mut ws).await;
    assert_eq!(push["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        (push["nextSeq"].as_i64(), push["events"][0]["data"].as_str()),
        (Some(2), Some("hi"))
    );
    // Another user's subscription is refused.
    let bob = coord.user_token("bob@example.com", "acme", "bob");
    let mut ws_b = control(&coord, &bob).await;
    next_json(&mut ws_b).await;
    send_json(&mut ws_b, json!({"type":"subscribe_run","runID":run})).await;
    assert_eq!(next_json(&mut ws_b).await["code"], "not_found");

    // A backlog of 250 events, then a subscriber pages through it while a
    // writer appends 300 more: every seq arrives, in order, none missing.
    for i in 0..248 {
        call(
            &http,
            &coord,
            "POST",
            &events,
            Some(&t),
            Some(json!({"type":"step","message":i.to_string()})),
        )
        .await;
    }
    let total = 250 + 300;
    let writer = {
        let (http, base, t, events) = (
            http.clone(),
            coord.base_url.clone(),
            t.clone(),
            events.clone(),
        );
        tokio::spawn(async move {
            for i in 0..300 {
                let r = http
                    .post(format!("{base}{events}"))
                    .bearer_auth(&t)
                    .header("content-type", "application/json")
                    .body(json!({"type":"live","message":i.to_string()}).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        })
    };
    let mut sub = control(&coord, &t).await;
    next_json(&mut sub).await;
    send_json(
        &mut sub,
        json!({"type":"subscribe_run","runID":run,"after":0,"limit":100}),
    )
    .await;
    let mut cursor = 0i64;
    let mut dups = 0;
    while cursor < total {
        let m = next_json(&mut sub).await;
        assert_eq!(m["type"], "run_events", "{m}");
        let evs = m["events"].as_array().unwrap();
        for e in evs {
            let seq = e["seq"].as_i64().unwrap();
            if seq <= cursor {
                dups += 1; // a page may repeat what a push already delivered; clients drop by seq
                continue;
            }
            assert_eq!(seq, cursor + 1, "gap: got {seq} after {cursor}");
            cursor = seq;
        }
        send_json(&mut sub, json!({"type":"ack","runID":run,"seq":cursor})).await;
        if evs.len() >= 100 {
            send_json(
                &mut sub,
                json!({"type":"subscribe_run","runID":run,"after":cursor,"limit":100}),
            )
            .await;
        }
    }
    writer.await.unwrap();
    assert!(dups <= 5, "{dups} duplicates");
    // The earlier subscriber received every event by push alone.
    let mut seen = 2;
    while seen < total {
        let m = next_json(&mut ws).await;
        for e in m["events"].as_array().unwrap() {
            assert_eq!(e["seq"].as_i64().unwrap(), seen + 1);
            seen += 1;
        }
    }
}

#[tokio::test]
async fn ticket_route_shapes() {
    let (coord, http, t) = setup().await;
    let (s, v) = ticket(&http, &coord, &t, "egress-box", "host", None).await;
    assert_eq!(s, 200);
    let tk = v["ticket"].as_str().unwrap();
    assert!(crabbox_coordinator::ids::is_ticket(tk), "{tk}");
    assert_eq!(v["leaseID"], "cbx_0000000000e1");
    assert_eq!(v["role"], "host");
    let sid = v["sessionID"].as_str().unwrap();
    assert!(sid.starts_with("egress_") && sid.len() == 19, "{sid}");
    assert!(v["expiresAt"].as_str().unwrap().ends_with('Z'));
    // An invalid requested id is silently replaced by a server id.
    let (_, v) = ticket(&http, &coord, &t, "egress-box", "client", Some("bad id")).await;
    assert_ne!(v["sessionID"], "bad id");
    let (s, v) = ticket(&http, &coord, &t, "egress-box", "proxy", None).await;
    assert_eq!(
        (s, v),
        (
            400,
            json!({"error":"invalid_egress_role","message":"egress ticket role must be host or client"})
        )
    );
    // Without a JSON content type the role is not read.
    let r = http
        .post(format!(
            "{}/v1/leases/egress-box/egress/ticket",
            coord.base_url
        ))
        .bearer_auth(&t)
        .body(r#"{"role":"host"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/egress-box/egress/ticket",
        Some(&t),
        None,
    )
    .await;
    assert_eq!((s, v), (404, json!({"error":"not_found"})));
    // Status is routed for any method.
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/leases/egress-box/egress/status",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["slug"], "egress-box");
    for k in [
        "leaseID",
        "active",
        "sessionID",
        "profile",
        "allow",
        "hostConnected",
        "clientConnected",
        "createdAt",
        "updatedAt",
    ] {
        assert!(v.get(k).is_some(), "status lacks {k}: {v}");
    }
    // Profile and allow-list are bounded and inherited across sessions.
    let (_, v) = call(&http, &coord, "POST", "/v1/leases/egress-box/egress/ticket", Some(&t),
        Some(json!({"role":"host","profile":" discord ","allow":["Discord.com","discord.com","","*.discord.com"]}))).await;
    let sid = v["sessionID"].as_str().unwrap().to_owned();
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/egress-box/egress/status",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        (v["sessionID"].as_str(), v["profile"].as_str()),
        (Some(sid.as_str()), Some("discord"))
    );
    assert_eq!(v["allow"], json!(["discord.com", "*.discord.com"]));
    let (_, v2) = ticket(&http, &coord, &t, "egress-box", "client", None).await;
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/egress-box/egress/status",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        (v["sessionID"].as_str(), v["profile"].as_str()),
        (v2["sessionID"].as_str(), Some("discord"))
    );
    // Released lease: no tickets.
    call(
        &http,
        &coord,
        "POST",
        "/v1/leases/egress-box/release",
        Some(&t),
        None,
    )
    .await;
    let (s, v) = ticket(&http, &coord, &t, "cbx_0000000000e1", "host", None).await;
    assert_eq!(
        (s, v),
        (
            409,
            json!({"error":"egress_unavailable","message":"lease is not active"})
        )
    );
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/cbx_0000000000e1/egress/status",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(v["active"], false, "release clears egress state");
}

#[tokio::test]
async fn relay_is_byte_identical_and_keeps_frame_type() {
    let (coord, http, t) = setup().await;
    let (mut host, mut client, _) = pair(&coord, &http, &t, Some("egress_relay-test")).await;
    let blob: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for round in 0..2 {
        let (from, to) = if round == 0 {
            (&mut host, &mut client)
        } else {
            (&mut client, &mut host)
        };
        from.send(Message::Text(
            r#"{"type":"open","id":"c1","host":"example.com","port":"443"}"#.into(),
        ))
        .await
        .unwrap();
        from.send(Message::Binary(blob.clone().into()))
            .await
            .unwrap();
        from.send(Message::Binary(Vec::new().into())).await.unwrap();
        match next_msg(to).await {
            Message::Text(s) => assert_eq!(
                s.as_str(),
                r#"{"type":"open","id":"c1","host":"example.com","port":"443"}"#
            ),
            other => panic!("text became {other:?}"),
        }
        match next_msg(to).await {
            Message::Binary(b) => assert!(b[..] == blob[..], "binary differs"),
            other => panic!("binary became {other:?}"),
        }
        assert_eq!(next_msg(to).await, Message::Binary(Vec::new().into()));
    }
    // 11 MiB passes; 13 MiB closes the sender with 1009 and the peer learns it left.
    let big = vec![7u8; 11 << 20];
    host.send(Message::Binary(big.clone().into()))
        .await
        .unwrap();
    match next_msg(&mut client).await {
        Message::Binary(b) => assert_eq!(b.len(), big.len()),
        other => panic!("{other:?}"),
    }
    host.send(Message::Binary(vec![1u8; 13 << 20].into()))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut host).await.0, 1009);
    assert_eq!(
        expect_close(&mut client).await,
        (1011, "egress host disconnected".into())
    );
}

#[tokio::test]
async fn close_codes_and_replacement() {
    let (coord, http, t) = setup().await;
    let status = |coord: &TestCoordinator, http: &reqwest::Client, t: &str| {
        let (coord, http, t) = (coord.base_url.clone(), http.clone(), t.to_owned());
        async move {
            http.get(format!("{coord}/v1/leases/cbx_0000000000e1/egress/status"))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };

    // Client leaves → host closed 1011; session stays active, nothing connected.
    let (mut host, mut client, sid) = pair(&coord, &http, &t, Some("egress_session-one")).await;
    client.close(None).await.unwrap();
    assert_eq!(
        expect_close(&mut host).await,
        (1011, "egress client disconnected".into())
    );
    eventually(|| async {
        let v = status(&coord, &http, &t).await;
        v["active"] == true
            && v["hostConnected"] == false
            && v["clientConnected"] == false
            && v["sessionID"] == sid.as_str()
    })
    .await;

    // Host leaves → client closed 1011 (reconnecting the same session is harmless).
    let (mut host, mut client, _) = pair(&coord, &http, &t, Some("egress_session-one")).await;
    host.close(None).await.unwrap();
    assert_eq!(
        expect_close(&mut client).await,
        (1011, "egress host disconnected".into())
    );

    // A second host on the same session replaces the first.
    let (mut host, mut client, _) = pair(&coord, &http, &t, Some("egress_session-one")).await;
    let (_, h2) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "host",
        Some("egress_session-one"),
    )
    .await;
    let mut host2 = bridge(
        &coord,
        "cbx_0000000000e1",
        "host",
        h2["ticket"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        expect_close(&mut host).await,
        (1012, "replaced by a newer egress host".into())
    );
    // The pair keeps working with the new host; the old host's exit did not tear it down.
    host2.send(Message::Text("after".into())).await.unwrap();
    assert_eq!(next_msg(&mut client).await, Message::Text("after".into()));
    // Likewise a second client replaces the first.
    let (_, c2) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "client",
        Some("egress_session-one"),
    )
    .await;
    let mut client2 = bridge(
        &coord,
        "cbx_0000000000e1",
        "client",
        c2["ticket"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        expect_close(&mut client).await,
        (1012, "replaced by a newer egress client".into())
    );
    let mut client = {
        client2
            .send(Message::Binary(vec![9u8; 3].into()))
            .await
            .unwrap();
        assert_eq!(
            next_msg(&mut host2).await,
            Message::Binary(vec![9u8; 3].into())
        );
        client2
    };
    assert_eq!(next_msg_or_none(&mut client).await, None);

    // A ticket minted for the old session before the replacement...
    let (_, stale) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "client",
        Some("egress_session-one"),
    )
    .await;
    // ...then a new session replaces it: both sockets get 1012.
    let (s, v) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "host",
        Some("egress_session-two"),
    )
    .await;
    assert_eq!(
        (s, v["sessionID"].as_str()),
        (200, Some("egress_session-two"))
    );
    assert_eq!(
        expect_close(&mut host2).await,
        (1012, "replaced by a newer egress session".into())
    );
    assert_eq!(
        expect_close(&mut client).await,
        (1012, "replaced by a newer egress session".into())
    );
    // The old session is tombstoned for mints and for upgrades.
    let (s, v) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "host",
        Some("egress_session-one"),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            409,
            json!({"error":"egress_session_replaced","message":"egress session was replaced by a newer session"})
        )
    );
    let url = coord.ws_url("/v1/leases/cbx_0000000000e1/egress/client");
    let err = ws_connect(
        &url,
        &[("x-crabbox-bridge-ticket", stale["ticket"].as_str().unwrap())],
    )
    .await
    .unwrap_err();
    assert_eq!(refusal(&err).0, 409);
    let v = status(&coord, &http, &t).await;
    assert_eq!(v["sessionID"], "egress_session-two");

    // Release closes the lease's bridges 1008 "lease ended".
    let (mut host, mut client, _) = pair(&coord, &http, &t, Some("egress_session-two")).await;
    call(
        &http,
        &coord,
        "POST",
        "/v1/leases/cbx_0000000000e1/release",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(expect_close(&mut host).await, (1008, "lease ended".into()));
    assert_eq!(
        expect_close(&mut client).await,
        (1008, "lease ended".into())
    );
    // Teardown forgot the tombstones too: the lease has no egress state.
    let v = status(&coord, &http, &t).await;
    assert_eq!(v["active"], false);
}

#[tokio::test]
async fn expiry_closes_bridges() {
    let (coord, http, t) = setup().await;
    let (mut host, mut client, _) = pair(&coord, &http, &t, None).await;
    coord.clock.advance(Duration::from_secs(601));
    assert_eq!(
        expect_close(&mut host).await,
        (1008, "lease expired".into())
    );
    assert_eq!(
        expect_close(&mut client).await,
        (1008, "lease expired".into())
    );
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        "/v1/leases/cbx_0000000000e1",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(v["lease"]["state"], "expired");
}

#[tokio::test]
async fn tickets_are_one_use_role_bound_and_expire() {
    let (coord, http, t) = setup().await;
    let path = "/v1/leases/cbx_0000000000e1/egress";
    let (_, h) = ticket(&http, &coord, &t, "cbx_0000000000e1", "host", None).await;
    let tk = h["ticket"].as_str().unwrap().to_owned();
    let refused =
        json!({"error":"egress_ticket_required","message":"valid egress bridge ticket required"});

    // Wrong role.
    let err = ws_connect(
        &coord.ws_url(&format!("{path}/client")),
        &[("x-crabbox-bridge-ticket", &tk)],
    )
    .await
    .unwrap_err();
    assert_eq!(refusal(&err), (401, refused.clone()));
    // Query tickets are refused unless explicitly allowed.
    let err = ws_connect(&coord.ws_url(&format!("{path}/host?ticket={tk}")), &[])
        .await
        .unwrap_err();
    assert_eq!(refusal(&err), (401, refused.clone()));
    // Another lease's path → 404.
    register(
        &http,
        &coord,
        &t,
        "cbx_0000000000e2",
        "other-box",
        3600,
        600,
    )
    .await;
    let err = ws_connect(
        &coord.ws_url("/v1/leases/cbx_0000000000e2/egress/host"),
        &[("x-crabbox-bridge-ticket", &tk)],
    )
    .await
    .unwrap_err();
    assert_eq!(refusal(&err).0, 404);
    // Authorization: Bearer <ticket> works, by slug too; a second use is refused.
    let bearer = format!("Bearer {tk}");
    let ws = ws_connect(
        &coord.ws_url("/v1/leases/egress-box/egress/host"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    drop(ws);
    let err = ws_connect(
        &coord.ws_url(&format!("{path}/host")),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap_err();
    assert_eq!(refusal(&err), (401, refused.clone()));
    // No ticket at all; and a plain GET (no upgrade) needs auth, then 426.
    let err = ws_connect(&coord.ws_url(&format!("{path}/host")), &[])
        .await
        .unwrap_err();
    assert_eq!(refusal(&err), (401, refused.clone()));
    let (s, v) = call(&http, &coord, "GET", &format!("{path}/host"), None, None).await;
    assert_eq!((s, v), (401, json!({"error":"unauthorized"})));
    let (s, v) = call(
        &http,
        &coord,
        "GET",
        &format!("{path}/host"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        (s, v),
        (
            426,
            json!({"error":"upgrade_required","message":"egress bridge requires a websocket upgrade"})
        )
    );
    // Expired after 120 s (injected clock).
    let (_, h) = ticket(&http, &coord, &t, "cbx_0000000000e1", "host", None).await;
    coord.clock.advance(Duration::from_secs(121));
    let err = ws_connect(
        &coord.ws_url(&format!("{path}/host")),
        &[("x-crabbox-bridge-ticket", h["ticket"].as_str().unwrap())],
    )
    .await
    .unwrap_err();
    assert_eq!(refusal(&err), (401, refused));
}

#[tokio::test]
async fn query_tickets_only_with_the_flag() {
    let coord = TestCoordinator::start_with(|c| c.allow_query_bridge_tickets = true).await;
    let http = http();
    let t = coord.user_token("alice@example.com", "acme", "alice");
    register(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "egress-box",
        3600,
        600,
    )
    .await;
    let (_, h) = ticket(&http, &coord, &t, "cbx_0000000000e1", "host", None).await;
    let url = coord.ws_url(&format!(
        "/v1/leases/cbx_0000000000e1/egress/host?ticket={}",
        h["ticket"].as_str().unwrap()
    ));
    let mut ws = ws_connect(&url, &[])
        .await
        .expect("query ticket accepted with the flag");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn frames_without_a_peer_are_dropped() {
    let (coord, http, t) = setup().await;
    let (_, h) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "host",
        Some("egress_lonely-host"),
    )
    .await;
    let mut host = bridge(
        &coord,
        "cbx_0000000000e1",
        "host",
        h["ticket"].as_str().unwrap(),
    )
    .await;
    host.send(Message::Text("into the void".into()))
        .await
        .unwrap();
    let (_, c) = ticket(
        &http,
        &coord,
        &t,
        "cbx_0000000000e1",
        "client",
        Some("egress_lonely-host"),
    )
    .await;
    let mut client = bridge(
        &coord,
        "cbx_0000000000e1",
        "client",
        c["ticket"].as_str().unwrap(),
    )
    .await;
    eventually(|| async {
        let (_, v) = call(
            &http,
            &coord,
            "GET",
            "/v1/leases/cbx_0000000000e1/egress/status",
            Some(&t),
            None,
        )
        .await;
        v["clientConnected"] == true
    })
    .await;
    host.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_msg(&mut client).await, Message::Text("hello".into()));
}

#[tokio::test]
async fn shutdown_closes_sockets_1012() {
    let (coord, http, t) = setup().await;
    let (mut host, _client, _) = pair(&coord, &http, &t, None).await;
    let mut ctl = control(&coord, &t).await;
    next_json(&mut ctl).await;
    let stopping = tokio::spawn(coord.stop());
    assert_eq!(
        expect_close(&mut host).await,
        (1012, "coordinator shutting down".into())
    );
    assert_eq!(
        expect_close(&mut ctl).await,
        (1012, "coordinator shutting down".into())
    );
    drop(_client);
    stopping.await.unwrap().unwrap();
}
