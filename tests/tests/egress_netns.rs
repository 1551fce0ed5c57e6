//! Proof that traffic takes the bridge: the lease-side helper runs in its
//! own network namespace, which reaches the coordinator over a veth and
//! nothing else. The origin listens on the root namespace's loopback, which
//! the lease namespace cannot reach; curl inside the lease still fetches it,
//! through the helper, the coordinator and the daemon's egress host.

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{
    TestDaemon,
    egress::{EgressHelper, Origin},
    netns::TestNetns,
};

const LEASE: &str = "cbx_00000000ee01";

/// Forwards `listen` to `to` (the coordinator listens on loopback only;
/// the namespace reaches it through this forwarder on the veth address).
async fn forward(listen: tokio::net::TcpListener, to: std::net::SocketAddr) {
    while let Ok((mut inbound, _)) = listen.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

async fn curl_in(ns: &TestNetns, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("ip")
        .args(ns.exec_prefix()[1..].iter())
        .arg("curl")
        .args(["-sS", "--fail", "--max-time", "5"])
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_from_the_lease_namespace_leaves_from_the_daemon() {
    if !TestNetns::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with iproute2: this test must run there"
        );
        eprintln!("SKIP: needs root and iproute2 to create a network namespace");
        return;
    }
    let ns = TestNetns::create(1).expect("create the test namespace");
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "ns-crab")
        .await
        .unwrap();
    let fwd = tokio::net::TcpListener::bind((ns.host_ip, 0))
        .await
        .unwrap();
    let coord_from_ns = format!("http://{}", fwd.local_addr().unwrap());
    tokio::spawn(forward(fwd, coord.addr));

    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let origin = Origin::start().await;

    // Inside the lease namespace the origin does not exist.
    let direct = curl_in(&ns, &[&origin.url("direct")]).await;
    assert!(
        !direct.status.success(),
        "the namespace must not reach the root loopback"
    );

    let session = d.egress_host_private(LEASE, "127.0.0.1").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ticket = d.home().join("ns-ticket");
    let out = d
        .ctl(&[
            "egress",
            "ticket",
            "--id",
            LEASE,
            "--out",
            ticket.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let helper = EgressHelper::start_with_prefix(
        &ns.exec_prefix(),
        &coord_from_ns,
        LEASE,
        &session,
        &ticket,
        d.home(),
    )
    .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let out = curl_in(&ns, &["-x", &helper.proxy_url(), &origin.url("through")]).await;
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fetch through the bridge: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, origin.body);
    // The origin saw the connection come from the root namespace's
    // loopback — the daemon's side — not from the lease's veth address.
    let peers = origin.peers.lock().unwrap().clone();
    assert!(!peers.is_empty());
    assert!(peers.iter().all(|p| p.ip().is_loopback()), "{peers:?}");
}
