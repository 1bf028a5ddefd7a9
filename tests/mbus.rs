//! M-Bus end to end: the simulated demo segment (heat, water, electricity meter) behind a
//! pseudo-terminal, the real bus worker with the M-Bus driver opening the pty as its serial
//! port in the bus's 2400 8E1, and a sled store in a temporary directory.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use amr_edge::config::Config;
use amr_edge::reading::{Cadence, EventKind, Reading};
use amr_edge::sim::mbus::{Segment, spawn_pty};
use common::worker::BusUnderTest;

fn config(device: &Path, data_dir: &Path) -> Config {
    let text = format!(
        r#"
[gateway]
id = "gw-test"
timezone = "Europe/Stockholm"
data_dir = "{data}"

[amqp]
url = "amqp://localhost"

[[bus]]
name = "mbus-1"
serial = {{ device = "{device}", baud = 2400, parity = "even", rs485 = false }}
timeout = "1s"
retries = 0

[[meter]]
id = "heat"
bus = "mbus-1"
mbus = {{ primary = 1 }}

[[meter]]
id = "water"
bus = "mbus-1"
mbus = {{ secondary = "23456789" }}

[[meter]]
id = "gone"
bus = "mbus-1"
mbus = {{ primary = 42 }}
"#,
        data = data_dir.display(),
        device = device.display(),
    );
    Config::from_toml(&text, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"))
}

async fn start() -> BusUnderTest {
    let pty = spawn_pty(Arc::new(Mutex::new(Segment::demo()))).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(pty.path().expect("pty path"), dir.path());
    BusUnderTest::start(&config, dir, pty)
}

fn row(r: &Reading) -> String {
    format!(
        "{} {} {} {} {}",
        r.meter,
        r.series,
        r.value,
        r.unit,
        if r.timestamp == r.read_at {
            "read-time".to_owned()
        } else {
            r.timestamp.rfc3339()
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_by_primary_and_water_by_secondary_should_arrive_with_exact_values() {
    let agent = start().await;
    for m in ["heat", "gone", "water"] {
        let report = agent.poll(m, Cadence::OnDemand).await;
        assert_eq!(
            report.errors.is_empty(),
            m != "gone",
            "{m}: {:?}",
            report.errors
        );
    }
    let (readings, events) = agent.taken();
    let got: Vec<String> = readings.iter().map(row).collect();
    // The heat meter's records are dated by its own clock (2026-12-01 14:26, Stockholm), its
    // storage-1 value by the storage's own date; the water meter has no date: the read time.
    // Exact decimals: 1234567 kWh in Wh, 654321 × 0.01 m3, 130 l/h in m3/h, BCD -025 × 0.01 °C.
    let t = "2026-12-01T14:26:00+01:00";
    let heat = |s: &str| format!("heat {s} {t}");
    let want: Vec<String> = vec![
        heat("6-0-1-8-0-255 1234567000 Wh"),
        heat("6-0-2-8-0-255 6543.21 m3"),
        heat("6-0-8-0-0-255 21500 W"),
        heat("6-0-9-0-0-255 0.130 m3/h"),
        heat("6-0-10-0-0-255 75.2 °C"),
        heat("6-0-11-0-0-255 41.8 °C"),
        "heat 6-0-1-8-0-1 1200000000 Wh 2025-12-31T00:00:00+01:00".into(),
        "water 8-0-1-0-0-255 456.789 m3 read-time".into(),
        "water 8-0-2-0-0-255 0.012 m3/h read-time".into(),
        "water 8-0-3-0-0-255 -0.25 °C read-time".into(),
        "water 8-0-144-23-0-255 0  read-time".into(),
    ];
    assert_eq!(got, want, "{got:#?}");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::MeterNotAnswering);
    assert_eq!(events[0].meter.as_deref(), Some("gone"));
    agent.shutdown.cancel();
}

fn scan(args: &[&str]) -> (String, String) {
    let pty = spawn_pty(Arc::new(Mutex::new(Segment::demo()))).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let text = format!(
        "[gateway]\nid = \"gw\"\ntimezone = \"UTC\"\ndata_dir = \"{}\"\n[amqp]\nurl = \"amqp://localhost\"\n[[bus]]\nname = \"mbus-1\"\nserial = {{ device = \"{}\", baud = 2400, parity = \"even\" }}\n",
        dir.path().display(),
        pty.path().expect("pty path").display()
    );
    std::fs::write(&path, text).expect("write");
    let mut all = vec![
        "scan",
        "--config",
        path.to_str().expect("utf-8"),
        "--bus",
        "mbus-1",
    ];
    all.extend_from_slice(args);
    let out = common::agent::cli(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

#[test]
fn scan_by_primary_should_print_every_meter_as_a_meter_block() {
    let (out, err) = scan(&["--primary"]);
    assert!(err.contains("3 meter(s) found"), "{err}");
    assert_eq!(out.matches("[[meter]]").count(), 3, "{out}");
    assert!(out.contains("mbus = { primary = 1 }"), "{out}");
    assert!(out.contains("id = \"KAM-12345678\""), "{out}");
}

#[test]
fn scan_by_secondary_should_print_every_meter_by_its_id() {
    let (out, err) = scan(&["--secondary"]);
    assert!(err.contains("3 meter(s) found"), "{err}");
    assert!(out.contains("mbus = { secondary = \"23456789\" }"), "{out}");
    assert!(out.contains("mbus = { secondary = \"34567890\" }"), "{out}");
}
