//! A one-thread runtime of its own, for the work of managed tasks whose many small hand-offs should not cross threads: [`Dedicated::run`] hands a future to it and waits, and dropping that wait aborts the work.
//!
//! The daemon runs on a multi-threaded runtime. Work whose tasks wake each
//! other on every message (an egress bridge: its read loop and multiplexer,
//! its writer, a task per stream) pays for a cross-thread wake-up each time
//! there; on one thread it does not (docs/benchmarks.md, "The daemon on one
//! worker thread"). The runtime starts with the first [`Dedicated::run`] and
//! lives as long as the process (a new one starts if its thread ever died).
//! Whatever the work dials or spawns belongs to that runtime; the task that
//! waits for it stays a managed task here (cancelled, restarted and listed as
//! any other). Two consequences: the work's timers run on that runtime's
//! clock, which a paused-time test of the caller does not pause; and the work
//! of a dropped wait is dropped a moment later, on that thread.

use std::future::Future;
use std::sync::Mutex;

use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

/// A lazily started one-thread runtime, named after its thread.
pub struct Dedicated {
    thread: &'static str,
    /// The runtime's handle and its thread, which may be replaced if it died.
    live: Mutex<Option<(Handle, std::thread::JoinHandle<()>)>>,
}

/// The dedicated runtime could not be started, or stopped under the work.
#[derive(Debug, thiserror::Error)]
#[error("the {thread} runtime {what}")]
pub struct Gone {
    thread: &'static str,
    what: String,
}

impl Dedicated {
    /// A runtime whose thread will be called `thread`.
    pub const fn new(thread: &'static str) -> Self {
        Dedicated {
            thread,
            live: Mutex::new(None),
        }
    }

    /// The running runtime's handle; starts it (again, if its thread died).
    fn handle(&self) -> Result<Handle, Gone> {
        let mut live = self.live.lock().unwrap();
        if let Some((handle, thread)) = &*live
            && !thread.is_finished()
        {
            return Ok(handle.clone());
        }
        let gone = |what: String| Gone {
            thread: self.thread,
            what,
        };
        let name = self.thread;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // The runtime is built, run and dropped on its own thread (a runtime
        // dropped inside this async context would panic).
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(format!("{name}-blocking"))
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| gone(format!("cannot start its thread: {e}")))?;
        // Building a current-thread runtime takes well under a millisecond.
        let handle = match rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => return Err(gone(format!("cannot start: {e}"))),
            Err(_) => return Err(gone("thread ended at its start".into())),
        };
        tracing::debug!(thread = name, "dedicated runtime started");
        *live = Some((handle.clone(), thread));
        Ok(handle)
    }

    /// Runs `work` on this runtime and waits for it. Dropping the returned
    /// future aborts `work` (dropped on that runtime's thread, next in its
    /// queue); a panic in it resumes here, where the supervisor catches it
    /// as it would one of the task's own. [`Gone`] if the runtime cannot be
    /// started or stopped under the work (the next call starts a new one).
    pub async fn run<F>(&self, work: F) -> Result<F::Output, Gone>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = AbortOnDropHandle::new(self.handle()?.spawn(work));
        match task.await {
            Ok(out) => Ok(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Not our abort (that needs `task` dropped): the runtime went away.
            Err(e) => Err(Gone {
                thread: self.thread,
                what: format!("stopped under the work: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST: Dedicated = Dedicated::new("crabboxd-test-rt");

    #[tokio::test]
    async fn work_runs_on_the_dedicated_thread_and_dropping_it_aborts_it() {
        let name = TEST
            .run(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("crabboxd-test-rt"));
        // Spawned from work on that runtime, a task stays there too.
        let inner = TEST
            .run(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
        assert_eq!(inner.as_deref(), Some("crabboxd-test-rt"));

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let work = TEST.run(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        // Polled, so the work is spawned, then dropped at the timeout.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), work).await;
        assert!(
            rx.await.is_err(),
            "the work was dropped, its sender with it"
        );
    }

    #[tokio::test]
    #[should_panic(expected = "boom")]
    async fn a_panic_in_the_work_resumes_in_the_caller() {
        let _ = TEST.run(async { panic!("boom") }).await;
    }
}
