//! The local beat: when each meter is read.
//!
//! # Boundary rules
//!
//! * Boundaries are wall-clock instants in the gateway's time zone ([`schedule`]):
//!   quarter-hours, hours, local midnight, the 1st of the month, 1 January. A cadence fires
//!   its boundary `delay` after it (per cadence, default none).
//! * A (meter, cadence) is never read twice for the same boundary: the bus worker writes the
//!   boundary's mark in the same atomic store write as the readings, and the beat skips a
//!   boundary at or before the meter's mark. (One exception, so a gateway whose RTC reset
//!   to 1970 does not fall silent for decades: while the kernel says the clock is not
//!   synchronised, a mark more than a day in the future is not trusted.)
//! * After downtime (a restart, the clock jumping forward, a suspend), only the most recent
//!   missed boundary of each cadence is read, once, flagged `late`; the older missed ones
//!   are not replayed (a late read can only read today's registers anyway). A meter that has
//!   never been read (no mark) gets no catch-up read: nothing was missed.
//! * The beat sleeps on the monotonic clock, at most a minute at a time, and asks the wall
//!   clock again on every wake-up. A jump of more than a few seconds either way is logged and
//!   reported as a `clock_problem` event. Backwards, nothing re-fires (the marks and the
//!   beat's own cursor are ahead); forwards, it is downtime.
//! * Readings taken while the kernel says the clock is not synchronised are flagged
//!   `clock_unsynced` (by the bus worker). `wait_for_clock_sync` holds the first scheduled
//!   read after start until the clock is synchronised, up to that long.
//! * A read counts as `late` when it happens more than a minute after its fire time.
//! * Overruns (a cadence's polls still queued at its next boundary) are the bus worker's to
//!   detect: it does not queue the duplicate and raises an `overrun` event.

pub mod schedule;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{PollRequest, RouteError, Router};
use crate::clock::SharedClock;
use crate::meter::Meter;
use crate::primitives::{HumanDuration, Problems};
use crate::reading::{Cadence, EventKind, Flags, Stamp, SystemEvent};
use crate::store::{Append, Store};

/// `[beat]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeatConfig {
    #[serde(default)]
    pub quarterly: CadenceConfig,
    #[serde(default)]
    pub hourly: CadenceConfig,
    #[serde(default)]
    pub daily: CadenceConfig,
    #[serde(default)]
    pub monthly: CadenceConfig,
    #[serde(default)]
    pub yearly: CadenceConfig,
    /// After start, hold the first scheduled read until the clock is synchronised, up to
    /// this long (an RTC-less board boots in 1970 until NTP answers).
    pub wait_for_clock_sync: Option<HumanDuration>,
    /// For commissioning, the demo and tests: read every meter this often (as quarterly
    /// reads, on multiples of it on the wall clock) instead of on the boundaries above.
    pub every: Option<HumanDuration>,
}

/// `quarterly = { delay = "10s" }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CadenceConfig {
    /// How long after the boundary to read (meters that close their registers late).
    pub delay: Option<HumanDuration>,
}

impl BeatConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if self.every.is_some_and(|e| e.0 < Duration::from_secs(1)) {
            p.push(format!("{at}.every"), "must be at least 1s");
        }
        for (name, c, max) in [
            ("quarterly", &self.quarterly, 10 * 60),
            ("hourly", &self.hourly, 45 * 60),
            ("daily", &self.daily, 12 * 3600),
            ("monthly", &self.monthly, 12 * 3600),
            ("yearly", &self.yearly, 12 * 3600),
        ] {
            if let Some(d) = c.delay {
                if d.0 > Duration::from_secs(max) {
                    p.push(
                        format!("{at}.{name}.delay"),
                        format!(
                            "must be at most {}",
                            humantime::format_duration(Duration::from_secs(max))
                        ),
                    );
                }
            }
        }
    }

    pub fn delay(&self, cadence: Cadence) -> Duration {
        let c = match cadence {
            Cadence::Quarterly => &self.quarterly,
            Cadence::Hourly => &self.hourly,
            Cadence::Daily => &self.daily,
            Cadence::Monthly => &self.monthly,
            Cadence::Yearly => &self.yearly,
            Cadence::OnDemand => return Duration::ZERO,
        };
        c.delay.map_or(Duration::ZERO, |d| d.0)
    }
}

/// When each cadence next fires after `now`: its next boundary, and the fire time (boundary
/// plus delay). For `check` and `inspect`.
pub fn next_fires(
    config: &BeatConfig,
    tz: &TimeZone,
    now: Timestamp,
) -> Vec<(Cadence, Timestamp, Timestamp)> {
    Cadence::SCHEDULED
        .into_iter()
        .map(|c| {
            let delay = config.delay(c);
            let due = latest_due(c, now, delay, tz);
            let b = schedule::after(c, due, tz);
            (c, b, add(b, delay))
        })
        .collect()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(t)
}

/// The latest boundary whose fire time (boundary + delay) is at or before `now`.
fn latest_due(c: Cadence, now: Timestamp, delay: Duration, tz: &TimeZone) -> Timestamp {
    let shifted = now.checked_sub(delay).unwrap_or(now);
    schedule::at_or_before(c, shifted, tz)
}

/// How far the wall clock may wander from the monotonic one between two looks before it
/// counts as a jump.
const JUMP: Duration = Duration::from_secs(5);
/// How long the beat sleeps at most before looking at the wall clock again.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// A read this long after its fire time is `late`.
const LATE: Duration = Duration::from_secs(60);
/// A mark this far ahead of an unsynchronised clock is not trusted (see the module doc).
const RESET_HORIZON: Duration = Duration::from_secs(86_400);

/// The long-lived beat task.
pub struct Beat {
    config: BeatConfig,
    /// The meters read at each cadence.
    plan: BTreeMap<Cadence, Vec<String>>,
    router: Router,
    store: Arc<dyn Store>,
    clock: SharedClock,
    tz: TimeZone,
}

impl Beat {
    pub fn new(
        config: BeatConfig,
        meters: &[Arc<Meter>],
        router: Router,
        store: Arc<dyn Store>,
        clock: SharedClock,
        tz: TimeZone,
    ) -> Self {
        let mut plan: BTreeMap<Cadence, Vec<String>> = BTreeMap::new();
        for m in meters {
            for c in m.reads.cadences() {
                plan.entry(c).or_default().push(m.id.clone());
            }
        }
        Beat {
            config,
            plan,
            router,
            store,
            clock,
            tz,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        if self.plan.is_empty() {
            tracing::info!("No meter has scheduled reads; the beat has nothing to do");
            return;
        }
        if !self.wait_for_sync(&shutdown).await {
            return;
        }
        let now = self.clock.now();
        // Start: where each cadence stands, and one late read for what was missed.
        let mut cursor: BTreeMap<Cadence, Timestamp> = BTreeMap::new();
        for &c in self.plan.keys() {
            let due = latest_due(c, now, self.config.delay(c), &self.tz);
            cursor.insert(c, due);
            self.fire(c, due, now, true).await;
        }
        let mut last_wall = now;
        let mut last_mono = Instant::now();
        loop {
            let now = self.clock.now();
            let expected = add(last_wall, last_mono.elapsed());
            let drift_ms = now.as_millisecond() - expected.as_millisecond();
            if drift_ms.unsigned_abs() > JUMP.as_millis() as u64 {
                self.clock_jumped(expected, now, drift_ms).await;
                let unsynced = self.clock.synchronized() != Some(true);
                if drift_ms < 0 && unsynced {
                    // A clock reset far into the past: without this, nothing would fire
                    // until the clock caught up with the old cursor again.
                    for (c, at) in cursor.iter_mut() {
                        if at.as_millisecond() - now.as_millisecond()
                            > RESET_HORIZON.as_millis() as i64
                        {
                            *at = latest_due(*c, now, self.config.delay(*c), &self.tz);
                        }
                    }
                }
            }
            last_wall = now;
            last_mono = Instant::now();

            for (&c, at) in cursor.iter_mut() {
                let due = latest_due(c, now, self.config.delay(c), &self.tz);
                if due > *at {
                    let missed = schedule::between(c, *at, due, &self.tz)
                        .len()
                        .saturating_sub(1);
                    if missed > 0 {
                        tracing::info!(cadence = %c, missed, boundary = %due, "Boundaries passed without a read (downtime or a clock jump); reading the latest once");
                    }
                    self.fire(c, due, now, false).await;
                    *at = due;
                }
            }

            let next = cursor
                .iter()
                .map(|(&c, &at)| add(schedule::after(c, at, &self.tz), self.config.delay(c)))
                .min()
                .unwrap_or(add(now, MAX_SLEEP));
            let wait =
                Duration::from_millis((next.as_millisecond() - now.as_millisecond()).max(0) as u64)
                    .min(MAX_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Waits for the clock to be synchronised if configured. `false`: shutdown came first.
    async fn wait_for_sync(&self, shutdown: &CancellationToken) -> bool {
        let Some(max) = self.config.wait_for_clock_sync else {
            return true;
        };
        if self.clock.synchronized() != Some(false) {
            return true;
        }
        tracing::info!(max = %max, "Waiting for the clock to synchronise before the first scheduled read");
        let until = Instant::now() + max.0;
        while Instant::now() < until {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = shutdown.cancelled() => return false,
            }
            if self.clock.synchronized() != Some(false) {
                tracing::info!("Clock synchronised");
                return true;
            }
        }
        tracing::warn!(
            "Clock still not synchronised: reading anyway, readings are flagged clock_unsynced"
        );
        self.report(
            SystemEvent::new(
                EventKind::ClockProblem,
                Stamp::in_zone(self.clock.now(), &self.tz),
                format!("The clock did not synchronise within {max}; reading with an unsynchronised clock"),
            )
            .detail("waited_s", max.0.as_secs()),
        )
        .await;
        true
    }

    /// Queues the reads of `boundary` for every meter of `cadence` that has not read it.
    /// `catch_up`: only meters that have read an earlier boundary (the start of the agent).
    async fn fire(&self, cadence: Cadence, boundary: Timestamp, now: Timestamp, catch_up: bool) {
        let Some(meters) = self.plan.get(&cadence) else {
            return;
        };
        let store = self.store.clone();
        let ids = meters.clone();
        let marks: Vec<Option<i64>> = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|m| store.boundary(m, cadence).ok().flatten())
                .collect()
        })
        .await
        .unwrap_or_default();
        let fire_at = add(boundary, self.config.delay(cadence));
        let late = now.as_millisecond() - fire_at.as_millisecond() > LATE.as_millis() as i64;
        let unsynced = self.clock.synchronized() != Some(true);
        let b = boundary.as_millisecond();
        let mut queued = 0;
        for (meter, mark) in meters.iter().zip(marks) {
            let wanted = match mark {
                None => !catch_up,
                Some(m) if m < b => true,
                // Read already, unless an unsynchronised clock was reset far back.
                Some(m) => unsynced && m - b > RESET_HORIZON.as_millis() as i64,
            };
            if !wanted {
                continue;
            }
            let mut req = PollRequest::new(meter.clone(), cadence);
            req.boundary = Some(boundary);
            if late {
                req.flags = Flags::LATE;
            }
            match self.router.try_poll(req) {
                Ok(()) => queued += 1,
                Err(RouteError::Busy(r)) => {
                    tracing::warn!(meter = %r.meter, cadence = %cadence, "Bus inbox full: read not queued");
                }
                Err(RouteError::UnknownMeter(r)) => {
                    tracing::warn!(meter = %r.meter, "Meter has no bus");
                }
            }
        }
        if queued > 0 {
            tracing::debug!(cadence = %cadence, boundary = %boundary, meters = queued, late, "Beat");
        }
    }

    async fn clock_jumped(&self, expected: Timestamp, now: Timestamp, drift_ms: i64) {
        let dir = if drift_ms > 0 { "forward" } else { "back" };
        tracing::warn!(expected = %expected, now = %now, jump_s = drift_ms / 1000, "The wall clock jumped {dir}");
        self.report(
            SystemEvent::new(
                EventKind::ClockProblem,
                Stamp::in_zone(now, &self.tz),
                format!(
                    "The gateway clock jumped {dir} by {}",
                    humantime::format_duration(Duration::from_secs(drift_ms.unsigned_abs() / 1000))
                ),
            )
            .detail("jump_ms", drift_ms)
            .detail("expected", Stamp::in_zone(expected, &self.tz))
            .detail(
                "synchronized",
                self.clock
                    .synchronized()
                    .map_or("unknown", |s| if s { "yes" } else { "no" }),
            ),
        )
        .await;
    }

    async fn report(&self, event: SystemEvent) {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || {
            store.append(Append {
                events: vec![event],
                ..Append::default()
            })
        })
        .await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::warn!("Could not store a clock event");
        }
    }
}

/// The fast beat of `beat.every` (the demo, commissioning, tests): every `interval`, on
/// multiples of it on the wall clock, one `quarterly` read of every meter.
pub async fn every(
    router: Router,
    interval: Duration,
    clock: SharedClock,
    shutdown: CancellationToken,
) {
    let step = interval.as_millis().max(1) as i64;
    loop {
        let now = clock.now_ms();
        let next = (now / step + 1) * step;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis((next - now) as u64)) => {}
            () = shutdown.cancelled() => return,
        }
        let boundary = Timestamp::from_millisecond(next).ok();
        for meter in router.meters() {
            let mut req = PollRequest::new(meter.clone(), Cadence::Quarterly);
            req.boundary = boundary;
            if let Err(e) = router.try_poll(req) {
                tracing::warn!(meter = %meter, error = ?e, "Could not queue demo read");
            }
        }
    }
}

#[cfg(test)]
mod tests;
