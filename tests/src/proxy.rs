//! `FaultProxy`: a loopback TCP proxy in front of a real coordinator, for
//! fault injection and counting. It can freeze the connections it holds (a
//! half-open path: sockets stay open, nothing more is forwarded either way,
//! while new connections pass), and counts exact byte strings (request
//! lines) that clients send. It can also go down (every connection closed,
//! new ones refused) and come back on the same port, and hold back bytes
//! that contain a given string for a while (a slow request or answer).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// A running proxy; dropping it stops accepting and drops every connection.
pub struct FaultProxy {
    /// The proxy's address.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub url: String,
    inner: Arc<Inner>,
    _tasks: Arc<Mutex<JoinSet<()>>>,
}

struct Inner {
    down: tokio::sync::watch::Sender<bool>,
    frozen: Mutex<Vec<Arc<AtomicBool>>>,
    accepted: AtomicUsize,
    needles: Mutex<Vec<(Vec<u8>, Arc<AtomicUsize>)>>,
    delays: Mutex<Vec<(Vec<u8>, std::time::Duration)>>,
}

impl FaultProxy {
    /// Proxies `127.0.0.1:<port>` to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            down: tokio::sync::watch::channel(false).0,
            frozen: Mutex::default(),
            accepted: AtomicUsize::default(),
            needles: Mutex::default(),
            delays: Mutex::default(),
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (i, t) = (Arc::clone(&inner), Arc::clone(&tasks));
        tasks.lock().unwrap().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *i.down.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                i.accepted.fetch_add(1, Ordering::SeqCst);
                let frozen = Arc::new(AtomicBool::new(false));
                i.frozen.lock().unwrap().push(Arc::clone(&frozen));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut set = t.lock().unwrap();
                let down = i.down.subscribe();
                set.spawn(pump(
                    cr,
                    sw,
                    Arc::clone(&frozen),
                    Some(Arc::clone(&i)),
                    down.clone(),
                    Arc::clone(&i),
                ));
                set.spawn(pump(sr, cw, frozen, None, down, Arc::clone(&i)));
            }
        });
        FaultProxy {
            addr,
            url: format!("http://{addr}"),
            inner,
            _tasks: tasks,
        }
    }

    /// Stops forwarding on every connection open now, without closing them.
    pub fn freeze_open_connections(&self) {
        for f in self.inner.frozen.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }

    /// Goes down (closes every connection and refuses new ones) or comes
    /// back up.
    pub fn set_down(&self, down: bool) {
        self.inner.down.send_replace(down);
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// From now on, a read (from a client or from the upstream) that
    /// contains `needle` is forwarded only after `by` (later bytes of that
    /// direction wait too): a slow request or a slow answer.
    pub fn delay(&self, needle: &str, by: std::time::Duration) {
        self.inner
            .delays
            .lock()
            .unwrap()
            .push((needle.as_bytes().to_vec(), by));
    }

    /// Counts from now on how often clients send exactly `needle`.
    pub fn count(&self, needle: &str) -> Arc<AtomicUsize> {
        let n = Arc::new(AtomicUsize::new(0));
        self.inner
            .needles
            .lock()
            .unwrap()
            .push((needle.as_bytes().to_vec(), Arc::clone(&n)));
        n
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    scan: Option<Arc<Inner>>,
    mut down: tokio::sync::watch::Receiver<bool>,
    delays: Arc<Inner>,
) {
    let mut buf = vec![0u8; 64 << 10];
    // The bytes before this chunk, so a needle split across reads counts.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            // Going down drops both halves: the connection closes.
            _ = down.wait_for(|d| *d) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Half-open: hold both sockets, forward nothing, ever.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if let Some(inner) = &scan {
            let mut hay = std::mem::take(&mut tail);
            hay.extend_from_slice(&buf[..n]);
            let needles = inner.needles.lock().unwrap();
            let longest = needles.iter().map(|(n, _)| n.len()).max().unwrap_or(1);
            for (needle, count) in needles.iter() {
                let hits = hay
                    .windows(needle.len())
                    .enumerate()
                    // Only matches that end in the new bytes: the tail was
                    // scanned before.
                    .filter(|(i, w)| *w == needle.as_slice() && i + needle.len() > hay.len() - n)
                    .count();
                count.fetch_add(hits, Ordering::SeqCst);
            }
            let keep = hay.len().min(longest.saturating_sub(1));
            tail = hay[hay.len() - keep..].to_vec();
        }
        let wait = {
            delays
                .delays
                .lock()
                .unwrap()
                .iter()
                .filter(|(needle, _)| {
                    buf[..n]
                        .windows(needle.len())
                        .any(|w| w == needle.as_slice())
                })
                .map(|(_, by)| *by)
                .max()
        };
        if let Some(by) = wait {
            tokio::time::sleep(by).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
