//! An in-memory stand-in for the coordinator's egress relay, for tests and demos: pairs one host and one client socket, relays frames verbatim (text stays text, binary stays binary), drops frames while the peer is absent, and closes with the reference's codes.

use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};

use crate::bridge::Role;

/// The WebSocket type [`MemoryRelay::connect`] returns.
pub type MemoryWs = WebSocketStream<DuplexStream>;

/// Messages queued towards one socket before its sender waits (backpressure like TCP).
const QUEUE: usize = 64;

/// WebSocket limits used on both ends of in-memory sockets (the reference Node coordinator allows 12 MiB).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// A coordinator-like pairing relay for one `(lease, session)`.
#[derive(Clone, Default)]
pub struct MemoryRelay {
    // A std mutex: only slot bookkeeping happens under it.
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Frames dropped at the start of every joined socket (see [`MemoryRelay::dropping_first`]).
    drop_first: usize,
    next: u64,
    host: Option<Slot>,
    client: Option<Slot>,
    /// Binary messages and their bytes relayed from each role's socket.
    binary_from_host: (u64, u64),
    binary_from_client: (u64, u64),
}

struct Slot {
    generation: u64,
    tx: mpsc::Sender<Message>,
}

impl State {
    fn slot(&mut self, role: Role) -> &mut Option<Slot> {
        match role {
            Role::Host => &mut self.host,
            Role::Client => &mut self.client,
        }
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }))
}

fn name(role: Role) -> &'static str {
    match role {
        Role::Host => "host",
        Role::Client => "client",
    }
}

impl MemoryRelay {
    /// Creates an empty relay.
    pub fn new() -> Self {
        Self::default()
    }

    /// A relay that drops the first `n` frames every joining socket sends, as
    /// the reference's Node relay loses frames sent just after an upgrade.
    pub fn dropping_first(n: usize) -> Self {
        let relay = Self::default();
        relay.state.lock().unwrap().drop_first = n;
        relay
    }

    /// Binary messages relayed from `role`'s sockets so far, and their total bytes
    /// (how well a sender coalesces its v2 frames).
    pub fn binary_sent_by(&self, role: Role) -> (u64, u64) {
        let state = self.state.lock().unwrap();
        match role {
            Role::Host => state.binary_from_host,
            Role::Client => state.binary_from_client,
        }
    }

    /// Whether a socket of `role` is currently registered.
    pub fn is_connected(&self, role: Role) -> bool {
        self.state.lock().unwrap().slot(role).is_some()
    }

    /// Closes both sockets with `code`/`reason` (e.g. `1008 "lease ended"`).
    pub fn close_all(&self, code: u16, reason: &str) {
        let mut state = self.state.lock().unwrap();
        for slot in [state.host.take(), state.client.take()]
            .into_iter()
            .flatten()
        {
            let _ = slot.tx.try_send(close(code, reason));
        }
    }

    /// Connects a new socket for `role`, replacing (and closing with 1012) any
    /// previous socket of the same role, as the reference coordinator does.
    pub async fn connect(&self, role: Role) -> MemoryWs {
        let (near, far) = tokio::io::duplex(256 * 1024);
        let ours = WebSocketStream::from_raw_socket(near, WsRole::Client, Some(ws_config())).await;
        let theirs = WebSocketStream::from_raw_socket(far, WsRole::Server, Some(ws_config())).await;
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
        let generation = {
            let mut state = self.state.lock().unwrap();
            state.next += 1;
            let generation = state.next;
            if let Some(old) = state.slot(role).replace(Slot { generation, tx }) {
                let _ = old.tx.try_send(close(
                    1012,
                    &format!("replaced by a newer egress {}", name(role)),
                ));
            }
            generation
        };
        let mut to_drop = self.state.lock().unwrap().drop_first;
        let (mut sink, mut stream) = theirs.split();
        // Separate reader and writer tasks: a full queue towards one socket must
        // never stop the relay from draining the other direction.
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let last = matches!(msg, Message::Close(_));
                if sink.send(msg).await.is_err() || last {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Text(_) | Message::Binary(_) if to_drop > 0 => to_drop -= 1,
                    Message::Text(_) | Message::Binary(_) => {
                        let peer = {
                            let mut s = state.lock().unwrap();
                            let me_current = s
                                .slot(role)
                                .as_ref()
                                .is_some_and(|slot| slot.generation == generation);
                            if !me_current {
                                break;
                            }
                            if let Message::Binary(b) = &msg {
                                let count = match role {
                                    Role::Host => &mut s.binary_from_host,
                                    Role::Client => &mut s.binary_from_client,
                                };
                                count.0 += 1;
                                count.1 += b.len() as u64;
                            }
                            s.slot(peer_of(role)).as_ref().map(|slot| slot.tx.clone())
                        };
                        // Peer absent: dropped, exactly like the reference relay.
                        if let Some(peer) = peer {
                            let _ = peer.send(msg).await;
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let mut s = state.lock().unwrap();
            if s.slot(role)
                .as_ref()
                .is_some_and(|slot| slot.generation == generation)
            {
                *s.slot(role) = None;
                if let Some(peer) = s.slot(peer_of(role)).take() {
                    let _ = peer
                        .tx
                        .try_send(close(1011, &format!("egress {} disconnected", name(role))));
                }
            }
        });
        ours
    }
}

fn peer_of(role: Role) -> Role {
    match role {
        Role::Host => Role::Client,
        Role::Client => Role::Host,
    }
}
