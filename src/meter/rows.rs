//! Profile-based reads: rows of a meter's own load profile, asked for by range.
//!
//! A cadence whose `reads` name a profile (`quarterly = { profile = "1-0:99.1.0" }`) is not
//! read from registers: at each boundary the bus asks the driver for the profile's rows
//! after the (meter, profile)'s high-water mark ([`crate::store::ProfileMark`]), up to now,
//! in chunks of at most [`CHUNK`], and each row becomes readings stamped with the row's own
//! time. Drivers that keep a profile (DLMS/COSEM, IEC 62056-21) answer [`RowsRequest`]s with
//! [`Rows`]; the others refuse it when the config is resolved.

use std::time::Duration;

use jiff::Timestamp;

use super::Value;
use crate::reading::{Cadence, Flags, Obis, Stamp};

/// The most a single request asks for: one day, 96 quarter-hour rows. A longer gap is read
/// chunk by chunk, each its own atomic append, at a priority below scheduled reads.
pub const CHUNK: Duration = Duration::from_secs(86_400);

/// What one request asks of a meter's profile: rows captured in `from ..= to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowsRequest {
    pub profile: Obis,
    pub from: Timestamp,
    pub to: Timestamp,
}

/// What a profile read returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rows {
    /// The profile's capture period, where the meter says one.
    pub period: Option<Duration>,
    /// Rows in the order the meter keeps them (oldest first).
    pub rows: Vec<Row>,
    /// Values of rows that could not be turned into readings (no time, not numeric).
    pub unmapped: usize,
    /// What the meter reported beside the rows that the centre should hear of (its clock off
    /// by more than `clock_limit`): each becomes a system event; the rows are still good.
    pub refused: Vec<super::Failure>,
}

/// One row: the interval it closes, its status as flags, and its values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The row's time, in the meter's clock (with the offset it was captured in).
    pub at: Stamp,
    /// What the row's status says (`clock_invalid`, `dst`, `power_down`, `clock_adjusted`).
    pub flags: Flags,
    pub values: Vec<Value>,
}

/// The cadence a profile's rows are given: the one its capture period is, else the cadence
/// that read it.
pub fn cadence_of(period: Option<Duration>, read_by: Cadence) -> Cadence {
    match period.map(|p| p.as_secs()) {
        Some(900) => Cadence::Quarterly,
        Some(3600) => Cadence::Hourly,
        Some(86_400) => Cadence::Daily,
        _ => read_by,
    }
}

/// The chunks of `from ..= to`, each at most [`CHUNK`] long, oldest first. The end of one is
/// the start of the next: rows exactly on it are asked for twice and kept once (the reader
/// drops rows at or before the high-water mark).
pub fn chunks(from: Timestamp, to: Timestamp) -> Vec<(Timestamp, Timestamp)> {
    let step = jiff::SignedDuration::from_secs(CHUNK.as_secs() as i64);
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = start.checked_add(step).map_or(to, |e| e.min(to));
        out.push((start, end));
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_long_gap_should_be_read_in_day_sized_chunks_that_meet_end_to_start() {
        let c = chunks(ts("2026-03-01T10:00:00Z"), ts("2026-03-04T04:00:00Z"));
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0],
            (ts("2026-03-01T10:00:00Z"), ts("2026-03-02T10:00:00Z"))
        );
        assert_eq!(
            c[2],
            (ts("2026-03-03T10:00:00Z"), ts("2026-03-04T04:00:00Z"))
        );
        assert!(chunks(ts("2026-03-01T10:00:00Z"), ts("2026-03-01T10:00:00Z")).is_empty());
    }

    #[test]
    fn rows_should_take_the_cadence_their_capture_period_is() {
        let p = |s| Some(Duration::from_secs(s));
        assert_eq!(cadence_of(p(900), Cadence::Daily), Cadence::Quarterly);
        assert_eq!(cadence_of(p(86_400), Cadence::Quarterly), Cadence::Daily);
        assert_eq!(cadence_of(p(300), Cadence::Quarterly), Cadence::Quarterly);
        assert_eq!(cadence_of(None, Cadence::OnDemand), Cadence::OnDemand);
    }
}
