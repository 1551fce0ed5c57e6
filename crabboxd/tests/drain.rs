//! The daemon in-process with a supervised task: a `Shutdown` RPC (and the
//! caller's shutdown future) cancel the task, wait for it to finish its
//! drain, and only then stop the API and remove the socket.

// A test outside the daemon: it runs `crabboxd::run` as a task of its own.
#![allow(
    clippy::disallowed_methods,
    reason = "the test, not the daemon, spawns the daemon"
)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crabbox_api::v1;
use crabboxd::{
    Daemon,
    config::{Config, Dirs, MapEnv, Overrides},
    platform::socket::ApiListener,
    supervisor::{Backoff, RestartPolicy, TaskId, TaskKind},
};

fn config(dir: &std::path::Path) -> Config {
    let dirs = Dirs {
        config: dir.join("config"),
        state: dir.join("state"),
    };
    Config::load_from(&Overrides::default(), &MapEnv::default(), &dirs).unwrap()
}

/// Starts a daemon with one supervised task whose drain takes 300 ms and
/// records that it finished.
async fn daemon_with_slow_task(
    dir: &std::path::Path,
) -> (Daemon, std::path::PathBuf, Arc<AtomicBool>) {
    let socket = dir.join("run/crabboxd.sock");
    let daemon = Daemon::new(config(dir), ApiListener::bind(&socket).unwrap()).unwrap();
    let drained = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&drained);
    let handle = daemon
        .state()
        .supervisor()
        .start(
            TaskId::new(TaskKind::EgressHost, "lease_1"),
            BTreeMap::from([("lease".into(), "lease_1".into())]),
            RestartPolicy::OnFailure(Backoff::NETWORK),
            move |ctx| {
                let flag = Arc::clone(&flag);
                async move {
                    ctx.running();
                    ctx.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    flag.store(true, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    // The supervisor owns the task from here; the handle is not needed.
    std::mem::forget(handle);
    (daemon, socket, drained)
}

#[tokio::test]
async fn shutdown_rpc_drains_tasks_before_removing_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket, drained) = daemon_with_slow_task(dir.path()).await;
    let running = tokio::spawn(daemon.run(std::future::pending()));

    let client = crabbox_api::Client::connect(&socket).await.unwrap();
    let tasks = client
        .daemon()
        .list_tasks(v1::ListTasksRequest {
            kind: v1::TaskKind::EgressHost as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].id, "egress-host/lease_1");
    assert_eq!(
        tasks[0].labels.get("lease").map(String::as_str),
        Some("lease_1")
    );

    // A kind filter applies to the snapshot (and to the changes).
    let mut filtered = client
        .daemon()
        .watch_tasks(v1::WatchTasksRequest {
            kind: v1::TaskKind::EgressHost as i32,
        })
        .await
        .unwrap()
        .into_inner();
    match filtered.message().await.unwrap().unwrap().event {
        Some(v1::watch_tasks_event::Event::Snapshot(snap)) => {
            let ids: Vec<&str> = snap.tasks.iter().map(|t| t.id.as_str()).collect();
            assert_eq!(ids, ["egress-host/lease_1"], "api-server filtered out");
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    drop(filtered);

    // Watch the table, then ask for shutdown: the watcher sees the task
    // stop while the API is still up.
    let mut watch = client
        .daemon()
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    client
        .daemon()
        .shutdown(v1::ShutdownRequest {
            reason: "test".into(),
        })
        .await
        .unwrap();
    let mut saw_stopped = false;
    while let Ok(Some(ev)) = watch.message().await {
        if let Some(v1::watch_tasks_event::Event::Upsert(t)) = ev.event
            && t.id == "egress-host/lease_1"
            && t.state() == v1::TaskState::Stopped
        {
            saw_stopped = true;
        }
    }
    assert!(
        saw_stopped,
        "the watcher saw the task stop during the drain"
    );

    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        drained.load(Ordering::SeqCst),
        "the task finished its drain"
    );
    assert!(!socket.exists(), "socket removed after the drain");
}

#[tokio::test]
async fn caller_shutdown_future_drains_tasks_too() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket, drained) = daemon_with_slow_task(dir.path()).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run(async {
        let _ = rx.await;
    }));
    crabbox_api::Client::connect(&socket)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(drained.load(Ordering::SeqCst));
    assert!(!socket.exists());
}
