//! The long-lived task of one bus: its inbox, the priority queue, the link's slots, the
//! meters' health and backoff. Side tasks it starts (an overrun event's write, a retry of the
//! spill) are tracked: `run` waits for them before it returns, and a panic in one reaches
//! whoever awaits `run`, as a panic of the worker itself would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use jiff::tz::TimeZone;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Bus;
use super::handle::{
    BusCommand, BusHandle, BusSnapshot, Health, MeterHealth, PollError, PollInfo, PollRequest,
};
use super::poll::{Done, reply_error, run_poll};
use super::queue::{PollQueue, Pushed};
use super::write::{Writer, flush_spill, store_append};
use crate::clock::SharedClock;
use crate::meter::link::Slot;
use crate::meter::{Failure, Meter};
use crate::reading::{Cadence, EventKind, Stamp, SystemEvent};
use crate::store::{Append, Store};

struct MeterRuntime {
    meter: Arc<Meter>,
    health: MeterHealth,
    backoff_until: Option<Instant>,
}

/// The long-lived task of one bus.
pub struct BusWorker {
    bus: Bus,
    meters: HashMap<String, MeterRuntime>,
    inbox: mpsc::Receiver<BusCommand>,
    writer: Arc<Writer>,
    /// Side tasks: writes of overrun events, retries of the spill.
    tasks: JoinSet<()>,
}

impl BusWorker {
    /// A worker for `bus` and its `meters`. `wake` is poked after every append.
    pub fn new(
        bus: Bus,
        meters: Vec<Arc<Meter>>,
        store: Arc<dyn Store>,
        wake: Arc<Notify>,
        clock: SharedClock,
        tz: TimeZone,
        inbox_size: usize,
    ) -> (Self, BusHandle) {
        let (tx, rx) = mpsc::channel(inbox_size.max(1));
        let meters = meters
            .into_iter()
            .map(|m| {
                (
                    m.id.clone(),
                    MeterRuntime {
                        health: MeterHealth {
                            meter: m.id.clone(),
                            ..MeterHealth::default()
                        },
                        meter: m,
                        backoff_until: None,
                    },
                )
            })
            .collect();
        let writer = Arc::new(Writer::new(&bus.name, store, wake, clock, tz));
        let handle = BusHandle {
            name: bus.name.clone(),
            tx,
        };
        (
            BusWorker {
                bus,
                meters,
                inbox: rx,
                writer,
                tasks: JoinSet::new(),
            },
            handle,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut queue = PollQueue::default();
        let mut free = Slot::for_link(&self.bus.link, self.bus.timing.timeout);
        let mut active: FuturesUnordered<
            std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>,
        > = FuturesUnordered::new();
        let mut active_info: Vec<PollInfo> = Vec::new();
        let mut stopping = false;
        // Readings kept while the store could not write are retried now and then, not only
        // when the next poll ends.
        let mut spill_retry = tokio::time::interval(Duration::from_secs(5));
        spill_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Start what can start.
            while !stopping && !free.is_empty() {
                // Never two scheduled reads of one (meter, cadence) at once (a TCP bus with
                // concurrency): a profile read's high-water mark is read and moved by one.
                let Some(req) = queue.pop_where(|r| {
                    r.cadence == Cadence::OnDemand
                        || !active_info
                            .iter()
                            .any(|a| a.meter == r.meter && a.cadence == r.cadence)
                }) else {
                    break;
                };
                let Some(meter) = self.meters.get(&req.meter) else {
                    reply_error(req, PollError::UnknownMeter);
                    continue;
                };
                if req.cadence != Cadence::OnDemand
                    && meter.backoff_until.is_some_and(|t| Instant::now() < t)
                {
                    tracing::debug!(bus = %self.bus.name, meter = %req.meter, cadence = %req.cadence, "Meter backed off, scheduled poll skipped");
                    continue;
                }
                let slot = free.pop().expect("checked non-empty");
                active_info.push(PollInfo::from(&req));
                active.push(Box::pin(run_poll(
                    self.writer.clone(),
                    self.bus.timing,
                    slot,
                    meter.meter.clone(),
                    req,
                )));
            }
            if stopping && active.is_empty() {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    // Queued polls are not started. Scheduled ones were not marked read, so
                    // the beat reads them late after the restart; on-demand ones are told.
                    while let Some(req) = queue.pop() {
                        reply_error(req, PollError::ShuttingDown);
                    }
                }
                Some(done) = active.next() => {
                    let Done { slot, meter, info, result, unmapped, again } = done;
                    free.push(slot);
                    if let Some(next) = again {
                        self.enqueue(&mut queue, next);
                    }
                    if let Some(i) = active_info.iter().position(|a| a.meter == info.meter && a.cadence == info.cadence && a.request_id == info.request_id) {
                        active_info.remove(i);
                    }
                    let max = self.bus.backoff_max;
                    if let Some(m) = self.meters.get_mut(&meter) {
                        m.record(result, unmapped, max, &self.writer.clock);
                    }
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                }
                _ = spill_retry.tick() => {
                    let w = self.writer.clone();
                    let pending = w.spill.try_lock().is_ok_and(|s| !s.is_empty());
                    if pending {
                        self.tasks.spawn(async move {
                            let mut spill = w.spill.lock().await;
                            flush_spill(&w, &mut spill).await;
                        });
                    }
                }
                cmd = self.inbox.recv(), if !stopping => match cmd {
                    None => stopping = true,
                    Some(BusCommand::Poll(req)) => self.enqueue(&mut queue, req),
                    Some(BusCommand::Cancel { request_id, reply }) => {
                        let mut dropped = queue.cancel(&request_id);
                        // A backfill cancelled between chunks: say what it read so far.
                        for req in &mut dropped {
                            super::rows::answer_cancelled(req);
                        }
                        let _ = reply.send(dropped);
                    }
                    Some(BusCommand::Inspect(reply)) => {
                        let _ = reply.send(BusSnapshot {
                            bus: self.bus.name.clone(),
                            active: active_info.clone(),
                            queued: queue.iter().map(PollInfo::from).collect(),
                            meters: self.meters.values().map(|m| m.health.clone()).collect(),
                        });
                    }
                },
            }
        }
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        let mut spill = self.writer.spill.lock().await;
        if !flush_spill(&self.writer, &mut spill).await {
            tracing::error!(bus = %self.bus.name, readings = spill.readings(), "Stopping with readings the store could not take: they are lost");
        }
        tracing::debug!(bus = %self.bus.name, "Bus worker stopped");
    }

    fn enqueue(&mut self, queue: &mut PollQueue, req: PollRequest) {
        if !self.meters.contains_key(&req.meter) {
            reply_error(req, PollError::UnknownMeter);
            return;
        }
        let (meter, cadence, boundary) = (req.meter.clone(), req.cadence, req.boundary);
        if let Pushed::Overrun { skipped } = queue.push(req) {
            tracing::warn!(bus = %self.bus.name, meter = %meter, cadence = %cadence, "Overrun: the previous read was still queued at the next boundary");
            if let Some(m) = &self.writer.metrics {
                m.overrun(cadence);
            }
            let tz = &self.writer.tz;
            let now = self.writer.clock.now();
            let mut event = SystemEvent::new(
                EventKind::Overrun,
                Stamp::in_zone(now, tz),
                format!(
                    "The {cadence} read of {meter} was still queued on bus {} at the next boundary; it reads the newer boundary instead",
                    self.bus.name
                ),
            )
            .meter(meter)
            .bus(self.bus.name.clone())
            .detail("cadence", cadence);
            if let Some(s) = skipped {
                event = event.detail("skipped_boundary", Stamp::in_zone(s, tz));
            }
            if let Some(b) = boundary {
                event = event.detail("boundary", Stamp::in_zone(b, tz));
            }
            let w = self.writer.clone();
            self.tasks.spawn(async move {
                store_append(
                    &w,
                    Append {
                        events: vec![event],
                        ..Append::default()
                    },
                )
                .await;
            });
        }
    }
}

impl MeterRuntime {
    fn record(
        &mut self,
        result: Result<(), Failure>,
        unmapped: usize,
        max: Duration,
        clock: &SharedClock,
    ) {
        let now = clock.now();
        self.health.unmapped = unmapped;
        match result {
            Ok(()) => {
                self.health.health = Health::Ok;
                self.health.consecutive_failures = 0;
                self.health.last_ok = Some(now);
                self.health.backoff_until = None;
                self.backoff_until = None;
            }
            Err(failure) => {
                self.health.health = Health::Failing;
                self.health.consecutive_failures += 1;
                self.health.last_error = Some(failure);
                // Three strikes, then 1 min, 2 min, 4 min … up to `max`.
                let n = self.health.consecutive_failures;
                if n >= 3 {
                    let pause = Duration::from_secs(60)
                        .saturating_mul(1u32 << (n - 3).min(16))
                        .min(max);
                    self.backoff_until = Some(Instant::now() + pause);
                    self.health.backoff_until = Some(now + pause);
                }
            }
        }
    }
}
