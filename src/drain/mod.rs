//! The drain: from the store to RabbitMQ, as Celery tasks, with publisher confirms.
//!
//! One task owns the broker connection. It takes the oldest records from the store, encodes
//! them as Celery protocol v2 tasks ([`celery`]), publishes them `mandatory` and persistent to
//! the default exchange with the queue's name as routing key, and keeps at most
//! `max_unconfirmed` messages awaiting their confirmation. A record leaves the store only
//! after its message was acked and not returned. A nack, a return, a closed channel or a lost
//! connection hands the records back to the store ([`Store::nack`]), and the drain reconnects
//! after a jittered backoff ([`crate::backoff`]).
//!
//! Order: messages leave in sequence order on one channel, so RabbitMQ keeps them in order per
//! meter. After a failure everything unconfirmed is sent again, oldest first; only if the
//! broker acked a later message while refusing an earlier one can a batch arrive after its
//! successor, and its reading ids say where it belongs.
//!
//! The broker being away is normal (a cellular link): it is logged as a warning and the
//! buffer grows. A broker that refuses us (credentials, vhost, missing queue) is an error an
//! operator must fix, and is logged as one, once per change, not once per retry.

mod amqp;
pub mod celery;
pub mod rate;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use amqp::AmqpPublisher;

use crate::backoff::Backoff;
use crate::primitives::{HumanDuration, Problems, Secret, read_secret_file};
use crate::store::{Entry, EntryId, Record, Store, StoreError, Stream};
use celery::{Envelope, TaskMessage};
use rate::{Pacer, RateLimit};

mod config;

pub use config::{AmqpConfig, URL_ENV};

/// How a published message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// The broker has it in the queue.
    Ack,
    /// Unroutable (no such queue): the broker returned it.
    Returned { code: u16, text: String },
    /// The broker refused it.
    Nack,
    /// The channel or connection went away before the confirmation came.
    Lost(String),
}

/// Why the publisher cannot go on. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker is not reachable (or went away): wait and reconnect.
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker refused us (credentials, vhost, permissions, TLS): an operator must act.
    /// Keep buffering and retry with the usual backoff.
    #[error("broker refused the connection: {0}")]
    Refused(String),
    /// A queue we publish to does not exist: an operator must act (or set
    /// `amqp.declare_queues`).
    #[error("queue `{0}` does not exist on the broker")]
    MissingQueue(String),
}

/// The broker, as the drain sees it. [`AmqpPublisher`] is the real one.
pub trait Publisher: Send + 'static {
    type Confirm: Future<Output = Confirmation> + Send + 'static;

    /// (Re)connects and readies a channel in confirm mode.
    fn connect(&mut self) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Makes sure `queue` exists: declared if configured so, else checked.
    fn ensure_queue(
        &mut self,
        queue: &str,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Sends one message to `queue`; the future resolves with the broker's confirmation.
    fn publish(
        &mut self,
        queue: &str,
        msg: TaskMessage,
    ) -> impl Future<Output = Result<Self::Confirm, PublishError>> + Send;
    /// Closes the connection cleanly.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// Whether the connection has died under us (the broker went, the link dropped), checked
    /// while there is nothing to send, so an idle drain notices and reconnects at once
    /// instead of at its next message, and its status does not say connected meanwhile.
    fn lost(&self) -> Option<PublishError> {
        None
    }
}

/// What the drain tells the rest of the agent (status, MQTT `inspect`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainStatus {
    pub connected: bool,
    /// The last failure, for operators.
    pub last_error: Option<String>,
    /// Messages confirmed since start.
    pub messages: u64,
    /// Records confirmed since start.
    pub records: u64,
}

/// The settings the drain loop needs, resolved from the config.
#[derive(Clone, Debug)]
pub struct DrainSettings {
    pub envelope: Envelope,
    pub queue: String,
    pub events_queue: String,
    pub task: String,
    pub events_task: String,
    pub readings_per_message: usize,
    pub max_unconfirmed: usize,
    pub rate_limit: Option<RateLimit>,
    pub max_backoff: Duration,
    pub confirm_timeout: Duration,
}

impl DrainSettings {
    pub fn new(gateway: &str, amqp: &AmqpConfig) -> Self {
        DrainSettings {
            envelope: Envelope {
                gateway: gateway.to_owned(),
                origin: format!("amr-edge@{gateway}"),
            },
            queue: amqp.queue.clone(),
            events_queue: amqp.events_queue.clone(),
            task: amqp.task.clone(),
            events_task: amqp.events_task.clone(),
            readings_per_message: amqp.readings_per_message,
            max_unconfirmed: amqp.max_unconfirmed,
            rate_limit: amqp.rate_limit,
            max_backoff: amqp.max_backoff.0,
            confirm_timeout: amqp.confirm_timeout.0,
        }
    }
}

/// The long-lived drain task: `new`, then `run` until shutdown.
pub struct Drain<P: Publisher> {
    settings: DrainSettings,
    store: Arc<dyn Store>,
    publisher: P,
    /// Poked by whoever appends to the store.
    wake: Arc<Notify>,
    status: watch::Sender<DrainStatus>,
    /// The process's counters, when metrics are on.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Records one take aims for when messages are small (see [`Drain::take_max`]).
const TAKE_RECORDS: usize = 256;

/// Why a session with the broker ended.
enum SessionEnd {
    Shutdown,
    Failed(PublishError),
}

/// A published message: its records, how many, how it ended and how long that took.
type InFlight =
    std::pin::Pin<Box<dyn Future<Output = (Vec<EntryId>, usize, Confirmation, Duration)> + Send>>;

impl<P: Publisher> Drain<P> {
    pub fn new(
        settings: DrainSettings,
        store: Arc<dyn Store>,
        publisher: P,
        wake: Arc<Notify>,
    ) -> (Self, watch::Receiver<DrainStatus>) {
        let (status, rx) = watch::channel(DrainStatus::default());
        (
            Drain {
                settings,
                store,
                publisher,
                wake,
                status,
                metrics: crate::metrics::global().cloned(),
            },
            rx,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), self.settings.max_backoff);
        let mut last_logged: Option<String> = None;
        while !shutdown.is_cancelled() {
            let result = match self.publisher.connect().await {
                Ok(()) => {
                    tracing::info!("Connected to the broker");
                    if let Some(m) = &self.metrics {
                        m.drain.connected();
                    }
                    self.status.send_modify(|s| {
                        s.connected = true;
                    });
                    last_logged = None;
                    self.session(&shutdown, &mut backoff).await
                }
                Err(e) => SessionEnd::Failed(e),
            };
            self.status.send_modify(|s| s.connected = false);
            match result {
                SessionEnd::Shutdown => break,
                SessionEnd::Failed(e) => {
                    let msg = e.to_string();
                    let delay = backoff.next_delay();
                    if last_logged.as_deref() != Some(msg.as_str()) {
                        match &e {
                            PublishError::Unreachable(_) => {
                                tracing::warn!(error = %msg, retry_in = ?delay, "Broker not available, readings stay buffered")
                            }
                            _ => {
                                tracing::error!(error = %msg, retry_in = ?delay, "Broker refuses delivery, readings stay buffered until this is fixed")
                            }
                        }
                        last_logged = Some(msg.clone());
                    } else {
                        tracing::debug!(error = %msg, retry_in = ?delay, "Still cannot deliver");
                    }
                    self.status.send_modify(|s| s.last_error = Some(msg));
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.publisher.close().await;
    }

    /// Publishes until the connection fails or shutdown.
    async fn session(&mut self, shutdown: &CancellationToken, backoff: &mut Backoff) -> SessionEnd {
        let queues = [
            self.settings.queue.clone(),
            self.settings.events_queue.clone(),
        ];
        for q in &queues {
            if let Err(e) = self.publisher.ensure_queue(q).await {
                return SessionEnd::Failed(e);
            }
        }
        let mut pacer = Pacer::new(self.settings.rate_limit);
        let mut progress = Progress::default();
        // Records taken from the store ahead of publishing, a few messages' worth per stream:
        // one store call per several messages. Handed back on any way out of the session.
        let mut ahead: [std::collections::VecDeque<Entry>; 2] = Default::default();
        let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        let mut failure: Option<PublishError> = None;
        // The store could not be read: the broker is fine, so the connection stays; the
        // drain waits a moment and reads again.
        let mut store_failed: Option<StoreError> = None;
        let mut stopping = false;
        // Events are few and often explain the readings around them: send them first.
        let mut streams = [Stream::Events, Stream::Readings].into_iter().cycle();
        // A stream whose last take came back short has nothing more until the next append
        // (or, as a fallback, the next tick), so it is not asked again before then: every
        // take is a hop to a blocking thread (a thread woken and put back to sleep), and with
        // a meter poll every few milliseconds most of them came back empty. New records
        // always wake the drain (the `wake` permit is kept while the drain is busy); records
        // handed back by a nack are taken by the next session, which starts with neither
        // stream dry.
        let mut dry = [false; 2];
        loop {
            // The pacer holds the next message back until then, and messages are in flight:
            // the window is left to handle their confirmations meanwhile (see below).
            let mut paced: Option<tokio::time::Instant> = None;
            if self.wake.notified().now_or_never().is_some() {
                dry = [false; 2];
            }
            // Fill the window.
            let mut idle_streams = 0;
            while !stopping
                && failure.is_none()
                && store_failed.is_none()
                && in_flight.len() < self.settings.max_unconfirmed
                && idle_streams < 2
            {
                let stream = streams.next().unwrap_or(Stream::Readings);
                if ahead[stream as usize].is_empty() && !dry[stream as usize] {
                    // The other stream in the same hop, if it will need a take too.
                    let other = match stream {
                        Stream::Events => Stream::Readings,
                        Stream::Readings => Stream::Events,
                    };
                    let mut wanted = vec![stream];
                    if ahead[other as usize].is_empty() && !dry[other as usize] {
                        wanted.push(other);
                    }
                    let (taken, failed) = self.take(wanted).await;
                    for (s, e) in taken {
                        dry[s as usize] = e.len() < self.take_max(s);
                        ahead[s as usize].extend(e);
                    }
                    if let Some(e) = failed {
                        store_failed = Some(e);
                        break;
                    }
                }
                let buf = &mut ahead[stream as usize];
                if buf.is_empty() {
                    idle_streams += 1;
                    continue;
                }
                idle_streams = 0;
                // Under a rate limit the next message may have to wait: with messages in
                // flight, wait where their confirmations are handled, so that the records
                // leave the store as they are confirmed, and a lost connection sends again
                // only what was truly unconfirmed, not the whole window.
                if !in_flight.is_empty() {
                    if let Some(at) = pacer.holds_until() {
                        paced = Some(at);
                        break;
                    }
                }
                let n = buf.len().min(self.per_message(stream));
                let entries: Vec<Entry> = buf.drain(..n).collect();
                tokio::select! {
                    () = pacer.ready() => {}
                    () = shutdown.cancelled() => {
                        self.store.nack(&ids(&entries));
                        stopping = true;
                        continue;
                    }
                }
                let (queue, msg) = self.encode(stream, &entries);
                let ids = ids(&entries);
                let sent = tokio::time::Instant::now();
                match self.publisher.publish(&queue, msg).await {
                    Ok(confirm) => {
                        let n = ids.len();
                        let limit = self.settings.confirm_timeout;
                        in_flight.push_back(Box::pin(async move {
                            let c =
                                tokio::time::timeout(limit, confirm)
                                    .await
                                    .unwrap_or_else(|_| {
                                        Confirmation::Lost(format!(
                                            "no confirmation within {limit:?}"
                                        ))
                                    });
                            (ids, n, c, sent.elapsed())
                        }));
                    }
                    Err(e) => {
                        self.store.nack(&ids);
                        failure = Some(e);
                    }
                }
            }
            if in_flight.is_empty() {
                progress.log(true);
                if failure.is_some() || stopping {
                    self.hand_back(&mut ahead);
                }
                if let Some(e) = failure {
                    return SessionEnd::Failed(e);
                }
                if stopping {
                    return SessionEnd::Shutdown;
                }
                if let Some(e) = store_failed.take() {
                    let msg = format!("cannot read the store: {e}");
                    if self.status.borrow().last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(error = %e, "Cannot read the store; the broker connection stays, reading again shortly");
                    }
                    self.status.send_modify(|s| s.last_error = Some(msg));
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => stopping = true,
                    }
                    continue;
                }
                // Nothing to send: wait for new records (or poll the store now and then, in case
                // a wake-up was missed or records came back from a nack).
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => stopping = true,
                }
                dry = [false; 2];
                if !stopping {
                    failure = self.publisher.lost();
                }
                continue;
            }
            let pace_until = paced.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                // The next message may go: back to filling the window.
                () = tokio::time::sleep_until(pace_until), if paced.is_some() => {}
                Some(first) = in_flight.next() => {
                    // Confirmations come in bursts (RabbitMQ acks several at once): take all
                    // that are ready and remove them from the store in one write.
                    let mut done = vec![first];
                    while let Some(Some(more)) = in_flight.next().now_or_never() {
                        done.push(more);
                    }
                    let mut delivered: Vec<EntryId> = Vec::new();
                    for (ids, n, confirmation, took) in done {
                        self.count(&ids, &confirmation, took);
                        match confirmation {
                            Confirmation::Ack => {
                                progress.add(stream_of(&ids), n);
                                self.status.send_modify(|s| {
                                    s.messages += 1;
                                    s.records += n as u64;
                                    s.last_error = None;
                                });
                                delivered.extend(ids);
                            }
                            Confirmation::Returned { code, text } => {
                                self.store.nack(&ids);
                                failure.get_or_insert(PublishError::MissingQueue(format!("{text} ({code})")));
                            }
                            Confirmation::Nack => {
                                self.store.nack(&ids);
                                failure.get_or_insert(PublishError::Unreachable("the broker nacked a message".into()));
                            }
                            Confirmation::Lost(why) => {
                                self.store.nack(&ids);
                                failure.get_or_insert(PublishError::Unreachable(why));
                            }
                        }
                    }
                    if !delivered.is_empty() {
                        if let Err(e) = self.ack(&delivered).await {
                            // Delivered but not removed: it will be sent again (same ids).
                            tracing::error!(error = %e, "Cannot remove delivered records from the store");
                        }
                        backoff.reset();
                        progress.log(false);
                    }
                }
                () = shutdown.cancelled() => {
                    // Stop taking new records; wait (briefly) for what is in flight.
                    let deadline = tokio::time::sleep(Duration::from_secs(5));
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            next = in_flight.next() => match next {
                                Some((ids, _, c, took)) => {
                                    self.count(&ids, &c, took);
                                    if matches!(c, Confirmation::Ack) {
                                        let _ = self.ack(&ids).await;
                                    } else {
                                        self.store.nack(&ids);
                                    }
                                }
                                None => break,
                            },
                            () = &mut deadline => break,
                        }
                    }
                    self.hand_back(&mut ahead);
                    return SessionEnd::Shutdown;
                }
            }
        }
    }

    /// Counts a message's end in the metrics, if they are on.
    fn count(&self, ids: &[EntryId], confirmation: &Confirmation, took: Duration) {
        use crate::metrics::Delivery;
        let Some(m) = &self.metrics else { return };
        let how = match confirmation {
            Confirmation::Ack => Delivery::Acked,
            Confirmation::Nack => Delivery::Nacked,
            Confirmation::Returned { .. } => Delivery::Returned,
            Confirmation::Lost(_) => Delivery::Lost,
        };
        m.drain.message(stream_of(ids), ids.len(), how, took);
    }

    fn per_message(&self, stream: Stream) -> usize {
        match stream {
            Stream::Readings => self.settings.readings_per_message,
            Stream::Events => self.settings.readings_per_message.min(100),
        }
    }

    /// Returns records taken ahead but not published to the store.
    fn hand_back(&self, ahead: &mut [std::collections::VecDeque<Entry>; 2]) {
        for buf in ahead {
            let ids: Vec<EntryId> = buf.drain(..).map(|e| e.id).collect();
            self.store.nack(&ids);
        }
    }

    /// How many records one take asks for: a few messages' worth (8), or as many as make
    /// [`TAKE_RECORDS`] records when messages are small, but never more than the window can
    /// carry. Every take is a hop to a blocking thread, a thread woken and put back to sleep:
    /// at one reading per message, 8 records a take was a hop every 8 messages.
    fn take_max(&self, stream: Stream) -> usize {
        let per = self.per_message(stream).max(1);
        let messages = (TAKE_RECORDS / per).max(8);
        per * messages.min(self.settings.max_unconfirmed)
    }

    /// Takes from each of `streams`, in one hop to a blocking thread. What was taken before
    /// a failure is returned with it, so that it is published or handed back, not stranded.
    async fn take(&self, streams: Vec<Stream>) -> (Vec<(Stream, Vec<Entry>)>, Option<StoreError>) {
        let store = self.store.clone();
        let wanted: Vec<(Stream, usize)> =
            streams.into_iter().map(|s| (s, self.take_max(s))).collect();
        tokio::task::spawn_blocking(move || {
            let mut taken = Vec::with_capacity(wanted.len());
            for (stream, max) in wanted {
                match store.take(stream, max) {
                    Ok(e) => taken.push((stream, e)),
                    Err(e) => return (taken, Some(e)),
                }
            }
            (taken, None)
        })
        .await
        .unwrap_or_else(|e| (Vec::new(), Some(StoreError::Unavailable(e.to_string()))))
    }

    async fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        let store = self.store.clone();
        let ids = ids.to_vec();
        tokio::task::spawn_blocking(move || store.ack(&ids))
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())))
    }

    fn encode(&self, stream: Stream, entries: &[Entry]) -> (String, TaskMessage) {
        let s = &self.settings;
        match stream {
            Stream::Readings => {
                let readings: Vec<_> = entries
                    .iter()
                    .filter_map(|e| match &e.record {
                        Record::Reading(r) => Some((e.id.seq, r)),
                        Record::Event(_) => None,
                    })
                    .collect();
                (
                    s.queue.clone(),
                    celery::readings_task(&s.envelope, &s.task, &readings),
                )
            }
            Stream::Events => {
                let events: Vec<_> = entries
                    .iter()
                    .filter_map(|e| match &e.record {
                        Record::Event(ev) => Some((e.id.seq, ev)),
                        Record::Reading(_) => None,
                    })
                    .collect();
                (
                    s.events_queue.clone(),
                    celery::events_task(&s.envelope, &s.events_task, &events),
                )
            }
        }
    }
}

fn stream_of(ids: &[EntryId]) -> Stream {
    ids.first().map_or(Stream::Readings, |i| i.range.stream())
}

/// Says what was delivered: when the buffer is empty again, and every 10 s while a backlog
/// drains, rather than once per message.
struct Progress {
    readings: u64,
    events: u64,
    messages: u64,
    since: tokio::time::Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            readings: 0,
            events: 0,
            messages: 0,
            since: tokio::time::Instant::now(),
        }
    }
}

impl Progress {
    fn add(&mut self, stream: Stream, n: usize) {
        match stream {
            Stream::Readings => self.readings += n as u64,
            Stream::Events => self.events += n as u64,
        }
        self.messages += 1;
    }

    fn log(&mut self, caught_up: bool) {
        if self.messages == 0 || !(caught_up || self.since.elapsed() >= Duration::from_secs(10)) {
            return;
        }
        tracing::info!(
            readings = self.readings,
            events = self.events,
            messages = self.messages,
            caught_up,
            "Delivered to the broker"
        );
        *self = Progress::default();
    }
}

fn ids(entries: &[Entry]) -> Vec<EntryId> {
    entries.iter().map(|e| e.id).collect()
}

#[cfg(test)]
mod tests;
