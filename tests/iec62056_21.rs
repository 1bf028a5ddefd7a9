//! IEC 62056-21 end to end: simulated meters behind a pseudo-terminal, the real bus worker
//! with the real driver opening the pty as its serial port, and a sled store in a temporary
//! directory. Several meters share the line as on an RS-485 bus, addressed by sign-on. The
//! last test runs the whole pipeline (store, drain) to a real Celery worker on RabbitMQ.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use amr_edge::agent::{self, BeatMode, Options};
use amr_edge::bus::PollRequest;
use amr_edge::clock::SystemClock;
use amr_edge::config::Config;
use amr_edge::meter::iec62056_21::codec::Identification;
use amr_edge::reading::{Cadence, EventKind, Reading};
use amr_edge::sim::iec::{Clock, Fault, SimBus, SimMeter, spawn_pty};
use amr_edge::store::{SledStore, Store, StoreConfig};
use common::AMQP_URL;
use common::celery::Celery;
use common::rabbit::scratch_queue;
use common::worker::BusUnderTest;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const LGZ: &str = "61234567";
const ISK: &str = "61234568";
const ELS: &str = "61234569";

/// Three meters on one line: a Landis+Gyr-like one (200 ms, 9600 Bd), an Iskra-like one
/// (lower-case, 9600 Bd, clock in UTC) and an Elster-like one that offers 19200 Bd.
fn three_meters() -> SimBus {
    let bus = SimBus::new();
    let mut lgz = SimMeter::landis_gyr(Some(LGZ), LGZ);
    lgz.clock = Some(Clock::Fixed(
        jiff::civil::date(2026, 3, 21).at(12, 34, 56, 0),
    ));
    bus.add(lgz);
    let mut isk = SimMeter::new(
        Some(ISK),
        Identification {
            manufacturer: "ISk".into(),
            baud_code: b'5',
            enhanced: Some(b'2'),
            ident: "MT174".into(),
        },
    );
    isk.sets = vec![
        amr_edge::sim::iec::set(Some("0.0.0"), ISK, None),
        amr_edge::sim::iec::set(Some("1.8.0"), "0000042.1", Some("kWh")),
        amr_edge::sim::iec::set(Some("2.8.0"), "0000000.0", Some("kWh")),
    ];
    isk.clock = Some(Clock::Fixed(jiff::civil::date(2026, 7, 1).at(8, 0, 0, 0)));
    // It announces 20 ms and may answer that fast; it takes 60 ms here so that a loaded test
    // machine, slow to switch its pty after the option select, does not make the test flaky.
    // The unit tests check the switch timing deterministically.
    isk.reaction = Duration::from_millis(60);
    bus.add(isk);
    let mut els = SimMeter::new(
        Some(ELS),
        Identification {
            manufacturer: "Els".into(),
            baud_code: b'6',
            enhanced: None,
            ident: "A1500".into(),
        },
    );
    els.reaction = Duration::from_millis(60);
    els.sets = vec![amr_edge::sim::iec::set(Some("1.8.0"), "12.5", Some("kWh"))];
    bus.add(els);
    bus
}

fn config(device: &Path, data_dir: &Path, extra: &str) -> Config {
    let text = format!(
        r#"
[gateway]
id = "gw-test"
timezone = "Europe/Stockholm"
data_dir = "{data}"

[amqp]
url = "amqp://localhost"

[[bus]]
name = "rs485-1"
serial = {{ device = "{device}", rs485 = false }}
timeout = "1s"
retries = 0

[[meter]]
id = "lgz"
bus = "rs485-1"
iec62056_21 = {{ address = "{LGZ}", max_baud = 9600 }}
reads = {{ quarterly = ["1-0:1.8.0"], daily = "all" }}

[[meter]]
id = "isk"
bus = "rs485-1"
iec62056_21 = {{ address = "{ISK}", timezone = "UTC" }}
reads = {{ daily = "all" }}

[[meter]]
id = "els"
bus = "rs485-1"
iec62056_21 = {{ address = "{ELS}", max_baud = 19200 }}
reads = {{ daily = "all" }}
{extra}
"#,
        data = data_dir.display(),
        device = device.display(),
    );
    Config::from_toml(&text, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"))
}

async fn start(sim: &SimBus, extra: &str) -> BusUnderTest {
    let pty = spawn_pty(sim.clone()).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(pty.path(), dir.path(), extra);
    BusUnderTest::start(&config, dir, pty)
}

fn row(r: &Reading) -> (String, String, String, String, String) {
    (
        r.meter.clone(),
        r.series.to_string(),
        r.value.to_string(),
        r.unit.clone(),
        r.timestamp.rfc3339(),
    )
}

fn rows(list: &[(&str, &str, &str, &str, &str)]) -> Vec<(String, String, String, String, String)> {
    list.iter()
        .map(|(a, b, c, d, e)| {
            (
                a.to_string(),
                b.to_string(),
                c.to_string(),
                d.to_string(),
                e.to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addressed_meters_on_one_line_should_arrive_in_the_store_with_exact_values() {
    let sim = three_meters();
    let agent = start(&sim, "").await;
    for m in ["lgz", "isk", "els"] {
        let report = agent.poll(m, Cadence::OnDemand).await;
        assert!(report.errors.is_empty(), "{m}: {:?}", report.errors);
        assert!(report.stored);
    }
    let (readings, events) = agent.taken();
    assert!(events.is_empty(), "{events:?}");
    assert!(readings.iter().all(|r| r.cadence == Cadence::OnDemand));
    let got: Vec<_> = readings.iter().map(row).collect();
    // The meter's clock, 12:34:56 on 21 March 2026 in Stockholm (the gateway's zone, CET);
    // the Iskra's in UTC as configured; the Elster has no clock: the read time.
    let lgz = "2026-03-21T12:34:56+01:00";
    let want = rows(&[
        ("lgz", "1-0-0-0-0-255", "61234567", "", lgz),
        ("lgz", "1-0-96-1-0-255", "61234567", "", lgz),
        ("lgz", "1-0-1-8-0-255", "1234.567", "kWh", lgz),
        ("lgz", "1-0-1-8-1-255", "800.123", "kWh", lgz),
        ("lgz", "1-0-1-8-2-255", "434.444", "kWh", lgz),
        ("lgz", "1-0-2-8-0-255", "12.345", "kWh", lgz),
        (
            "lgz",
            "1-0-1-6-0-255",
            "2.345",
            "kW",
            "2026-03-20T14:15:00+01:00",
        ),
        ("lgz", "1-0-96-7-0-255", "3", "", lgz),
        ("lgz", "1-0-32-7-0-255", "231.2", "V", lgz),
        (
            "isk",
            "1-0-0-0-0-255",
            "61234568",
            "",
            "2026-07-01T08:00:00+00:00",
        ),
        (
            "isk",
            "1-0-1-8-0-255",
            "42.1",
            "kWh",
            "2026-07-01T08:00:00+00:00",
        ),
        (
            "isk",
            "1-0-2-8-0-255",
            "0.0",
            "kWh",
            "2026-07-01T08:00:00+00:00",
        ),
    ]);
    assert_eq!(got[..want.len()], want[..]);
    let els: Vec<_> = readings.iter().filter(|r| r.meter == "els").collect();
    assert_eq!(els.len(), 1);
    assert_eq!(
        (
            els[0].series.to_string(),
            els[0].value.as_str(),
            els[0].unit.as_str()
        ),
        ("1-0-1-8-0-255".into(), "12.5", "kWh")
    );
    assert_eq!(els[0].timestamp, els[0].read_at);
    assert_eq!(sim.readouts(), 3);
    agent.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_read_should_keep_only_the_series_of_its_cadence() {
    let sim = three_meters();
    let agent = start(&sim, "").await;
    let report = agent.poll("lgz", Cadence::Quarterly).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let (readings, _) = agent.taken();
    assert_eq!(
        readings.iter().map(row).collect::<Vec<_>>(),
        rows(&[(
            "lgz",
            "1-0-1-8-0-255",
            "1234.567",
            "kWh",
            "2026-03-21T12:34:56+01:00"
        )])
    );
    assert_eq!(readings[0].cadence, Cadence::Quarterly);
    // The boundary is marked read with its readings.
    assert_eq!(
        agent
            .store
            .boundary("lgz", Cadence::Quarterly)
            .expect("boundary"),
        Some(1_774_047_600_000)
    );
    agent.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_should_become_its_event_and_the_other_meters_keep_being_read() {
    let sim = three_meters();
    let agent = start(&sim, "").await;
    for (fault, kind, readings_of_faulty) in [
        (Fault::Silent, EventKind::MeterNotAnswering, false),
        (Fault::BadBcc, EventKind::ChecksumError, false),
        (Fault::Garbage, EventKind::MalformedResponse, false),
        (Fault::Truncated, EventKind::MalformedResponse, false),
        // Read again at 300 Bd: the values are kept, the refusal is reported.
        (Fault::KeepsBaud, EventKind::MalformedResponse, true),
        (Fault::RefusesBaudSwitch, EventKind::MalformedResponse, true),
    ] {
        sim.set_fault(ISK, fault);
        for m in ["lgz", "isk", "els"] {
            agent.poll(m, Cadence::OnDemand).await;
        }
        let (readings, events) = agent.taken();
        let meters = |m: &str| readings.iter().filter(|r| r.meter == m).count();
        assert_eq!(meters("lgz"), 9, "{fault:?}");
        assert_eq!(meters("els"), 1, "{fault:?}");
        assert_eq!(meters("isk") > 0, readings_of_faulty, "{fault:?}");
        match events.as_slice() {
            [e] => {
                assert_eq!(e.kind, kind, "{fault:?}: {}", e.message);
                assert_eq!(e.meter.as_deref(), Some("isk"));
                assert_eq!(e.bus.as_deref(), Some("rs485-1"));
            }
            other => panic!("{fault:?}: {other:?}"),
        }
        sim.set_fault(ISK, Fault::None);
    }
    agent.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_and_iec_meters_should_share_one_serial_bus() {
    // A Modbus meter on the same line (nobody answers it here): the bus hands the port from
    // the IEC framing to the Modbus client and back, and the IEC meters keep being read.
    let sim = three_meters();
    let modbus = r#"
[[meter]]
id = "sdm"
bus = "rs485-1"
modbus = { unit = 7, profile = "eastron-sdm120" }
reads = { daily = "all" }
"#;
    let agent = start(&sim, modbus).await;
    let first = agent.poll("lgz", Cadence::OnDemand).await;
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let sdm = agent.poll("sdm", Cadence::OnDemand).await;
    assert!(!sdm.errors.is_empty());
    let again = agent.poll("isk", Cadence::OnDemand).await;
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    let (readings, events) = agent.taken();
    assert_eq!(readings.iter().filter(|r| r.meter == "lgz").count(), 9);
    assert_eq!(readings.iter().filter(|r| r.meter == "isk").count(), 3);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::MeterNotAnswering);
    assert_eq!(events[0].meter.as_deref(), Some("sdm"));
    agent.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readouts_should_arrive_at_a_celery_worker_with_exact_values_and_meter_time() {
    let (queue, _queues) = scratch_queue("amr.iec");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let sim = three_meters();
    let pty = spawn_pty(sim.clone()).expect("pty");
    let dir = tempfile::tempdir().expect("tempdir");
    // The whole agent pipeline in this process (store, drain, bus workers), no beat.
    let mut config = config(pty.path(), dir.path(), "");
    config.amqp = toml::from_str(&format!(
        "url = \"{AMQP_URL}\"\nqueue = \"{queue}\"\nevents_queue = \"{queue}.events\"\nmax_backoff = \"2s\""
    ))
    .expect("amqp config");
    let clock = Arc::new(SystemClock);
    let store = Arc::new(
        SledStore::open(
            &dir.path().join("store"),
            &StoreConfig::default(),
            clock.clone(),
        )
        .expect("store"),
    );
    let root = CancellationToken::new();
    let running = agent::start(
        &config,
        &Options {
            beat: BeatMode::Schedule,
            config_path: None,
            summary_every: Duration::from_secs(3600),
            stop_after: None,
        },
        store,
        clock,
        jiff::Timestamp::now(),
        &root,
    )
    .expect("agent");
    for m in ["lgz", "isk"] {
        let (tx, rx) = oneshot::channel();
        let mut req = PollRequest::new(m, Cadence::OnDemand);
        req.reply = Some(tx);
        running.router.poll(req).await.expect("queued");
        let report = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("poll finished in time")
            .expect("report");
        assert!(report.errors.is_empty(), "{m}: {:?}", report.errors);
    }
    let got = celery.wait_readings(9 + 3, Duration::from_secs(60)).await;
    let mut at_celery: Vec<(String, String, String, String, String)> = got
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                s("meter"),
                s("series"),
                s("value"),
                s("unit"),
                s("timestamp"),
            )
        })
        .collect();
    at_celery.sort();
    at_celery.dedup();
    let lgz = "2026-03-21T12:34:56+01:00";
    let isk = "2026-07-01T08:00:00+00:00";
    let mut want = rows(&[
        ("lgz", "1-0-0-0-0-255", "61234567", "", lgz),
        ("lgz", "1-0-96-1-0-255", "61234567", "", lgz),
        ("lgz", "1-0-1-8-0-255", "1234.567", "kWh", lgz),
        ("lgz", "1-0-1-8-1-255", "800.123", "kWh", lgz),
        ("lgz", "1-0-1-8-2-255", "434.444", "kWh", lgz),
        ("lgz", "1-0-2-8-0-255", "12.345", "kWh", lgz),
        (
            "lgz",
            "1-0-1-6-0-255",
            "2.345",
            "kW",
            "2026-03-20T14:15:00+01:00",
        ),
        ("lgz", "1-0-96-7-0-255", "3", "", lgz),
        ("lgz", "1-0-32-7-0-255", "231.2", "V", lgz),
        ("isk", "1-0-0-0-0-255", "61234568", "", isk),
        ("isk", "1-0-1-8-0-255", "42.1", "kWh", isk),
        ("isk", "1-0-2-8-0-255", "0.0", "kWh", isk),
    ]);
    want.sort();
    assert_eq!(at_celery, want);
    assert!(got.iter().all(|r| r["cadence"] == "on_demand"));
    running.stop().await;
    drop(pty);
}
