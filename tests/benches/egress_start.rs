//! Benchmark of `egress start` over SSH (run with `bench/egress_start.sh`;
//! numbers go to docs/benchmarks.md; nothing here asserts):
//!
//! * time from `egress start` to the first proxied byte inside the lease,
//!   cold (the helper uploaded) and warm (the cached helper), against the
//!   reference flow's steps done by hand with OpenSSH: `egress host`, a
//!   ticket, `scp` of the helper to `/tmp`, `ssh … nohup helper &`, then
//!   fetches until the first byte;
//! * headless Chromium loading a many-resource HTTPS page through the bridge
//!   against the same page direct (no proxy, in the root namespace), rounds
//!   interleaved, with the page's own `performance.now()` at its load event,
//!   and the same page through squid (one `CONNECT` hop in the root
//!   namespace, when squid is installed), which separates the cost of
//!   Chromium using any proxy from the cost of our path.
//!
//! The lease is a network namespace with a real sshd (tests/src/lease.rs).

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{
    TestDaemon,
    egress::Origin,
    lease::TestLease,
    page::{PageOrigin, chromium, chromium_flags},
};
use tokio::time::Instant;

const LEASE: &str = "cbx_00000000be11";

async fn first_byte(lease: &TestLease, proxy: &str, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if lease.curl(Some(proxy), url).await.0 {
            return;
        }
        assert!(Instant::now() < deadline, "no first byte");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn ctl_ok(d: &TestDaemon, args: &[&str]) -> String {
    let out = d.ctl(args).await;
    assert!(
        out.status.success(),
        "crabboxctl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A squid `CONNECT` proxy on a free loopback port (no cache, no logs),
/// killed on drop; `None` when squid is not installed.
async fn squid(dir: &std::path::Path) -> Option<(tokio::process::Child, String)> {
    let bin = ["/usr/sbin/squid", "/usr/bin/squid"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    // squid drops to its own user when run as root: it must reach the files.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).ok()?;
    let d = dir.display();
    let conf = dir.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}\nhttp_access allow all\ncache deny all\naccess_log none\n\
             cache_log {d}/cache.log\npid_filename {d}/squid.pid\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"
        ),
    )
    .ok()?;
    let child = tokio::process::Command::new(bin)
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some((child, format!("http://127.0.0.1:{port}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One page load; returns the page's load time (ms) from its own clock.
async fn page_load(
    prefix: &[&str],
    chromium: &str,
    flags: &[String],
    extra: &[String],
    url: &str,
) -> Option<f64> {
    let profile = tempfile::tempdir().unwrap();
    // CRABBOX_BENCH_NETLOG=<dir>: each load writes Chromium's NetLog there
    // (per-request DNS/connect/TLS/proxy timings, for chrome://net-export's viewer).
    let netlog = std::env::var_os("CRABBOX_BENCH_NETLOG").map(|dir| {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kind = if extra.is_empty() { "direct" } else { "proxy" };
        let file = std::path::Path::new(&dir).join(format!("{n:02}-{kind}.json"));
        format!("--log-net-log={}", file.display())
    });
    let mut cmd = tokio::process::Command::new(prefix.first().copied().unwrap_or(chromium));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(chromium);
    }
    let out = cmd
        .args(flags)
        .args(extra)
        .args(netlog)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stderr(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    dom.split("loadms=")
        .nth(1)?
        .split('<')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let rounds: usize = std::env::var("CRABBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let coord = TestCoordinator::start().await;
    let lease = TestLease::start(61, coord.addr).await;
    coord
        .register_lease_with(&coord.shared_token, LEASE, &lease.registration("bench"))
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .toml(&lease.daemon_toml())
        .start()
        .await;
    let origin = Origin::start().await;
    let proxy = "http://127.0.0.1:3128";
    let start_args = [
        "egress",
        "start",
        "--id",
        LEASE,
        "--allow",
        "127.0.0.1",
        "--allow-private",
        "--coordinator",
        &lease.coordinator_url,
    ];

    // Cold, then warm rounds (stop in between).
    let mut cold = vec![];
    let mut warm = vec![];
    let mut manual = vec![];
    for round in 0..rounds {
        // Cold: a fresh helper cache.
        let _ = std::fs::remove_dir_all(lease.path(".cache/crabbox/bin"));
        let t = Instant::now();
        ctl_ok(&d, &start_args).await;
        first_byte(&lease, proxy, &origin.url(&format!("cold{round}"))).await;
        cold.push(ms(t.elapsed()));
        ctl_ok(&d, &["egress", "stop", "--id", LEASE]).await;

        let t = Instant::now();
        ctl_ok(&d, &start_args).await;
        first_byte(&lease, proxy, &origin.url(&format!("warm{round}"))).await;
        warm.push(ms(t.elapsed()));
        ctl_ok(&d, &["egress", "stop", "--id", LEASE]).await;

        // The reference's manual flow with OpenSSH.
        let t = Instant::now();
        let host = ctl_ok(
            &d,
            &[
                "egress",
                "host",
                "--id",
                LEASE,
                "--allow",
                "127.0.0.1",
                "--allow-private",
                "--json",
            ],
        )
        .await;
        let session = serde_json::from_str::<serde_json::Value>(&host).unwrap()["session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ticket = ctl_ok(&d, &["egress", "ticket", "--id", LEASE]).await;
        let helper = crabbox_tests::bins::bin("crabbox-egress-client");
        let target = format!("{}@{}", lease.sshd.user, lease.ns.ns_ip);
        let ssh_opts = [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ];
        // -O: the classic scp protocol (the lease's sshd runs no sftp subsystem).
        let scp = tokio::process::Command::new("scp")
            .arg("-O")
            .args(ssh_opts)
            .arg(&lease.sshd.client_key)
            .arg(&helper)
            .arg(format!("{target}:/tmp/crabbox-egress-client-bench"))
            .output()
            .await
            .unwrap();
        assert!(
            scp.status.success(),
            "{}",
            String::from_utf8_lossy(&scp.stderr)
        );
        let remote = format!(
            "printf '%s' '{}' > /tmp/cbx-bench-ticket; chmod 600 /tmp/cbx-bench-ticket; nohup /tmp/crabbox-egress-client-bench --coordinator '{}' --id {LEASE} --session {session} --listen 127.0.0.1:3128 --control /tmp/cbx-bench.sock --ticket-file /tmp/cbx-bench-ticket > /tmp/cbx-bench.log 2>&1 < /dev/null &",
            ticket.trim(),
            lease.coordinator_url
        );
        let ssh = tokio::process::Command::new("ssh")
            .args(ssh_opts)
            .arg(&lease.sshd.client_key)
            .arg(&target)
            .arg(&remote)
            .output()
            .await
            .unwrap();
        assert!(
            ssh.status.success(),
            "{}",
            String::from_utf8_lossy(&ssh.stderr)
        );
        first_byte(&lease, proxy, &origin.url(&format!("manual{round}"))).await;
        manual.push(ms(t.elapsed()));
        let _ = tokio::process::Command::new("ssh")
            .args(ssh_opts)
            .arg(&lease.sshd.client_key)
            .arg(&target)
            .arg("pkill -f '[c]rabbox-egress-client-bench'; rm -f /tmp/crabbox-egress-client-bench /tmp/cbx-bench-ticket /tmp/cbx-bench.log /tmp/cbx-bench.sock")
            .output()
            .await;
        ctl_ok(&d, &["egress", "stop", "--id", LEASE]).await;
    }
    println!(
        "egress start -> first proxied byte (median of {rounds}): cold {:.0} ms, warm {:.0} ms; manual scp+nohup {:.0} ms",
        median(cold.clone()),
        median(warm.clone()),
        median(manual.clone())
    );
    println!("  cold {cold:.0?}\n  warm {warm:.0?}\n  manual {manual:.0?}");

    // Chromium: through the bridge vs direct, interleaved.
    let Some(chromium) = chromium() else {
        eprintln!("chromium missing: no page-load rows");
        return;
    };
    ctl_ok(&d, &start_args).await;
    first_byte(&lease, proxy, &origin.url("page-warmup")).await;
    let page = PageOrigin::start().await;
    let flags = chromium_flags(&page.spki);
    let ns_prefix = ["ip", "netns", "exec", lease.ns.name.as_str()];
    let via = [
        format!("--proxy-server={proxy}"),
        "--proxy-bypass-list=<-loopback>".to_owned(),
    ];
    let squid_dir = tempfile::tempdir().unwrap();
    let squid = squid(squid_dir.path()).await;
    let via_squid = squid.as_ref().map(|(_, url)| {
        [
            format!("--proxy-server={url}"),
            "--proxy-bypass-list=<-loopback>".to_owned(),
        ]
    });
    let (mut through, mut direct, mut squided) = (vec![], vec![], vec![]);
    // One unmeasured load each to warm caches of the OS.
    page_load(&ns_prefix, chromium, &flags, &via, &page.url()).await;
    page_load(&[], chromium, &flags, &[], &page.url()).await;
    for _ in 0..rounds {
        if let Some(t) = page_load(&ns_prefix, chromium, &flags, &via, &page.url()).await {
            through.push(t);
        }
        if let Some(t) = page_load(&[], chromium, &flags, &[], &page.url()).await {
            direct.push(t);
        }
        if let Some(v) = &via_squid
            && let Some(t) = page_load(&[], chromium, &flags, v, &page.url()).await
        {
            squided.push(t);
        }
    }
    if through.is_empty() || direct.is_empty() {
        println!("page load: no measurement (through {through:?}, direct {direct:?})");
        return;
    }
    let (t, dm) = (median(through.clone()), median(direct.clone()));
    println!(
        "chromium page load (median of {}): through the bridge {t:.0} ms, direct {dm:.0} ms, x{:.2}",
        through.len(),
        t / dm
    );
    println!("  through {through:.0?}\n  direct {direct:.0?}");
    if !squided.is_empty() {
        let sq = median(squided.clone());
        println!(
            "  through squid CONNECT (root namespace): {sq:.0} ms, x{:.2} direct; the bridge is x{:.2} squid",
            sq / dm,
            t / sq
        );
        println!("  squid {squided:.0?}");
    }
}
