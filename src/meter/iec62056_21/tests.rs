//! The driver ([`read_line`]) against the simulated meter, over an in-memory line with paused
//! time: retries, the fallback to 300 Bd, fault mapping and the timing of the baud switch.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

use super::*;
use crate::meter::iec62056_21::codec::ACK;
use crate::sim::iec::{Clock, Fault, SimBus, SimMeter};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Baud(u32),
    Sent(Vec<u8>),
    Received(Vec<u8>),
}

/// A line whose far end is the simulated meter. `switch_delay` makes the UART take that long
/// to change to a faster rate, like a sluggish driver.
struct FakeLine {
    io: DuplexStream,
    baud: Arc<AtomicU32>,
    switch_delay: Duration,
    events: Arc<Mutex<Vec<(Instant, Event)>>>,
}

impl FakeLine {
    fn log(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), e));
    }
}

impl Line for FakeLine {
    fn set_baud(&mut self, baud: u32) -> std::io::Result<()> {
        self.log(Event::Baud(baud));
        if self.switch_delay.is_zero() || baud <= self.baud.load(Ordering::SeqCst) {
            self.baud.store(baud, Ordering::SeqCst);
        } else {
            let (b, d) = (self.baud.clone(), self.switch_delay);
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                b.store(baud, Ordering::SeqCst);
            });
        }
        Ok(())
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 256];
        while let Some(Ok(n)) = self.io.read(&mut buf).now_or_never() {
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.log(Event::Sent(bytes.to_vec()));
        self.io.write_all(bytes).await
    }

    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.io.read(buf).await?;
        self.log(Event::Received(buf[..n].to_vec()));
        Ok(n)
    }
}

fn line_to(bus: &SimBus, switch_delay: Duration) -> FakeLine {
    let (agent, meter) = tokio::io::duplex(64 * 1024);
    let baud = Arc::new(AtomicU32::new(300));
    let peer = baud.clone();
    tokio::spawn(crate::sim::iec::serve(
        meter,
        move || Some(peer.load(Ordering::SeqCst)),
        bus.clone(),
    ));
    FakeLine {
        io: agent,
        baud,
        switch_delay,
        events: Arc::default(),
    }
}

fn meter_config(address: &str) -> IecMeter {
    IecMeter {
        address: Some(address.into()),
        max_baud: 9600,
        ab: [1, 0],
        tz: TimeZone::get("Europe/Stockholm").unwrap(),
        readout_timeout: Duration::from_secs(60),
        password: None,
    }
}

fn timing(retries: u32) -> Timing {
    Timing {
        timeout: Duration::from_secs(1),
        retries,
        ..Timing::default()
    }
}

fn meter_with(address: &str, fault: Fault) -> SimMeter {
    let mut m = SimMeter::landis_gyr(Some(address), "61234567");
    m.clock = Some(Clock::Fixed(
        jiff::civil::date(2026, 3, 21).at(12, 34, 56, 0),
    ));
    m.fault = fault;
    m
}

fn bus_with(address: &str, fault: Fault) -> SimBus {
    let bus = SimBus::new();
    bus.add(meter_with(address, fault));
    bus
}

async fn read_once(line: &mut FakeLine, retries: u32) -> Outcome {
    read_line(
        line,
        "m1",
        &meter_config("61234567"),
        &Selection::All,
        &timing(retries),
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn healthy_meter_should_give_its_values_at_9600_baud() {
    let bus = bus_with("61234567", Fault::None);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    assert!(out.refused.is_empty());
    let e = out
        .values
        .iter()
        .find(|v| v.series.to_string() == "1-0-1-8-0-255")
        .expect("1.8.0");
    assert_eq!(e.value.as_str(), "1234.567");
    assert_eq!(e.unit, "kWh");
    assert_eq!(
        e.meter_time.map(|t| t.rfc3339()),
        Some("2026-03-21T12:34:56+01:00".into())
    );
    assert_eq!(line.baud.load(Ordering::SeqCst), 9600);
    assert_eq!(bus.readouts(), 1);
}

#[tokio::test(start_paused = true)]
async fn agent_should_keep_tr_before_the_ack_and_switch_right_after_it() {
    let bus = bus_with("61234567", Fault::None);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    let events = line.events.lock().unwrap().clone();
    let ident_end = events
        .iter()
        .find(|(_, e)| matches!(e, Event::Received(b) if b.ends_with(b"\r\n") && b.starts_with(b"/LGZ")))
        .map(|(t, _)| *t)
        .expect("identification");
    let (ack_at, ack_index) = events
        .iter()
        .enumerate()
        .find(|(_, (_, e))| matches!(e, Event::Sent(b) if b.first() == Some(&ACK)))
        .map(|(i, (t, _))| (*t, i))
        .expect("option select");
    // tr (200 ms for LGZ) between the identification and the option select.
    assert!(ack_at - ident_end >= Duration::from_millis(200));
    // The switch is the very next thing after the option select, at no time lost.
    assert_eq!(events[ack_index + 1], (ack_at, Event::Baud(9600)));
    // The break ends the session.
    assert!(matches!(&events.last().unwrap().1, Event::Sent(b) if *b == codec::break_message()));
}

#[tokio::test(start_paused = true)]
async fn agent_that_switches_too_late_should_not_get_the_readout_at_the_new_rate() {
    // A UART that takes longer to change than the meter's tr: the meter starts at 9600 Bd
    // while the agent still listens at 300. The simulated line must make that fail.
    let bus = bus_with("61234567", Fault::None);
    let mut line = line_to(&bus, Duration::from_millis(300));
    let out = read_once(&mut line, 0).await;
    // The switch looked refused; the reading at 300 Bd works.
    assert_eq!(out.failure, None);
    assert!(matches!(out.refused.as_slice(), [Failure::Refused(_)]));
    assert_eq!(bus.readouts(), 2);
}

#[tokio::test(start_paused = true)]
async fn meter_that_keeps_300_baud_should_be_read_at_300_with_a_refused_event() {
    let bus = bus_with("61234567", Fault::KeepsBaud);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    assert!(!out.values.is_empty());
    match out.refused.as_slice() {
        [Failure::Refused(m)] => assert!(m.contains("9600 Bd") && m.contains("noise"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The second sign-on asked for 300 Bd.
    let events = line.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|(_, e)| *e == Event::Sent(b"\x06000\r\n".to_vec()))
    );
}

#[tokio::test(start_paused = true)]
async fn meter_that_naks_the_switch_should_be_read_at_300_with_a_refused_event() {
    let bus = bus_with("61234567", Fault::RefusesBaudSwitch);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    assert!(matches!(out.refused.as_slice(), [Failure::Refused(_)]));
    assert_eq!(bus.readouts(), 1);
}

#[tokio::test(start_paused = true)]
async fn silent_meter_should_time_out_after_every_retry() {
    let bus = bus_with("61234567", Fault::Silent);
    let mut line = line_to(&bus, Duration::ZERO);
    let started = Instant::now();
    let out = read_once(&mut line, 2).await;
    assert!(matches!(out.failure, Some(Failure::Timeout(_))));
    assert!(out.values.is_empty());
    assert_eq!(bus.requests(), 3);
    // Each attempt waits the standard's 1.5 s (the bus's 1 s is too short) plus a character.
    let each = Duration::from_millis(1500) + codec::wire_time(1, 300);
    assert!(started.elapsed() >= each * 3);
    assert!(started.elapsed() < each * 3 + Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn faulty_meters_should_give_their_failure_kinds() {
    use crate::reading::EventKind as K;
    for (fault, kind) in [
        (Fault::BadBcc, K::ChecksumError),
        (Fault::Truncated, K::MalformedResponse),
        (Fault::Garbage, K::MalformedResponse),
    ] {
        let bus = bus_with("61234567", fault);
        let mut line = line_to(&bus, Duration::ZERO);
        let out = read_once(&mut line, 1).await;
        let f = out.failure.unwrap_or_else(|| panic!("{fault:?} read fine"));
        assert_eq!(f.event_kind(), kind, "{fault:?}: {f}");
        assert!(out.values.is_empty());
        assert_eq!(bus.requests(), 2, "{fault:?} retried once");
    }
}

#[tokio::test(start_paused = true)]
async fn meter_not_addressed_should_stay_silent() {
    let bus = bus_with("99999999", Fault::None);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert!(matches!(out.failure, Some(Failure::Timeout(_))));
}

#[tokio::test(start_paused = true)]
async fn max_baud_300_should_never_switch() {
    let bus = bus_with("61234567", Fault::None);
    let mut line = line_to(&bus, Duration::ZERO);
    let mut config = meter_config("61234567");
    config.max_baud = 300;
    let out = read_line(&mut line, "m1", &config, &Selection::All, &timing(0)).await;
    assert_eq!(out.failure, None);
    let events = line.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .all(|(_, e)| !matches!(e, Event::Baud(b) if *b != 300))
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_to_300_baud_should_not_use_up_a_retry() {
    // Retries 0: the second sign-on (at 300 Bd) is still made.
    let bus = bus_with("61234567", Fault::KeepsBaud);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    assert_eq!(bus.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn meter_that_keeps_300_baud_and_then_fails_should_report_both() {
    // Keeps 300 Bd at the switch, then its readout at 300 Bd has a bad BCC.
    let bus = bus_with("61234567", Fault::KeepsBaud);
    let mut line = line_to(&bus, Duration::ZERO);
    let watcher = bus.clone();
    let flip = tokio::spawn(async move {
        while watcher.requests() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        watcher.set_fault("61234567", Fault::BadBcc);
    });
    let out = read_once(&mut line, 0).await;
    flip.abort();
    assert!(
        matches!(out.failure, Some(Failure::Checksum(_))),
        "{:?}",
        out.failure
    );
    assert!(matches!(out.refused.as_slice(), [Failure::Refused(_)]));
}

#[tokio::test(start_paused = true)]
async fn short_codes_in_a_readout_should_give_values() {
    // Iskraemeco MT174 and others write instantaneous values with two groups, `C.D`.
    let mut m = meter_with("61234567", Fault::None);
    for (address, value, unit) in [("52.7", "230.9", "V"), ("31.7", "1.23", "A")] {
        m.sets
            .push(crate::sim::iec::set(Some(address), value, Some(unit)));
    }
    let bus = SimBus::new();
    bus.add(m);
    let mut line = line_to(&bus, Duration::ZERO);
    let out = read_once(&mut line, 0).await;
    assert_eq!(out.failure, None);
    let short: Vec<(String, &str, &str)> = out
        .values
        .iter()
        .filter(|v| matches!(v.series.0[2..4], [52, 7] | [31, 7]))
        .map(|v| (v.series.to_string(), v.value.as_str(), v.unit.as_str()))
        .collect();
    assert_eq!(
        short,
        vec![
            ("1-0-52-7-0-255".into(), "230.9", "V"),
            ("1-0-31-7-0-255".into(), "1.23", "A"),
        ]
    );
}

#[test]
fn config_with_bad_values_should_name_each_key() {
    let config: IecMeterConfig = toml::from_str(
        r#"address = "12/34"
max_baud = 115200
medium = "electricity"
timezone = "Mars/Olympus"
readout_timeout = "10h""#,
    )
    .expect("parses");
    let mut p = Problems::default();
    assert!(
        config
            .resolve("meter[0].iec62056_21", &TimeZone::UTC, &mut p)
            .is_none()
    );
    let keys: Vec<&str> = p.0.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "meter[0].iec62056_21.address",
            "meter[0].iec62056_21.max_baud",
            "meter[0].iec62056_21.medium",
            "meter[0].iec62056_21.readout_timeout",
            "meter[0].iec62056_21.timezone",
        ]
    );
    let good: IecMeterConfig = toml::from_str(r#"medium = "6-1""#).expect("parses");
    let mut p = Problems::default();
    let good = good.resolve("m", &TimeZone::UTC, &mut p).expect("resolves");
    assert!(p.0.is_empty(), "{:?}", p.0);
    assert_eq!(good.ab, [6, 1]);
    assert_eq!(good.readout_timeout, Duration::from_secs(60));
}

// --- Load profile reads against the simulated meter ------------------------------------------

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// The LGZ meter with a quarter-hour profile from 00:00 local on 25 October 2026 (the autumn
/// change in Stockholm) to 06:00Z, and a power failure from 04:00Z to 04:50Z.
fn profile_bus(password: Option<&str>) -> SimBus {
    let mut m = meter_with("61234567", Fault::None);
    let mut p = crate::sim::iec::SimProfile::quarter_hours(
        TimeZone::get("Europe/Stockholm").unwrap(),
        ts("2026-10-24T22:00:00Z"),
        Some(ts("2026-10-25T06:00:00Z")),
    );
    p.outage = Some((ts("2026-10-25T04:00:00Z"), ts("2026-10-25T04:50:00Z")));
    m.profile = Some(p);
    m.password = password.map(str::to_owned);
    let bus = SimBus::new();
    bus.add(m);
    bus
}

fn request(from: &str, to: &str) -> crate::meter::rows::RowsRequest {
    crate::meter::rows::RowsRequest {
        profile: "1-0:99.1.0".parse().unwrap(),
        from: ts(from),
        to: ts(to),
    }
}

async fn read_profile(
    bus: &SimBus,
    password: Option<&str>,
    from: &str,
    to: &str,
) -> Result<crate::meter::rows::Rows, Failure> {
    let mut line = line_to(bus, Duration::ZERO);
    let config = IecMeter {
        password: password.map(crate::primitives::Secret::new),
        ..meter_config("61234567")
    };
    read_rows_line(&mut line, "m1", &config, &request(from, to), &timing(1)).await
}

#[tokio::test(start_paused = true)]
async fn profile_across_the_autumn_fold_should_give_every_quarter_hour_once() {
    let bus = profile_bus(None);
    let rows = read_profile(&bus, None, "2026-10-25T00:00:00Z", "2026-10-25T01:45:00Z")
        .await
        .expect("rows");
    let times: Vec<String> = rows.rows.iter().map(|r| r.at.rfc3339()).collect();
    assert_eq!(
        times,
        [
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:15:00+02:00",
            "2026-10-25T02:30:00+02:00",
            "2026-10-25T02:45:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T02:15:00+01:00",
            "2026-10-25T02:30:00+01:00",
            "2026-10-25T02:45:00+01:00",
        ]
    );
    assert!(
        rows.rows[..4]
            .iter()
            .all(|r| r.flags == crate::reading::Flags::DST)
    );
    assert!(
        rows.rows[4..]
            .iter()
            .all(|r| r.flags == crate::reading::Flags::empty())
    );
    // Row 8 (00:00Z, 8 quarter hours after the start): 0.100 + 296/1000, 88 mod 50 = 38.
    let first: Vec<(String, String, String)> = rows.rows[0]
        .values
        .iter()
        .map(|v| {
            (
                v.series.to_string(),
                v.value.as_str().to_owned(),
                v.unit.clone(),
            )
        })
        .collect();
    assert_eq!(
        first,
        [
            ("1-0-1-5-0-255".into(), "0.396".into(), "kW".into()),
            ("1-0-2-5-0-255".into(), "0.038".into(), "kW".into()),
        ]
    );
    assert_eq!(rows.period, Some(Duration::from_secs(900)));
    assert_eq!(rows.unmapped, 0);
    assert_eq!(bus.profile_reads(), 1);
}

#[tokio::test(start_paused = true)]
async fn profile_after_a_power_failure_should_start_a_block_with_power_down() {
    let bus = profile_bus(None);
    let rows = read_profile(&bus, None, "2026-10-25T03:45:00Z", "2026-10-25T05:15:00Z")
        .await
        .expect("rows");
    let got: Vec<(String, bool)> = rows
        .rows
        .iter()
        .map(|r| {
            (
                r.at.rfc3339(),
                r.flags.contains(crate::reading::Flags::POWER_DOWN),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("2026-10-25T04:45:00+01:00".to_owned(), false),
            ("2026-10-25T05:00:00+01:00".to_owned(), false),
            ("2026-10-25T06:00:00+01:00".to_owned(), true),
            ("2026-10-25T06:15:00+01:00".to_owned(), false),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn profile_range_before_the_first_row_should_be_no_rows_not_a_failure() {
    let bus = profile_bus(None);
    let rows = read_profile(&bus, None, "2026-10-20T00:00:00Z", "2026-10-21T00:00:00Z")
        .await
        .expect("no rows is an answer");
    assert!(rows.rows.is_empty());
    assert_eq!(bus.profile_reads(), 1);
}

#[tokio::test(start_paused = true)]
async fn profile_with_the_right_password_should_read_and_a_wrong_one_be_a_security_failure() {
    let bus = profile_bus(Some("s3cret"));
    let rows = read_profile(
        &bus,
        Some("s3cret"),
        "2026-10-25T00:00:00Z",
        "2026-10-25T00:30:00Z",
    )
    .await
    .expect("rows");
    assert_eq!(rows.rows.len(), 3);
    let wrong = read_profile(
        &bus,
        Some("guess"),
        "2026-10-25T00:00:00Z",
        "2026-10-25T00:30:00Z",
    )
    .await;
    assert!(matches!(wrong, Err(Failure::Security(_))), "{wrong:?}");
    // Without one, the meter breaks off at R5.
    let none = read_profile(&bus, None, "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z").await;
    assert!(matches!(none, Err(Failure::Security(_))), "{none:?}");
    // Neither was retried (timing allows one retry): one sign-on each.
    assert_eq!(bus.requests(), 3);
    assert_eq!(bus.profile_reads(), 1);
}

#[tokio::test(start_paused = true)]
async fn profile_with_a_bad_bcc_should_be_a_checksum_failure_after_the_repeats_and_retries() {
    let bus = profile_bus(None);
    bus.set_fault("61234567", Fault::BadBcc);
    let r = read_profile(&bus, None, "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z").await;
    assert!(matches!(r, Err(Failure::Checksum(_))), "{r:?}");
    // One R5 answer per session (the repeats after each NAK are not counted), one retry.
    assert_eq!(bus.profile_reads(), 2);
    assert_eq!(bus.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn profile_block_corrupted_once_should_be_read_again_after_a_nak() {
    let bus = profile_bus(None);
    bus.set_fault("61234567", Fault::BadBccOnce);
    let rows = read_profile(&bus, None, "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z")
        .await
        .expect("rows after the repeat");
    assert_eq!(rows.rows.len(), 3);
    // In the same session: no second sign-on.
    assert_eq!(bus.requests(), 1);
}

#[test]
fn profile_that_is_not_p_should_be_refused_before_any_byte() {
    let bus = profile_bus(None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut line = line_to(&bus, Duration::ZERO);
        let mut req = request("2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z");
        req.profile = "1-0:1.8.0".parse().unwrap();
        let r = read_rows_line(&mut line, "m1", &meter_config("61234567"), &req, &timing(0)).await;
        assert!(matches!(r, Err(Failure::Refused(_))), "{r:?}");
    });
    assert_eq!(bus.requests(), 0);
}

#[test]
fn password_file_should_be_read_at_resolve_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.pw");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.path().join("bad.pw");
    std::fs::write(&bad, "a(b)\n").unwrap();
    let parse = |path: &std::path::Path| -> IecMeterConfig {
        toml::from_str(&format!("password_file = \"{}\"", path.display())).expect("parses")
    };
    let mut p = Problems::default();
    let m = parse(&good)
        .resolve("m", &TimeZone::UTC, &mut p)
        .expect("resolves");
    assert_eq!(m.password.as_ref().map(|s| s.expose()), Some("s3cret"));
    // Never shown.
    assert!(!format!("{m:?}").contains("s3cret"));
    for path in [bad, dir.path().join("missing.pw")] {
        let mut p = Problems::default();
        assert!(parse(&path).resolve("m", &TimeZone::UTC, &mut p).is_none());
        assert_eq!(p.0[0].key, "m.password_file");
    }
}
