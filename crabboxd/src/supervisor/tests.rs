//! Supervisor behaviour under tokio's paused clock: restart policy, backoff
//! reset, fatal errors, one task per key, cancel on drop, replacement.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::*;

fn sup() -> Supervisor {
    Supervisor::new(CancellationToken::new(), TaskRegistry::new())
}

fn id(key: &str) -> TaskId {
    TaskId::new(TaskKind::EgressHost, key)
}

/// A backoff without jitter, so delays are exact.
const EXACT: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(8),
    jitter: 0.0,
    reset_after: Duration::from_secs(60),
};

async fn settle() {
    // Let spawned tasks run up to their next await under the paused clock.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn fatal_error_stops_without_restart() {
    let s = sup();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let h = s
        .start(
            id("a"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |_ctx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(TaskError::fatal(anyhow::anyhow!("lease ended"))) }
            },
        )
        .await
        .unwrap();
    h.finished().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rec = s.registry().get(&id("a")).unwrap();
    assert_eq!(rec.state, TaskState::Failed);
    assert_eq!(rec.restarts, 0);
    assert_eq!(rec.last_error.as_deref(), Some("lease ended"));
    assert!(!s.is_live(&id("a")));
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_back_off_exponentially_to_the_cap() {
    let s = sup();
    let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let st = Arc::clone(&starts);
    let t0 = Instant::now();
    let _h = s
        .start(
            id("b"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |_ctx| {
                st.lock().unwrap().push(Instant::now());
                async { Err(TaskError::retryable(anyhow::anyhow!("connection refused"))) }
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(40)).await;
    let gaps: Vec<u64> = starts
        .lock()
        .unwrap()
        .iter()
        .scan(t0, |prev, t| {
            let gap = t.duration_since(*prev).as_secs();
            *prev = *t;
            Some(gap)
        })
        .collect();
    // First attempt at once, then 1, 2, 4, 8, 8, 8 … seconds apart.
    assert_eq!(&gaps[..7], &[0, 1, 2, 4, 8, 8, 8], "{gaps:?}");
    let rec = s.registry().get(&id("b")).unwrap();
    assert_eq!(rec.state, TaskState::Backoff);
    assert!(rec.restarts >= 6);
    assert!(rec.next_attempt.is_some());
}

/// Starts a task whose attempts 0..3 fail at once and whose attempt 3 runs
/// `healthy` and then fails too; returns when each attempt started, after
/// `run_for` of (paused) time.
async fn attempt_starts<F, Fut>(key: &str, healthy: F, run_for: Duration) -> Vec<Instant>
where
    F: Fn(TaskCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let s = sup();
    let calls = Arc::new(AtomicU32::new(0));
    let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let (c, st) = (Arc::clone(&calls), Arc::clone(&starts));
    let healthy = Arc::new(healthy);
    let _h = s
        .start(
            id(key),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |ctx| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                st.lock().unwrap().push(Instant::now());
                let healthy = Arc::clone(&healthy);
                async move {
                    if n == 3 {
                        healthy(ctx).await;
                    }
                    Err(TaskError::retryable(anyhow::anyhow!("blip")))
                }
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(run_for).await;
    starts.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_a_healthy_period() {
    // Attempt 3 runs healthy for longer than reset_after.
    let starts = attempt_starts(
        "c",
        |ctx| async move {
            ctx.running();
            tokio::time::sleep(Duration::from_secs(61)).await;
        },
        Duration::from_secs(80),
    )
    .await;
    // 0 → 1s → 2s → 4s (healthy 61 s) → reset: next delay is 1 s again.
    let after_healthy = starts[4].duration_since(starts[3]);
    assert_eq!(after_healthy, Duration::from_secs(61 + 1), "{starts:?}");
}

/// A task that reports `running` after every unit of work (a keeper after
/// each beat) is healthy since its first report, not its last.
#[tokio::test(start_paused = true)]
async fn backoff_resets_for_a_task_that_reports_running_often() {
    // Attempt 3 beats every 10 s for 70 s (past reset_after).
    let starts = attempt_starts(
        "c2",
        |ctx| async move {
            for _ in 0..7 {
                ctx.running();
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        },
        Duration::from_secs(90),
    )
    .await;
    // 0 → 1s → 2s → 4s (healthy 70 s) → reset: next delay is 1 s, not 8 s.
    let after_healthy = starts[4].duration_since(starts[3]);
    assert_eq!(after_healthy, Duration::from_secs(70 + 1), "{starts:?}");
}

#[tokio::test(start_paused = true)]
async fn clean_exit_stops_on_failure_policy_but_restarts_always_policy() {
    let s = sup();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let h = s
        .start(
            id("d"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
        )
        .await
        .unwrap();
    h.finished().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        s.registry().get(&id("d")).unwrap().state,
        TaskState::Stopped
    );

    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let _h = s
        .start(
            id("e"),
            BTreeMap::new(),
            RestartPolicy::Always(EXACT),
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(calls.load(Ordering::SeqCst) >= 3);
}

#[tokio::test(start_paused = true)]
async fn one_task_per_key() {
    let s = sup();
    let forever = |ctx: TaskCtx| async move {
        ctx.cancelled().await;
        Ok(())
    };
    let _h = s
        .start(id("k"), BTreeMap::new(), RestartPolicy::Never, forever)
        .await
        .unwrap();
    let err = s
        .start(id("k"), BTreeMap::new(), RestartPolicy::Never, forever)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "task egress-host/k is already running");
    // Another key is fine.
    let _h2 = s
        .start(id("other"), BTreeMap::new(), RestartPolicy::Never, forever)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_cancels_the_task() {
    let s = sup();
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let sc = Arc::clone(&saw_cancel);
    let h = s
        .start(
            id("drop"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |ctx| {
                let sc = Arc::clone(&sc);
                async move {
                    ctx.running();
                    ctx.cancelled().await;
                    sc.store(true, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    settle().await;
    assert_eq!(
        s.registry().get(&id("drop")).unwrap().state,
        TaskState::Running
    );
    drop(h);
    settle().await;
    assert!(saw_cancel.load(Ordering::SeqCst));
    assert_eq!(
        s.registry().get(&id("drop")).unwrap().state,
        TaskState::Stopped
    );
    assert!(!s.is_live(&id("drop")));
}

#[tokio::test(start_paused = true)]
async fn cancel_during_backoff_stops_at_once() {
    let s = sup();
    let h = s
        .start(
            id("bo"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(Backoff::NETWORK),
            |_| async { Err(TaskError::retryable(anyhow::anyhow!("down"))) },
        )
        .await
        .unwrap();
    settle().await;
    assert_eq!(
        s.registry().get(&id("bo")).unwrap().state,
        TaskState::Backoff
    );
    h.stop().await;
    assert_eq!(
        s.registry().get(&id("bo")).unwrap().state,
        TaskState::Stopped
    );
}

#[tokio::test(start_paused = true)]
async fn panics_are_caught_and_follow_policy() {
    let s = sup();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let _h = s
        .start(
            id("p"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |_| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        panic!("bug");
                    }
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let rec = s.registry().get(&id("p")).unwrap();
    assert_eq!(rec.state, TaskState::Stopped);
    assert_eq!(rec.restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_replacements_never_overlap_and_leave_one_task() {
    let s = sup();
    let running = Arc::new(AtomicU32::new(0));
    let overlap = Arc::new(AtomicBool::new(false));
    let mut joins = Vec::new();
    for i in 0..50 {
        let (s, running, overlap) = (s.clone(), Arc::clone(&running), Arc::clone(&overlap));
        joins.push(tokio::spawn(async move {
            let h = s
                .replace(
                    id("lease"),
                    BTreeMap::from([("n".into(), i.to_string())]),
                    RestartPolicy::Never,
                    move |ctx| {
                        let (running, overlap) = (Arc::clone(&running), Arc::clone(&overlap));
                        async move {
                            if running.fetch_add(1, Ordering::SeqCst) != 0 {
                                overlap.store(true, Ordering::SeqCst);
                            }
                            ctx.running();
                            ctx.cancelled().await;
                            // Draining takes time; the successor must wait for it.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        }
                    },
                )
                .await;
            // Keep every handle alive so only replacement (not drop) ends a task.
            std::mem::forget(h);
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    settle().await;
    assert!(
        !overlap.load(Ordering::SeqCst),
        "two generations ran at once"
    );
    assert_eq!(running.load(Ordering::SeqCst), 1);
    assert!(s.is_live(&id("lease")));
    assert_eq!(s.registry().list(Some(TaskKind::EgressHost)).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_within_grace_and_reports_stragglers() {
    let s = sup();
    let _good = s
        .start(
            id("good"),
            BTreeMap::new(),
            RestartPolicy::Never,
            |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            },
        )
        .await
        .unwrap();
    assert!(s.clone().shutdown(Duration::from_secs(5)).await);

    let s = sup();
    let _stubborn = s
        .start(
            id("stubborn"),
            BTreeMap::new(),
            RestartPolicy::Never,
            |_ctx| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            },
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(!s.shutdown(Duration::from_secs(5)).await);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn watch_gives_a_snapshot_then_changes() {
    let s = sup();
    let _a = s
        .start(
            id("w1"),
            BTreeMap::new(),
            RestartPolicy::Never,
            |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            },
        )
        .await
        .unwrap();
    let (snapshot, mut rx) = s.registry().watch();
    assert_eq!(snapshot.len(), 1);
    let b = s
        .start(
            id("w2"),
            BTreeMap::from([("lease".into(), "L".into())]),
            RestartPolicy::Never,
            |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            },
        )
        .await
        .unwrap();
    match rx.recv().await.unwrap() {
        RegistryEvent::Upsert(r) => {
            assert_eq!(r.id, id("w2"));
            assert_eq!(r.labels.get("lease").map(String::as_str), Some("L"));
        }
        other => panic!("unexpected {other:?}"),
    }
    b.stop().await;
    let mut last = None;
    while let Ok(ev) = rx.try_recv() {
        last = Some(ev);
    }
    assert!(matches!(last, Some(RegistryEvent::Upsert(r)) if r.state == TaskState::Stopped));
}

#[test]
fn ended_records_are_bounded_by_count_oldest_first_live_ones_never() {
    let reg = TaskRegistry::with_retention(Duration::from_secs(3600), 3);
    reg.upsert(&id("live"), |r| r.state = TaskState::Running);
    for n in 0..10 {
        reg.upsert(&id(&format!("ended-{n:02}")), |r| {
            r.state = TaskState::Running
        });
        // Distinct `since` values so "oldest" is well defined.
        std::thread::sleep(Duration::from_millis(2));
        reg.upsert(&id(&format!("ended-{n:02}")), |r| {
            r.state = if n % 2 == 0 {
                TaskState::Stopped
            } else {
                TaskState::Failed
            }
        });
    }
    let keys: Vec<String> = reg.list(None).into_iter().map(|r| r.id.key).collect();
    assert_eq!(keys, ["ended-07", "ended-08", "ended-09", "live"]);
}

#[test]
fn ended_records_expire_after_the_retention_time() {
    let reg = TaskRegistry::with_retention(Duration::from_millis(50), 256);
    let (_, mut rx) = reg.watch();
    reg.upsert(&id("live"), |r| r.state = TaskState::Running);
    reg.upsert(&id("done"), |r| r.state = TaskState::Stopped);
    assert_eq!(reg.list(None).len(), 2, "kept while recent");
    std::thread::sleep(Duration::from_millis(80));
    let keys: Vec<String> = reg.list(None).into_iter().map(|r| r.id.key).collect();
    assert_eq!(keys, ["live"]);
    // Watchers hear about the removal.
    let mut removed = false;
    while let Ok(ev) = rx.try_recv() {
        removed |= matches!(ev, RegistryEvent::Removed(i) if i == id("done"));
    }
    assert!(removed);
}

#[tokio::test(start_paused = true)]
async fn ended_tasks_leave_neither_records_beyond_the_cap_nor_transition_locks() {
    let s = sup();
    for n in 0..600 {
        let h = s
            .start(
                id(&format!("t{n}")),
                BTreeMap::new(),
                RestartPolicy::Never,
                |_ctx| async { Ok(()) },
            )
            .await
            .unwrap();
        h.finished().await;
    }
    // A stopped id, a refused duplicate start and a replaced id clean up too.
    let live = s
        .start(
            id("live"),
            BTreeMap::new(),
            RestartPolicy::Never,
            |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            },
        )
        .await
        .unwrap();
    assert!(
        s.start(
            id("live"),
            BTreeMap::new(),
            RestartPolicy::Never,
            |_| async { Ok(()) }
        )
        .await
        .is_err()
    );
    assert!(!s.stop(&id("never-started")).await);
    settle().await;
    assert_eq!(s.transition_locks(), 1, "only the live task's lock remains");
    assert!(s.registry().list(None).len() <= KEEP_FINAL_MAX + 1);
    live.stop().await;
    settle().await;
    assert_eq!(s.transition_locks(), 0);
}

#[tokio::test(start_paused = true)]
async fn recovering_clears_the_last_error() {
    let s = sup();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let _h = s
        .start(
            id("flaky"),
            BTreeMap::new(),
            RestartPolicy::OnFailure(EXACT),
            move |ctx| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        return Err(TaskError::retryable(anyhow::anyhow!("coordinator down")));
                    }
                    ctx.running();
                    ctx.cancelled().await;
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    settle().await;
    let rec = s.registry().get(&id("flaky")).unwrap();
    assert_eq!(rec.state, TaskState::Backoff);
    assert_eq!(rec.last_error.as_deref(), Some("coordinator down"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    let rec = s.registry().get(&id("flaky")).unwrap();
    assert_eq!(rec.state, TaskState::Running);
    assert_eq!(rec.restarts, 1);
    assert_eq!(rec.last_error, None, "a recovered task shows no old error");
}
