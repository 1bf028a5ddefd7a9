//! IEC 62056-21 load profile reads end to end: the simulated meter (src/sim/iec.rs) on a
//! pseudo-terminal, the config resolved from TOML (the P1 password read from its
//! `password_file`), and `Meter::read_rows` opening the pty as its serial port: programming
//! mode, the password, `R5 P.01(from;to)`, the break. Rows are checked exactly — values,
//! instants and offsets — across the spring-forward night, after a power failure, before the
//! profile's first row; a wrong password is a security failure. Last, `amr-edge poll
//! --profile` prints the same rows.

mod common;

use std::path::Path;
use std::sync::Arc;

use amr_edge::config::Config;
use amr_edge::meter::link::Slot;
use amr_edge::meter::rows::{Rows, RowsRequest};
use amr_edge::meter::{Failure, Meter};
use amr_edge::reading::Flags;
use amr_edge::sim::iec::{SimBus, SimMeter, SimProfile, SimPty, spawn_pty};
use jiff::Timestamp;
use jiff::tz::TimeZone;

const LGZ: &str = "61234567";
const ISK: &str = "61234568";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// Two meters on one line, each with a quarter-hour profile from 00:00 local on 29 March 2026
/// (the spring change in Stockholm: 02:00 CET is followed by 03:00 CEST) to 06:00Z; the
/// power failed from 03:00Z to 03:40Z. The second wants the P1 password `s3cret`.
fn meters() -> SimBus {
    let bus = SimBus::new();
    for (address, password) in [(LGZ, None), (ISK, Some("s3cret"))] {
        let mut m = SimMeter::landis_gyr(Some(address), address);
        let mut p = SimProfile::quarter_hours(
            TimeZone::get("Europe/Stockholm").unwrap(),
            ts("2026-03-28T23:00:00Z"),
            Some(ts("2026-03-29T06:00:00Z")),
        );
        p.outage = Some((ts("2026-03-29T03:00:00Z"), ts("2026-03-29T03:40:00Z")));
        m.profile = Some(p);
        m.password = password.map(str::to_owned);
        bus.add(m);
    }
    bus
}

/// The config file: the line, the meter without a password, the one with it (and with a
/// wrong one, which is the same meter).
fn config_text(device: &Path, dir: &Path) -> String {
    let good = dir.join("isk.pw");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.join("wrong.pw");
    std::fs::write(&bad, "guess\n").unwrap();
    let extra = format!(
        r#"
[[bus]]
name = "rs485-1"
serial = {{ device = "{device}", rs485 = false }}
timeout = "1s"
retries = 1

[[meter]]
id = "lgz"
bus = "rs485-1"
iec62056_21 = {{ address = "{LGZ}" }}
reads = {{ quarterly = {{ profile = "1-0:99.1.0" }} }}

[[meter]]
id = "isk"
bus = "rs485-1"
iec62056_21 = {{ address = "{ISK}", password_file = {good:?} }}
reads = {{ quarterly = {{ profile = "1-0:99.1.0" }} }}

[[meter]]
id = "isk-wrong"
bus = "rs485-1"
iec62056_21 = {{ address = "{ISK}", password_file = {bad:?} }}
reads = {{ quarterly = {{ profile = "1-0:99.1.0" }} }}

[[meter]]
id = "isk-none"
bus = "rs485-1"
iec62056_21 = {{ address = "{ISK}" }}
reads = {{ quarterly = {{ profile = "1-0:99.1.0" }} }}
"#,
        device = device.display(),
    );
    common::agent::config(
        &dir.join("data"),
        "gw-iec-profile",
        "amqp://127.0.0.1:9",
        "q",
        &extra,
    )
}

struct Line {
    config: Config,
    _pty: SimPty,
    _dir: tempfile::TempDir,
}

fn line(sim: &SimBus) -> Line {
    let pty = spawn_pty(sim.clone()).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(pty.path(), dir.path());
    let config = Config::from_toml(&text, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"));
    Line {
        config,
        _pty: pty,
        _dir: dir,
    }
}

impl Line {
    fn meter(&self, id: &str) -> Arc<Meter> {
        self.config
            .meters
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .expect("meter")
    }

    async fn read(&self, id: &str, from: &str, to: &str) -> Result<Rows, Failure> {
        let meter = self.meter(id);
        let bus = &self.config.buses[0];
        let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
        let request = RowsRequest {
            profile: "1-0:99.1.0".parse().unwrap(),
            from: ts(from),
            to: ts(to),
        };
        meter
            .read_rows(&mut slot, &request, &meter.timing_on(&bus.timing))
            .await
    }
}

fn times(rows: &Rows) -> Vec<String> {
    rows.rows.iter().map(|r| r.at.rfc3339()).collect()
}

fn values(rows: &Rows, i: usize) -> Vec<(String, String, String)> {
    rows.rows[i]
        .values
        .iter()
        .map(|v| {
            (
                v.series.to_string(),
                v.value.as_str().to_owned(),
                v.unit.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_rows_over_the_serial_line_should_be_exact_across_the_spring_change() {
    let sim = meters();
    let line = line(&sim);
    let rows = line
        .read("lgz", "2026-03-29T00:00:00Z", "2026-03-29T01:30:00Z")
        .await
        .expect("rows");
    // Every quarter hour once; no 02:xx local time exists that night.
    assert_eq!(
        times(&rows),
        [
            "2026-03-29T01:00:00+01:00",
            "2026-03-29T01:15:00+01:00",
            "2026-03-29T01:30:00+01:00",
            "2026-03-29T01:45:00+01:00",
            "2026-03-29T03:00:00+02:00",
            "2026-03-29T03:15:00+02:00",
            "2026-03-29T03:30:00+02:00",
        ]
    );
    let ms: Vec<i64> = rows.rows.iter().map(|r| r.at.ms).collect();
    assert!(ms.windows(2).all(|w| w[1] - w[0] == 900_000), "{ms:?}");
    assert_eq!(ms[0], ts("2026-03-29T00:00:00Z").as_millisecond());
    assert!(rows.rows[..4].iter().all(|r| r.flags == Flags::empty()));
    assert!(rows.rows[4..].iter().all(|r| r.flags == Flags::DST));
    // Row 4 of the profile (00:00Z): 0.100 + 148/1000 kW in, 44/1000 kW out; row 10.
    assert_eq!(
        values(&rows, 0),
        [
            ("1-0-1-5-0-255".into(), "0.248".into(), "kW".into()),
            ("1-0-2-5-0-255".into(), "0.044".into(), "kW".into()),
        ]
    );
    assert_eq!(
        values(&rows, 6),
        [
            ("1-0-1-5-0-255".into(), "0.470".into(), "kW".into()),
            ("1-0-2-5-0-255".into(), "0.010".into(), "kW".into()),
        ]
    );
    assert_eq!(rows.period, Some(std::time::Duration::from_secs(900)));
    assert_eq!(rows.unmapped, 0);
    assert_eq!(sim.profile_reads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_failure_and_a_range_before_the_profile_should_read_as_the_meter_keeps_them() {
    let sim = meters();
    let line = line(&sim);
    let rows = line
        .read("lgz", "2026-03-29T02:45:00Z", "2026-03-29T04:00:00Z")
        .await
        .expect("rows");
    let got: Vec<(String, bool)> = rows
        .rows
        .iter()
        .map(|r| (r.at.rfc3339(), r.flags.contains(Flags::POWER_DOWN)))
        .collect();
    // 03:15Z and 03:30Z closed while the supply was off; 03:45Z is the first after it.
    assert_eq!(
        got,
        [
            ("2026-03-29T04:45:00+02:00".to_owned(), false),
            ("2026-03-29T05:00:00+02:00".to_owned(), false),
            ("2026-03-29T05:45:00+02:00".to_owned(), true),
            ("2026-03-29T06:00:00+02:00".to_owned(), false),
        ]
    );
    let before = line
        .read("lgz", "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z")
        .await
        .expect("no rows is an answer, not a failure");
    assert!(before.rows.is_empty());
    assert_eq!(sim.profile_reads(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_p1_password_should_open_the_profile_and_a_wrong_one_be_a_security_failure() {
    let sim = meters();
    let line = line(&sim);
    let rows = line
        .read("isk", "2026-03-29T05:00:00Z", "2026-03-29T05:30:00Z")
        .await
        .expect("rows with the password");
    assert_eq!(
        times(&rows),
        [
            "2026-03-29T07:00:00+02:00",
            "2026-03-29T07:15:00+02:00",
            "2026-03-29T07:30:00+02:00",
        ]
    );
    let requests = sim.requests();
    let wrong = line
        .read("isk-wrong", "2026-03-29T05:00:00Z", "2026-03-29T05:30:00Z")
        .await;
    assert!(matches!(wrong, Err(Failure::Security(_))), "{wrong:?}");
    // Not retried (the bus allows one retry): meters lock out after wrong passwords.
    assert_eq!(sim.requests(), requests + 1);
    let none = line
        .read("isk-none", "2026-03-29T05:00:00Z", "2026-03-29T05:30:00Z")
        .await;
    assert!(matches!(none, Err(Failure::Security(_))), "{none:?}");
    assert_eq!(sim.profile_reads(), 1);
    // The meter is still readable after the refusals.
    let again = line
        .read("isk", "2026-03-29T05:00:00Z", "2026-03-29T05:00:00Z")
        .await
        .expect("rows");
    assert_eq!(again.rows.len(), 1);
}

async fn run(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        common::agent::cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_profile_should_print_an_iec_meters_rows() {
    let sim = meters();
    let pty = spawn_pty(sim.clone()).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text(pty.path(), dir.path())).unwrap();
    let args = |json: bool| {
        let mut a: Vec<String> = [
            "poll",
            "--config",
            path.to_str().unwrap(),
            "isk",
            "--profile",
            "1-0:99.1.0",
            "--from",
            "2026-03-29T00:45:00Z",
            // A local time in the gateway's zone: 01:15Z.
            "--to",
            "2026-03-29T03:15",
        ]
        .map(String::from)
        .to_vec();
        if json {
            a.push("--json".into());
        }
        a
    };
    let out = run(args(true)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["capture_period_s"], 900, "{j}");
    assert_eq!(
        j["rows"],
        serde_json::json!([
            {"timestamp": "2026-03-29T01:45:00+01:00", "flags": [], "values": [
                {"series": "1-0-1-5-0-255", "value": "0.359", "unit": "kW"},
                {"series": "1-0-2-5-0-255", "value": "0.027", "unit": "kW"}]},
            {"timestamp": "2026-03-29T03:00:00+02:00", "flags": ["dst"], "values": [
                {"series": "1-0-1-5-0-255", "value": "0.396", "unit": "kW"},
                {"series": "1-0-2-5-0-255", "value": "0.038", "unit": "kW"}]},
            {"timestamp": "2026-03-29T03:15:00+02:00", "flags": ["dst"], "values": [
                {"series": "1-0-1-5-0-255", "value": "0.433", "unit": "kW"},
                {"series": "1-0-2-5-0-255", "value": "0.049", "unit": "kW"}]},
        ]),
        "{j}"
    );
    let out = run(args(false)).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].contains("1-0-1-5-0-255 [kW]"), "{text}");
    assert!(
        lines[2].starts_with("2026-03-29T03:00:00+02:00") && lines[2].contains("0.396"),
        "{text}"
    );
    assert!(lines[2].ends_with("dst"), "{text}");
    drop(pty);
}
