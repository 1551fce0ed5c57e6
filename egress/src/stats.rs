//! Per-session counters (active streams, bytes in/out, recent hostnames, protocol version) that the daemon displays.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// How many distinct hostnames [`SessionStats`] remembers; the least recently
/// seen one is forgotten first so a scan of many names cannot grow memory.
pub const RECENT_HOSTS_CAP: usize = 64;

/// Live counters for one egress session (one end of one bridge, or of the
/// successive bridges of one healing client).
///
/// Share it as `Arc<SessionStats>`; every method takes `&self`. "In" means
/// bytes that arrived over the bridge from the peer; "out" means bytes sent
/// over the bridge to the peer.
#[derive(Debug, Default)]
pub struct SessionStats {
    connected: AtomicBool,
    protocol_version: AtomicU8,
    active_streams: AtomicU64,
    total_streams: AtomicU64,
    rejected_streams: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    // A std mutex: held only for a map update, never across an await.
    hosts: Mutex<HostTable>,
    peer: Mutex<Option<PeerStats>>,
}

#[derive(Debug, Default)]
struct HostTable {
    seq: u64,
    entries: HashMap<String, (u64, u64)>, // host -> (count, last seen sequence)
}

/// A point-in-time copy of [`SessionStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Whether a bridge WebSocket is currently up.
    pub connected: bool,
    /// Bridge protocol in use: 0 before any bridge, 1 (JSON) or 2 (yamux).
    pub protocol_version: u8,
    /// Streams open right now.
    pub active_streams: u64,
    /// Streams opened since the session started.
    pub total_streams: u64,
    /// Opens refused (policy, dial failure, limits).
    pub rejected_streams: u64,
    /// Bytes received from the peer over the bridge.
    pub bytes_in: u64,
    /// Bytes sent to the peer over the bridge.
    pub bytes_out: u64,
    /// Recently used destination hostnames with how often each was opened, most used first.
    pub recent_hosts: Vec<HostCount>,
    /// The peer's own counters, from its last v2 `stats` frame.
    pub peer: Option<PeerStats>,
}

/// One destination hostname and how many streams were opened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCount {
    /// Lowercased hostname or IP literal.
    pub host: String,
    /// Number of opens seen.
    pub count: u64,
}

/// Counters reported by the peer in a v2 `stats` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peer's active streams.
    pub active: u64,
    /// Bytes the peer received over the bridge.
    pub bytes_in: u64,
    /// Bytes the peer sent over the bridge.
    pub bytes_out: u64,
}

impl SessionStats {
    /// Creates zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a consistent-enough snapshot (each counter is read atomically).
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut recent_hosts: Vec<HostCount> = {
            let table = self.hosts.lock().unwrap();
            table
                .entries
                .iter()
                .map(|(host, (count, _))| HostCount {
                    host: host.clone(),
                    count: *count,
                })
                .collect()
        };
        recent_hosts.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.host.cmp(&b.host)));
        StatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            protocol_version: self.protocol_version.load(Ordering::Relaxed),
            active_streams: self.active_streams.load(Ordering::Relaxed),
            total_streams: self.total_streams.load(Ordering::Relaxed),
            rejected_streams: self.rejected_streams.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            recent_hosts,
            peer: *self.peer.lock().unwrap(),
        }
    }

    /// Bridge protocol version in use (0 = none yet).
    pub fn protocol_version(&self) -> u8 {
        self.protocol_version.load(Ordering::Relaxed)
    }

    pub(crate) fn set_connected(&self, up: bool, version: u8) {
        self.connected.store(up, Ordering::Relaxed);
        if up {
            self.protocol_version.store(version, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_protocol_version(&self, version: u8) {
        self.protocol_version.store(version, Ordering::Relaxed);
    }

    pub(crate) fn set_peer(&self, peer: PeerStats) {
        *self.peer.lock().unwrap() = Some(peer);
    }

    pub(crate) fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self) {
        self.rejected_streams.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an opened stream to `host`; the returned guard keeps it counted as active.
    pub(crate) fn stream_opened(&self, host: &str) -> ActiveGuard<'_> {
        self.total_streams.fetch_add(1, Ordering::Relaxed);
        self.active_streams.fetch_add(1, Ordering::Relaxed);
        self.record_host(host);
        ActiveGuard(self)
    }

    fn record_host(&self, host: &str) {
        let mut table = self.hosts.lock().unwrap();
        table.seq += 1;
        let seq = table.seq;
        if let Some(entry) = table.entries.get_mut(host) {
            entry.0 += 1;
            entry.1 = seq;
            return;
        }
        if table.entries.len() >= RECENT_HOSTS_CAP {
            let oldest = table
                .entries
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(h, _)| h.clone());
            if let Some(oldest) = oldest {
                table.entries.remove(&oldest);
            }
        }
        table.entries.insert(host.to_owned(), (1, seq));
    }
}

/// Decrements the active-stream counter when the stream ends.
pub(crate) struct ActiveGuard<'a>(&'a SessionStats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_counted_and_bounded() {
        let stats = SessionStats::new();
        {
            let _a = stats.stream_opened("a.example");
            let _b = stats.stream_opened("a.example");
            assert_eq!(stats.snapshot().active_streams, 2);
        }
        assert_eq!(stats.snapshot().active_streams, 0);
        for i in 0..(RECENT_HOSTS_CAP + 10) {
            drop(stats.stream_opened(&format!("h{i}.example")));
        }
        drop(stats.stream_opened("h73.example"));
        let snap = stats.snapshot();
        assert_eq!(snap.recent_hosts.len(), RECENT_HOSTS_CAP);
        // Least recently seen names are forgotten first; counts survive for the rest.
        assert!(!snap.recent_hosts.iter().any(|h| h.host == "a.example"));
        assert_eq!(
            snap.recent_hosts[0],
            HostCount {
                host: "h73.example".into(),
                count: 2
            }
        );
        assert_eq!(snap.total_streams, 3 + RECENT_HOSTS_CAP as u64 + 10);
    }
}
