//! `crabbox-egress-client`: the lease-side helper. A loopback HTTP proxy whose listener outlives its bridge; fresh tickets arrive over a 0600 Unix control socket so the pair heals.
//!
//! The ticket comes from `CRABBOX_EGRESS_TICKET`, `--ticket-file` (0600,
//! `-` = stdin) or the control socket (`ticket <t>`), never from argv, a URL
//! or a log line. Without any it listens and waits for one on the control
//! socket, which is how the daemon starts it over SSH. The control socket
//! also answers `status` (JSON) and `stop` (the helper removes its pid file
//! and socket and exits 0); `--pid-file` records the pid once the listener
//! and the control socket are bound.

use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use crabbox_egress::{
    BridgeConfig, ClientConfig, ConnectError, ProxyServer, connect_bridge, proxy,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// mimalloc instead of the system allocator: every binary message tungstenite
/// reads lands in a fresh message-sized buffer, and glibc's malloc returned
/// those pages to the kernel and faulted them back in (94 % of the helper's
/// page faults under a bulk download, ≈ 140 per MiB); mimalloc keeps them for reuse.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a terminal bridge condition (session replaced, lease gone), as in the reference.
const EXIT_FATAL: u8 = 4;
/// Exit code for usage and configuration errors.
const EXIT_USAGE: u8 = 2;
/// A ticket is valid for 120 s; retrying the same one after that is pointless.
const TICKET_RETRY_WINDOW: Duration = Duration::from_secs(110);

#[derive(Parser, Debug)]
#[command(
    name = "crabbox-egress-client",
    version,
    about = "Lease-side loopback HTTP proxy for crabbox mediated egress"
)]
struct Args {
    /// Coordinator base URL (https://… or http://…).
    #[arg(long, required_unless_present = "coordinator_file")]
    coordinator: Option<String>,
    /// A file (0600) holding the coordinator base URL, so it stays out of the process list.
    #[arg(long, conflicts_with = "coordinator")]
    coordinator_file: Option<PathBuf>,
    /// Lease id (or slug).
    #[arg(long)]
    id: String,
    /// Egress session id (bound into the ticket; used here for logs and the control socket).
    #[arg(long)]
    session: String,
    /// Loopback address for the proxy.
    #[arg(long, default_value = "127.0.0.1:3128")]
    listen: String,
    /// File holding the ticket (must be 0600); `-` reads it from stdin. Otherwise `CRABBOX_EGRESS_TICKET` is used.
    #[arg(long)]
    ticket_file: Option<PathBuf>,
    /// Unix control socket for fresh tickets (default: $XDG_RUNTIME_DIR or /tmp, named after the listen port).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Write the pid here (0600) once the listener and control socket are bound; removed on exit.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Concurrent proxied connections with a complete request head before answering 503.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Speak only bridge protocol v1 (never offer v2).
    #[arg(long)]
    v1_only: bool,
    /// v1 only: bytes (KiB) one stream may queue towards a slow browser before the bridge waits for it.
    #[arg(long, default_value_t = 1024)]
    v1_queue_kib: usize,
    /// Always wait for the host before answering a CONNECT. By default a
    /// destination that opened in the last 2 minutes is answered at once
    /// (a round trip sooner); if its open then fails, the connection is
    /// closed rather than answered 403/502.
    #[arg(long)]
    no_early_connect: bool,
}

/// A bridge ticket; its Debug/Display never show the value.
#[derive(Clone)]
struct Ticket(String);

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(MASKED)")
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // Whatever CRABBOX_LOG says, the WebSocket/HTTP/TLS libraries stay at
        // info: at debug/trace they log the upgrade request with the ticket.
        let clamp = [
            "tungstenite",
            "tokio_tungstenite",
            "hyper",
            "hyper_util",
            "h2",
            "http",
            "rustls",
            "tokio_rustls",
            "reqwest",
        ]
        .into_iter()
        .fold(
            Targets::new().with_default(LevelFilter::TRACE),
            |t, target| t.with_target(target, LevelFilter::INFO),
        );
        let env = tracing_subscriber::EnvFilter::try_from_env("CRABBOX_LOG")
            .unwrap_or_else(|_| "info".into());
        // One filter, both rules: its level hint is the lower of the two
        // (info by default), so disabled `trace!`/`debug!` call sites — yamux
        // has them on every frame — are skipped at once instead of asking the
        // filter each time (a separate clamp layer made the hint trace).
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_filter(env.and(clamp)),
            )
            .init();
    }
    let listen = match proxy::validate_listen(&args.listen) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("crabbox-egress-client: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let coordinator = match (&args.coordinator, &args.coordinator_file) {
        (Some(url), _) => url.clone(),
        (None, Some(path)) => match read_private(path) {
            Ok(url) => url,
            Err(e) => {
                eprintln!("crabbox-egress-client: {e:#}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        (None, None) => unreachable!("clap requires one of them"),
    };
    let base = match bridge_url(&coordinator, &args.id) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("crabbox-egress-client: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let ticket = match initial_ticket(args.ticket_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("crabbox-egress-client: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread: the helper serves one user's browser, and on a
    // multi-threaded runtime every hand-off between its tasks (proxy
    // connection, yamux driver, socket writer) could wake another worker: 18
    // futex calls per small request. On one thread there are none (strace -c,
    // 300 requests: 16.6k system calls before, 8.0k after).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crabbox-egress-client: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match run(args, listen, base, ticket).await {
            Ok(code) => code,
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn bridge_url(coordinator: &str, lease: &str) -> anyhow::Result<url::Url> {
    let mut url =
        url::Url::parse(coordinator.trim_end_matches('/')).context("--coordinator is not a URL")?;
    let scheme = match url.scheme() {
        "https" | "wss" => "wss",
        "http" | "ws" => "ws",
        other => anyhow::bail!("--coordinator must be an http(s) URL, not {other}:"),
    };
    url.set_scheme(scheme)
        .map_err(|_| anyhow::anyhow!("cannot use scheme {scheme}"))?;
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut segs = url
            .path_segments_mut()
            .map_err(|_| anyhow::anyhow!("--coordinator cannot be a base URL"))?;
        segs.pop_if_empty();
        // push() percent-escapes the lease id like Go's PathEscape.
        segs.push("v1")
            .push("leases")
            .push(lease)
            .push("egress")
            .push("client");
    }
    Ok(url)
}

/// The trimmed contents of a file nobody else may read.
fn read_private(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "{} must not be readable by others (chmod 600)",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn initial_ticket(file: Option<&Path>) -> anyhow::Result<Option<Ticket>> {
    if let Some(path) = file {
        let raw = if path == Path::new("-") {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the ticket from stdin")?;
            s
        } else {
            read_private(path).context("the ticket file")?
        };
        let t = raw.trim();
        if t.is_empty() {
            anyhow::bail!("ticket file is empty");
        }
        return Ok(Some(Ticket(t.to_owned())));
    }
    Ok(std::env::var("CRABBOX_EGRESS_TICKET")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(Ticket))
}

fn default_control(listen_port: u16) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join(format!("crabbox-egress-client-{listen_port}.sock"))
}

/// What the control socket reports besides the proxy's counters.
struct Shared {
    proxy: std::sync::Arc<ProxyServer>,
    /// Set while the helper waits for a fresh ticket (its bridge is down).
    waiting: AtomicBool,
    session: String,
    listen: std::net::SocketAddr,
}

async fn run(
    args: Args,
    listen: std::net::SocketAddr,
    url: url::Url,
    ticket: Option<Ticket>,
) -> anyhow::Result<ExitCode> {
    let listener = crabbox_egress::proxy::listen::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    let mut bridge = BridgeConfig::client();
    bridge.enable_v2 = !args.v1_only;
    bridge.v1_queue_cap = args.v1_queue_kib.max(1) * 1024;
    bridge.early_connect = !args.no_early_connect;
    let cfg = ClientConfig {
        bridge,
        max_connections: args.max_connections,
        ..ClientConfig::default()
    };
    let proxy = std::sync::Arc::new(ProxyServer::start(listener, cfg)?);
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control(local.port()));
    let (ticket_tx, ticket_rx) = mpsc::channel::<Ticket>(4);
    let (stop_tx, mut stop_rx) = mpsc::channel::<()>(1);
    let control_listener = bind_control(&control)?;
    let shared = std::sync::Arc::new(Shared {
        proxy: proxy.clone(),
        waiting: AtomicBool::new(false),
        session: args.session.clone(),
        listen: local,
    });
    if let Some(pid_file) = &args.pid_file {
        write_private(pid_file, &format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pid file {}", pid_file.display()))?;
    }
    tokio::spawn(control_loop(
        control_listener,
        ticket_tx,
        stop_tx,
        shared.clone(),
    ));
    info!(lease = %args.id, session = %args.session, listen = %local, control = %control.display(), "egress client: listening");

    let code = tokio::select! {
        code = bridge_loop(&args, &url, local, &control, ticket, ticket_rx, &shared) => code,
        _ = stop_rx.recv() => {
            info!(session = %args.session, "egress client: stopped over the control socket");
            ExitCode::SUCCESS
        }
    };
    let _ = std::fs::remove_file(&control);
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    Ok(code)
}

/// Writes `text` to a new 0600 file at `path` (replacing one left behind).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)
}

async fn bridge_loop(
    args: &Args,
    url: &url::Url,
    local: std::net::SocketAddr,
    control: &Path,
    mut ticket: Option<Ticket>,
    mut ticket_rx: mpsc::Receiver<Ticket>,
    shared: &Shared,
) -> ExitCode {
    let proxy = &shared.proxy;
    let mut backoff = Duration::from_millis(500);
    let mut received = Instant::now();
    loop {
        // Prefer the newest ticket the daemon pushed meanwhile.
        while let Ok(t) = ticket_rx.try_recv() {
            ticket = Some(t);
            received = Instant::now();
        }
        let current = match ticket.take() {
            Some(t) => t,
            None => {
                info!(control = %control.display(), "egress client: waiting for a fresh ticket");
                shared.waiting.store(true, Ordering::SeqCst);
                let next = ticket_rx.recv().await;
                shared.waiting.store(false, Ordering::SeqCst);
                match next {
                    Some(t) => {
                        received = Instant::now();
                        t
                    }
                    None => return ExitCode::FAILURE,
                }
            }
        };
        match connect_bridge(url.as_str(), &current.0, None).await {
            Ok(ws) => {
                info!(lease = %args.id, session = %args.session, listen = %local, "egress client: connected");
                backoff = Duration::from_millis(500);
                match proxy.attach(ws).await {
                    Err(e) if e.is_fatal() => {
                        error!(error = %e, "egress client: bridge ended for good");
                        proxy.set_down_reason(
                            "this egress session is over (replaced, or the lease ended)",
                        );
                        return ExitCode::from(EXIT_FATAL);
                    }
                    Err(e) => warn!(error = %e, "egress client: bridge ended; the proxy stays up"),
                    Ok(()) => warn!("egress client: bridge ended; the proxy stays up"),
                }
            }
            Err(e) if e.is_fatal() => {
                error!(error = %e, "egress client: lease unavailable or session replaced");
                return ExitCode::from(EXIT_FATAL);
            }
            Err(ConnectError::TicketRefused(status)) => {
                warn!(%status, "egress client: ticket refused; need a fresh one")
            }
            Err(reason) => {
                warn!(%reason, "egress client: cannot reach the coordinator");
                if received.elapsed() < TICKET_RETRY_WINDOW {
                    ticket = Some(current);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        Some(t) = ticket_rx.recv() => { ticket = Some(t); received = Instant::now(); }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        // Only replace a stale socket: a live one belongs to another helper.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control socket {} is in use by another helper",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// One line per connection: `ticket <value>` → `ok`, `status` → a JSON
/// snapshot, `stop` → `ok`, then the helper exits.
async fn control_loop(
    listener: UnixListener,
    tickets: mpsc::Sender<Ticket>,
    stop: mpsc::Sender<()>,
    shared: std::sync::Arc<Shared>,
) {
    let my_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Only our own user may hand us tickets or read counters.
        if let (Ok(cred), Some(uid)) = (stream.peer_cred(), my_uid)
            && cred.uid() != uid
        {
            continue;
        }
        let tickets = tickets.clone();
        let stop = stop.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r).take(8192);
            use tokio::io::AsyncReadExt as _;
            let read =
                tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let line = line.trim();
            let mut stopping = false;
            let reply = if let Some(t) = line.strip_prefix("ticket ") {
                let t = t.trim();
                if t.is_empty() {
                    "error empty ticket\n".to_owned()
                } else if tickets.send(Ticket(t.to_owned())).await.is_ok() {
                    info!("egress client: fresh ticket received");
                    "ok\n".to_owned()
                } else {
                    "error shutting down\n".to_owned()
                }
            } else if line == "status" {
                let mut snap =
                    serde_json::to_value(shared.proxy.stats().snapshot()).unwrap_or_default();
                snap["bridged"] = shared.proxy.is_bridged().into();
                snap["waiting_ticket"] = shared.waiting.load(Ordering::SeqCst).into();
                snap["pid"] = std::process::id().into();
                snap["session"] = shared.session.clone().into();
                snap["listen"] = shared.listen.to_string().into();
                snap["version"] = env!("CARGO_PKG_VERSION").into();
                format!("{snap}\n")
            } else if line == "stop" {
                stopping = true;
                "ok\n".to_owned()
            } else {
                "error unknown command\n".to_owned()
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.shutdown().await;
            if stopping {
                let _ = stop.send(()).await;
            }
        });
    }
}
