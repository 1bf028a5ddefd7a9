//! Mode E (IEC 62056-21 annex E): the DLMS driver through an optical probe's opening — sign-on
//! `/?!` at 300 Bd 7E1, an identification offering HDLC (`\2`), `ACK 2 Z 2`, then HDLC at the
//! agreed rate in 8N1 — against the simulated meter's mode E front end on a pty
//! (src/sim/dlms/, which listens only at the rate the line is set to: bytes sent at the wrong
//! rate are lost, as on a real line). Registers and a profile range read exactly, with LLS and
//! the public client, read after read.

mod common;

use std::path::Path;

use amr_edge::bus::BusConfig;
use amr_edge::meter::link::Slot;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::meter::{Meter, MeterConfig, Protocol, Request, Resolver};
use amr_edge::primitives::Problems;
use amr_edge::reading::{Cadence, Decimal, Obis};
use amr_edge::sim::dlms::{self, MeterSpec};
use jiff::tz::TimeZone;

fn meter(device: &Path, dlms: &str, dir: &Path) -> (amr_edge::bus::Bus, Meter) {
    let bus: BusConfig = toml::from_str(&format!(
        "name = \"optical\"\nserial = {{ device = \"{}\" }}\ntimeout = \"3s\"\nretries = 1",
        device.display()
    ))
    .unwrap();
    let m: MeterConfig = toml::from_str(&format!(
        "id = \"e350\"\nbus = \"optical\"\ndlms = {{ {dlms} }}"
    ))
    .unwrap();
    let mut p = Problems::default();
    let bus = bus.resolve("bus", &mut p).expect("bus");
    let profiles = Profiles::built_in();
    let tz = TimeZone::UTC;
    let mut r = Resolver::new(&profiles, &tz).with_gateway("gw-test", dir);
    let m = m
        .resolve("meter[0]", "optical", &bus.link, &mut r, &mut p)
        .unwrap_or_else(|| panic!("{:?}", p.0));
    (bus, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_e_should_sign_on_switch_to_hdlc_and_read_exactly() {
    let sim = dlms::Meter::new(MeterSpec::new(16));
    let pty = dlms::spawn_mode_e_pty(sim.clone()).expect("pty");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "12345678\n").unwrap();
    let sections = [
        format!(
            "client = 17, logical = 1, physical = 16, security = \"lls\", password_file = {pw:?}, mode_e = true"
        ),
        "client = 16, logical = 1, physical = 16, mode_e = true".to_owned(),
    ];
    for section in &sections {
        let (bus, m) = meter(pty.path(), section, dir.path());
        // Twice on the same port: after the DISC the meter waits for a sign-on again.
        for round in 0..3 {
            let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
            let before = sim.now().as_second();
            let out = m
                .read(
                    &mut slot,
                    &Request {
                        cadence: Cadence::OnDemand,
                        series: None,
                    },
                    &bus.timing,
                )
                .await;
            let after = sim.now().as_second();
            assert!(
                out.failure.is_none(),
                "{section} round {round}: {:?}",
                out.failure
            );
            // Energy changes each quarter hour only: exact unless one passed during the read.
            let import = |t| Decimal::from_scaled(i128::from(dlms::import_raw(t, 16)), -1).unwrap();
            let got = out
                .values
                .iter()
                .find(|v| v.series == "1-0:1.8.0".parse::<Obis>().unwrap())
                .unwrap_or_else(|| panic!("no 1-0:1.8.0 in {:?}", out.values));
            assert!(got.value == import(before) || got.value == import(after));
            assert_eq!(got.unit, "Wh");
            assert_eq!(out.values.len(), 10, "{:?}", out.values);
        }
    }
    // A profile range over mode E.
    let (bus, m) = meter(pty.path(), &sections[1], dir.path());
    let Protocol::Dlms(d) = &m.protocol else {
        unreachable!()
    };
    let times = dlms::row_times(sim.now().as_second(), 3);
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let p = d
        .read_profile(
            &mut slot,
            Obis(dlms::PROFILE_OBIS),
            jiff::Timestamp::from_second(times[0]).unwrap(),
            jiff::Timestamp::from_second(times[95]).unwrap(),
            &bus.timing,
        )
        .await
        .expect("profile over mode E");
    assert_eq!(p.rows.len(), 96);
    for (row, t) in p.rows.iter().zip(&times) {
        assert_eq!(row.timestamp.unwrap().as_second(), *t);
        assert_eq!(
            row.values[1],
            amr_edge::meter::dlms::axdr::Data::UInt32(dlms::import_raw(*t, 16))
        );
    }
    assert!(sim.associations() >= 7);
    drop(slot);
    // Without the opening the meter hears no HDLC: it waits for a sign-on.
    let (bus, m) = meter(
        pty.path(),
        "client = 16, logical = 1, physical = 16",
        dir.path(),
    );
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let out = m
        .read(
            &mut slot,
            &Request {
                cadence: Cadence::OnDemand,
                series: None,
            },
            &bus.timing,
        )
        .await;
    assert!(
        matches!(out.failure, Some(amr_edge::meter::Failure::Timeout(_))),
        "{:?}",
        out.failure
    );
}
