//! Modbus meters end to end: RTU on pseudo-terminals and TCP on loopback, against
//! tokio-modbus' server and against pymodbus (an independent implementation), through the
//! bus worker, the store and the drain to a real Celery worker; and every fault a meter or
//! a port can throw at the bus.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use amr_edge::agent::{self, BeatMode, Options, Running};
use amr_edge::bus::{PollReport, PollRequest};
use amr_edge::clock::SystemClock;
use amr_edge::config::Config;
use amr_edge::meter::modbus::profile::{Function, Profile, Profiles};
use amr_edge::meter::modbus::wire::crc16;
use amr_edge::reading::{Cadence, EventKind};
use amr_edge::sim::modbus::{Fault, Meters, Unit, serve_rtu, spawn_tcp};
use amr_edge::store::{Record, SledStore, Store, StoreConfig, Stream};
use common::celery::Celery;
use common::rabbit::scratch_queue;
use common::{AMQP_URL, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

const DEAD_BROKER: &str = "amqp://guest:guest@127.0.0.1:9/%2f";

fn sdm630() -> Profile {
    Profiles::built_in().get("eastron-sdm630").unwrap().clone()
}

/// The values a default simulated SDM630 holds, as the centre must receive them.
fn expected_sdm630() -> BTreeMap<String, (String, String)> {
    [
        ("1-0-32-7-0-255", "230.1", "V"),
        ("1-0-52-7-0-255", "230.1", "V"),
        ("1-0-72-7-0-255", "230.1", "V"),
        ("1-0-31-7-0-255", "5.25", "A"),
        ("1-0-51-7-0-255", "5.25", "A"),
        ("1-0-71-7-0-255", "5.25", "A"),
        ("1-0-21-7-0-255", "1150.5", "W"),
        ("1-0-41-7-0-255", "1150.5", "W"),
        ("1-0-61-7-0-255", "1150.5", "W"),
        ("1-0-16-7-0-255", "1150.5", "W"),
        ("1-0-14-7-0-255", "50", "Hz"),
        ("1-0-1-8-0-255", "11000.125", "kWh"),
        ("1-0-2-8-0-255", "12000.125", "kWh"),
        ("1-0-3-8-0-255", "13000.125", "kvarh"),
        ("1-0-4-8-0-255", "14000.125", "kvarh"),
        ("1-0-15-8-0-255", "25000.125", "kWh"),
        // 140000.125 is exact in f32, but at this magnitude an f32 step is 1/64: the
        // shortest decimal that reads back as the same f32 is 140000.13.
        ("1-0-130-8-0-255", "140000.13", "kvarh"),
    ]
    .into_iter()
    .map(|(s, v, u)| (s.to_owned(), (v.to_owned(), u.to_owned())))
    .collect()
}

/// A serial line between a meter and the agent: two pseudo-terminals linked by socat (which
/// keeps both ends open, so either side may close and reopen). Returns the meter's end,
/// opened, the path the agent opens, and the socat process that carries the line.
fn pty(dir: &Path, name: &str) -> (SerialStream, String, Socat) {
    let socat = Socat::start(&dir.join(name));
    let meter = SerialStream::open(&tokio_serial::new(socat.meter.to_string_lossy(), 9600))
        .expect("open the meter end");
    (meter, socat.agent.to_string_lossy().into_owned(), socat)
}

/// The agent's pipeline in this process: store, drain, bus workers; no beat (the tests ask).
struct Pipeline {
    running: Option<Running>,
    store: Arc<SledStore>,
    _root: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Pipeline {
    fn start(amqp: &str, queue: &str, buses_and_meters: &str) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        // Buses and meters (and any top-level key) first: TOML tables may come in any order.
        let text = format!(
            "{buses_and_meters}\n\n[gateway]\nid = \"gw-modbus\"\ntimezone = \"Europe/Stockholm\"\ndata_dir = \"{}\"\n\n[amqp]\nurl = \"{amqp}\"\nqueue = \"{queue}\"\nevents_queue = \"{queue}.events\"\nmax_backoff = \"2s\"\n",
            dir.path().display()
        );
        let config =
            Config::from_toml(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
        let clock = Arc::new(SystemClock);
        let store =
            Arc::new(SledStore::open(dir.path(), &StoreConfig::default(), clock.clone()).unwrap());
        let root = CancellationToken::new();
        let options = Options {
            beat: BeatMode::Off,
            config_path: None,
            summary_every: Duration::from_secs(3600),
            stop_after: None,
        };
        let running = agent::start(
            &config,
            &options,
            store.clone(),
            clock,
            jiff::Timestamp::now(),
            &root,
        )
        .unwrap();
        Pipeline {
            running: Some(running),
            store,
            _root: root,
            _dir: dir,
        }
    }

    async fn poll(&self, meter: &str) -> PollReport {
        let (tx, rx) = oneshot::channel();
        let mut req = PollRequest::new(meter, Cadence::OnDemand);
        req.reply = Some(tx);
        self.running
            .as_ref()
            .unwrap()
            .router
            .poll(req)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("poll report")
            .unwrap()
    }

    fn events(&self) -> Vec<amr_edge::reading::SystemEvent> {
        self.store
            .take(Stream::Events, 1000)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.record {
                Record::Event(e) => Some(e),
                Record::Reading(_) => None,
            })
            .collect()
    }

    async fn stop(mut self) {
        self.running.take().unwrap().stop().await;
    }
}

fn values(report: &PollReport) -> BTreeMap<String, (String, String)> {
    report
        .readings
        .iter()
        .map(|r| (r.series.to_string(), (r.value.to_string(), r.unit.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_on_a_pty_and_tcp_on_loopback_should_deliver_exact_values_to_a_celery_worker() {
    let (queue, _queues) = scratch_queue("amr.modbus");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    // RTU: tokio-modbus' server on the meter end of a pty, two meters on one RS-485 line.
    let rtu_meters = Meters::new();
    rtu_meters.insert(1, Unit::new(sdm630()));
    rtu_meters.insert(2, Unit::new(sdm630()));
    let dir = tempfile::tempdir().unwrap();
    let (master, path, _line) = pty(dir.path(), "rs485");
    tokio::spawn(serve_rtu(master, rtu_meters));
    // TCP: the same meter behind a Modbus TCP endpoint.
    let tcp_meters = Meters::new();
    tcp_meters.insert(7, Unit::new(sdm630()));
    let addr = spawn_tcp(tcp_meters).await.unwrap();
    let p = Pipeline::start(
        AMQP_URL,
        &queue,
        &format!(
            r#"
[[bus]]
name = "rs485"
serial = {{ device = "{path}", baud = 9600 }}
timeout = "500ms"

[[bus]]
name = "lan"
tcp = {{ host = "{}", port = {} }}

[[meter]]
id = "rtu-1"
bus = "rs485"
modbus = {{ unit = 1, profile = "eastron-sdm630" }}

[[meter]]
id = "rtu-2"
bus = "rs485"
modbus = {{ unit = 2, profile = "eastron-sdm630" }}

[[meter]]
id = "tcp-7"
bus = "lan"
modbus = {{ unit = 7, profile = "eastron-sdm630" }}
"#,
            addr.ip(),
            addr.port()
        ),
    );
    for m in ["rtu-1", "rtu-2", "tcp-7"] {
        let r = p.poll(m).await;
        assert!(r.errors.is_empty(), "{m}: {:?}", r.errors);
        assert_eq!(values(&r), expected_sdm630(), "{m} in the store");
        assert!(r.stored);
    }
    let got = celery.wait_readings(3 * 17, Duration::from_secs(60)).await;
    for m in ["rtu-1", "rtu-2", "tcp-7"] {
        let at_celery: BTreeMap<String, (String, String)> = got
            .iter()
            .filter(|r| r["meter"] == m)
            .map(|r| {
                (
                    r["series"].as_str().unwrap().to_owned(),
                    (
                        r["value"].as_str().unwrap().to_owned(),
                        r["unit"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect();
        assert_eq!(at_celery, expected_sdm630(), "{m} at the Celery worker");
        assert!(
            got.iter()
                .filter(|r| r["meter"] == m)
                .all(|r| r["cadence"] == "on_demand")
        );
    }
    p.stop().await;
}

/// pymodbus (from the test virtualenv) serving `banks`, over TCP or RTU.
struct PyModbus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl PyModbus {
    fn start(mode: &str, where_: &str, profile: &Profile, units: &[u8]) -> PyModbus {
        let dir = tempfile::tempdir().unwrap();
        let unit = Unit::new(profile.clone());
        let mut banks = serde_json::Map::new();
        for u in units {
            let mut input = serde_json::Map::new();
            let mut holding = serde_json::Map::new();
            for r in &profile.registers {
                for (i, w) in r.encode(unit.value(&r.series, 0.0)).into_iter().enumerate() {
                    let m = if r.function == Function::Input {
                        &mut input
                    } else {
                        &mut holding
                    };
                    m.insert((r.address + i as u16).to_string(), w.into());
                }
            }
            banks.insert(
                u.to_string(),
                serde_json::json!({"input": input, "holding": holding}),
            );
        }
        let path = dir.path().join("banks.json");
        std::fs::write(&path, serde_json::Value::Object(banks).to_string()).unwrap();
        let mut child = Command::new(common::celery::venv().join("bin/python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/modbus/pymodbus_server.py"))
            .args([mode, where_])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pymodbus");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "pymodbus did not start");
        PyModbus { child, _dir: dir }
    }
}

impl Drop for PyModbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two linked pseudo-terminals made by socat, at fixed paths that survive a restart.
struct Socat {
    child: Option<Child>,
    pub meter: PathBuf,
    pub agent: PathBuf,
}

impl Socat {
    fn start(dir: &Path) -> Socat {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = Socat {
            child: None,
            meter: dir.join("meter"),
            agent: dir.join("agent"),
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.meter.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.agent.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)");
        self.child = Some(child);
        for _ in 0..100 {
            if self.meter.exists() && self.agent.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("socat made no ptys");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..100 {
            if !self.agent.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_over_tcp_and_over_a_socat_pty_should_give_the_same_values() {
    let profile = sdm630();
    let port = common::free_port();
    let _tcp = PyModbus::start("tcp", &port.to_string(), &profile, &[3]);
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path());
    let _rtu = PyModbus::start("rtu", socat.meter.to_str().unwrap(), &profile, &[5]);
    let p = Pipeline::start(
        DEAD_BROKER,
        "q",
        &format!(
            r#"
[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}

[[bus]]
name = "rs485"
serial = {{ device = "{}" }}
timeout = "1s"

[[meter]]
id = "py-tcp"
bus = "lan"
modbus = {{ unit = 3, profile = "eastron-sdm630" }}

[[meter]]
id = "py-rtu"
bus = "rs485"
modbus = {{ unit = 5, profile = "eastron-sdm630" }}
"#,
            socat.agent.display()
        ),
    );
    for m in ["py-tcp", "py-rtu"] {
        let r = p.poll(m).await;
        assert!(r.errors.is_empty(), "{m}: {:?}", r.errors);
        assert_eq!(values(&r), expected_sdm630(), "{m}");
    }
    p.stop().await;
}

/// How the raw meter on a pty answers.
#[derive(Clone, Copy)]
enum Raw {
    Garbage,
    BadCrc,
    OtherUnit(u8),
}

/// A line with a broken meter (`unit`, answering every read with `mode`, byte for byte: what
/// no Modbus library would send on purpose) and a good SDM630 as unit 9.
async fn raw_meter(mut port: SerialStream, unit: u8, mode: Raw) {
    let good = Unit::new(sdm630());
    let mut req = [0u8; 8];
    loop {
        if port.read_exact(&mut req).await.is_err() {
            return;
        }
        let start = u16::from_be_bytes([req[2], req[3]]);
        let count = u16::from_be_bytes([req[4], req[5]]);
        if req[0] == 9 {
            let words = good.read(Function::Input, start, count, 0.0).unwrap();
            let mut frame = vec![9, req[1], (count * 2) as u8];
            frame.extend(words.iter().flat_map(|w| w.to_be_bytes()));
            let crc = crc16(&frame);
            frame.extend(crc.to_le_bytes());
            let _ = port.write_all(&frame).await;
            continue;
        }
        if req[0] != unit {
            continue;
        }
        let mut frame = vec![unit, req[1], (count * 2) as u8];
        frame.extend(std::iter::repeat_n(0x42, usize::from(count) * 2));
        let crc = crc16(&frame);
        frame.extend(crc.to_le_bytes());
        match mode {
            Raw::Garbage => frame = b"\x13\x37 not modbus at all \xff\xfe".to_vec(),
            Raw::BadCrc => {
                let n = frame.len();
                frame[n - 1] ^= 0xff;
            }
            Raw::OtherUnit(other) => {
                frame[0] = other;
                let n = frame.len();
                let crc = crc16(&frame[..n - 2]);
                frame[n - 2..].copy_from_slice(&crc.to_le_bytes());
            }
        }
        if port.write_all(&frame).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_should_give_its_event_and_the_good_meter_on_the_bus_keeps_being_read() {
    // One RS-485 line per fault, each shared with a good meter (unit 9) behind the same pty.
    let profile = sdm630();
    let cases: Vec<(&str, EventKind)> = vec![
        ("silent", EventKind::MeterNotAnswering),
        ("exception", EventKind::ExceptionResponse),
        ("garbage", EventKind::MalformedResponse),
        ("badcrc", EventKind::ChecksumError),
        ("otherunit", EventKind::WrongDeviceAnswered),
    ];
    let mut toml = String::new();
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for (name, _) in &cases {
        let (master, path, line) = pty(dir.path(), name);
        lines.push(line);
        match *name {
            "silent" | "exception" => {
                let meters = Meters::new();
                let mut bad = Unit::new(profile.clone());
                bad.fault = if *name == "silent" {
                    Fault::Silent
                } else {
                    Fault::Exception(tokio_modbus::ExceptionCode::IllegalDataAddress)
                };
                meters.insert(1, bad);
                meters.insert(9, Unit::new(profile.clone()));
                tokio::spawn(serve_rtu(master, meters));
            }
            "garbage" => {
                tokio::spawn(raw_meter(master, 1, Raw::Garbage));
            }
            "badcrc" => {
                tokio::spawn(raw_meter(master, 1, Raw::BadCrc));
            }
            _ => {
                tokio::spawn(raw_meter(master, 1, Raw::OtherUnit(4)));
            }
        }
        toml.push_str(&format!(
            "[[bus]]\nname = \"{name}\"\nserial = {{ device = \"{path}\" }}\ntimeout = \"300ms\"\nretries = 1\n\n[[meter]]\nid = \"{name}-bad\"\nbus = \"{name}\"\nmodbus = {{ unit = 1, profile = \"eastron-sdm630\" }}\n\n[[meter]]\nid = \"{name}-good\"\nbus = \"{name}\"\nmodbus = {{ unit = 9, profile = \"eastron-sdm630\" }}\n\n"
        ));
    }
    // A device that does not exist, next to nothing.
    toml.push_str(
        "[[bus]]\nname = \"nodevice\"\nserial = { device = \"/dev/ttyAMR-does-not-exist\" }\n\n[[meter]]\nid = \"nodevice-bad\"\nbus = \"nodevice\"\nmodbus = { unit = 1, profile = \"eastron-sdm630\" }\n",
    );
    let p = Pipeline::start(DEAD_BROKER, "q", &toml);
    for (name, kind) in &cases {
        let bad = p.poll(&format!("{name}-bad")).await;
        assert!(bad.readings.is_empty(), "{name}");
        assert!(!bad.errors.is_empty(), "{name}");
        let events = p.events();
        assert!(
            events
                .iter()
                .any(|e| e.kind == *kind && e.meter.as_deref() == Some(&format!("{name}-bad"))),
            "{name}: expected {kind} among {events:?}"
        );
        let good = p.poll(&format!("{name}-good")).await;
        assert_eq!(
            values(&good),
            expected_sdm630(),
            "{name}: the good meter on the bus"
        );
    }
    let r = p.poll("nodevice-bad").await;
    assert!(
        r.errors[0]
            .to_string()
            .contains("cannot open /dev/ttyAMR-does-not-exist"),
        "{:?}",
        r.errors
    );
    assert!(p.events().iter().any(|e| e.kind == EventKind::LinkError));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_disappears_should_give_link_errors_and_reads_resume_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut socat = Socat::start(dir.path());
    let meters = Meters::new();
    meters.insert(1, Unit::new(sdm630()));
    let serve = |meters: Meters, path: PathBuf| {
        let port = tokio_serial::new(path.to_string_lossy(), 9600);
        let port = SerialStream::open(&port).expect("meter end");
        tokio::spawn(serve_rtu(port, meters))
    };
    let server = serve(meters.clone(), socat.meter.clone());
    let p = Pipeline::start(
        DEAD_BROKER,
        "q",
        &format!(
            "[[bus]]\nname = \"rs485\"\nserial = {{ device = \"{}\" }}\ntimeout = \"300ms\"\nretries = 0\n\n[[meter]]\nid = \"m\"\nbus = \"rs485\"\nmodbus = {{ unit = 1, profile = \"eastron-sdm630\" }}\n",
            socat.agent.display()
        ),
    );
    assert_eq!(values(&p.poll("m").await), expected_sdm630());
    // The USB adapter is pulled out.
    server.abort();
    socat.kill();
    let r = p.poll("m").await;
    assert!(r.readings.is_empty());
    let kinds: Vec<EventKind> = p.events().iter().map(|e| e.kind).collect();
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, EventKind::LinkError | EventKind::MeterNotAnswering)),
        "{kinds:?}"
    );
    let r = p.poll("m").await;
    assert!(
        r.errors
            .iter()
            .any(|e| e.to_string().contains("link error")),
        "{:?}",
        r.errors
    );
    // Plugged back in: the worker reopens the port by itself.
    socat.restart();
    let _server = serve(meters, socat.meter.clone());
    let r = eventually(Duration::from_secs(20), "reads to resume", || async {
        let r = p.poll("m").await;
        r.errors.is_empty().then_some(r)
    })
    .await;
    assert_eq!(values(&r), expected_sdm630());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_profile_file_should_be_loaded_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let profile_text = r#"
name = "heat-meter-x"
function = "holding"
[[register]]
series = "6-0:1.8.0"
address = 100
type = "u32"
word_order = "low_first"
exponent = -2
unit = "MWh"

[[register]]
series = "6-0:2.8.0"
address = 102
type = "i16"
scale = "0.5"
unit = "m3"
"#;
    let path = dir.path().join("heat.toml");
    std::fs::write(&path, profile_text).unwrap();
    let profile = Profile::from_toml(profile_text, "heat.toml").unwrap();
    let meters = Meters::new();
    let mut unit = Unit::new(profile.clone());
    unit.values.insert("6-0:1.8.0".parse().unwrap(), 12345.67);
    unit.values.insert("6-0:2.8.0".parse().unwrap(), -21.0);
    unit.gaps_readable = false;
    meters.insert(1, unit);
    let addr = spawn_tcp(meters).await.unwrap();
    let p = Pipeline::start(
        DEAD_BROKER,
        "q",
        &format!(
            "modbus_profiles = [\"{}\"]\n\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"{}\", port = {} }}\n\n[[meter]]\nid = \"heat\"\nbus = \"lan\"\nmodbus = {{ unit = 1, profile = \"heat-meter-x\" }}\n",
            path.display(),
            addr.ip(),
            addr.port()
        ),
    );
    let r = p.poll("heat").await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let v = values(&r);
    assert_eq!(
        v["6-0-1-8-0-255"],
        ("12345.67".to_owned(), "MWh".to_owned())
    );
    // i16 -21 stored raw (the simulator does not undo `scale`), times 0.5.
    assert_eq!(v["6-0-2-8-0-255"], ("-10.5".to_owned(), "m3".to_owned()));
    p.stop().await;
}
