//! Tests of the simulated DLMS meter with our own client.

use super::*;
use crate::meter::dlms::association::{AssociationConfig, Error, LinkConfig, SecurityConfig};
use crate::meter::dlms::reads::Object;
use crate::meter::dlms::security::MemoryCounter;
use crate::meter::dlms::transport::{Client, TransportError};
use crate::reading::{Decimal, Obis};

/// A wrapper meter at the far end of an in-memory stream.
fn wrapper_link(meter: Meter) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(8192);
    tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let mut server = WrapperServer::new(meter);
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let out = server.received(&buf[..n]);
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    ours
}

fn security(level: &str, spec: &MeterSpec) -> (u16, SecurityConfig) {
    match level {
        "none" => (PUBLIC_SAP, SecurityConfig::None),
        "lls" => (
            LLS_SAP,
            SecurityConfig::Lls {
                password: spec.password.clone(),
            },
        ),
        _ => (
            HLS_SAP,
            SecurityConfig::HlsGmac {
                keys: spec.keys.clone(),
                client_system_title: *b"TESTCLNT",
            },
        ),
    }
}

fn registers() -> Vec<Object> {
    REGISTERS
        .iter()
        .map(|r| Object {
            class: class::REGISTER,
            obis: Obis(r.0),
        })
        .collect()
}

fn expected(obis: [u8; 6], t: i64, physical: u16) -> Decimal {
    let r = REGISTERS.iter().find(|r| r.0 == obis).unwrap();
    let raw = (r.3)(t, physical).as_integer().unwrap();
    Decimal::from_scaled(raw, i32::from(r.1)).unwrap()
}

#[tokio::test]
async fn every_security_level_should_read_every_register_exactly() {
    let spec = MeterSpec::new(17);
    let meter = Meter::new(spec.clone());
    let mut counter = MemoryCounter::default();
    for level in ["none", "lls", "hls", "hls"] {
        let (client, sec) = security(level, &spec);
        let cfg = AssociationConfig::new(LinkConfig::Wrapper { client, server: 1 }, sec);
        let mut c = Client::new(wrapper_link(meter.clone()), cfg, counter);
        c.connect().await.unwrap_or_else(|e| panic!("{level}: {e}"));
        let before = meter.now().as_second();
        let values = c.read_values(&registers()).await.unwrap();
        let after = meter.now().as_second();
        for (obis, v) in values {
            let v = v.unwrap_or_else(|e| panic!("{level} {obis}: {e}"));
            assert!(
                v.value == expected(obis.0, before, 17) || v.value == expected(obis.0, after, 17),
                "{level} {obis}: {}",
                v.value
            );
        }
        c.release().await.unwrap();
        counter = c.into_parts().1;
    }
    assert_eq!(meter.associations(), 4);
}

#[tokio::test]
async fn profile_range_should_be_the_formula_rows_in_blocks() {
    let spec = MeterSpec::new(17);
    let meter = Meter::new(spec.clone());
    for level in ["none", "hls"] {
        let (client, sec) = security(level, &spec);
        let mut cfg = AssociationConfig::new(LinkConfig::Wrapper { client, server: 1 }, sec);
        cfg.max_receive_pdu = 256;
        let mut c = Client::new(wrapper_link(meter.clone()), cfg, MemoryCounter::default());
        c.connect().await.unwrap();
        let times = row_times(meter.now().as_second(), 3);
        let (from, to) = (times[10], times[100]);
        let p = c
            .read_profile(
                Obis(PROFILE_OBIS),
                Some((
                    Timestamp::from_second(from).unwrap(),
                    Timestamp::from_second(to).unwrap(),
                )),
                &jiff::tz::TimeZone::UTC,
            )
            .await
            .unwrap_or_else(|e| panic!("{level}: {e}"));
        assert_eq!(p.capture_period_s, 900);
        assert_eq!(p.rows.len(), 91, "{level}");
        for (row, t) in p.rows.iter().zip(&times[10..=100]) {
            assert_eq!(row.timestamp.unwrap().as_second(), *t);
            assert_eq!(row.values[1], Data::UInt32(import_raw(*t, 17)));
            assert_eq!(row.values[2], Data::UInt32(export_raw(*t, 17)));
        }
        c.release().await.unwrap();
    }
}

#[tokio::test]
async fn wrong_password_or_key_should_be_rejected() {
    let spec = MeterSpec::new(17);
    let meter = Meter::new(spec.clone());
    let mut bad = spec.clone();
    bad.password = b"wrong".to_vec();
    bad.keys.encryption[0] ^= 0xFF;
    for level in ["lls", "hls"] {
        let (client, sec) = security(level, &bad);
        let cfg = AssociationConfig::new(LinkConfig::Wrapper { client, server: 1 }, sec);
        let mut c = Client::new(wrapper_link(meter.clone()), cfg, MemoryCounter::default());
        match c.connect().await {
            Err(TransportError::Dlms(Error::Rejected { .. })) => {}
            other => panic!("{level}: {other:?}"),
        }
    }
    assert_eq!(meter.associations(), 0);
}

#[tokio::test]
async fn replayed_invocation_counter_should_be_refused() {
    let spec = MeterSpec::new(17);
    let meter = Meter::new(spec.clone());
    for round in 0..2 {
        let (client, sec) = security("hls", &spec);
        let cfg = AssociationConfig::new(LinkConfig::Wrapper { client, server: 1 }, sec);
        // The same counter values both times: the second association must fail.
        let mut c = Client::new(wrapper_link(meter.clone()), cfg, MemoryCounter::default());
        let r = c.connect().await;
        assert_eq!(r.is_ok(), round == 0, "round {round}: {r:?}");
    }
}

#[tokio::test]
async fn hdlc_should_serve_two_meters_by_address_and_ignore_a_third() {
    let (ours, theirs) = tokio::io::duplex(8192);
    let meters = vec![
        Meter::new(MeterSpec::new(17)),
        Meter::new(MeterSpec::new(18)),
    ];
    tokio::spawn(serve_hdlc(theirs, meters));
    let mut io = ours;
    for physical in [17u16, 18] {
        let link = LinkConfig::Hdlc {
            client: 16,
            server_logical: 1,
            server_physical: Some(physical),
            max_info: 128,
        };
        let cfg = AssociationConfig::new(link, SecurityConfig::None);
        let mut c = Client::new(io, cfg, MemoryCounter::default());
        c.connect().await.unwrap();
        let list = c.object_list().await.unwrap();
        assert!(
            list.iter()
                .any(|e| e.obis == Obis(PROFILE_OBIS) && e.class == 7)
        );
        let v = c
            .read_values(&[Object {
                class: 3,
                obis: Obis(EXPORT),
            }])
            .await
            .unwrap();
        let t = Timestamp::now().as_second();
        assert_eq!(
            v[0].1.as_ref().unwrap().value,
            expected(EXPORT, t, physical)
        );
        // The whole buffer: GET blocks, each in HDLC segments.
        let p = c
            .read_profile(Obis(PROFILE_OBIS), None, &jiff::tz::TimeZone::UTC)
            .await
            .unwrap();
        assert_eq!(p.rows.len(), 288);
        c.release().await.unwrap();
        io = c.into_parts().0;
    }
    let link = LinkConfig::Hdlc {
        client: 16,
        server_logical: 1,
        server_physical: Some(19),
        max_info: 128,
    };
    let mut cfg = AssociationConfig::new(link, SecurityConfig::None);
    cfg.answer_timeout = Duration::from_millis(200);
    cfg.retries = 0;
    let mut c = Client::new(io, cfg, MemoryCounter::default());
    assert!(matches!(
        c.connect().await,
        Err(TransportError::Dlms(Error::NoAnswer { .. }))
    ));
}

#[test]
fn entry_selector_should_pick_rows_and_columns() {
    let meter = Meter::new(MeterSpec::new(17));
    let mut s = Session::new(meter.clone(), PUBLIC_SAP);
    let sel = (
        2,
        Data::Structure(vec![
            Data::UInt32(5),
            Data::UInt32(7),
            Data::UInt16(2),
            Data::UInt16(3),
        ]),
    );
    let t = meter.now().as_second();
    let got = s
        .get(&AttributeRef::new(7, PROFILE_OBIS, 2), Some(&sel))
        .unwrap();
    let times = row_times(t, 3);
    let want: Vec<Data> = times[4..7]
        .iter()
        .map(|x| {
            Data::Structure(vec![
                Data::UInt32(import_raw(*x, 17)),
                Data::UInt32(export_raw(*x, 17)),
            ])
        })
        .collect();
    assert_eq!(got, Data::Array(want));
    // Unknown objects and classes are refused as a meter refuses them.
    assert_eq!(
        s.get(&AttributeRef::new(3, [1, 0, 9, 9, 9, 255], 2), None),
        Err(AccessError::OBJECT_UNDEFINED)
    );
    assert_eq!(
        s.get(&AttributeRef::new(1, IMPORT, 2), None),
        Err(AccessError::OBJECT_CLASS_INCONSISTENT)
    );
    let _ = s.apdu(&[0xC0, 0x01, 0xC1]);
}
