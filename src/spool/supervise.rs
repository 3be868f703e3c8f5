//! The spool's tasks, watched: the SQLite writer and reader threads, the
//! PostgreSQL writer, settler, notifier, pruners and listener. A task that
//! panics, or ends while the spool is open, fails the spool for good: every
//! operation then answers [`SpoolError::Failed`] with the reason (pushes
//! 503, `/readyz` 503), an ERROR line says which task and why, and the
//! relay shuts down and exits with status 70 so that its supervisor starts
//! it again. A task is not restarted in place: whatever state broke it
//! (a lease map, a half-read batch) would be kept, and the bug hidden.
//!
//! A database that does not answer is no failure: the tasks keep running,
//! each operation fails on its own, and the spool recovers when the
//! database is back.

use super::SpoolError;
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// The fate of one spool's tasks; cloned into each of them.
#[derive(Clone)]
pub struct Supervision {
    inner: Arc<Inner>,
}

struct Inner {
    /// Why the spool failed, once a task has.
    failure: watch::Sender<Option<Arc<str>>>,
    /// Set when the spool closes: a task ending then has finished its work.
    closing: AtomicBool,
    #[cfg(any(test, feature = "test-util"))]
    fail_writer: AtomicBool,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                failure: watch::Sender::new(None),
                closing: AtomicBool::new(false),
                #[cfg(any(test, feature = "test-util"))]
                fail_writer: AtomicBool::new(false),
            }),
        }
    }
}

impl Supervision {
    /// Why the spool failed, if a task has.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.inner.failure.borrow().clone()
    }

    /// Resolves once a task has failed, with the reason.
    pub async fn failed(&self) -> Arc<str> {
        let mut failures = self.inner.failure.subscribe();
        let reason = match failures.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The sender lives as long as `self`: never reached.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// `Failed` once a task has failed: every operation asks first.
    pub(super) fn check(&self) -> Result<(), SpoolError> {
        match self.failure() {
            Some(reason) => Err(SpoolError::Failed(reason)),
            None => Ok(()),
        }
    }

    /// The spool is closing: its tasks end because their work is done.
    pub(super) fn closing(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
    }

    fn fail(&self, task: &str, how: &str) {
        let reason: Arc<str> = Arc::from(format!("the {task} {how}"));
        let first = self.inner.failure.send_if_modified(|failure| {
            let first = failure.is_none();
            if first {
                *failure = Some(reason.clone());
            }
            first
        });
        if first {
            tracing::error!(task, reason = %reason, "a spool task failed: the spool refuses all work and the relay stops");
        }
    }

    /// What a task's end means: a panic is a failure, and so is a task of the
    /// spool's lifetime ending while the spool is open.
    fn ended(&self, task: &str, until_closed: bool, outcome: Result<(), Box<dyn Any + Send>>) {
        match outcome {
            Err(panic) => self.fail(task, &format!("panicked: {}", panic_text(&*panic))),
            Ok(()) if until_closed && !self.inner.closing.load(Ordering::SeqCst) => {
                self.fail(task, "ended while the spool was open")
            }
            Ok(()) => {}
        }
    }

    /// Runs `body` on a thread of its own, named `task`, for the spool's lifetime.
    pub(super) fn thread(
        &self,
        task: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name(task.replace(' ', "-"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
                this.ended(task, true, outcome);
            })
    }

    /// Spawns a task of the spool's lifetime: it ends only when the spool
    /// closes (or is aborted then).
    pub(super) fn spawn(
        &self,
        task: &'static str,
        body: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_watched(task, true, body)
    }

    /// Spawns a task that ends when its job is done; only a panic fails it.
    pub(super) fn spawn_brief(
        &self,
        task: &'static str,
        body: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_watched(task, false, body)
    }

    fn spawn_watched(
        &self,
        task: &'static str,
        until_closed: bool,
        body: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(Watched {
            supervision: self.clone(),
            task,
            until_closed,
            body: Box::pin(body),
        })
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Supervision {
    /// For tests: the writer that stores pushes panics when it takes the
    /// next push.
    pub fn fail_writer_at_next_push(&self) {
        self.inner.fail_writer.store(true, Ordering::SeqCst);
    }

    /// Called by the writers before storing pushes; panics when asked to.
    pub(super) fn panic_if_asked(&self) {
        if self.inner.fail_writer.swap(false, Ordering::SeqCst) {
            panic!("injected failure of the spool writer");
        }
    }
}

/// The message a panic was given, when it was text.
fn panic_text(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A task whose end is judged (see [`Supervision::ended`]) while its future
/// is still held: the failure is recorded before the requests the task held
/// are dropped, so their callers already find the reason.
struct Watched<F> {
    supervision: Supervision,
    task: &'static str,
    until_closed: bool,
    body: Pin<Box<F>>,
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let body = this.body.as_mut();
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| body.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(())) => Ok(()),
            Err(panic) => Err(panic),
        };
        this.supervision
            .ended(this.task, this.until_closed, outcome);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn failed_within(s: &Supervision) -> Option<Arc<str>> {
        tokio::time::timeout(Duration::from_secs(5), s.failed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_panicking_task_fails_the_spool_with_its_message() {
        let s = Supervision::default();
        s.spawn("spool writer", async { panic!("boom") });
        let reason = failed_within(&s).await.expect("failed");
        assert_eq!(&*reason, "the spool writer panicked: boom");
        assert!(matches!(s.check(), Err(SpoolError::Failed(r)) if r == reason));
    }

    #[tokio::test]
    async fn a_thread_that_ends_while_the_spool_is_open_fails_it() {
        let s = Supervision::default();
        s.thread("spool reader", || {}).unwrap().join().unwrap();
        let reason = failed_within(&s).await.expect("failed");
        assert_eq!(&*reason, "the spool reader ended while the spool was open");
    }

    #[tokio::test]
    async fn ending_at_close_or_by_abort_or_when_done_is_no_failure() {
        let s = Supervision::default();
        s.spawn_brief("spool pruner", async {}).await.unwrap();
        let forever = s.spawn("spool notifier", std::future::pending());
        forever.abort();
        assert!(forever.await.unwrap_err().is_cancelled());
        s.closing();
        s.spawn("spool settler", async {}).await.unwrap();
        s.thread("spool writer", || {}).unwrap().join().unwrap();
        assert!(s.failure().is_none());
        assert!(s.check().is_ok());
    }

    #[tokio::test]
    async fn the_first_failure_is_the_reason() {
        let s = Supervision::default();
        s.spawn_brief("spool pruner", async { panic!("first") })
            .await
            .unwrap();
        s.spawn_brief("spool pruner", async { panic!("second") })
            .await
            .unwrap();
        assert_eq!(
            s.failure().as_deref(),
            Some("the spool pruner panicked: first")
        );
    }
}
