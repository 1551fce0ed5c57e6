//! `desktop launch --browser --egress` end to end: after `egress start`, the
//! daemon launches headless Chromium inside the lease namespace (a `chromium`
//! shim first on the lease user's PATH adds the headless flags and dumps the
//! DOM), and the page — HTML, CSS, scripts, eight images and a 4 MiB script
//! over HTTPS from the root namespace's loopback — loads through the helper.
//! Without egress, `desktop launch` refuses, and Chromium alone cannot load it.

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{
    TestDaemon,
    lease::TestLease,
    page::{PageOrigin, chromium, chromium_flags, loaded_marker, wait_for_dom},
    text,
};

const LEASE: &str = "cbx_00000000e512";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_launch_loads_a_many_resource_https_page_through_the_helper() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let Some(chromium) = chromium() else {
        eprintln!("skipped: needs /usr/bin/chromium (apt-get install chromium)");
        return;
    };
    let coord = TestCoordinator::start().await;
    let lease = TestLease::start(47, coord.addr).await;
    coord
        .register_lease_with(&coord.shared_token, LEASE, &lease.registration("browser"))
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .toml(&lease.daemon_toml())
        .start()
        .await;
    let page = PageOrigin::start().await;
    let dom = lease.path("dom.html");
    let flags = chromium_flags(&page.spki).join(" ");
    lease.shim(
        "chromium",
        &format!(
            "exec {chromium} {flags} --dump-dom \"$@\" > {} 2> {}",
            dom.display(),
            lease.path("chromium.err").display()
        ),
    );

    // No egress yet: refused with a sentence naming `egress start`.
    let out = d
        .ctl(&[
            "desktop",
            "launch",
            "--id",
            LEASE,
            "--browser",
            "--url",
            &page.url(),
            "--egress",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("egress start"),
        "{}",
        text(&out.stderr)
    );

    // Chromium alone, inside the lease, cannot load the page.
    let alone = lease.path("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let direct = lease
        .run(&[
            "sh",
            "-c",
            &format!(
                "{chromium} {flags} --user-data-dir={} --dump-dom {} 2>/dev/null",
                alone.display(),
                page.url()
            ),
        ])
        .await;
    assert!(
        !text(&direct.stdout).contains(&loaded_marker()),
        "{}",
        text(&direct.stdout)
    );
    assert!(page.served.lock().unwrap().is_empty());

    let out = d
        .ctl(&[
            "egress",
            "start",
            "--id",
            LEASE,
            "--allow",
            "127.0.0.1",
            "--allow-private",
            "--coordinator",
            &lease.coordinator_url,
        ])
        .await;
    assert!(
        out.status.success(),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        d.stderr()
    );

    let out = d
        .ctl(&[
            "desktop",
            "launch",
            "--id",
            LEASE,
            "--browser",
            "--url",
            &page.url(),
            "--egress",
            "local",
            "--json",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        d.stderr()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let argv: Vec<String> = serde_json::from_value(v["argv"].clone()).unwrap();
    assert!(
        argv.contains(&"--proxy-server=http://127.0.0.1:3128".to_owned()),
        "{argv:?}"
    );
    assert!(
        argv.contains(&"--proxy-bypass-list=<-loopback>".to_owned()),
        "{argv:?}"
    );
    let session = v["session_id"].as_str().unwrap();
    assert!(v["profile_dir"].as_str().unwrap().ends_with(session), "{v}");
    assert!(
        argv.iter()
            .any(|a| a.starts_with("--user-data-dir=") && a.ends_with(session))
    );

    let dom = wait_for_dom(&dom, Duration::from_secs(90)).await;
    assert!(
        dom.contains(&loaded_marker()),
        "the page did not load through the helper: {dom}\n{}",
        std::fs::read_to_string(lease.path("chromium.err")).unwrap_or_default()
    );
    page.served_everything().unwrap();
    let peers = page.peers.lock().unwrap().clone();
    assert!(peers.iter().all(|p| p.ip().is_loopback()), "{peers:?}");
}
