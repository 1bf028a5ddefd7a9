//! M-Bus end to end: the simulated demo segment (heat, water, electricity meter) behind a
//! pseudo-terminal, the real bus worker with the M-Bus driver opening the pty as its serial
//! port in the bus's 2400 8E1, and a sled store in a temporary directory. The last test runs the
//! whole agent against a slave of the tests' own answering with a real meter's frame, to a
//! Celery worker, and unplugs its converter.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The tests' own M-Bus slave process; killed when dropped (also when a test panics).
struct Converter(std::process::Child);

impl Drop for Converter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tests' own M-Bus slave (tests/mbus/slave.py) answering with a real Kamstrup
/// MULTICAL 601's frame, behind the symlink `link`, once it says it is ready.
fn slave(link: &Path) -> Converter {
    use std::io::BufRead;
    let frame = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/mbus-frames/test-frames/kamstrup_multical_601.hex");
    let mut child = std::process::Command::new(common::celery::venv().join("bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mbus/slave.py"))
        .arg(frame)
        .arg(link)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tests/mbus/slave.py");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "slave.py: {line:?}");
    Converter(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_meters_answer_should_reach_celery_exactly_and_an_unplugged_converter_be_reported_and_survived()
 {
    use common::agent::{AgentProc, config};
    use common::celery::Celery;
    use common::rabbit::scratch_queue;

    let (queue, _queues) = scratch_queue("amr.mbus");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyMBUS0");
    let converter = slave(&link);
    let gw = common::unique("gw");
    let extra = format!(
        r#"
[beat]
every = "2s"

[[bus]]
name = "mbus-1"
serial = {{ device = "{}", baud = 2400, parity = "even" }}
timeout = "1s"
retries = 1

[[meter]]
id = "kam-601"
bus = "mbus-1"
mbus = {{ primary = 17 }}
"#,
        link.display()
    );
    let mut agent = AgentProc::start(
        dir.path(),
        &config(dir.path(), &gw, common::AMQP_URL, &queue, &extra),
    );
    // The values libmbus's normalised decode gives for this frame
    // (../shared/mbus-frames/test-frames/kamstrup_multical_601.norm.xml).
    let want = [
        ("6-0-1-8-0-255", "37351000", "Wh"),
        ("6-0-2-8-0-255", "561.08", "m3"),
        ("6-0-10-0-0-255", "101.69", "°C"),
        ("6-0-11-0-0-255", "46.16", "°C"),
    ];
    let first = common::eventually(
        Duration::from_secs(90),
        "the Kamstrup's readings at the Celery worker",
        || async {
            let got = celery.readings();
            want.iter()
                .all(|(s, ..)| got.iter().any(|r| r["series"] == *s))
                .then_some(got)
        },
    )
    .await;
    for (series, value, unit) in want {
        let r = first
            .iter()
            .find(|r| r["series"] == series)
            .unwrap_or_else(|| panic!("{series} in {first:#?}"));
        assert_eq!(r["meter"], "kam-601");
        assert_eq!(
            (r["value"].as_str(), r["unit"].as_str()),
            (Some(value), Some(unit)),
            "{r}"
        );
    }
    // Unplugged: the device is gone. A link_error for the meter, and the agent runs on.
    drop(converter);
    std::fs::remove_file(&link).unwrap();
    common::eventually(
        Duration::from_secs(60),
        "a link_error event for the unplugged converter",
        || async {
            celery
                .events()
                .into_iter()
                .find(|e| e["kind"] == "link_error" && e["meter"] == "kam-601")
        },
    )
    .await;
    assert!(agent.is_running(), "the agent survives the unplug");
    // Plugged in again (another pty behind the same name): read again without a restart.
    let before = celery.readings().len();
    let _converter = slave(&link);
    common::eventually(
        Duration::from_secs(60),
        "readings again after the converter is back",
        || async { (celery.readings().len() > before + want.len()).then_some(()) },
    )
    .await;
    assert!(agent.sigterm().success());
}
