//! Profile-based reads on a bus worker, against the simulated DLMS meter on loopback and the
//! in-memory store; and [`assemble_rows`], pure.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::bus::{BusConfig, BusHandle, BusWorker, resolve};
use crate::clock::{Clock, ManualClock};
use crate::meter::MeterConfig;
use crate::meter::modbus::profile::Profiles;
use crate::meter::rows::Row;
use crate::reading::Decimal;
use crate::sim::dlms as sim;
use crate::store::{MemoryStore, Record, Store, Stream};

const PROFILE: Obis = Obis(sim::PROFILE_OBIS);

struct Bench {
    handle: BusHandle,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// One simulated DLMS meter (public client, 3 days of profile) read quarterly from its load
/// profile, with `history`; the agent's clock at `at`.
async fn bench(history: &str, at: Timestamp) -> Bench {
    bench_with(history, at, 0).await
}

/// [`bench`] with the meter's clock `clock_offset_s` ahead of the system's.
async fn bench_with(history: &str, at: Timestamp, clock_offset_s: i64) -> Bench {
    let mut spec = sim::MeterSpec::new(17);
    spec.clock_offset_s = clock_offset_s;
    let addr = sim::spawn_wrapper(sim::Meter::new(spec)).await.unwrap();
    let bus: BusConfig = toml::from_str(&format!(
        "name = \"lan\"\ntimeout = \"2s\"\nretries = 0\ntcp = {{ host = \"{}\", port = {}, concurrency = 2 }}",
        addr.ip(),
        addr.port()
    ))
    .unwrap();
    let meter: MeterConfig = toml::from_str(&format!(
        "id = \"e450\"\nbus = \"lan\"\ndlms = {{ client = 16, logical = 1 }}\nhistory = \"{history}\"\nreads = {{ quarterly = {{ profile = \"1-0:99.1.0\" }} }}"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tz = TimeZone::get("Europe/Stockholm").unwrap();
    let (bus, resolved) = resolve(&bus, &[meter], &Profiles::built_in(), &tz).unwrap();
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(at);
    let (worker, handle) = BusWorker::new(
        bus,
        resolved,
        store.clone(),
        Arc::new(Notify::new()),
        clock.clone(),
        tz,
        64,
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Bench {
        handle,
        store,
        clock,
        shutdown,
        task,
        _dir: dir,
    }
}

impl Bench {
    /// A scheduled quarterly read at the clock's time, and its chunks, until the bus is idle.
    async fn read(&self) {
        let mut r = PollRequest::new("e450", Cadence::Quarterly);
        r.boundary = Some(self.clock.now());
        self.handle.try_poll(r).unwrap();
        self.idle().await;
    }

    async fn idle(&self) {
        for _ in 0..400 {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            let s = self.handle.inspect().await.unwrap();
            if s.active.is_empty() && s.queued.is_empty() {
                return;
            }
        }
        panic!("the bus did not go idle");
    }

    fn readings(&self) -> Vec<Reading> {
        let entries = self.store.take(Stream::Readings, 100_000).unwrap();
        entries
            .into_iter()
            .filter_map(|e| match e.record {
                Record::Reading(r) => Some(r),
                Record::Event(_) => None,
            })
            .collect()
    }

    fn events(&self) -> Vec<SystemEvent> {
        let entries = self.store.take(Stream::Events, 100_000).unwrap();
        entries
            .into_iter()
            .filter_map(|e| match e.record {
                Record::Event(ev) => Some(ev),
                Record::Reading(_) => None,
            })
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// The quarter hour at or before `t`.
fn quarter(t: Timestamp) -> i64 {
    t.as_second().div_euclid(900) * 900
}

/// Row times (Unix s) among `readings`, each once, sorted; and the count of readings each.
fn row_times(readings: &[Reading]) -> (Vec<i64>, Vec<usize>) {
    let mut by: std::collections::BTreeMap<i64, usize> = Default::default();
    for r in readings {
        *by.entry(r.timestamp.ms / 1000).or_default() += 1;
    }
    (by.keys().copied().collect(), by.values().copied().collect())
}

#[tokio::test]
async fn a_new_meter_should_read_its_history_then_after_downtime_every_missed_row_once() {
    // The agent's clock five hours behind the meter's: "before the downtime".
    let real = Timestamp::now();
    let before = Timestamp::from_second(quarter(real) - 5 * 3600 + 60).unwrap();
    let b = bench("3h", before).await;
    b.read().await;
    let first = b.readings();
    let (times, per_row) = row_times(&first);
    let last = quarter(before);
    let want: Vec<i64> = (0..12).rev().map(|k| last - k * 900).collect();
    assert_eq!(times, want, "3h of quarter-hour rows up to the agent's now");
    assert!(per_row.iter().all(|n| *n == 2), "two columns per row");
    // Exact values: the simulator's formula for the import register at each row's time.
    for r in first.iter().filter(|r| r.series.0 == [1, 0, 1, 8, 0, 255]) {
        let q = r.timestamp.ms / 1000 / 900;
        let raw = 10 * q + (q * q) % 7 + 1000 * 17;
        assert_eq!(r.value, Decimal::from_scaled(raw.into(), -1).unwrap());
        assert_eq!(r.unit, "Wh");
        assert_eq!(r.cadence, Cadence::Quarterly);
        assert!(r.flags.contains(Flags::FROM_PROFILE));
        assert!(!r.flags.contains(Flags::BACKFILL));
    }
    assert_eq!(
        b.store.profile_mark("e450", &PROFILE).unwrap(),
        Some(last * 1000)
    );
    // The same boundary again: nothing new, nothing twice.
    b.read().await;
    assert!(b.readings().is_empty());
    // Five hours later: all 20 missed rows, none of the earlier ones.
    b.clock
        .set(Timestamp::from_second(quarter(real) + 30).unwrap());
    b.read().await;
    let (times, _) = row_times(&b.readings());
    let want: Vec<i64> = (1..=20).map(|k| last + k * 900).collect();
    assert_eq!(times, want);
    let states = b.store.profiles().unwrap();
    assert_eq!(states[0].rows, 32);
    assert!(b.events().is_empty(), "no gap: the meter held every row");
    b.stop().await;
}

#[tokio::test]
async fn a_long_gap_should_be_read_in_day_chunks_each_row_once_and_beyond_the_meters_first_row_without_error()
 {
    // Seven days of history asked for; the simulated meter holds three.
    let now = Timestamp::now();
    let b = bench("7d", now).await;
    b.read().await;
    let readings = b.readings();
    let (times, per_row) = row_times(&readings);
    assert_eq!(times.len(), 3 * 96, "every row the meter holds, once");
    assert!(per_row.iter().all(|n| *n == 2));
    assert!(times.windows(2).all(|w| w[1] - w[0] == 900));
    assert_eq!(*times.last().unwrap(), quarter(now));
    assert_eq!(b.store.profiles().unwrap()[0].rows, 3 * 96);
    // Four empty days before the meter's first row: chunks that are not the last and hold
    // nothing are gaps the meter cannot fill, reported; the read still went on.
    let gaps: Vec<_> = b
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::ProfileGap)
        .collect();
    assert!(!gaps.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn a_backfill_should_read_its_range_again_flagged_and_leave_the_mark_alone() {
    let now = Timestamp::now();
    let b = bench("1h", now).await;
    b.read().await;
    let mark = b.store.profile_mark("e450", &PROFILE).unwrap();
    assert_eq!(b.readings().len(), 4 * 2);
    let from = Timestamp::from_second(quarter(now) - 2 * 86_400).unwrap();
    let to = Timestamp::from_second(quarter(now) - 86_400 + 3600).unwrap();
    let mut r = PollRequest::new("e450", Cadence::OnDemand);
    r.request_id = Some("bf-1".into());
    let mut job = RowsJob::new(PROFILE);
    job.backfill = Some((from, to));
    r.rows = Some(Box::new(job));
    let (tx, rx) = oneshot::channel();
    r.reply = Some(tx);
    b.handle.try_poll(r).unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(20), rx)
        .await
        .unwrap()
        .unwrap();
    let tally = report.rows.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(tally.rows, 96 + 4 + 1, "both ends inclusive");
    assert_eq!(tally.chunks, 2);
    assert_eq!(tally.first.unwrap().ms, from.as_millisecond());
    assert_eq!(tally.last.unwrap().ms, to.as_millisecond());
    let readings = b.readings();
    assert_eq!(readings.len() as u64, tally.readings);
    assert!(
        readings
            .iter()
            .all(|r| r.flags.contains(Flags::BACKFILL | Flags::FROM_PROFILE))
    );
    assert_eq!(b.store.profile_mark("e450", &PROFILE).unwrap(), mark);
    b.stop().await;
}

#[tokio::test]
async fn rows_read_while_the_meters_clock_is_off_should_be_flagged_and_say_by_how_much() {
    let now = Timestamp::now();
    let b = bench_with("1h", now, -600).await;
    b.read().await;
    let readings = b.readings();
    assert!(!readings.is_empty());
    assert!(readings.iter().all(|r| r.flags.contains(Flags::CLOCK_OFF)));
    let events = b.events();
    let clock: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::ClockProblem)
        .collect();
    assert_eq!(clock.len(), 1, "{events:?}");
    assert!(
        clock[0].message.contains("off by 600 s") || clock[0].message.contains("off by 599 s"),
        "{}",
        clock[0].message
    );
    b.stop().await;
}

#[tokio::test]
async fn a_profile_starting_inside_a_later_chunk_should_report_the_gap_up_to_its_first_row() {
    // The simulated meter holds three days; the backfill starts a day and a half before
    // them: its first chunk is empty, and the second finds rows only halfway through.
    let now = Timestamp::now();
    let b = bench("1h", now).await;
    let q = quarter(now);
    let first_row = q - 3 * 86_400 + 900;
    let from = Timestamp::from_second(q - 4 * 86_400 - 12 * 3600).unwrap();
    let to = Timestamp::from_second(q - 3 * 86_400 + 2 * 3600).unwrap();
    let mut r = PollRequest::new("e450", Cadence::OnDemand);
    let mut job = RowsJob::new(PROFILE);
    job.backfill = Some((from, to));
    r.rows = Some(Box::new(job));
    let (tx, rx) = oneshot::channel();
    r.reply = Some(tx);
    b.handle.try_poll(r).unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(20), rx)
        .await
        .unwrap()
        .unwrap();
    let tally = report.rows.unwrap();
    assert_eq!(tally.chunks, 2);
    assert_eq!(tally.first.unwrap().ms, first_row * 1000);
    // The gaps run from `from` to the row before the first, without a hole between them.
    let gaps: Vec<(i64, i64)> = tally.gaps.iter().map(|(a, b)| (a.ms, b.ms)).collect();
    assert_eq!(gaps[0].0, from.as_millisecond(), "{gaps:?}");
    assert_eq!(gaps.last().unwrap().1, (first_row - 900) * 1000, "{gaps:?}");
    assert!(gaps.windows(2).all(|w| w[1].0 <= w[0].1 + 1), "{gaps:?}");
    b.stop().await;
}

#[test]
fn a_backfill_cancelled_between_chunks_should_say_so_with_what_it_read() {
    let mut queue = crate::bus::queue::PollQueue::default();
    let mut r = PollRequest::new("e450", Cadence::OnDemand);
    r.request_id = Some("bf-9".into());
    let mut job = RowsJob::new(PROFILE);
    job.backfill = Some((ts("2026-03-01T00:00:00Z"), ts("2026-03-04T00:00:00Z")));
    job.next = Some(ts("2026-03-02T00:00:00Z"));
    job.tally.rows = 96;
    job.tally.chunks = 1;
    r.rows = Some(Box::new(job));
    let (tx, mut rx) = oneshot::channel();
    r.reply = Some(tx);
    queue.push(r);
    queue.push(PollRequest::new("other", Cadence::Quarterly));
    let mut dropped = queue.cancel("bf-9");
    assert_eq!((dropped.len(), queue.len()), (1, 1));
    for req in &mut dropped {
        answer_cancelled(req);
    }
    let report = rx.try_recv().unwrap();
    assert_eq!(report.errors, [PollError::Cancelled]);
    assert_eq!(report.rows.unwrap().rows, 96);
}

fn meter() -> crate::meter::Meter {
    let bus: BusConfig =
        toml::from_str("name = \"lan\"\ntcp = { host = \"127.0.0.1\", port = 4059 }").unwrap();
    let m: MeterConfig = toml::from_str(
        "id = \"e450\"\nbus = \"lan\"\ndlms = { client = 16, logical = 1 }\nreads = { quarterly = { profile = \"1-0:99.1.0\" } }",
    )
    .unwrap();
    let (_, mut v) = resolve(&bus, &[m], &Profiles::built_in(), &TimeZone::UTC).unwrap();
    Arc::try_unwrap(v.remove(0)).unwrap()
}

fn row(at: &str, flags: Flags) -> Row {
    let t: Timestamp = at.parse().unwrap();
    Row {
        at: Stamp::in_zone(t, &TimeZone::UTC),
        flags,
        values: vec![crate::meter::Value {
            series: Obis([1, 0, 1, 8, 0, 255]),
            value: Decimal::from_scaled(1, 0).unwrap(),
            unit: "Wh".into(),
            meter_time: None,
        }],
    }
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[test]
fn rows_at_or_before_the_mark_should_be_dropped_and_a_late_first_row_be_a_gap() {
    let m = meter();
    let mut req = PollRequest::new("e450", Cadence::Quarterly);
    req.boundary = Some(ts("2026-03-01T12:00:00Z"));
    let job = RowsJob::new(PROFILE);
    let rows = Rows {
        period: Some(std::time::Duration::from_secs(900)),
        rows: vec![
            row("2026-03-01T10:00:00Z", Flags::empty()),
            row("2026-03-01T11:00:00Z", Flags::POWER_DOWN),
            row("2026-03-01T11:15:00Z", Flags::empty()),
        ],
        unmapped: 0,
        refused: vec![crate::meter::Failure::ClockDeviation {
            offset_s: -300,
            limit: std::time::Duration::from_secs(30),
        }],
    };
    let chunk = Chunk {
        floor: ts("2026-03-01T10:00:00Z"),
        to: ts("2026-03-01T12:00:00Z"),
        last: true,
        expect_from: Some(ts("2026-03-01T10:00:00Z")),
    };
    let now = ts("2026-03-01T12:00:05Z");
    let (a, tally) = assemble_rows(
        "lan",
        &TimeZone::UTC,
        &m,
        &req,
        &job,
        rows,
        &chunk,
        now,
        false,
    );
    assert_eq!(tally.rows, 2);
    assert_eq!(
        a.readings[0].timestamp.ms,
        ts("2026-03-01T11:00:00Z").as_millisecond()
    );
    assert!(
        a.readings[0]
            .flags
            .contains(Flags::POWER_DOWN | Flags::FROM_PROFILE)
    );
    assert_eq!(
        a.profile_marks[0].last_ms,
        ts("2026-03-01T11:15:00Z").as_millisecond()
    );
    assert_eq!(a.marks.len(), 1, "the boundary is marked with its rows");
    // 10:15 .. 10:45 are missing: the meter was expected to hold them. And its clock is off.
    assert_eq!(a.events.len(), 2);
    assert_eq!(a.events[0].kind, EventKind::ProfileGap);
    assert_eq!(a.events[1].kind, EventKind::ClockProblem);
    assert!(
        a.events[1].message.contains("-300 s"),
        "{}",
        a.events[1].message
    );
    assert_eq!(
        tally.gaps[0].0.ms,
        ts("2026-03-01T10:15:00Z").as_millisecond()
    );
    assert_eq!(
        tally.gaps[0].1.ms,
        ts("2026-03-01T10:45:00Z").as_millisecond()
    );
}

#[test]
fn an_empty_last_chunk_should_move_nothing_and_an_empty_earlier_one_move_the_mark_past_it() {
    let m = meter();
    let req = PollRequest::new("e450", Cadence::Quarterly);
    let job = RowsJob::new(PROFILE);
    let empty = || Rows {
        period: Some(std::time::Duration::from_secs(900)),
        ..Rows::default()
    };
    let mut chunk = Chunk {
        floor: ts("2026-03-01T10:00:00Z"),
        to: ts("2026-03-01T10:10:00Z"),
        last: true,
        expect_from: Some(ts("2026-03-01T10:00:00Z")),
    };
    let now = ts("2026-03-01T10:10:00Z");
    let (a, _) = assemble_rows(
        "lan",
        &TimeZone::UTC,
        &m,
        &req,
        &job,
        empty(),
        &chunk,
        now,
        false,
    );
    assert!(a.is_empty(), "nothing new yet is not a gap: {a:?}");
    chunk.last = false;
    let (a, tally) = assemble_rows(
        "lan",
        &TimeZone::UTC,
        &m,
        &req,
        &job,
        empty(),
        &chunk,
        now,
        false,
    );
    assert_eq!(a.profile_marks[0].last_ms, chunk.to.as_millisecond());
    assert_eq!(tally.gaps.len(), 1);
}
