//! `crabbox-coordinator`: a self-hostable coordinator, wire-compatible with the
//! reference crabbox coordinator for the routes the daemon uses, on embedded SQLite.
//!
//! Entry point: [`serve`]`(config, listener, shutdown)`. Tests start it
//! in-process on port 0 through [`testing::TestCoordinator`].
//!
//! # Layout
//!
//! * `app` — shared state, route table, authentication layer.
//! * `body` — request bodies under a byte budget, parsed into bounded typed shapes.
//! * `auth` — admin → shared → `cbxu_` token precedence; user token issue/verify.
//! * `leases` — registration, lookup by id or slug, list, heartbeat, release, expiry math.
//! * `runs` — runs, run events (append + page), finish with logs.
//! * `control` — the `/v1/control` WebSocket and gap-free run-event pushes.
//! * `egress` — tickets, sessions and tombstones, bridge upgrades, status; `egress::relay` pairs and relays.
//! * `ws` — writer task and close signalling shared by both WebSocket kinds.
//! * `portal` — the browser portal under `/portal` (cookie sign-in, pages, live updates).
//! * `sweeper` — wakes at the soonest lease deadline and expires leases.
//! * `store` — SQLite schema, migrations and queries.
//! * `model`, `ids`, `clock`, `error`, `config` — records, identifiers, time, error shape, settings.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
mod tidy {
    /// House rule: every source file opens with a `//!` line saying what it owns.
    #[test]
    fn every_file_starts_with_a_module_doc() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in [
            "src",
            "src/egress",
            "src/portal",
            "tests",
            "tests/common",
            "benches",
        ] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        text.starts_with("//!"),
                        "{} must start with a //! line",
                        path.display()
                    );
                }
            }
        }
    }
}

mod app;
pub mod auth;
mod body;
pub mod clock;
pub mod config;
mod control;
mod egress;
pub mod error;
pub mod ids;
mod leases;
pub mod model;
mod portal;
mod runs;
mod store;
mod sweeper;
#[cfg(feature = "testing")]
pub mod testing;
mod ws;

use std::future::Future;

pub use clock::Clock;
pub use config::{Config, Limits, Secret};

/// Serve the coordinator on `listener` until `shutdown` completes.
///
/// On shutdown every WebSocket is closed `1012 "coordinator shutting down"`,
/// the portal's live streams end, in-flight HTTP requests finish, and the
/// expiry sweeper stops. The
/// database stays on disk: calling `serve` again with the same
/// [`Config::db_path`] resumes with the same leases, runs and egress sessions.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = store::Store::open(&config.db_path)?;
    let state = app::AppState::new(config, store);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(sweeper::run(state.clone(), stop_rx));
    let router = app::router(state.clone());
    let closing = state.clone();
    // Bridges relay small interactive frames; Nagle's algorithm would add
    // delayed-ACK stalls to every round trip.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.hub.close_all(1012, "coordinator shutting down");
            closing.egress.close_all(1012, "coordinator shutting down");
            closing.portal.stopping.send_replace(true);
        })
        .await;
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    tracing::info!(
        control = state.hub.len(),
        bridges = state.egress.socket_count(),
        "coordinator stopped"
    );
    result.map_err(Into::into)
}
