//! A one-thread runtime of its own, for the work of managed tasks whose many small hand-offs should not cross threads: [`Dedicated::run`] hands a future to it and waits, and dropping that wait aborts the work.
//!
//! The daemon runs on a multi-threaded runtime. Work whose tasks wake each
//! other on every message (an egress bridge: its read loop and multiplexer,
//! its writer, a task per stream) pays for a cross-thread wake-up each time
//! there; on one thread it does not (docs/benchmarks.md, "The daemon on one
//! worker thread"). The runtime starts with the first [`Dedicated::run`] and
//! lives as long as the process. Whatever the work dials or spawns belongs
//! to that runtime; the task that waits for it stays a managed task here
//! (cancelled, restarted and listed as any other).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

/// A lazily started one-thread runtime, named after its thread.
pub struct Dedicated {
    thread: &'static str,
    handle: OnceLock<Handle>,
}

impl Dedicated {
    /// A runtime whose thread will be called `thread`.
    pub const fn new(thread: &'static str) -> Self {
        Dedicated {
            thread,
            handle: OnceLock::new(),
        }
    }

    fn handle(&self) -> &Handle {
        self.handle.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime starts (it needs only an epoll and a timer)");
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(self.thread.into())
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .expect("the dedicated runtime's thread starts");
            handle
        })
    }

    /// Runs `work` on this runtime and waits for it. Dropping the returned
    /// future aborts `work`; a panic in it resumes here, where the
    /// supervisor catches it as it would one of the task's own.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = AbortOnDropHandle::new(self.handle().spawn(work));
        match task.await {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only an abort ends it otherwise, and only dropping `task` aborts it.
            Err(e) => unreachable!("a dedicated runtime's task ended without finishing: {e}"),
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
            .await;
        assert_eq!(name.as_deref(), Some("crabboxd-test-rt"));
        // Spawned from work on that runtime, a task stays there too.
        let inner = TEST
            .run(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                    .await
                    .unwrap()
            })
            .await;
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
        TEST.run(async { panic!("boom") }).await
    }
}
