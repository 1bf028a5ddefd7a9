//! The real binary's beat under a faked clock (Debian's libfaketime): reads at midnight of a
//! year end, catch-up after downtime, and kill -9 in the middle of a read.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use amr_edge::clock::SystemClock;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::reading::{Cadence, Flags, Reading};
use amr_edge::sim::modbus::{Fault, Meters, Unit, spawn_tcp};
use amr_edge::store::{Record, SledStore, Store, StoreConfig, Stream};

/// `amr-edge run` with its wall clock starting at `start` (UTC).
fn run_at(start: &str, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(common::agent::bin())
        .env("LD_PRELOAD", common::agent::libfaketime())
        .env("FAKETIME", format!("@{start}"))
        .args(["--log", "info,amr_edge=debug", "run", "--config"])
        .arg(config)
        .env("TZ", "UTC")
        // The beat sleeps on the monotonic clock: leave it real, fake only the wall clock.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start amr-edge")
}

/// Waits until the log holds `n` "Agent starting" lines (at most 30 s).
async fn wait_for_starts(log: &Path, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches("Agent starting").count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not log its start {n} within 30 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "the agent should exit 0 on SIGTERM");
}

fn readings(dir: &Path) -> Vec<Reading> {
    let store = SledStore::open(dir, &StoreConfig::default(), Arc::new(SystemClock)).unwrap();
    store
        .take(Stream::Readings, 1_000_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.record {
            Record::Reading(r) => Some(r),
            Record::Event(_) => None,
        })
        .collect()
}

fn config(dir: &Path, port: u16, extra_meter: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
id = "gw-beat"
timezone = "Europe/Stockholm"
data_dir = "{}"

[amqp]
url = "amqp://guest:guest@127.0.0.1:9/%2f"

[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}
timeout = "2s"

[[meter]]
id = "m1"
bus = "lan"
modbus = {{ unit = 1, profile = "eastron-sdm630" }}
reads = {{ quarterly = ["1-0:1.8.0"], hourly = ["1-0:1.8.0"], daily = ["1-0:1.8.0", "1-0:2.8.0"], monthly = "all", yearly = "all" }}
{extra_meter}
"#,
            dir.display()
        ),
    )
    .unwrap();
    path
}

/// (cadence, local time of the timestamp) → readings of m1.
fn by_boundary(rs: &[Reading]) -> HashMap<(Cadence, String), Vec<&Reading>> {
    let mut m: HashMap<(Cadence, String), Vec<&Reading>> = HashMap::new();
    for r in rs.iter().filter(|r| r.meter == "m1") {
        m.entry((r.cadence, r.timestamp.rfc3339()))
            .or_default()
            .push(r);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_end_midnight_should_read_every_cadence_once_and_catch_up_once_after_downtime() {
    let meters = Meters::new();
    meters.insert(
        1,
        Unit::new(Profiles::built_in().get("eastron-sdm630").unwrap().clone()),
    );
    let addr = spawn_tcp(meters).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), addr.port(), "");
    let log = dir.path().join("agent.log");

    // 23:59:00 in Stockholm on 31 December: a minute before every cadence's boundary.
    let agent = run_at("2026-12-31 22:59:00", &cfg, &log);
    tokio::time::sleep(Duration::from_secs(68)).await;
    stop(agent);
    let rs = readings(dir.path());
    let got = by_boundary(&rs);
    let midnight = "2027-01-01T00:00:00+01:00".to_owned();
    for (c, series) in [
        (Cadence::Quarterly, 1),
        (Cadence::Hourly, 1),
        (Cadence::Daily, 2),
        (Cadence::Monthly, 17),
        (Cadence::Yearly, 17),
    ] {
        let at = got.get(&(c, midnight.clone())).map(Vec::len).unwrap_or(0);
        assert_eq!(at, series, "{c} at midnight: {rs:#?}");
    }
    assert_eq!(got.len(), 5, "nothing but the midnight reads: {got:#?}");
    assert!(rs.iter().all(|r| !r.flags.contains(Flags::LATE)));

    // Down until 02:31: the 02:30 quarter-hour and 02:00 hour are read once, late; midnight
    // is not read again; nothing in between is replayed.
    let agent = run_at("2027-01-01 01:31:00", &cfg, &log);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop(agent);
    let rs = readings(dir.path());
    let got = by_boundary(&rs);
    let late: Vec<_> = rs
        .iter()
        .filter(|r| r.flags.contains(Flags::LATE))
        .collect();
    assert_eq!(late.len(), 2, "{late:#?}");
    assert_eq!(
        got[&(Cadence::Quarterly, "2027-01-01T02:30:00+01:00".into())].len(),
        1
    );
    assert_eq!(
        got[&(Cadence::Hourly, "2027-01-01T02:00:00+01:00".into())].len(),
        1
    );
    assert_eq!(got.len(), 7, "{got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_reads_should_never_mark_without_readings_nor_buffer_twice() {
    // Slow meters: each read of the daily selection takes a second or more on the bus.
    let meters = Meters::new();
    let profile = Profiles::built_in().get("eastron-sdm630").unwrap().clone();
    for u in 1..=3 {
        let mut unit = Unit::new(profile.clone());
        unit.fault = Fault::Delay(400);
        meters.insert(u, unit);
    }
    let addr = spawn_tcp(meters).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        addr.port(),
        r#"
[[meter]]
id = "m2"
bus = "lan"
modbus = { unit = 2, profile = "eastron-sdm630" }
reads = { daily = ["1-0:1.8.0", "1-0:2.8.0"] }

[[meter]]
id = "m3"
bus = "lan"
modbus = { unit = 3, profile = "eastron-sdm630" }
reads = { daily = ["1-0:1.8.0", "1-0:2.8.0"] }
"#,
    );
    let log = dir.path().join("agent.log");
    // Marks from an earlier day, so the restarts catch up on today's midnight.
    {
        let store =
            SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock)).unwrap();
        let prev = "2026-11-20T23:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond();
        for m in ["m1", "m2", "m3"] {
            store
                .append(amr_edge::store::Append {
                    marks: vec![amr_edge::store::Mark {
                        meter: m.into(),
                        cadence: Cadence::Daily,
                        boundary_ms: prev,
                    }],
                    ..Default::default()
                })
                .unwrap();
        }
    }
    // Start just after local midnight, kill at random moments while the reads are on the
    // bus, start again (a little later each time), until every meter has been read.
    // Each kill waits for the agent's own "Agent starting" line first: on a busy machine a
    // start can take longer than the shortest wait, and a kill before the agent has even
    // opened its store proves nothing.
    let mut second = 5;
    for round in 1..=12 {
        let mut agent = run_at(&format!("2026-11-21 23:00:{second:02}"), &cfg, &log);
        wait_for_starts(&log, round).await;
        let wait = fastrand::u64(..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let _ = agent.kill();
        let _ = agent.wait();
        second += 2;
    }
    // A last, clean run finishes whatever is left.
    let agent = run_at(&format!("2026-11-21 23:00:{second:02}"), &cfg, &log);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop(agent);

    let store =
        SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock)).unwrap();
    let midnight = "2026-11-21T23:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();
    let rs: Vec<Reading> = store
        .take(Stream::Readings, 1_000_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.record {
            Record::Reading(r) => Some(r),
            Record::Event(_) => None,
        })
        .collect();
    for m in ["m1", "m2", "m3"] {
        let mark = store.boundary(m, Cadence::Daily).unwrap();
        let daily: Vec<&Reading> = rs
            .iter()
            .filter(|r| r.meter == m && r.cadence == Cadence::Daily)
            .collect();
        assert_eq!(mark, Some(midnight), "{m}: today's midnight is marked read");
        assert_eq!(daily.len(), 2, "{m}: its two series, once each: {daily:#?}");
        assert!(daily.iter().all(|r| r.timestamp.ms == midnight));
    }
    let kills = std::fs::read_to_string(&log)
        .unwrap()
        .matches("Agent starting")
        .count();
    assert_eq!(kills, 13);
}
