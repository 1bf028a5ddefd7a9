//! The drain's orchestration against a scripted broker and the in-memory store.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::*;
use crate::reading::{Cadence, Stamp};
use crate::store::tests::reading;
use crate::store::{Append, MemoryStore};

/// A broker whose behaviour the test scripts.
#[derive(Default)]
struct Broker {
    up: bool,
    queue_exists: bool,
    /// Confirmations given at once; `None`: the test confirms by hand via `pending`.
    auto: Option<Confirmation>,
    pending: VecDeque<oneshot::Sender<Confirmation>>,
    published: Vec<TaskMessage>,
    connects: usize,
    in_flight: usize,
    max_in_flight: usize,
}

#[derive(Clone, Default)]
struct FakePublisher(Arc<Mutex<Broker>>);

impl FakePublisher {
    /// A broker that is up and has the queues; the test confirms messages by hand.
    fn up() -> Self {
        let broker = FakePublisher::default();
        {
            let mut b = broker.broker();
            b.up = true;
            b.queue_exists = true;
        }
        broker
    }

    /// A broker that is up, has the queues and acknowledges every message at once.
    fn acking() -> Self {
        let broker = FakePublisher::up();
        broker.broker().auto = Some(Confirmation::Ack);
        broker
    }

    fn broker(&self) -> std::sync::MutexGuard<'_, Broker> {
        self.0.lock().unwrap()
    }
}

impl Publisher for FakePublisher {
    type Confirm = Pin<Box<dyn Future<Output = Confirmation> + Send>>;

    async fn connect(&mut self) -> Result<(), PublishError> {
        let mut b = self.broker();
        if b.up {
            b.connects += 1;
            b.in_flight = 0;
            Ok(())
        } else {
            Err(PublishError::Unreachable("connection refused".into()))
        }
    }

    async fn ensure_queue(&mut self, queue: &str) -> Result<(), PublishError> {
        if self.broker().queue_exists {
            Ok(())
        } else {
            Err(PublishError::MissingQueue(queue.into()))
        }
    }

    async fn publish(
        &mut self,
        _queue: &str,
        msg: TaskMessage,
    ) -> Result<Self::Confirm, PublishError> {
        let mut b = self.broker();
        if !b.up {
            return Err(PublishError::Unreachable("gone".into()));
        }
        b.published.push(msg);
        b.in_flight += 1;
        b.max_in_flight = b.max_in_flight.max(b.in_flight);
        let shared = self.0.clone();
        let confirm: Self::Confirm = match b.auto.clone() {
            Some(c) => Box::pin(async move {
                shared.lock().unwrap().in_flight -= 1;
                c
            }),
            None => {
                let (tx, rx) = oneshot::channel();
                b.pending.push_back(tx);
                Box::pin(async move {
                    let c = rx
                        .await
                        .unwrap_or(Confirmation::Lost("channel closed".into()));
                    shared.lock().unwrap().in_flight -= 1;
                    c
                })
            }
        };
        Ok(confirm)
    }

    async fn close(&mut self) {}
}

fn settings(per_message: usize, window: usize) -> DrainSettings {
    let mut amqp = AmqpConfig::for_url("amqp://localhost");
    amqp.readings_per_message = per_message;
    amqp.max_unconfirmed = window;
    DrainSettings::new("gw-test", &amqp)
}

fn fill(store: &MemoryStore, n: usize) {
    store
        .append(Append {
            readings: (0..n)
                .map(|i| reading("m", Cadence::Quarterly, i as i64, 1_000))
                .collect(),
            ..Append::default()
        })
        .unwrap();
}

fn reading_ids(m: &TaskMessage) -> Vec<String> {
    let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    body[1]["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reading_id"].as_str().unwrap().to_owned())
        .collect()
}

struct Running {
    store: Arc<MemoryStore>,
    broker: FakePublisher,
    status: watch::Receiver<DrainStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(settings: DrainSettings, store: Arc<MemoryStore>, broker: FakePublisher) -> Running {
    let (drain, status) = Drain::new(
        settings,
        store.clone(),
        broker.clone(),
        Arc::new(Notify::new()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drain.run(shutdown.clone()));
    Running {
        store,
        broker,
        status,
        shutdown,
        task,
    }
}

async fn until(mut f: impl FnMut() -> bool) {
    // Paused time: five simulated minutes cost nothing.
    for _ in 0..30_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never met");
}

#[tokio::test(start_paused = true)]
async fn confirmed_messages_should_leave_the_store_in_batches() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 250);
    let broker = FakePublisher::acking();
    let r = start(settings(100, 8), store, broker);
    until(|| r.store.records().is_empty()).await;
    let sizes: Vec<usize> = r
        .broker
        .broker()
        .published
        .iter()
        .map(|m| reading_ids(m).len())
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(r.status.borrow().records, 250);
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unconfirmed_messages_should_never_exceed_the_window() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 100);
    let broker = FakePublisher::up();
    let r = start(settings(1, 4), store, broker);
    // Confirm by hand, one at a time, while the drain keeps the window full.
    let mut confirmed = 0;
    while confirmed < 100 {
        until(|| !r.broker.broker().pending.is_empty()).await;
        let tx = r.broker.broker().pending.pop_front().unwrap();
        let _ = tx.send(Confirmation::Ack);
        confirmed += 1;
        assert!(r.broker.broker().max_in_flight <= 4);
    }
    until(|| r.store.records().is_empty()).await;
    assert_eq!(r.broker.broker().max_in_flight, 4);
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_confirmation_should_resend_the_same_readings_with_the_same_task_id() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 10);
    let broker = FakePublisher::up();
    let r = start(settings(10, 4), store, broker);
    until(|| !r.broker.broker().pending.is_empty()).await;
    // The connection drops before the broker confirms.
    let tx = r.broker.broker().pending.pop_front().unwrap();
    let _ = tx.send(Confirmation::Lost("connection reset".into()));
    until(|| r.broker.broker().published.len() == 2).await;
    let (first, second) = {
        let b = r.broker.broker();
        (b.published[0].clone(), b.published[1].clone())
    };
    assert_eq!(first.id, second.id);
    assert_eq!(reading_ids(&first), reading_ids(&second));
    assert_eq!(r.broker.broker().connects, 2, "it reconnected");
    assert_eq!(
        r.store.records().len(),
        10,
        "nothing left the store unconfirmed"
    );
    let tx = r.broker.broker().pending.pop_front().unwrap();
    let _ = tx.send(Confirmation::Ack);
    until(|| r.store.records().is_empty()).await;
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_returned_message_should_stay_buffered_and_be_reported() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 5);
    let broker = FakePublisher::default();
    {
        let mut b = broker.broker();
        b.up = true;
        b.queue_exists = true;
        b.auto = Some(Confirmation::Returned {
            code: 312,
            text: "NO_ROUTE".into(),
        });
    }
    let r = start(settings(100, 4), store, broker);
    let mut status = r.status.clone();
    until(|| status.borrow_and_update().last_error.is_some()).await;
    assert!(
        status
            .borrow()
            .last_error
            .as_ref()
            .unwrap()
            .contains("NO_ROUTE")
    );
    assert_eq!(r.store.records().len(), 5);
    // The queue comes back.
    r.broker.broker().auto = Some(Confirmation::Ack);
    until(|| r.store.records().is_empty()).await;
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_missing_queue_or_a_down_broker_should_be_retried_with_growing_waits() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 3);
    let broker = FakePublisher::default();
    broker.broker().up = false;
    let r = start(settings(100, 4), store, broker);
    let t0 = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(r.broker.broker().connects, 0);
    {
        let mut b = r.broker.broker();
        b.up = true;
        b.queue_exists = false;
    }
    let mut status = r.status.clone();
    until(|| {
        status
            .borrow_and_update()
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("does not exist"))
    })
    .await;
    {
        let mut b = r.broker.broker();
        b.queue_exists = true;
        b.auto = Some(Confirmation::Ack);
    }
    until(|| r.store.records().is_empty()).await;
    // Waits are capped (max_backoff 60 s), so recovery is prompt once things are fixed.
    assert!(t0.elapsed() < Duration::from_secs(30 + 2 * 60 + 5));
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_should_pace_messages_after_an_outage() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 50);
    let broker = FakePublisher::acking();
    let mut s = settings(1, 64);
    s.rate_limit = Some("10/s".parse().unwrap());
    let t0 = tokio::time::Instant::now();
    let r = start(s, store, broker);
    until(|| r.store.records().is_empty()).await;
    // 50 messages at 10/s: the first goes at once, the last 4.9 s later.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(4900), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    r.shutdown.cancel();
    r.task.await.unwrap();
}

/// While the pacer holds the next message back, the confirmations of those sent go on being
/// handled: a connection lost in the middle of a paced backlog then sends again only what
/// was truly unconfirmed, not the whole window.
#[tokio::test(start_paused = true)]
async fn confirmations_should_be_handled_while_the_rate_limit_holds_the_next_message() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 50);
    let broker = FakePublisher::acking();
    let mut s = settings(1, 64);
    s.rate_limit = Some("10/s".parse().unwrap());
    let r = start(s, store, broker);
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let sent = r.broker.broker().published.len();
    let left = r.store.records().len();
    assert!((10..=12).contains(&sent), "{sent} sent in 1.05 s at 10/s");
    assert!(
        left <= 50 - sent + 1,
        "{sent} sent and acknowledged, but {left} of 50 still in the store"
    );
    until(|| r.store.records().is_empty()).await;
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_should_wait_for_confirmations_in_flight() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 1);
    let broker = FakePublisher::up();
    let r = start(settings(10, 4), store, broker);
    until(|| !r.broker.broker().pending.is_empty()).await;
    r.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tx = r.broker.broker().pending.pop_front().unwrap();
    let _ = tx.send(Confirmation::Ack);
    r.task.await.unwrap();
    assert!(
        r.store.records().is_empty(),
        "the late confirmation still counted"
    );
}

#[tokio::test(start_paused = true)]
async fn events_should_go_to_the_events_queue_as_their_own_task() {
    let store = Arc::new(MemoryStore::new());
    store
        .append(Append {
            events: vec![SystemEvent::new(
                crate::reading::EventKind::MeterNotAnswering,
                Stamp { ms: 0, offset: 0 },
                "m1: no answer",
            )],
            ..Append::default()
        })
        .unwrap();
    let broker = FakePublisher::acking();
    let r = start(settings(10, 4), store, broker);
    until(|| r.store.records().is_empty()).await;
    let m = r.broker.broker().published[0].clone();
    assert_eq!(
        m.header("task"),
        Some(&celery::Header::Str(
            "utilitarian.commits.meter_system_events".into()
        ))
    );
    r.shutdown.cancel();
    r.task.await.unwrap();
}

use crate::reading::SystemEvent;

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_be_read_should_not_be_taken_for_a_broker_that_is_down() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 30);
    store.fail_reads(true);
    let broker = FakePublisher::acking();
    let r = start(settings(10, 4), store, broker);
    until(|| {
        r.status
            .borrow()
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot read the store"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    {
        let s = r.status.borrow();
        assert!(s.connected, "the broker connection stays up: {s:?}");
        assert!(
            !s.last_error
                .as_deref()
                .unwrap_or("")
                .contains("unreachable")
        );
    }
    assert_eq!(
        r.broker.broker().connects,
        1,
        "no reconnect for a store error"
    );
    r.store.fail_reads(false);
    until(|| r.store.records().is_empty()).await;
    assert_eq!(r.broker.broker().connects, 1);
    r.shutdown.cancel();
    r.task.await.unwrap();
}

/// A poll's worth of readings, appended and announced the way a bus worker does it.
fn poll_append(store: &dyn Store, wake: &Notify, from: i64, n: usize) {
    store
        .append(Append {
            readings: (0..n)
                .map(|i| reading("m", Cadence::Quarterly, from + i as i64, 1_000))
                .collect(),
            ..Append::default()
        })
        .unwrap();
    wake.notify_one();
}

#[tokio::test(start_paused = true)]
async fn a_poll_delivered_by_an_idle_drain_should_cost_one_take_per_stream() {
    let store = Arc::new(MemoryStore::new());
    let wake = Arc::new(Notify::new());
    let broker = FakePublisher::acking();
    let (drain, status) = Drain::new(
        settings(100, 8),
        store.clone(),
        broker.clone(),
        wake.clone(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drain.run(shutdown.clone()));
    until(|| status.borrow().connected).await;
    // Idle: both streams found empty.
    until(|| store.takes() >= 2).await;
    tokio::task::yield_now().await;
    let before = store.takes();
    poll_append(&*store, &wake, 0, 18);
    until(|| status.borrow().records == 18).await;
    tokio::task::yield_now().await;
    // The events (empty) and the readings (short of a full take): nothing is asked again
    // before the next append.
    assert_eq!(store.takes() - before, 2);
    until(|| store.records().is_empty()).await;
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn records_appended_while_messages_are_in_flight_should_be_sent_before_those_are_confirmed() {
    let store = Arc::new(MemoryStore::new());
    let wake = Arc::new(Notify::new());
    let broker = FakePublisher::up();
    let (drain, status) = Drain::new(settings(10, 4), store.clone(), broker.clone(), wake.clone());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drain.run(shutdown.clone()));
    until(|| status.borrow().connected).await;
    poll_append(&*store, &wake, 0, 20);
    until(|| broker.broker().pending.len() == 2).await;
    // A later poll, while both messages wait for their confirmation.
    poll_append(&*store, &wake, 100, 5);
    let tx = broker.broker().pending.pop_front().unwrap();
    let _ = tx.send(Confirmation::Ack);
    // The second message is still unconfirmed when the new readings go out.
    until(|| broker.broker().published.len() == 3).await;
    let third = reading_ids(&broker.broker().published[2]);
    let first = reading_ids(&broker.broker().published[0]);
    assert_eq!(third.len(), 5, "the new readings, not a resend: {third:?}");
    assert!(third.iter().all(|id| !first.contains(id)));
    assert_eq!(broker.broker().connects, 1, "no resend after a reconnect");
    shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn a_take_should_ask_for_a_window_of_small_messages_and_eight_large_ones() {
    let take = |per_message, window| {
        let (drain, _) = Drain::new(
            settings(per_message, window),
            Arc::new(MemoryStore::new()),
            FakePublisher::default(),
            Arc::new(Notify::new()),
        );
        drain.take_max(Stream::Readings)
    };
    // One reading per message: the whole window in one take, not eight records.
    assert_eq!(take(1, 64), 64);
    assert_eq!(take(1, 1_000), TAKE_RECORDS);
    assert_eq!(take(10, 64), 250);
    // Large messages: eight of them, as before, and never more than the window.
    assert_eq!(take(100, 64), 800);
    assert_eq!(take(100, 4), 400);
    assert_eq!(take(1, 1), 1);
}

#[tokio::test(start_paused = true)]
async fn a_backlog_at_one_reading_per_message_should_be_taken_a_window_at_a_time() {
    let store = Arc::new(MemoryStore::new());
    fill(&store, 640);
    let broker = FakePublisher::acking();
    let r = start(settings(1, 64), store.clone(), broker.clone());
    until(|| store.records().is_empty()).await;
    assert_eq!(broker.broker().published.len(), 640);
    // 10 takes of 64 readings and the last, empty one, and a few of the (empty) events
    // stream; at eight records a take it was over 80.
    assert!(store.takes() <= 16, "{} takes", store.takes());
    r.shutdown.cancel();
    r.task.await.unwrap();
}
