//! The bridge relay: registers a host or client socket in its pair and
//! forwards its frames, unchanged, to the other end.

use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{FutureExt, SinkExt, StreamExt};

use super::{Key, MAX_FRAME, Peer, Role};
use crate::app::Shared;
use crate::ws::{CLOSE_GRACE, DirectHandle, closed, drain, frame_len, is_too_big, write_batch};

/// Frames taken into one write when a burst is already buffered.
const BATCH: usize = 64;
/// Bytes taken into one write (flushed in steps of `ws::FLUSH_BYTES`).
const BATCH_BYTES: usize = 1024 * 1024;

/// How one relayed write ended.
enum Write {
    Done,
    /// This socket was closed meanwhile.
    SelfClosed,
    /// The peer was closed meanwhile.
    PeerClosed,
    /// The peer made no progress for the write timeout: it stopped reading.
    TimedOut,
}

/// Register a bridge socket and relay its frames to the other end.
pub(super) async fn relay(
    st: Shared,
    key: Key,
    role: Role,
    socket: WebSocket,
    op: tokio::sync::OwnedMutexGuard<()>,
) {
    let (handle, mut stream) = DirectHandle::new(socket);
    let id = st.egress.next_id.fetch_add(1, Ordering::Relaxed);
    let epoch = {
        let mut inner = st.egress.inner.lock().unwrap();
        let pair = inner.pairs.entry(key.clone()).or_default();
        let me = Peer {
            id,
            handle: handle.clone(),
            since_ms: st.clock.now_ms(),
        };
        if let Some(old) = pair.slot(role).replace(me) {
            old.handle.close(
                1012,
                &format!("replaced by a newer egress {}", role.as_str()),
            );
        }
        pair.epoch.fetch_add(1, Ordering::Release);
        pair.epoch.clone()
    };
    drop(op);
    st.changed(Some(&key.0), None);
    let mut close_rx = handle.watch();
    let (ping_every, write_timeout) = (st.cfg.limits.ping_every, st.cfg.limits.write_timeout);
    // The other end, refreshed only when the pair's epoch moves.
    let mut cached: (u64, Option<DirectHandle>) = (u64::MAX, None);
    let other = match role {
        Role::Host => Role::Client,
        Role::Client => Role::Host,
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pending: Option<Option<Result<Message, axum::Error>>> = None;
    let mut too_big = false;
    let mut unread = false;
    let mut alive = true;
    let mut written_at_tick = handle.written.load(Ordering::Acquire);
    loop {
        let item = match pending.take() {
            Some(item) => item,
            None => tokio::select! {
                item = stream.next() => item,
                _ = closed(&mut close_rx) => {
                    drain(&mut stream).await;
                    break;
                }
                _ = ping.tick() => {
                    // Like the reference's Node runtime, a peer that sent
                    // nothing (not even a pong) for a whole ping interval is
                    // dead: drop it so status stops reporting it connected.
                    if !alive {
                        break;
                    }
                    // Never wait for the lock. While the other end's relay
                    // holds it, a peer that only reads a download (a v1
                    // client sends nothing else) is alive as long as those
                    // writes move; one that stopped reading is dropped at the
                    // next tick, without waiting for the write deadline.
                    let written = handle.written.load(Ordering::Acquire);
                    if let Ok(mut sink) = handle.sink.try_lock() {
                        alive = false;
                        tokio::select! {
                            _ = tokio::time::timeout(write_timeout, sink.send(Message::Ping(Default::default()))) => {}
                            _ = closed(&mut close_rx) => {}
                        }
                    } else {
                        alive = written != written_at_tick;
                    }
                    written_at_tick = written;
                    continue;
                }
            },
        };
        alive = true;
        match item {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if frame_len(&m) > MAX_FRAME {
                    too_big = true;
                    break;
                }
                let now_epoch = epoch.load(Ordering::Acquire);
                if cached.0 != now_epoch {
                    let mut inner = st.egress.inner.lock().unwrap();
                    let peer = inner
                        .pairs
                        .get_mut(&key)
                        .and_then(|p| p.slot(other).as_ref().map(|p| p.handle.clone()));
                    cached = (now_epoch, peer);
                }
                // With no peer the frame is dropped, as in the reference.
                let Some(peer) = &cached.1 else { continue };
                let mut peer_close = peer.watch();
                // The frame is forwarded as the same value (text stays text,
                // binary stays binary, no re-encoding, no copy). Frames that
                // are already buffered are written too, in flushes of at most
                // 256 KiB. Awaiting the peer's sink is the backpressure: a
                // slow peer slows its sender, nothing queues. Each step (the
                // lock, a frame, a flush) has the write timeout, so a peer
                // reading slowly but steadily is not taken for one that
                // stopped, and the write yields to either side's close: a
                // peer that stops reading cannot wedge the pair or hold the
                // lock its own close and pings need. Frames are taken as they
                // are fed, each dropped once the library copied it (holding
                // a burst would keep the reader's buffer from being reused).
                let stream = &mut stream;
                let pending = &mut pending;
                let write = async move {
                    let mut sink = tokio::time::timeout(write_timeout, peer.sink.lock()).await?;
                    let mut bytes = 0;
                    let mut first = Some(m);
                    let frames = std::iter::from_fn(|| {
                        if let Some(m) = first.take() {
                            bytes += frame_len(&m);
                            return Some(m);
                        }
                        if bytes >= BATCH_BYTES {
                            return None;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))))
                                if frame_len(&m) <= MAX_FRAME =>
                            {
                                bytes += frame_len(&m);
                                Some(m)
                            }
                            Some(other) => {
                                *pending = Some(other);
                                None
                            }
                            None => None,
                        }
                    })
                    .take(BATCH + 1);
                    // A write error surfaces on the socket's own reader.
                    write_batch(&mut *sink, frames, write_timeout, || {
                        peer.written.fetch_add(1, Ordering::Release);
                    })
                    .await
                    .map(drop)
                };
                let outcome = tokio::select! {
                    biased;
                    _ = closed(&mut close_rx) => Write::SelfClosed,
                    _ = closed(&mut peer_close) => Write::PeerClosed,
                    r = write => {
                        if r.is_ok() { Write::Done } else { Write::TimedOut }
                    }
                };
                match outcome {
                    Write::Done | Write::SelfClosed | Write::PeerClosed => {}
                    Write::TimedOut => {
                        tracing::info!(role = other.as_str(), timeout = ?write_timeout,
                            "egress peer stopped reading; closing it");
                        peer.close(1011, "egress peer stopped reading");
                    }
                }
            }
            Some(Err(e)) if is_too_big(&e) => {
                too_big = true;
                unread = true;
                break;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    // If this socket is still registered, its departure ends the pair: the
    // other end is told which side left. A replaced socket's late exit does
    // nothing because the registry already points at its successor.
    {
        let mut inner = st.egress.inner.lock().unwrap();
        if let Some(pair) = inner.pairs.get_mut(&key)
            && pair.slot(role).as_ref().is_some_and(|p| p.id == id)
        {
            *pair.slot(role) = None;
            if let Some(peer) = pair.slot(other).take() {
                peer.handle
                    .close(1011, &format!("egress {} disconnected", role.as_str()));
            }
            pair.epoch.fetch_add(1, Ordering::Release);
            inner.pairs.remove(&key);
        }
    }
    st.changed(Some(&key.0), None);
    if too_big {
        handle.close(1009, "message too big");
        if unread {
            // The library refused the frame from its header: reading on would
            // buffer the rest of it. Give the close frame time to arrive, then drop.
            tokio::time::sleep(CLOSE_GRACE).await;
        } else {
            drain(&mut stream).await;
        }
    }
}
