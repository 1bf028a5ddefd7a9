//! Tests of the reading types: OBIS codes, decimals, flags, event kinds.

use super::*;

#[test]
fn every_event_kind_should_be_named_as_serde_names_it_and_found_by_its_name() {
    use EventKind as K;
    for kind in [
        K::MeterNotAnswering,
        K::LinkError,
        K::ChecksumError,
        K::MalformedResponse,
        K::ExceptionResponse,
        K::WrongDeviceAnswered,
        K::Overrun,
        K::Eviction,
        K::ClockProblem,
        K::StoreError,
        K::StoreCorruption,
        K::SecurityError,
        K::ConfigReverted,
        K::ProfileGap,
    ] {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.as_str()));
        assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
    }
    assert_eq!(EventKind::from_name("no_such_kind"), None);
}

#[test]
fn obis_forms_should_parse_to_the_same_code() {
    let want = Obis([1, 0, 1, 8, 0, 255]);
    for s in [
        "1-0:1.8.0",
        "1-0:1.8.0*255",
        "1-0-1-8-0-255",
        "1.8.0",
        "1.8.0*255",
    ] {
        assert_eq!(s.parse::<Obis>().unwrap(), want, "{s}");
    }
    assert_eq!(want.to_string(), "1-0-1-8-0-255");
}

#[test]
fn obis_letters_in_group_c_should_map_to_their_numbers() {
    assert_eq!(
        Obis::parse_with("C.1.0", [0, 0]).unwrap(),
        Obis([0, 0, 96, 1, 0, 255])
    );
    assert_eq!(
        Obis::parse_with("F.F.0", [0, 0]).map_err(|e| e.reason),
        Err("type (D) is not 0-255")
    );
}

#[test]
fn obis_garbage_should_be_rejected_with_a_reason() {
    for s in [
        "",
        "1-0:1.8",
        "1-0-1-8-0",
        "256.8.0",
        "1-0:1.x.0",
        "a-b-c-d-e-f",
        "1-0:",
    ] {
        assert!(s.parse::<Obis>().is_err(), "{s}");
    }
}

#[test]
fn decimal_from_scaled_should_place_the_point_exactly() {
    assert_eq!(
        Decimal::from_scaled(14567125, -3).unwrap().as_str(),
        "14567.125"
    );
    assert_eq!(Decimal::from_scaled(-5, -3).unwrap().as_str(), "-0.005");
    assert_eq!(Decimal::from_scaled(12, 2).unwrap().as_str(), "1200");
    assert_eq!(Decimal::from_scaled(0, -2).unwrap().as_str(), "0.00");
    assert!(Decimal::from_scaled(i128::MAX, 1).is_err());
}

#[test]
fn decimal_from_f32_should_not_show_float_noise() {
    assert_eq!(Decimal::from_f32(230.1).unwrap().as_str(), "230.1");
    assert_eq!(Decimal::from_f32(0.1).unwrap().as_str(), "0.1");
    assert_eq!(
        Decimal::from_f32(1e20).unwrap().as_str(),
        "100000000000000000000"
    );
    assert!(Decimal::from_f32(f32::NAN).is_err());
    assert!(Decimal::from_f64(f64::INFINITY).is_err());
}

#[test]
fn decimal_parse_should_normalise_what_meters_send() {
    assert_eq!(Decimal::parse("001234.567").unwrap().as_str(), "1234.567");
    assert_eq!(Decimal::parse("+5").unwrap().as_str(), "5");
    assert_eq!(Decimal::parse("-0.000").unwrap().as_str(), "0.000");
    assert_eq!(Decimal::parse("12,5").unwrap().as_str(), "12.5");
    for bad in ["", "-", ".", "1e5", "1.2.3", "abc", "--1"] {
        assert!(Decimal::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn decimal_shift_should_move_the_point_both_ways() {
    let d = Decimal::parse("1234.5").unwrap();
    assert_eq!(d.clone().shift(-3).unwrap().as_str(), "1.2345");
    assert_eq!(d.clone().shift(-6).unwrap().as_str(), "0.0012345");
    assert_eq!(d.clone().shift(2).unwrap().as_str(), "123450");
    assert_eq!(d.clone().shift(0).unwrap().as_str(), "1234.5");
    assert_eq!(
        Decimal::parse("-7").unwrap().shift(-1).unwrap().as_str(),
        "-0.7"
    );
}

#[test]
fn decimal_mul_should_be_exact() {
    let a = Decimal::parse("230.1").unwrap();
    assert_eq!(
        a.mul(&Decimal::parse("0.5").unwrap()).unwrap().as_str(),
        "115.05"
    );
    assert_eq!(
        Decimal::parse("-3")
            .unwrap()
            .mul(&Decimal::parse("2.50").unwrap())
            .unwrap()
            .as_str(),
        "-7.50"
    );
}

#[test]
fn stamp_should_render_rfc3339_with_its_offset() {
    let s = Stamp {
        ms: 1_763_680_500_000,
        offset: 3600,
    };
    assert_eq!(s.rfc3339(), "2025-11-21T00:15:00+01:00");
    let s = Stamp {
        ms: 1_763_680_500_123,
        offset: 0,
    };
    assert_eq!(s.rfc3339(), "2025-11-20T23:15:00.123+00:00");
}

#[test]
fn cadence_priorities_should_put_on_demand_first_and_quarterly_last() {
    let mut all = Cadence::SCHEDULED.to_vec();
    all.push(Cadence::OnDemand);
    all.sort_by_key(|c| c.priority());
    assert_eq!(all.first(), Some(&Cadence::OnDemand));
    assert_eq!(all.last(), Some(&Cadence::Quarterly));
}

#[test]
fn flags_written_as_the_old_single_byte_should_read_back_the_same() {
    // Stores written before the profile flags held `Flags(u8)`: postcard wrote the byte as
    // it is; a u16 varint below 128 is that same byte.
    for old in [0u8, 1, 2, 3] {
        let f: Flags = postcard::from_bytes(&[old]).unwrap();
        assert_eq!(postcard::to_stdvec(&f).unwrap(), vec![old]);
    }
    assert_eq!(
        (Flags::FROM_PROFILE | Flags::DATA_INVALID).names(),
        vec!["from_profile", "data_invalid"]
    );
}

#[test]
fn the_fast_rfc3339_should_write_what_jiff_writes() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::default();
    // 1900 to 2200, every quarter-hour offset from -14h to +14h, milliseconds or none.
    let stamps = (
        -2_208_988_800_000i64..7_258_118_400_000,
        -56i32..=56,
        any::<bool>(),
    )
        .prop_map(|(ms, q, whole)| Stamp {
            ms: if whole { ms - ms.rem_euclid(1000) } else { ms },
            offset: q * 900,
        });
    runner
        .run(&stamps, |s| {
            let (fast, jiff) = rfc3339_both(s);
            prop_assert_eq!(fast, jiff);
            Ok(())
        })
        .unwrap();
    for s in [
        Stamp { ms: 0, offset: 0 },
        Stamp { ms: -1, offset: 0 },
        Stamp {
            ms: 951_782_400_000,
            offset: 3600,
        },
        Stamp {
            ms: 1_763_680_501_250,
            offset: 3600,
        },
        Stamp {
            ms: 1_763_680_501_005,
            offset: -34_200,
        },
        Stamp {
            ms: 1_000,
            offset: 37,
        },
    ] {
        let (fast, jiff) = rfc3339_both(s);
        assert_eq!(fast, jiff, "{s:?}");
    }
}

#[test]
fn from_f32_should_write_what_parse_makes_of_the_float_and_shift_by_nothing_should_keep_it() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::default();
    // Every bit pattern: normal, subnormal, zero of either sign (infinities and NaN refused).
    runner
        .run(&any::<u32>().prop_map(f32::from_bits), |v| {
            let fast = Decimal::from_f32(v);
            if !v.is_finite() {
                prop_assert!(fast.is_err());
                return Ok(());
            }
            let fast = fast.unwrap();
            prop_assert_eq!(&fast, &Decimal::parse(&v.to_string()).unwrap());
            prop_assert_eq!(fast.clone().shift(0).unwrap(), fast);
            Ok(())
        })
        .unwrap();
    for v in [0.0f32, -0.0, 1.0, -1.5, 0.1, 1e-45, 3.4e38, 14567.125] {
        let d = Decimal::from_f32(v).unwrap();
        assert_eq!(d, Decimal::parse(&v.to_string()).unwrap(), "{v}");
    }
    assert_eq!(Decimal::from_f32(-0.0).unwrap().as_str(), "0");
}
