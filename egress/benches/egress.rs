//! Egress benchmark, one run on loopback, side by side: direct, squid CONNECT, `ssh -D`, and our helper + host across a WebSocket relay process (v1 and v2).
//!
//! Run through `bench/egress/run.sh`. Paths whose tools are missing (squid,
//! sshd) are skipped with a note. Numbers are printed as a Markdown table.

// The handshake callback signature is tungstenite's; its large error type is not ours to shrink.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crabbox_egress::memory::ws_config;
use crabbox_egress::{BridgeConfig, HostConfig, Policy, run_host};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy)]
enum Via {
    Direct,
    Connect(SocketAddr),
    Socks5(SocketAddr),
}

struct Opts {
    only: Option<String>,
    bulk: u64,
    small_runs: usize,
    concurrent: usize,
    /// Interleaved rounds; each printed figure is the median.
    rounds: usize,
    /// Whether to run the stalled-stream column (`--no-fairness` skips it).
    fairness: bool,
}

fn main() {
    if std::env::var_os("EGRESS_BENCH_RELAY").is_some() {
        return relay_process();
    }
    if let Ok(next) = std::env::var("EGRESS_BENCH_FORWARD") {
        return forward_process(
            &next,
            std::env::var_os("EGRESS_BENCH_FORWARD_CONNECT").is_some(),
        );
    }
    let arg = |name: &str, default: u64| -> u64 {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let opts = Opts {
        only,
        bulk: arg("--bulk-mib", 1024) << 20,
        small_runs: arg("--small", 500) as usize,
        concurrent: arg("--concurrent", 1000) as usize,
        rounds: arg("--rounds", 1).max(1) as usize,
        fairness: !args.iter().any(|a| a == "--no-fairness"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(opts));
}

async fn run(opts: Opts) {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    // Every path is set up first and stays up, so rounds can interleave:
    // round 1 measures every path, then round 2, ... (a burst of load from
    // another process then hits every row alike). Each figure printed is the
    // median over the rounds.
    let mut paths: Vec<(String, Via)> = vec![("direct".into(), Via::Direct)];
    let mut children = Vec::new();
    let mut skipped = Vec::new();
    let squid = if wanted(&opts, "squid CONNECT") {
        start_squid(dir.path()).await
    } else {
        None
    };
    match squid {
        Some((child, addr)) => {
            paths.push(("squid CONNECT".into(), Via::Connect(addr)));
            children.push(child);
        }
        None if wanted(&opts, "squid CONNECT") => {
            skipped.push("| squid CONNECT | skipped (squid not installed) | | | | | |")
        }
        None => {}
    }
    let ssh = if wanted(&opts, "ssh -D (OpenSSH, loopback)") {
        start_ssh(dir.path()).await
    } else {
        None
    };
    match ssh {
        Some((c, addr)) => {
            paths.push(("ssh -D (OpenSSH, loopback)".into(), Via::Socks5(addr)));
            children.extend(c);
        }
        None if wanted(&opts, "ssh -D (OpenSSH, loopback)") => {
            skipped.push("| ssh -D | skipped (openssh-server not installed) | | | | | |")
        }
        None => {}
    }
    // The physical shape of the path without its protocol: processes that
    // only copy bytes (tokio's `copy_bidirectional`), the first answering
    // CONNECT. One hop has squid's shape; three have ours (helper,
    // coordinator relay, daemon host), so the pair shows what the extra
    // hops alone cost on this machine.
    for hops in [1, 3] {
        let name = format!(
            "bare TCP forwarders (tokio copy), {hops} hop{}",
            if hops > 1 { "s" } else { "" }
        );
        if !wanted(&opts, &name) {
            continue;
        }
        let (c, entry) = start_chain(hops, origin);
        paths.push((name, Via::Connect(entry)));
        children.extend(c);
    }
    for v2 in [false, true] {
        let name = if v2 {
            "crabbox v2 (yamux) via WS relay"
        } else {
            "crabbox v1 (JSON) via WS relay"
        };
        if !wanted(&opts, name) {
            continue;
        }
        let (c, proxy) = start_ours(dir.path(), v2).await;
        paths.push((name.into(), Via::Connect(proxy)));
        children.extend(c);
    }
    // Proxies set up outside this bench, measured in the same run: e.g. the
    // whole daemon path started by `bench/e2e.sh` (`NAME=127.0.0.1:PORT`,
    // several separated by `;`).
    // `EGRESS_BENCH_EXTRA_PROXIES` takes the same list, where `socks5:ADDR`
    // names a SOCKS5 proxy (bench/egress_ssh.sh: `ssh -R` and
    // `--transport ssh`).
    for var in ["EGRESS_BENCH_EXTRA_PROXY", "EGRESS_BENCH_EXTRA_PROXIES"] {
        let Ok(extra) = std::env::var(var) else {
            continue;
        };
        for entry in extra.split(';') {
            let Some((name, addr)) = entry.rsplit_once('=') else {
                continue;
            };
            let via = match addr.strip_prefix("socks5:") {
                Some(a) => a.parse::<SocketAddr>().map(Via::Socks5),
                None => addr.parse::<SocketAddr>().map(Via::Connect),
            };
            if let Ok(via) = via {
                paths.push((name.to_owned(), via));
            }
        }
    }
    paths.retain(|(name, _)| wanted(&opts, name));
    let mut rows: Vec<Vec<Row>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (i, (name, via)) in paths.iter().enumerate() {
            let row = measure(*via, origin, &opts).await;
            if opts.rounds > 1 {
                eprintln!("round {}: {}", round + 1, row.render(name, &opts));
            }
            rows[i].push(row);
        }
    }
    println!(
        "| path | bulk {} MiB (MiB/s) | small 1 KiB p50 (ms) | p99 (ms) | {} streams: errors | time (s) | stalled stream: others' loss |",
        opts.bulk >> 20,
        opts.concurrent
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ((name, _), rows) in paths.iter().zip(&rows) {
        println!("{}", Row::median(rows).render(name, &opts));
    }
    for line in skipped {
        println!("{line}");
    }
    children.into_iter().for_each(kill);
}

fn wanted(opts: &Opts, name: &str) -> bool {
    // `--only a,b` keeps the paths whose name contains any of the parts.
    opts.only
        .as_ref()
        .is_none_or(|o| o.split(',').any(|part| name.contains(part)))
}

/// One path's figures in one round.
#[derive(Clone, Default)]
struct Row {
    bulk: Option<f64>,
    p50: f64,
    p99: f64,
    small_errors: usize,
    errors: usize,
    secs: f64,
    fair: Option<f64>,
}

impl Row {
    /// Per-column median over the rounds (a failed bulk or fairness counts as missing).
    fn median(rows: &[Row]) -> Row {
        fn mid(mut v: Vec<f64>) -> Option<f64> {
            v.retain(|x| x.is_finite());
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (!v.is_empty()).then(|| v[v.len() / 2])
        }
        let col = |f: &dyn Fn(&Row) -> Option<f64>| mid(rows.iter().filter_map(f).collect());
        Row {
            bulk: col(&|r| r.bulk),
            p50: col(&|r| Some(r.p50)).unwrap_or(f64::NAN),
            p99: col(&|r| Some(r.p99)).unwrap_or(f64::NAN),
            small_errors: rows.iter().map(|r| r.small_errors).max().unwrap_or(0),
            errors: rows.iter().map(|r| r.errors).max().unwrap_or(0),
            secs: col(&|r| Some(r.secs)).unwrap_or(f64::NAN),
            fair: col(&|r| r.fair),
        }
    }

    /// A column that was not run (`--small 0`, `--concurrent 0`, `--no-fairness`) shows `—`.
    fn render(&self, name: &str, opts: &Opts) -> String {
        let note = if self.small_errors > 0 {
            format!(" ({} small-fetch errors)", self.small_errors)
        } else {
            String::new()
        };
        format!(
            "| {name}{note} | {} | {} | {} | {} | {} | {} |",
            self.bulk.map_or("error".into(), |m| format!("{m:.0}")),
            cell_if(opts.small_runs > 0, format!("{:.3}", self.p50)),
            cell_if(opts.small_runs > 0, format!("{:.3}", self.p99)),
            cell_if(opts.concurrent > 0, self.errors.to_string()),
            cell_if(opts.concurrent > 0, format!("{:.2}", self.secs)),
            cell_if(
                opts.fairness,
                self.fair
                    .map_or("error".into(), |f| format!("{:.1} %", f * 100.0))
            ),
        )
    }
}

/// `cell`, or `—` for a column that was not run.
fn cell_if(ran: bool, cell: String) -> String {
    if ran { cell } else { "—".into() }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

async fn measure(via: Via, origin: SocketAddr, opts: &Opts) -> Row {
    let bulk = bulk(via, origin, opts.bulk).await;
    let mut lat = Vec::with_capacity(opts.small_runs);
    for _ in 0..opts.small_runs {
        let start = Instant::now();
        if let Ok(1024) = fetch(via, origin, 1024).await {
            lat.push(start.elapsed());
        }
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let (errors, secs) = if opts.concurrent > 0 {
        concurrent(via, origin, opts.concurrent).await
    } else {
        (0, f64::NAN)
    };
    let fair = if opts.fairness {
        fairness(via, origin, (opts.bulk / 4).max(64 << 20)).await
    } else {
        None
    };
    Row {
        bulk,
        p50: pct(0.5),
        p99: pct(0.99),
        small_errors: opts.small_runs - lat.len(),
        errors,
        secs,
        fair,
    }
}

// === origin ===

/// `GET /bytes/<n>` answers n bytes; `GET /stall` streams forever. One request per connection.
async fn start_origin() -> SocketAddr {
    // A 4096-deep accept queue: with `TcpListener::bind`'s 128, 1000
    // simultaneous dials overflow it and the dropped ones wait out a 1 s SYN
    // retry, which the 1000-stream column then measured instead of the path.
    let listener = crabbox_egress::proxy::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let chunk: Arc<[u8]> = vec![b'z'; 256 * 1024].into();
        while let Ok((mut s, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&buf).to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                let len: Option<u64> = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok());
                let head = match len {
                    Some(n) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                    ),
                    None => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_owned(),
                };
                if len.is_some_and(|n| n <= 64 * 1024) {
                    let mut all = head.into_bytes();
                    all.extend_from_slice(&chunk[..len.unwrap() as usize]);
                    let _ = s.write_all(&all).await;
                    return;
                }
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut left = len.unwrap_or(u64::MAX);
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

// === client ===

async fn open(via: Via, origin: SocketAddr) -> std::io::Result<TcpStream> {
    let bad = |m: &str| std::io::Error::other(m.to_owned());
    match via {
        Via::Direct => {
            let s = TcpStream::connect(origin).await?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Via::Connect(proxy) => {
            let mut s = TcpStream::connect(proxy).await?;
            s.set_nodelay(true)?;
            s.write_all(format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
                .await?;
            let mut head = Vec::with_capacity(128);
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).await? == 0 {
                    return Err(bad("proxy closed"));
                }
                head.push(b[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                return Err(bad(&String::from_utf8_lossy(&head)));
            }
            Ok(s)
        }
        Via::Socks5(proxy) => {
            let mut s = TcpStream::connect(proxy).await?;
            s.set_nodelay(true)?;
            s.write_all(&[5, 1, 0]).await?;
            let mut r = [0u8; 2];
            s.read_exact(&mut r).await?;
            let SocketAddr::V4(v4) = origin else {
                return Err(bad("v4 only"));
            };
            let mut req = vec![5, 1, 0, 1];
            req.extend_from_slice(&v4.ip().octets());
            req.extend_from_slice(&v4.port().to_be_bytes());
            s.write_all(&req).await?;
            let mut rep = [0u8; 10];
            s.read_exact(&mut rep).await?;
            if rep[1] != 0 {
                return Err(bad("socks refused"));
            }
            Ok(s)
        }
    }
}

/// Fetches `/bytes/<n>` on a new connection; returns the body length received.
async fn fetch(via: Via, origin: SocketAddr, n: u64) -> std::io::Result<u64> {
    let mut s = open(via, origin).await?;
    s.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut head_done = None;
    loop {
        let r = s.read(&mut buf).await?;
        if r == 0 {
            break;
        }
        total += r as u64;
        if head_done.is_none()
            && let Some(pos) = buf[..r].windows(4).position(|w| w == b"\r\n\r\n")
        {
            head_done = Some(total - r as u64 + pos as u64 + 4);
        }
        if let Some(h) = head_done
            && total - h >= n
        {
            break;
        }
    }
    Ok(total - head_done.unwrap_or(total))
}

async fn bulk(via: Via, origin: SocketAddr, n: u64) -> Option<f64> {
    let start = Instant::now();
    let got = fetch(via, origin, n).await.ok()?;
    (got == n).then(|| n as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

async fn concurrent(via: Via, origin: SocketAddr, n: usize) -> (usize, f64) {
    let start = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut s = open(via, origin).await;
                // Every stream is open at the same time before any fetches.
                barrier.wait().await;
                let s = s
                    .as_mut()
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                s.write_all(
                    format!("GET /bytes/16384 HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes(),
                )
                .await?;
                let mut out = Vec::new();
                s.read_to_end(&mut out).await?;
                Ok::<bool, std::io::Error>(out.len() > 16384)
            })
        })
        .collect();
    let mut errors = 0;
    for t in tasks {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(60), t).await,
            Ok(Ok(Ok(true)))
        ) {
            errors += 1;
        }
    }
    (errors, start.elapsed().as_secs_f64())
}

/// Throughput lost by a bulk stream while another stream is stalled (its
/// reader never reads). Alone and stalled runs alternate, three rounds, best
/// of each, because the machine is shared and single runs swing widely.
async fn fairness(via: Via, origin: SocketAddr, n: u64) -> Option<f64> {
    let (mut alone, mut with): (f64, f64) = (0.0, 0.0);
    for _ in 0..3 {
        alone = alone.max(bulk(via, origin, n).await?);
        let mut stalled = open(via, origin).await.ok()?;
        stalled
            .write_all(format!("GET /stall HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        // Let the stalled stream fill every buffer it can before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        with = with.max(bulk(via, origin, n).await?);
        drop(stalled);
    }
    // Not clamped: a negative figure means the stalled run happened to be
    // faster (noise on a shared machine), and is reported as such.
    Some(1.0 - with / alone)
}

// === the systems under test ===

async fn wait_port(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn which(bin: &str) -> Option<String> {
    ["/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"]
        .iter()
        .map(|d| format!("{d}{bin}"))
        .find(|p| Path::new(p).exists())
}

async fn start_squid(dir: &Path) -> Option<(Child, SocketAddr)> {
    let squid = which("squid")?;
    let addr = free_port();
    let sq = dir.join("squid");
    std::fs::create_dir_all(&sq).ok()?;
    let _ = Command::new("chmod").arg("777").arg(&sq).status();
    let conf = sq.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port {addr}\nhttp_access allow all\ncache deny all\ncache_mem 8 MB\naccess_log none\n\
             cache_log {0}/cache.log\npid_filename {0}/squid.pid\ncoredump_dir {0}\nshutdown_lifetime 0 seconds\n\
             max_filedescriptors 8192\n",
            sq.display()
        ),
    )
    .ok()?;
    let child = Command::new(squid)
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(addr).await.then_some((child, addr))
}

async fn start_ssh(dir: &Path) -> Option<(Vec<Child>, SocketAddr)> {
    let sshd = which("sshd")?;
    let d = dir.join("ssh");
    std::fs::create_dir_all(&d).ok()?;
    std::fs::create_dir_all("/run/sshd").ok()?;
    for key in ["host_key", "user_key"] {
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(key))
            .status()
            .ok()?;
    }
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).ok()?;
    let port = free_port();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {}\nListenAddress 127.0.0.1\nHostKey {1}/host_key\nPidFile {1}/sshd.pid\nAuthorizedKeysFile {1}/authorized_keys\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowTcpForwarding yes\nMaxStartups 2000\nMaxSessions 2000\n",
            port.port(),
            d.display()
        ),
    )
    .ok()?;
    let server = Command::new(sshd)
        .arg("-D")
        .arg("-f")
        .arg(d.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !wait_port(port).await {
        return None;
    }
    let socks = free_port();
    let client = Command::new("ssh")
        .args([
            "-N",
            "-D",
            &socks.to_string(),
            "-p",
            &port.port().to_string(),
            "-i",
        ])
        .arg(d.join("user_key"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(socks)
        .await
        .then_some((vec![server, client], socks))
}

/// Relay process + our helper process + our host in this process.
async fn start_ours(dir: &Path, v2: bool) -> (Vec<Child>, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let mut relay = Command::new(exe)
        .env("EGRESS_BENCH_RELAY", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(relay.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let relay_addr: SocketAddr = line.trim().parse().unwrap();

    let ws_url = format!("ws://{relay_addr}/v1/leases/bench/egress/host");
    let (ws, _) = tokio_tungstenite::connect_async_with_config(ws_url, Some(ws_config()), true)
        .await
        .unwrap();
    let policy = Arc::new(
        Policy::builder()
            .allow(["127.0.0.1"])
            .allow_private(true)
            .build()
            .unwrap(),
    );
    let mut bridge = BridgeConfig::host();
    bridge.enable_v2 = v2;
    tokio::spawn(run_host(
        ws,
        policy,
        HostConfig {
            bridge,
            ..HostConfig::default()
        },
    ));

    let listen = free_port();
    let ctl = dir.join(format!("ctl-{v2}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crabbox-egress-client"));
    cmd.args([
        "--coordinator",
        &format!("http://{relay_addr}"),
        "--id",
        "bench",
        "--session",
        "egress_bench",
    ])
    .args([
        "--listen",
        &listen.to_string(),
        "--max-connections",
        "4096",
        "--control",
    ])
    .arg(&ctl)
    .env("CRABBOX_EGRESS_TICKET", "egress_bench_ticket")
    .env("CRABBOX_LOG", "warn")
    .stderr(Stdio::null());
    if !v2 {
        cmd.arg("--v1-only");
        // v1 has no flow control: a stream that outruns its reader by more
        // than the queue cap is closed (256 KiB by default, as the reference).
        if let Ok(kib) = std::env::var("EGRESS_BENCH_V1_QUEUE_KIB") {
            cmd.args(["--v1-queue-kib", &kib]);
        }
    }
    let helper = cmd.spawn().unwrap();
    // Ready when the control socket reports a bridge with the wanted protocol.
    let want = if v2 {
        "\"protocol_version\":2"
    } else {
        "\"protocol_version\":1"
    };
    for _ in 0..200 {
        if let Ok(mut s) = tokio::net::UnixStream::connect(&ctl).await {
            let _ = s.write_all(b"status\n").await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.contains("\"bridged\":true") && out.contains(want) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (vec![helper, relay], listen)
}

/// `hops` forwarder processes in a chain ending at `origin`; returns them and the first one's address.
fn start_chain(hops: usize, origin: SocketAddr) -> (Vec<Child>, SocketAddr) {
    let mut next = origin;
    let mut children = Vec::new();
    for i in (0..hops).rev() {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env("EGRESS_BENCH_FORWARD", next.to_string())
            .stdout(Stdio::piped());
        if i == 0 {
            cmd.env("EGRESS_BENCH_FORWARD_CONNECT", "1");
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        next = line.trim().parse().unwrap();
        children.push(child);
    }
    (children, next)
}

/// A process that copies every accepted connection to `next` and back;
/// with `connect`, it first reads a CONNECT head and answers 200 once its
/// own dial is up (a lower bound: a real proxy would also parse and check).
fn forward_process(next: &str, connect: bool) {
    let next: SocketAddr = next.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = crabbox_egress::proxy::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        println!("{}", listener.local_addr().unwrap());
        while let Ok((mut a, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                if connect {
                    let mut head = Vec::with_capacity(256);
                    let mut buf = [0u8; 256];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match a.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                }
                let Ok(mut b) = TcpStream::connect(next).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                if connect && a.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
                    return;
                }
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 << 10, 64 << 10)
                        .await;
            });
        }
    });
}

/// A plain WebSocket relay (no TLS, no auth): pairs the `…/host` and `…/client` sockets and forwards messages verbatim.
fn relay_process() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        let (mut host_tx, mut client_tx) = (None, None);
        let (reg_tx, mut reg_rx) =
            mpsc::unbounded_channel::<(bool, mpsc::Sender<Message>, mpsc::Receiver<Message>)>();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let reg_tx = reg_tx.clone();
                tokio::spawn(async move {
                    let is_host = Arc::new(std::sync::Mutex::new(false));
                    let flag = is_host.clone();
                    let cb =
                        move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                              resp| {
                            *flag.lock().unwrap() = req.uri().path().ends_with("/host");
                            Ok(resp)
                        };
                    let Ok(ws) =
                        tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(ws_config()))
                            .await
                    else {
                        return;
                    };
                    let host = *is_host.lock().unwrap();
                    let (mut sink, mut stream) = ws.split();
                    let (to_me, mut my_rx) = mpsc::channel::<Message>(256);
                    let (from_me_tx, from_me_rx) = mpsc::channel::<Message>(256);
                    let _ = reg_tx.send((host, to_me, from_me_rx));
                    tokio::spawn(async move {
                        while let Some(m) = my_rx.recv().await {
                            if sink.send(m).await.is_err() {
                                break;
                            }
                        }
                    });
                    while let Some(Ok(m)) = stream.next().await {
                        if (m.is_text() || m.is_binary()) && from_me_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        // One pair: once both sides registered, pump each side's messages to the other.
        let (mut host_rx, mut client_rx) = (None, None);
        while let Some((is_host, tx, rx)) = reg_rx.recv().await {
            if is_host {
                host_tx = Some(tx);
                host_rx = Some(rx);
            } else {
                client_tx = Some(tx);
                client_rx = Some(rx);
            }
            if let (Some(ht), Some(ct)) = (&host_tx, &client_tx)
                && let (Some(mut hr), Some(mut cr)) = (host_rx.take(), client_rx.take())
            {
                let (ht, ct) = (ht.clone(), ct.clone());
                tokio::spawn(async move {
                    while let Some(m) = hr.recv().await {
                        if ct.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some(m) = cr.recv().await {
                        if ht.send(m).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
}
