//! The DLMS driver against the Gurux-based simulated meter (tests/dlms/meter.py): over the
//! TCP wrapper at each security level every register reads exactly as the peer's dump says,
//! and a wrong password or key is a `security_error`, not a link failure.

mod common;
#[path = "dlms/peer.rs"]
mod dlms_peer;
#[path = "dlms/wire.rs"]
mod wire;

use std::path::Path;

use amr_edge::bus::BusConfig;
use amr_edge::meter::dlms::cosem::unit_name;
use amr_edge::meter::link::Slot;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::meter::{Failure, Meter, MeterConfig, Request, Resolver};
use amr_edge::primitives::Problems;
use amr_edge::reading::{Cadence, Decimal, EventKind, Obis};
use dlms_peer::DlmsMeter;
use jiff::tz::TimeZone;

fn meter(port: u16, id: &str, dlms: &str, data_dir: &Path) -> (amr_edge::bus::Bus, Meter) {
    meter_on(
        &format!("tcp = {{ host = \"127.0.0.1\", port = {port} }}"),
        id,
        dlms,
        data_dir,
    )
}

fn meter_on(link: &str, id: &str, dlms: &str, data_dir: &Path) -> (amr_edge::bus::Bus, Meter) {
    let bus: BusConfig = toml::from_str(&format!(
        "name = \"lan\"\n{link}\ntimeout = \"2s\"\nretries = 0"
    ))
    .unwrap();
    let m: MeterConfig = toml::from_str(&format!(
        "id = \"{id}\"\nbus = \"lan\"\ndlms = {{ {dlms} }}"
    ))
    .unwrap();
    let mut p = Problems::default();
    let bus = bus.resolve("bus", &mut p).expect("bus");
    let profiles = Profiles::built_in();
    let tz = TimeZone::UTC;
    let mut r = Resolver::new(&profiles, &tz).with_gateway("gw-test", data_dir);
    let m = m
        .resolve("meter[0]", "lan", &bus.link, &mut r, &mut p)
        .unwrap_or_else(|| panic!("{:?}", p.0));
    (bus, m)
}

/// Every register (class 3) of the dump as (OBIS, value × 10^scaler, unit).
fn expected_registers(dump: &serde_json::Value) -> Vec<(String, Decimal, String)> {
    dump["meters"][0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["class_id"] == 3)
        .map(|o| {
            let raw = o["attributes"]["2"]["value"].as_i64().unwrap();
            let su = &o["attributes"]["3"]["value"];
            let scaler = su[0]["value"].as_i64().unwrap() as i32;
            let unit = unit_name(su[1]["value"].as_u64().unwrap() as u8).unwrap();
            let obis = o["obis"].as_str().unwrap().trim_end_matches(".255");
            (
                obis.to_owned(),
                Decimal::from_scaled(raw as i128, scaler).unwrap(),
                unit.to_owned(),
            )
        })
        .collect()
}

async fn read(bus: &amr_edge::bus::Bus, m: &Meter) -> amr_edge::meter::Outcome {
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let req = Request {
        cadence: Cadence::OnDemand,
        series: None,
    };
    m.read(&mut slot, &req, &bus.timing).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapper_meter_should_read_every_register_exactly_at_each_security_level() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0"]);
    let want = expected_registers(&DlmsMeter::dump(&[]));
    assert!(want.len() >= 4, "{want:?}");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "12345678\n").unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let levels = [
        ("none", "client = 16, logical = 1".to_owned()),
        (
            "lls",
            format!("client = 17, logical = 1, security = \"lls\", password_file = {pw:?}"),
        ),
        (
            "hls",
            format!(
                "client = 1, logical = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
            ),
        ),
    ];
    for (name, section) in levels {
        let (bus, m) = meter(peer.port(), &format!("m-{name}"), &section, dir.path());
        // Twice: the second read uses the cached object list (and, ciphered, a higher
        // invocation counter the meter must accept).
        for round in 0..2 {
            let out = read(&bus, &m).await;
            assert!(
                out.failure.is_none(),
                "{name} round {round}: {:?}",
                out.failure
            );
            for (obis, value, unit) in &want {
                let got = out
                    .values
                    .iter()
                    .find(|v| v.series == obis.parse::<Obis>().unwrap())
                    .unwrap_or_else(|| panic!("{name}: {obis} missing from {:?}", out.values));
                assert_eq!(&got.value, value, "{name} {obis}");
                assert_eq!(&got.unit, unit, "{name} {obis}");
            }
        }
    }
    // The HLS meter's counter is on disk, above what was used.
    let ic = std::fs::read_to_string(dir.path().join("dlms/m-hls.ic")).unwrap();
    assert!(ic.trim().parse::<u32>().unwrap() >= 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_or_key_should_be_a_security_error() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "FF0102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    for (name, section) in [
        (
            "lls",
            format!("client = 17, security = \"lls\", password_file = {pw:?}"),
        ),
        (
            "hls",
            format!(
                "client = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
            ),
        ),
    ] {
        let (bus, m) = meter(peer.port(), &format!("bad-{name}"), &section, dir.path());
        let out = read(&bus, &m).await;
        let f = out.failure.expect("a failure");
        assert!(
            matches!(f, Failure::Security(_)),
            "{name}: {f:?} should be a security failure"
        );
        assert_eq!(f.event_kind(), EventKind::SecurityError);
        assert_eq!(f.event_kind().as_str(), "security_error");
    }
    // The public client still reads after both.
    let (bus, m) = meter(peer.port(), "good", "client = 16", dir.path());
    let out = read(&bus, &m).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(!out.values.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_clock_off_should_raise_clock_problem_and_keep_the_values() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0", "--clock-offset", "300"]);
    let dir = tempfile::tempdir().unwrap();
    let (bus, m) = meter(peer.port(), "skewed", "client = 16", dir.path());
    let out = read(&bus, &m).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(!out.values.is_empty());
    let clock: Vec<_> = out
        .refused
        .iter()
        .filter(|f| f.event_kind() == EventKind::ClockProblem)
        .collect();
    assert_eq!(clock.len(), 1, "{:?}", out.refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undefined_object_should_be_a_refusal_and_the_rest_read() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0", "--undefined", "1-0:2.8.0.255"]);
    let dir = tempfile::tempdir().unwrap();
    let (bus, m) = meter(peer.port(), "undef", "client = 16", dir.path());
    let out = read(&bus, &m).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(
        out.values
            .iter()
            .any(|v| v.series == "1-0:1.8.0".parse::<Obis>().unwrap())
    );
    assert!(
        !out.values
            .iter()
            .any(|v| v.series == "1-0:2.8.0".parse::<Obis>().unwrap())
    );
    assert!(
        out.refused.iter().any(|f| matches!(f, Failure::Refused(_))),
        "{:?}",
        out.refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_dropped_mid_association_should_fail_and_reopen() {
    let peer = DlmsMeter::start(&[
        "--wrapper",
        "--port",
        "0",
        "--fault",
        "drop-mid-association",
        "--drop-after",
        "1",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (bus, m) = meter(peer.port(), "dropped", "client = 16", dir.path());
    let out = read(&bus, &m).await;
    let f = out.failure.expect("a failure");
    assert!(matches!(f, Failure::Link(_) | Failure::Timeout(_)), "{f:?}");
    assert!(out.reopen);
}

/// socat's two linked ptys, killed on drop.
struct Ptys(std::process::Child);

impl Ptys {
    /// A pty pair from socat, its two ends behind the links `a` (the meter's) and `b` (the
    /// agent's), once both exist.
    fn pair(a: &Path, b: &Path) -> Ptys {
        let ptys = Ptys(
            std::process::Command::new("socat")
                .arg(format!("pty,raw,echo=0,link={}", a.display()))
                .arg(format!("pty,raw,echo=0,link={}", b.display()))
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("socat"),
        );
        for _ in 0..250 {
            if a.exists() && b.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ptys
    }
}

impl Drop for Ptys {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hdlc_meters_on_one_line_should_read_and_a_wrong_address_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let (m_dev, a_dev) = (dir.path().join("meter"), dir.path().join("agent"));
    let _ptys = Ptys::pair(&m_dev, &a_dev);
    let m_path = m_dev.to_str().unwrap().to_owned();
    let _peer = DlmsMeter::start(&["--hdlc", &m_path, "--physical", "17", "--physical", "18"]);
    let want = expected_registers(&DlmsMeter::dump(&["--physical", "17", "--physical", "18"]));
    let link = format!("serial = {{ device = {:?}, baud = 9600 }}", a_dev);
    let (bus, m17) = meter_on(&link, "h17", "client = 16, physical = 17", dir.path());
    let (_, m18) = meter_on(&link, "h18", "client = 16, physical = 18", dir.path());
    let (_, m19) = meter_on(&link, "h19", "client = 16, physical = 19", dir.path());
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let req = Request {
        cadence: Cadence::OnDemand,
        series: None,
    };
    let out = m17.read(&mut slot, &req, &bus.timing).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    for (obis, value, unit) in &want {
        let got = out
            .values
            .iter()
            .find(|v| v.series == obis.parse::<Obis>().unwrap())
            .unwrap_or_else(|| panic!("{obis} missing from {:?}", out.values));
        assert_eq!((&got.value, &got.unit), (value, unit), "{obis}");
    }
    let out = m19.read(&mut slot, &req, &bus.timing).await;
    assert!(
        matches!(out.failure, Some(Failure::Timeout(_))),
        "{:?}",
        out.failure
    );
    if out.reopen {
        slot.reset();
    }
    let out = m18.read(&mut slot, &req, &bus.timing).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(
        out.values
            .iter()
            .any(|v| v.series == "1-0:1.8.0".parse::<Obis>().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_hdlc_line_should_be_a_link_failure_and_read_again_once_back() {
    let dir = tempfile::tempdir().unwrap();
    let (m_dev, a_dev) = (dir.path().join("meter"), dir.path().join("agent"));
    let link = format!("serial = {{ device = {:?}, baud = 9600 }}", a_dev);
    let (bus, m17) = meter_on(&link, "h17", "client = 16, physical = 17", dir.path());
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let req = Request {
        cadence: Cadence::OnDemand,
        series: None,
    };
    let m_path = m_dev.to_str().unwrap().to_owned();
    let ptys = Ptys::pair(&m_dev, &a_dev);
    let peer = DlmsMeter::start(&["--hdlc", &m_path, "--physical", "17"]);
    let out = m17.read(&mut slot, &req, &bus.timing).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    // Unplugged: the line and its device are gone.
    drop(peer);
    drop(ptys);
    for d in [&m_dev, &a_dev] {
        let _ = std::fs::remove_file(d);
    }
    let mut failures = Vec::new();
    for _ in 0..2 {
        let out = m17.read(&mut slot, &req, &bus.timing).await;
        assert!(out.values.is_empty());
        failures.push(out.failure.expect("a failure while unplugged"));
        if out.reopen {
            slot.reset();
        }
    }
    assert!(
        failures.iter().any(|f| matches!(f, Failure::Link(_))),
        "opening the missing device is a link failure: {failures:?}"
    );
    // Plugged in again under the same name: read on the same slot.
    let _ptys = Ptys::pair(&m_dev, &a_dev);
    let _peer = DlmsMeter::start(&["--hdlc", &m_path, "--physical", "17"]);
    let out = m17.read(&mut slot, &req, &bus.timing).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(!out.values.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fcs_on_hdlc_should_be_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let (m_dev, a_dev) = (dir.path().join("meter"), dir.path().join("agent"));
    let _ptys = Ptys::pair(&m_dev, &a_dev);
    let m_path = m_dev.to_str().unwrap().to_owned();
    let _peer = DlmsMeter::start(&["--hdlc", &m_path, "--physical", "17", "--fault", "bad-fcs"]);
    let link = format!("serial = {{ device = {:?}, baud = 9600 }}", a_dev);
    let (bus, m) = meter_on(&link, "fcs", "client = 16, physical = 17", dir.path());
    let out = read(&bus, &m).await;
    let f = out.failure.expect("a failure");
    assert_eq!(f.event_kind(), EventKind::ChecksumError, "{f:?}");
    assert!(out.reopen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_transfer_stopping_halfway_should_fail_without_values() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0", "--fault", "stop-block-transfer"]);
    let dir = tempfile::tempdir().unwrap();
    let (bus, m) = meter(peer.port(), "blocks", "client = 16", dir.path());
    let out = read(&bus, &m).await;
    let f = out.failure.expect("a failure");
    assert!(out.values.is_empty());
    assert!(
        matches!(
            f,
            Failure::Timeout(_) | Failure::Link(_) | Failure::Malformed(_)
        ),
        "{f:?}"
    );
}

#[test]
fn scan_should_print_the_object_list() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = {:?}\n\n[amqp]\nurl = \"amqp://localhost\"\n\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"127.0.0.1\", port = {} }}\n\n[[meter]]\nid = \"m\"\nbus = \"lan\"\ndlms = {{ client = 16 }}\n",
            dir.path().join("data"),
            peer.port()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amr-edge"))
        .args(["scan", "--config", cfg.to_str().unwrap(), "m"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("1-0:1.8.0") || l.contains("1-0-1-8-0"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.split_whitespace().nth(1) == Some("3"), "{line}");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("7")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_behind_the_meters_should_resync_once_and_read() {
    let peer = DlmsMeter::start(&["--wrapper", "--port", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let section = format!(
        "client = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
    );
    let first = dir.path().join("first");
    let (bus, m) = meter(peer.port(), "same", &section, &first);
    assert!(read(&bus, &m).await.failure.is_none());
    // The counter file lost (a wiped data dir): ours starts again below what the meter saw.
    let wiped = dir.path().join("wiped");
    let (bus, m) = meter(peer.port(), "same", &section, &wiped);
    let out = read(&bus, &m).await;
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(!out.values.is_empty());
}

/// Issue #14's budget against the Gurux peer: a day of quarter-hour rows (~2.5 KB) after
/// the first read is the buffer GET (with the meter's clock in the same list, for the clock
/// check) and its blocks alone, as many as the meter's PDU size makes: 3 GETs at 1024 bytes,
/// 6 at the peer's default of 512.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_day_should_take_as_many_gets_as_the_meters_pdu_makes() {
    for (max_pdu, gets) in [("1024", 3), ("512", 6)] {
        let peer = DlmsMeter::start(&["--wrapper", "--port", "0", "--max-pdu", max_pdu]);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], peer.port()));
        let (proxy, wire) = wire::counting_proxy(addr).await;
        let data = tempfile::tempdir().unwrap();
        let (bus, m) = wire::meter(
            proxy.port(),
            "lp",
            "client = 16, logical = 1",
            "\"all\"",
            data.path(),
        );
        let (first, cold) = wire::read_day(&bus, &m, &wire).await;
        let (warm, w) = wire::read_day(&bus, &m, &wire).await;
        eprintln!(
            "Gurux peer, max PDU {max_pdu}: first read {} ({} B), cached header {} ({} B)",
            cold.apdus(),
            cold.to_meter + cold.from_meter,
            w.apdus(),
            w.to_meter + w.from_meter
        );
        assert_eq!(warm, first);
        assert_eq!(w.gets(), gets, "max PDU {max_pdu}: {}", w.apdus());
        assert_eq!(w.round_trips(), gets + 2, "{}", w.apdus());
        // The first read adds the header's two GETs (capture objects and period, scalers);
        // its buffer answer may take one block more or less than the warm one, as the
        // meter cuts its blocks.
        assert!(
            (gets + 1..=gets + 3).contains(&cold.gets()),
            "max PDU {max_pdu}: {}",
            cold.apdus()
        );
    }
}
