//! Every task control starts, in one [`TaskTracker`]: the command loop, the status loop and
//! one waiter per running poll. Stopping waits for all of them; a panic in any of them is
//! caught, logged and reported on a channel, and [`super::Control::run`] then panics itself,
//! so the agent sees it as it sees any of its tasks panic (the watchdog's `reap_panics`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// Spawns tracked tasks. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    panics: mpsc::Sender<String>,
}

/// Where [`Tasks`] report panics: the first one matters, the rest are logged only.
pub type Panics = mpsc::Receiver<String>;

impl Tasks {
    pub fn new() -> (Tasks, Panics) {
        let (panics, rx) = mpsc::channel(1);
        (
            Tasks {
                tracker: TaskTracker::new(),
                panics,
            },
            rx,
        )
    }

    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let panics = self.panics.clone();
        self.tracker.spawn(async move {
            if let Err(payload) = AssertUnwindSafe(task).catch_unwind().await {
                let why = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                tracing::error!(task = name, panic = %why, "A control task panicked");
                let _ = panics.try_send(format!("control {name} task: {why}"));
            }
        });
    }

    /// How many are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// No new tasks from now on; resolves when every task has ended.
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        self.tracker.close();
        let tracker = self.tracker.clone();
        async move { tracker.wait().await }
    }
}

/// Stop waits this long for control's tasks (each returns as soon as it sees the shutdown).
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_task_should_be_reported_and_the_tracker_still_end() {
        let (tasks, mut panics) = Tasks::new();
        tasks.spawn("fine", async {});
        tasks.spawn("doomed", async { panic!("waiter exploded") });
        let why = panics.recv().await.unwrap();
        assert!(
            why.contains("doomed") && why.contains("waiter exploded"),
            "{why}"
        );
        tasks.close().await;
        assert_eq!(tasks.len(), 0);
    }
}
