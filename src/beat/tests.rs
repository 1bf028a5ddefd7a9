//! The beat on a clock the tests control: tokio's paused time drives the monotonic clock, and
//! the wall clock follows it plus whatever jumps the test makes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::sync::mpsc;

use super::*;
use crate::bus::{BusCommand, BusHandle};
use crate::clock::Clock;
use crate::meter::{Meter, MeterConfig};
use crate::store::{Mark, MemoryStore};

/// Wall time = start + (paused tokio time elapsed) + jumps.
struct TestClock {
    base_ms: i64,
    start: Instant,
    jumps_ms: AtomicI64,
    synced: AtomicBool,
}

impl TestClock {
    fn new(at: &str) -> Arc<TestClock> {
        Arc::new(TestClock {
            base_ms: at.parse::<Timestamp>().unwrap().as_millisecond(),
            start: Instant::now(),
            jumps_ms: AtomicI64::new(0),
            synced: AtomicBool::new(true),
        })
    }

    fn jump(&self, by_ms: i64) {
        self.jumps_ms.fetch_add(by_ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        let ms = self.base_ms
            + self.start.elapsed().as_millis() as i64
            + self.jumps_ms.load(Ordering::SeqCst);
        Timestamp::from_millisecond(ms).unwrap()
    }
    fn synchronized(&self) -> Option<bool> {
        Some(self.synced.load(Ordering::SeqCst))
    }
}

/// One read the beat asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Read {
    meter: String,
    cadence: Cadence,
    boundary: Timestamp,
    late: bool,
}

/// A stand-in bus: records every read and marks it done in the store, as a successful poll
/// would.
fn fake_bus(store: Arc<MemoryStore>, reads: Arc<Mutex<Vec<Read>>>) -> Router {
    let (handle, mut rx): (BusHandle, mpsc::Receiver<BusCommand>) = BusHandle::channel("bus", 4096);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            if let BusCommand::Poll(req) = cmd {
                let boundary = req.boundary.expect("scheduled reads carry a boundary");
                reads.lock().unwrap().push(Read {
                    meter: req.meter.clone(),
                    cadence: req.cadence,
                    boundary,
                    late: req.flags.contains(Flags::LATE),
                });
                store
                    .append(Append {
                        marks: vec![Mark {
                            meter: req.meter,
                            cadence: req.cadence,
                            boundary_ms: boundary.as_millisecond(),
                        }],
                        ..Append::default()
                    })
                    .unwrap();
            }
        }
    });
    let mut router = Router::default();
    router.add_bus(handle, ["m1".to_owned(), "m2".to_owned()]);
    router
}

fn meters() -> Vec<Arc<Meter>> {
    let all = r#"reads = { quarterly = "all", hourly = "all", daily = "all", monthly = "all", yearly = "all" }"#;
    let configs: Vec<MeterConfig> = ["m1", "m2"]
        .iter()
        .map(|id| {
            toml::from_str(&format!(
                "id = \"{id}\"\nbus = \"bus\"\nmodbus = {{ unit = 1, profile = \"eastron-sdm630\" }}\n{all}"
            ))
            .unwrap()
        })
        .collect();
    let bus: crate::bus::BusConfig =
        toml::from_str("name = \"bus\"\ntcp = { host = \"127.0.0.1\", port = 1 }").unwrap();
    let profiles = crate::meter::modbus::profile::Profiles::built_in();
    crate::bus::resolve(&bus, &configs, &profiles, &TimeZone::UTC)
        .unwrap()
        .1
}

fn tz() -> TimeZone {
    TimeZone::get("Europe/Stockholm").unwrap()
}

struct Run {
    clock: Arc<TestClock>,
    store: Arc<MemoryStore>,
    reads: Arc<Mutex<Vec<Read>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(clock: Arc<TestClock>, store: Arc<MemoryStore>, config: BeatConfig) -> Run {
    let reads = Arc::new(Mutex::new(Vec::new()));
    let router = fake_bus(store.clone(), reads.clone());
    let beat = Beat::new(
        config,
        &meters(),
        router,
        store.clone(),
        clock.clone(),
        tz(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(beat.run(shutdown.clone()));
    Run {
        clock,
        store,
        reads,
        shutdown,
        task,
    }
}

impl Run {
    async fn stop(self) -> (Arc<TestClock>, Arc<MemoryStore>, Vec<Read>) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        // Let the stand-in bus finish what is in its inbox.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let reads = self.reads.lock().unwrap().clone();
        (self.clock, self.store, reads)
    }

    fn reads(&self) -> Vec<Read> {
        self.reads.lock().unwrap().clone()
    }
}

fn boundaries(reads: &[Read], meter: &str, cadence: Cadence) -> Vec<Timestamp> {
    reads
        .iter()
        .filter(|r| r.meter == meter && r.cadence == cadence)
        .map(|r| r.boundary)
        .collect()
}

/// Runs the beat from `from` for `hours` and checks that every boundary of every cadence in
/// that window was read exactly once, on time, by both meters.
async fn every_boundary_once(from: &str, hours: u64) {
    let clock = TestClock::new(from);
    let start_at = clock.now();
    let r = start(
        clock.clone(),
        Arc::new(MemoryStore::new()),
        BeatConfig::default(),
    );
    tokio::time::sleep(Duration::from_secs(hours * 3600)).await;
    let end_at = r.clock.now();
    let (_, _, reads) = r.stop().await;
    for c in Cadence::SCHEDULED {
        let want = schedule::between(c, start_at, end_at, &tz());
        for m in ["m1", "m2"] {
            assert_eq!(boundaries(&reads, m, c), want, "{m} {c} from {from}");
        }
    }
    assert!(
        reads.iter().all(|r| !r.late),
        "nothing is late on a steady clock"
    );
}

#[tokio::test(start_paused = true)]
async fn every_boundary_should_fire_once_across_the_autumn_dst_change() {
    every_boundary_once("2026-10-24T21:50:00Z", 8).await;
}

#[tokio::test(start_paused = true)]
async fn every_boundary_should_fire_once_across_the_spring_dst_change() {
    every_boundary_once("2026-03-28T22:50:00Z", 6).await;
}

#[tokio::test(start_paused = true)]
async fn every_boundary_should_fire_once_across_a_leap_day_and_month_end() {
    every_boundary_once("2028-02-28T22:40:00Z", 26).await;
}

#[tokio::test(start_paused = true)]
async fn every_boundary_should_fire_once_across_the_year_end() {
    every_boundary_once("2026-12-31T22:40:00Z", 3).await;
}

#[tokio::test(start_paused = true)]
async fn a_delay_should_move_the_read_not_the_boundary() {
    let clock = TestClock::new("2026-11-21T09:59:00Z");
    let mut config = BeatConfig::default();
    config.hourly.delay = Some(HumanDuration(Duration::from_secs(90)));
    let r = start(clock, Arc::new(MemoryStore::new()), config);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        boundaries(&r.reads(), "m1", Cadence::Hourly).is_empty(),
        "not before the delay"
    );
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(
        boundaries(&r.reads(), "m1", Cadence::Hourly),
        ["2026-11-21T10:00:00Z".parse::<Timestamp>().unwrap()]
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_after_downtime_should_read_the_latest_missed_boundary_once_late() {
    // Running at local midnight: quarterly, hourly and daily read (not the 1st of a month).
    let clock = TestClock::new("2026-11-21T22:55:00Z");
    let store = Arc::new(MemoryStore::new());
    let r = start(clock.clone(), store.clone(), BeatConfig::default());
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    let (clock, store, before) = r.stop().await;
    assert_eq!(
        before.len(),
        2 * 3,
        "00:00 quarterly, hourly and daily for both meters"
    );
    // Down for 26 hours: past quarter-hours, hours, a midnight; not a month or year end.
    clock.jump(26 * 3600 * 1000);
    let r = start(clock, store, BeatConfig::default());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after: Vec<Read> = r.reads();
    let latest = |c| schedule::at_or_before(c, r.clock.now(), &tz());
    for m in ["m1", "m2"] {
        for c in [Cadence::Quarterly, Cadence::Hourly, Cadence::Daily] {
            let got: Vec<&Read> = after
                .iter()
                .filter(|x| x.meter == m && x.cadence == c)
                .collect();
            assert_eq!(got.len(), 1, "{m} {c}: exactly one catch-up read");
            assert_eq!(got[0].boundary, latest(c));
            assert!(got[0].late);
        }
        // Monthly and yearly were never read: no mark, nothing missed, no catch-up.
        assert!(boundaries(&after, m, Cadence::Monthly).is_empty());
    }
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_without_downtime_should_not_read_again() {
    let clock = TestClock::new("2026-11-21T09:59:00Z");
    let r = start(clock, Arc::new(MemoryStore::new()), BeatConfig::default());
    tokio::time::sleep(Duration::from_secs(120)).await;
    let (clock, store, first) = r.stop().await;
    assert_eq!(first.len(), 4);
    let r = start(clock, store, BeatConfig::default());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(r.reads().is_empty(), "{:?}", r.reads());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_clock_jumping_back_an_hour_should_not_read_any_boundary_twice() {
    let clock = TestClock::new("2026-11-21T09:50:00Z");
    let r = start(
        clock.clone(),
        Arc::new(MemoryStore::new()),
        BeatConfig::default(),
    );
    tokio::time::sleep(Duration::from_secs(40 * 60)).await;
    clock.jump(-3600 * 1000);
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    let (_, store, reads) = r.stop().await;
    for m in ["m1", "m2"] {
        for c in [Cadence::Quarterly, Cadence::Hourly] {
            let b = boundaries(&reads, m, c);
            let mut dedup = b.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(
                b.len(),
                dedup.len(),
                "{m} {c}: a boundary read twice: {b:?}"
            );
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{m} {c}: {b:?}");
        }
    }
    let events: Vec<_> = store
        .records()
        .into_iter()
        .filter(
            |r| matches!(r, crate::store::Record::Event(e) if e.kind == EventKind::ClockProblem),
        )
        .collect();
    assert_eq!(events.len(), 1, "the jump is reported once");
}

#[tokio::test(start_paused = true)]
async fn a_clock_jumping_forward_should_read_once_per_cadence_not_storm() {
    let clock = TestClock::new("2026-11-21T09:50:00Z");
    let r = start(
        clock.clone(),
        Arc::new(MemoryStore::new()),
        BeatConfig::default(),
    );
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    let before = r.reads().len();
    clock.jump(3600 * 1000 + 5 * 60 * 1000);
    tokio::time::sleep(Duration::from_secs(70)).await;
    let new: Vec<Read> = r.reads()[before..].to_vec();
    // Now just after 11:15 UTC: that quarter-hour is read on time, and 11:00 once, late; the
    // quarter-hours in between are not replayed.
    let at = |s: &str| s.parse::<Timestamp>().unwrap();
    for m in ["m1", "m2"] {
        assert_eq!(
            boundaries(&new, m, Cadence::Quarterly),
            [at("2026-11-21T11:15:00Z")],
            "{new:?}"
        );
        assert_eq!(
            boundaries(&new, m, Cadence::Hourly),
            [at("2026-11-21T11:00:00Z")],
            "{new:?}"
        );
    }
    assert!(
        new.iter()
            .filter(|r| r.cadence == Cadence::Hourly)
            .all(|r| r.late)
    );
    assert!(
        new.iter()
            .filter(|r| r.cadence == Cadence::Quarterly)
            .all(|r| !r.late)
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_rtc_less_boot_in_1970_then_ntp_should_not_storm_or_fall_silent() {
    // The board boots with its clock at the epoch, unsynchronised, with marks from before.
    let store = Arc::new(MemoryStore::new());
    for m in ["m1", "m2"] {
        for c in Cadence::SCHEDULED {
            store
                .append(Append {
                    marks: vec![Mark {
                        meter: m.into(),
                        cadence: c,
                        boundary_ms: schedule::at_or_before(
                            c,
                            "2026-11-20T12:00:00Z".parse().unwrap(),
                            &tz(),
                        )
                        .as_millisecond(),
                    }],
                    ..Append::default()
                })
                .unwrap();
        }
    }
    let clock = TestClock::new("1970-01-01T00:00:30Z");
    clock.synced.store(false, Ordering::SeqCst);
    let r = start(clock.clone(), store, BeatConfig::default());
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    // Unsynchronised in 1970: the quarter-hours are read rather than not at all.
    let in_1970: Vec<Read> = r.reads();
    assert!(
        !boundaries(&in_1970, "m1", Cadence::Quarterly).is_empty(),
        "{in_1970:?}"
    );
    // NTP answers: the clock jumps 56 years forward. One read per cadence, not a storm.
    let before = in_1970.len();
    clock.synced.store(true, Ordering::SeqCst);
    clock.jump(
        "2026-11-21T10:07:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond()
            - r.clock.now().as_millisecond(),
    );
    tokio::time::sleep(Duration::from_secs(90)).await;
    let after: Vec<Read> = r.reads()[before..].to_vec();
    for m in ["m1", "m2"] {
        for c in Cadence::SCHEDULED {
            assert!(boundaries(&after, m, c).len() <= 1, "{m} {c}: {after:?}");
        }
        assert_eq!(boundaries(&after, m, Cadence::Quarterly).len(), 1);
        assert_eq!(boundaries(&after, m, Cadence::Daily).len(), 1);
    }
    assert!(after.len() <= 2 * 5);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_ten_year_jump_should_read_each_cadence_once() {
    let clock = TestClock::new("2026-11-21T09:50:00Z");
    let r = start(
        clock.clone(),
        Arc::new(MemoryStore::new()),
        BeatConfig::default(),
    );
    tokio::time::sleep(Duration::from_secs(15 * 60)).await;
    let before = r.reads().len();
    clock.jump(10 * 365 * 86_400 * 1000);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = r.reads()[before..].to_vec();
    assert_eq!(after.len(), 2 * 5, "{after:?}");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waiting_for_clock_sync_should_hold_reads_until_synchronised() {
    let clock = TestClock::new("2026-11-21T09:59:00Z");
    clock.synced.store(false, Ordering::SeqCst);
    let config = BeatConfig {
        wait_for_clock_sync: Some(HumanDuration(Duration::from_secs(600))),
        ..BeatConfig::default()
    };
    let r = start(clock.clone(), Arc::new(MemoryStore::new()), config);
    tokio::time::sleep(Duration::from_secs(180)).await;
    assert!(r.reads().is_empty(), "held while unsynchronised");
    clock.synced.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(15 * 60)).await;
    assert!(!boundaries(&r.reads(), "m1", Cadence::Quarterly).is_empty());
    r.stop().await;
}

#[test]
fn next_fires_should_list_every_cadence_with_its_delay() {
    let mut config = BeatConfig::default();
    config.daily.delay = Some(HumanDuration(Duration::from_secs(30)));
    let now: Timestamp = "2026-11-21T10:07:00Z".parse().unwrap();
    let fires = next_fires(&config, &tz(), now);
    let daily = fires.iter().find(|f| f.0 == Cadence::Daily).unwrap();
    assert_eq!(daily.1.to_string(), "2026-11-21T23:00:00Z");
    assert_eq!(daily.2.to_string(), "2026-11-21T23:00:30Z");
}
