//! A profile-based read on the bus: one chunk of a meter's load profile per poll.
//!
//! Where a scheduled poll reads a cadence whose `reads` name a profile, or the centre orders a
//! `backfill`, [`run_rows`] takes the place of the register read:
//!
//! 1. **Where to start.** A backfill starts at its `from`. A scheduled read starts after the
//!    (meter, profile)'s high-water mark — the store's, or a newer one in the bus's spill
//!    (rows read while the disk could not write) — and, for a meter never read (or a wiped
//!    store), `history` before now (default: one period of the cadence, the last boundary).
//!    It ends now (a backfill: at its `to`), fixed when the first chunk starts.
//! 2. **One chunk.** At most [`CHUNK`] of rows per request. The rows after the start become
//!    readings with the row's own time, the flag `from_profile` (and `backfill`) and the
//!    row's status flags; [`assemble_rows`] puts them, the new high-water mark and, on the
//!    first chunk, the boundary mark into **one** atomic append: a crash leaves either the
//!    chunk with its mark or neither, so no row is lost or read twice.
//! 3. **The rest.** If the range goes on, the poll hands back a continuation
//!    ([`super::poll::Done::again`]) that the bus queues *after* every scheduled read of the
//!    other meters, so a 30-day gap on one meter does not starve the bus. A continuation is
//!    dropped when a newer scheduled read of the same (meter, cadence) is queued (that one
//!    starts from the same mark), and a `cancel` drops a backfill's between chunks.
//! 4. **Gaps.** When the meter's profile does not reach back to where the read started (its
//!    first row is later than one period after the mark, a backfill's `from`, or the end of
//!    the chunks before it that held no row), or holds no row at all in a whole chunk that
//!    is not the last, a `profile_gap` event says which range the meter could not give.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::handle::{PollError, PollInfo, PollReport, PollRequest};
use super::poll::Done;
use super::write::{Writer, store_append};
use crate::meter::link::Slot;
use crate::meter::rows::{CHUNK, Rows, RowsRequest, cadence_of};
use crate::meter::{Failure, Meter, Timing};
use crate::reading::{Cadence, EventKind, Flags, Obis, Reading, Stamp, SystemEvent};
use crate::store::{Append, Mark, ProfileMark};

/// The most a chunk reaches past [`CHUNK`] to take the rest of its read along.
const TAIL: Duration = Duration::from_secs(3600);

/// A profile read in progress, carried from chunk to chunk by its continuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowsJob {
    pub profile: Obis,
    /// A backfill's range (the centre's order): read it again whatever the mark says, and
    /// leave the mark alone. `None`: a scheduled read, after the mark.
    pub backfill: Option<(Timestamp, Timestamp)>,
    /// Once the first chunk is read: where the next starts (rows at or before it are done).
    pub next: Option<Timestamp>,
    /// The end of the whole read, fixed when its first chunk starts.
    pub to: Option<Timestamp>,
    /// What the chunks so far read.
    pub tally: RowsTally,
}

impl RowsJob {
    pub fn new(profile: Obis) -> Self {
        RowsJob {
            profile,
            backfill: None,
            next: None,
            to: None,
            tally: RowsTally::default(),
        }
    }

    /// A continuation: queued below every scheduled read.
    pub fn is_continuation(&self) -> bool {
        self.next.is_some()
    }
}

/// What a profile read did, for the `backfill` reply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RowsTally {
    pub rows: u64,
    pub readings: u64,
    pub chunks: u32,
    /// The first and last row's times.
    pub first: Option<Stamp>,
    pub last: Option<Stamp>,
    /// Ranges the meter could not give.
    pub gaps: Vec<(Stamp, Stamp)>,
}

/// The profile `req` reads, if it is a profile read: a backfill or continuation says so, a
/// scheduled poll of a cadence whose `reads` name a profile too.
pub fn profile_of(meter: &Meter, req: &PollRequest) -> Option<Obis> {
    if let Some(job) = &req.rows {
        return Some(job.profile);
    }
    if req.cadence == Cadence::OnDemand || req.series.is_some() {
        return None;
    }
    meter.profile_read(req.cadence).map(|p| p.profile)
}

/// How far back a scheduled profile read of `cadence` goes without a mark, by default: one
/// period of the cadence, so the first read takes the interval of the last boundary.
fn default_history(cadence: Cadence) -> Duration {
    Duration::from_secs(match cadence {
        Cadence::Quarterly => 900,
        Cadence::Hourly => 3600,
        Cadence::Daily | Cadence::OnDemand => 86_400,
        Cadence::Monthly => 31 * 86_400,
        Cadence::Yearly => 366 * 86_400,
    })
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// Where a read starts: the exclusive floor (rows after it are new) and whether the floor is
/// a mark (so a later first row is a gap).
struct Start {
    floor: Timestamp,
    /// The first row expected: one period after a mark, or a backfill's `from`.
    expect_from: Option<Timestamp>,
}

/// Reads, stores and reports one chunk of a profile read (see the module doc).
pub async fn run_rows(
    w: Arc<Writer>,
    timing: Timing,
    mut slot: Slot,
    meter: Arc<Meter>,
    mut req: PollRequest,
    profile: Obis,
) -> Done {
    let info = PollInfo::from(&req);
    let timing = meter.timing_on(&timing);
    let now = w.clock.now();
    let mut job = req
        .rows
        .take()
        .unwrap_or_else(|| Box::new(RowsJob::new(profile)));
    let to = match (job.to, job.backfill) {
        (Some(to), _) => to,
        (None, Some((_, to))) => to.min(now),
        (None, None) => now,
    };
    let start = match start(&w, &meter, &req, &job, now).await {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(bus = %w.bus, meter = %meter.id, %profile, error = %why, "Profile read skipped: its high-water mark cannot be read");
            return finish(
                req,
                job.tally,
                &meter,
                slot,
                info,
                Err(PollError::Store(why)),
                None,
            );
        }
    };
    // A tail of less than an hour goes with this chunk: not an association of its own.
    let chunk_to = match add(start.floor, CHUNK) {
        end if add(end, TAIL) >= to => to,
        end => end,
    };
    let last_chunk = chunk_to >= to;
    if start.floor >= to {
        // Nothing new can exist yet (the mark is at now): the boundary is done.
        let batch = Append {
            marks: boundary_mark(&meter, &req).into_iter().collect(),
            ..Append::default()
        };
        store_append(&w, batch).await;
        return finish(req, job.tally, &meter, slot, info, Ok(()), None);
    }
    let request = RowsRequest {
        profile,
        from: start.floor,
        to: chunk_to,
    };
    let started = tokio::time::Instant::now();
    slot.begin(&timing).await;
    let read = meter.read_rows(&mut slot, &request, &timing).await;
    slot.end();
    if read.is_err() {
        // The association or link may be half-open: start clean next time.
        slot.reset();
    }
    if let Some(m) = &w.metrics {
        let values = read.as_ref().map_or(0, |r| {
            r.rows.iter().map(|row| row.values.len()).sum::<usize>()
        });
        m.poll(&crate::metrics::PollEnd {
            meter: &meter.id,
            cadence: req.cadence,
            values,
            took: started.elapsed(),
            failure: read.as_ref().err(),
            refused: &[],
            at: w.clock.now(),
        });
    }
    let unsynced = w.clock.synchronized() == Some(false);
    let chunk = Chunk {
        floor: start.floor,
        to: chunk_to,
        last: last_chunk,
        // A continuation after chunks without a row: their gap is reported up to this
        // chunk's floor, so the rows are still expected from there.
        expect_from: if job.is_continuation() {
            (job.tally.rows == 0).then_some(start.floor)
        } else {
            start.expect_from
        },
    };
    let rows = match read {
        Ok(rows) => rows,
        Err(f) => {
            tracing::warn!(bus = %w.bus, meter = %meter.id, cadence = %req.cadence, %profile, kind = %f.event_kind(), error = %f, "Profile read failed");
            let event = failure_event(&w.bus, &meter, &req, &f, now, &w.tz);
            store_append(
                &w,
                Append {
                    events: vec![event],
                    ..Append::default()
                },
            )
            .await;
            return finish(
                req,
                job.tally,
                &meter,
                slot,
                info,
                Err(PollError::Meter(f)),
                None,
            );
        }
    };
    let (batch, tally) = assemble_rows(
        &w.bus, &w.tz, &meter, &req, &job, rows, &chunk, now, unsynced,
    );
    let n = batch.readings.len();
    let stored = store_append(&w, batch).await;
    job.tally.rows += tally.rows;
    job.tally.readings += tally.readings;
    job.tally.chunks += 1;
    job.tally.first = job.tally.first.or(tally.first);
    job.tally.last = tally.last.or(job.tally.last);
    job.tally.gaps.extend(tally.gaps);
    if let Some(m) = &w.metrics {
        m.backfill_rows(tally.rows);
    }
    if tally.rows > 0 {
        tracing::info!(bus = %w.bus, meter = %meter.id, cadence = %req.cadence, %profile, rows = tally.rows, readings = n, from = %Stamp::in_zone(start.floor, &w.tz), to = %Stamp::in_zone(chunk_to, &w.tz), stored, "Profile rows buffered");
    } else {
        tracing::debug!(bus = %w.bus, meter = %meter.id, cadence = %req.cadence, %profile, from = %Stamp::in_zone(start.floor, &w.tz), to = %Stamp::in_zone(chunk_to, &w.tz), "No new profile rows");
    }
    if !stored || last_chunk {
        let result = if stored {
            Ok(())
        } else {
            Err(PollError::Store(
                "the store cannot write now; the rows read wait in memory".into(),
            ))
        };
        return finish(req, job.tally, &meter, slot, info, result, None);
    }
    job.next = Some(chunk_to);
    job.to = Some(to);
    let again = PollRequest {
        meter: req.meter.clone(),
        cadence: req.cadence,
        boundary: None,
        flags: req.flags,
        series: None,
        request_id: req.request_id.clone(),
        reply: req.reply.take(),
        rows: Some(job),
    };
    Done {
        slot,
        meter: meter.id.clone(),
        info,
        result: Ok(()),
        unmapped: 0,
        again: Some(again),
    }
}

/// Where the read starts (see the module doc).
async fn start(
    w: &Writer,
    meter: &Meter,
    req: &PollRequest,
    job: &RowsJob,
    now: Timestamp,
) -> Result<Start, String> {
    if let Some(next) = job.next {
        return Ok(Start {
            floor: next,
            expect_from: None,
        });
    }
    if let Some((from, _)) = job.backfill {
        // Inclusive of `from`: the floor is just before it.
        return Ok(Start {
            floor: sub(from, Duration::from_millis(1)),
            expect_from: Some(from),
        });
    }
    let profile = job.profile;
    let (store, id) = (w.store.clone(), meter.id.clone());
    let stored = tokio::task::spawn_blocking(move || store.profile_mark(&id, &profile))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let spilled = w.spill.lock().await.profile_mark(&meter.id, &profile);
    let mark = stored.max(spilled);
    Ok(
        match mark.and_then(|ms| Timestamp::from_millisecond(ms).ok()) {
            Some(mark) => Start {
                floor: mark,
                expect_from: Some(mark),
            },
            None => {
                let history = meter
                    .profile_read(req.cadence)
                    .and_then(|p| p.history)
                    .or(meter.history)
                    .unwrap_or_else(|| default_history(req.cadence));
                let base = req.boundary.unwrap_or(now).min(now);
                Start {
                    floor: sub(base, history),
                    expect_from: None,
                }
            }
        },
    )
}

/// One chunk's range.
pub struct Chunk {
    /// Rows after this are new.
    pub floor: Timestamp,
    /// Rows up to this were asked for.
    pub to: Timestamp,
    /// The last chunk of the read (an empty one is not a gap: nothing new yet).
    pub last: bool,
    /// Where the first row should have been (a mark plus one period, a backfill's `from`);
    /// only on a read's first chunk.
    pub expect_from: Option<Timestamp>,
}

/// Turns one chunk's rows into one atomic store write: the readings, a `profile_gap` event
/// per range the meter could not give, the high-water mark (not for a backfill) and, on the
/// read's first chunk, the boundary mark. Pure.
#[allow(clippy::too_many_arguments)]
pub fn assemble_rows(
    bus: &str,
    tz: &TimeZone,
    meter: &Meter,
    req: &PollRequest,
    job: &RowsJob,
    rows: Rows,
    chunk: &Chunk,
    now: Timestamp,
    unsynced: bool,
) -> (Append, RowsTally) {
    let read_at = Stamp::in_zone(now, tz);
    let cadence = cadence_of(rows.period, req.cadence);
    let mut base = Flags::FROM_PROFILE;
    if job.backfill.is_some() {
        base.insert(Flags::BACKFILL);
    }
    if unsynced {
        base.insert(Flags::CLOCK_UNSYNCED);
    }
    let (floor_ms, to_ms) = (chunk.floor.as_millisecond(), chunk.to.as_millisecond());
    let fresh: Vec<_> = rows
        .rows
        .into_iter()
        .filter(|r| r.at.ms > floor_ms && r.at.ms <= to_ms)
        .collect();
    let mut tally = RowsTally {
        rows: fresh.len() as u64,
        first: fresh.first().map(|r| r.at),
        last: fresh.last().map(|r| r.at),
        ..RowsTally::default()
    };
    let mut readings = Vec::new();
    for row in &fresh {
        for v in &row.values {
            readings.push(Reading {
                meter: meter.id.clone(),
                id_type: meter.id_type.clone(),
                series: v.series,
                value: v.value.clone(),
                unit: v.unit.clone(),
                timestamp: row.at,
                read_at,
                cadence,
                flags: base | row.flags,
            });
        }
    }
    tally.readings = readings.len() as u64;
    // Gaps: the meter's first row later than expected, or a whole chunk without rows.
    let period = rows.period.unwrap_or(Duration::ZERO);
    let mut gaps = Vec::new();
    match (fresh.first(), chunk.expect_from) {
        (Some(first), Some(expect)) => {
            let expected = if job.backfill.is_some() {
                expect
            } else {
                add(expect, period)
            };
            if first.at.ms > add(expected, period).as_millisecond() - 1 && !period.is_zero() {
                gaps.push((expected, sub(first.at.timestamp(), period)));
            }
        }
        (None, _) if !chunk.last || job.backfill.is_some() => {
            gaps.push((chunk.expect_from.unwrap_or(chunk.floor), chunk.to));
        }
        _ => {}
    }
    let refused: Vec<SystemEvent> = rows
        .refused
        .iter()
        .map(|f| failure_event(bus, meter, req, f, now, tz))
        .collect();
    let events: Vec<SystemEvent> = gaps
        .iter()
        .map(|(from, to)| {
            // A backfill's range starts 1 ms before its `from`: say whole seconds.
            let from = Timestamp::from_second(from.as_millisecond().div_euclid(1000) + 1)
                .ok()
                .filter(|_| from.as_millisecond().rem_euclid(1000) != 0)
                .unwrap_or(*from);
            let (from, to) = (Stamp::in_zone(from, tz), Stamp::in_zone(*to, tz));
            tally.gaps.push((from, to));
            let mut e = SystemEvent::new(
                EventKind::ProfileGap,
                read_at,
                format!(
                    "{}: load profile {} holds no rows from {from} to {to}; those intervals cannot be read from the meter",
                    meter.id, job.profile
                ),
            )
            .meter(meter.id.clone())
            .bus(bus.to_owned())
            .detail("profile", job.profile)
            .detail("from", from)
            .detail("to", to);
            if let Some(id) = &req.request_id {
                e = e.detail("request_id", id);
            }
            e
        })
        .chain(refused)
        .collect();
    let profile_marks = match (job.backfill, fresh.last()) {
        (Some(_), _) => Vec::new(),
        (None, Some(last)) => vec![ProfileMark {
            meter: meter.id.clone(),
            profile: job.profile,
            last_ms: last.at.ms,
            rows: tally.rows,
        }],
        // A whole chunk without rows, not the last: the read moves past it.
        (None, None) if !chunk.last => vec![ProfileMark {
            meter: meter.id.clone(),
            profile: job.profile,
            last_ms: to_ms,
            rows: 0,
        }],
        (None, None) => Vec::new(),
    };
    let marks = if job.is_continuation() {
        Vec::new()
    } else {
        boundary_mark(meter, req).into_iter().collect()
    };
    (
        Append {
            readings,
            events,
            marks,
            profile_marks,
        },
        tally,
    )
}

fn boundary_mark(meter: &Meter, req: &PollRequest) -> Option<Mark> {
    match req.boundary {
        Some(b) if req.cadence != Cadence::OnDemand && req.rows.is_none() => Some(Mark {
            meter: meter.id.clone(),
            cadence: req.cadence,
            boundary_ms: b.as_millisecond(),
        }),
        _ => None,
    }
}

fn failure_event(
    bus: &str,
    meter: &Meter,
    req: &PollRequest,
    f: &Failure,
    now: Timestamp,
    tz: &TimeZone,
) -> SystemEvent {
    let mut e = SystemEvent::new(
        f.event_kind(),
        Stamp::in_zone(now, tz),
        format!("{}: {f}", meter.id),
    )
    .meter(meter.id.clone())
    .bus(bus.to_owned())
    .detail("cadence", req.cadence);
    if let Some(id) = &req.request_id {
        e = e.detail("request_id", id);
    }
    e
}

/// A profile read's next chunk dropped by a `cancel`: tells whoever asked what the chunks
/// before it read, and that the rest was cancelled. Other requests are left as they are.
pub fn answer_cancelled(req: &mut PollRequest) {
    let Some(job) = req.rows.as_ref() else {
        return;
    };
    if let Some(tx) = req.reply.take() {
        let _ = tx.send(PollReport {
            meter: req.meter.clone(),
            cadence: req.cadence,
            readings: Vec::new(),
            errors: vec![PollError::Cancelled],
            stored: true,
            rows: Some(job.tally.clone()),
        });
    }
}

/// The end of a profile read (its last chunk, a failure): the reply, if someone asked.
fn finish(
    mut req: PollRequest,
    tally: RowsTally,
    meter: &Meter,
    slot: Slot,
    info: PollInfo,
    result: Result<(), PollError>,
    again: Option<PollRequest>,
) -> Done {
    let failure = match &result {
        Err(PollError::Meter(f)) => Some(f.clone()),
        _ => None,
    };
    if let Some(reply) = req.reply.take() {
        let _ = reply.send(PollReport {
            meter: meter.id.clone(),
            cadence: req.cadence,
            readings: Vec::new(),
            stored: result.is_ok(),
            errors: result.err().into_iter().collect(),
            rows: Some(tally),
        });
    }
    Done {
        slot,
        meter: meter.id.clone(),
        info,
        result: failure.map_or(Ok(()), Err),
        unmapped: 0,
        again,
    }
}

#[cfg(test)]
mod tests;
