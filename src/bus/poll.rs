//! One poll: the driver reads, [`assemble`] turns the outcome into one atomic store write
//! (pure: readings, an event per failure, the boundary mark), the write goes to the store,
//! and whoever asked gets a report.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::handle::{PollError, PollInfo, PollReport, PollRequest};
use super::write::{Writer, store_append};
use crate::meter::link::Slot;
use crate::meter::{Failure, Meter, Outcome, Request, Timing};
use crate::reading::{Cadence, Flags, Reading, Stamp, SystemEvent};
use crate::store::{Append, Mark};

/// What a finished poll tells the worker.
pub struct Done {
    pub slot: Slot,
    pub meter: String,
    pub info: PollInfo,
    /// `Err`: the read failed (not a refusal of part of it).
    pub result: Result<(), Failure>,
    pub unmapped: usize,
    /// A profile read's next chunk, to queue below the scheduled reads.
    pub again: Option<PollRequest>,
}

/// Reads, stores and reports one poll.
pub async fn run_poll(
    w: Arc<Writer>,
    timing: Timing,
    mut slot: Slot,
    meter: Arc<Meter>,
    req: PollRequest,
) -> Done {
    if let Some(profile) = super::rows::profile_of(&meter, &req) {
        return super::rows::run_rows(w, timing, slot, meter, req, profile).await;
    }
    let info = PollInfo::from(&req);
    let request = Request {
        cadence: req.cadence,
        series: req.series.as_deref(),
    };
    let timing = meter.timing_on(&timing);
    let started = tokio::time::Instant::now();
    slot.begin(&timing).await;
    let outcome = meter.read(&mut slot, &request, &timing).await;
    slot.end();
    if outcome.reopen {
        slot.reset();
    }
    if let Some(m) = &w.metrics {
        let values = if outcome.failure.is_some() {
            0
        } else {
            outcome.values.len()
        };
        m.poll(&crate::metrics::PollEnd {
            meter: &meter.id,
            cadence: req.cadence,
            values,
            took: started.elapsed(),
            failure: outcome.failure.as_ref(),
            refused: &outcome.refused,
            at: w.clock.now(),
        });
    }
    let failure = outcome.failure.clone();
    let unmapped = outcome.unmapped;
    let failures: Vec<Failure> = outcome
        .failure
        .iter()
        .chain(outcome.refused.iter())
        .cloned()
        .collect();
    for f in &failures {
        tracing::warn!(bus = %w.bus, meter = %meter.id, cadence = %req.cadence, kind = %f.event_kind(), error = %f, "Poll failed");
    }
    let unsynced = w.clock.synchronized() == Some(false);
    let batch = assemble(
        &w.bus,
        &w.tz,
        &meter,
        &req,
        outcome,
        w.clock.now(),
        unsynced,
    );
    // The readings are copied only for whoever asked (the beat's polls have no one); the
    // log line's sample only if it is written.
    let readings = if req.reply.is_some() {
        batch.readings.clone()
    } else {
        Vec::new()
    };
    let n = batch.readings.len();
    let sample = tracing::enabled!(tracing::Level::INFO)
        .then(|| {
            // One value in the log line, so an operator sees numbers, not just counts: the
            // import energy register where there is one.
            batch
                .readings
                .iter()
                .find(|r| r.series.0[2..5] == [1, 8, 0])
                .or(batch.readings.first())
                .map(|r| format!("{}={} {}", r.series, r.value, r.unit))
        })
        .flatten();
    let stored = store_append(&w, batch).await;
    if stored {
        tracing::info!(bus = %w.bus, meter = %meter.id, cadence = %req.cadence, readings = n, sample = sample.as_deref().unwrap_or("-"), "Polled and buffered");
    }
    if let Some(reply) = req.reply {
        let _ = reply.send(PollReport {
            meter: meter.id.clone(),
            cadence: req.cadence,
            readings,
            errors: failures.into_iter().map(PollError::Meter).collect(),
            stored,
            rows: None,
        });
    }
    Done {
        slot,
        meter: meter.id.clone(),
        info,
        result: failure.map_or(Ok(()), Err),
        unmapped,
        again: None,
    }
}

/// Answers a poll that will not run.
pub fn reply_error(req: PollRequest, why: PollError) {
    if let Some(reply) = req.reply {
        let _ = reply.send(PollReport {
            meter: req.meter,
            cadence: req.cadence,
            readings: Vec::new(),
            errors: vec![why],
            stored: false,
            rows: req.rows.map(|j| j.tally),
        });
    }
}

/// Turns what a driver read into one atomic store write: the readings, an event per
/// failure, and — only if the read succeeded — the boundary mark.
pub fn assemble(
    bus: &str,
    tz: &TimeZone,
    meter: &Meter,
    req: &PollRequest,
    outcome: Outcome,
    now: Timestamp,
    unsynced: bool,
) -> Append {
    let Outcome {
        values,
        failure,
        refused,
        ..
    } = outcome;
    let failure = failure.as_ref();
    let read_at = Stamp::in_zone(now, tz);
    let boundary = req.boundary.map(|b| Stamp::in_zone(b, tz));
    let mut flags = req.flags;
    if unsynced {
        flags.insert(Flags::CLOCK_UNSYNCED);
    }
    // A transient failure means the read did not happen: no readings, no mark, so the beat
    // (after downtime) or the next boundary reads again. Refused requests (exceptions) are
    // permanent: keep what was read and mark the boundary done.
    let readings = if failure.is_some() {
        Vec::new()
    } else {
        values
            .into_iter()
            .map(|v| Reading {
                meter: meter.id.clone(),
                id_type: meter.id_type.clone(),
                series: v.series,
                value: v.value,
                unit: v.unit,
                timestamp: v.meter_time.or(boundary).unwrap_or(read_at),
                read_at,
                cadence: req.cadence,
                flags,
            })
            .collect()
    };
    let events = failure
        .into_iter()
        .chain(&refused)
        .map(|f| {
            let mut e = SystemEvent::new(f.event_kind(), read_at, format!("{}: {f}", meter.id))
                .meter(meter.id.clone())
                .bus(bus.to_owned())
                .detail("cadence", req.cadence);
            if let Failure::Exception { code, name, .. } = f {
                e = e.detail("exception_code", code).detail("exception", name);
            }
            if let Some(id) = &req.request_id {
                e = e.detail("request_id", id);
            }
            e
        })
        .collect();
    let marks = match (failure, req.boundary) {
        (None, Some(b)) if req.cadence != Cadence::OnDemand => vec![Mark {
            meter: meter.id.clone(),
            cadence: req.cadence,
            boundary_ms: b.as_millisecond(),
        }],
        _ => Vec::new(),
    };
    Append {
        readings,
        events,
        marks,
        ..Append::default()
    }
}
