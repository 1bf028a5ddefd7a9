//! From a readout's data sets to values: OBIS series, exact decimals, the meter's own time.
//!
//! * **Series**: a data-set address is an OBIS code without medium and channel (`1.8.0`,
//!   `C.1.0`, `1.8.0*19` for a stored billing period); the meter's `medium` (A-B, default
//!   `1-0`) completes it and a missing billing period is 255, so `1.8.0` is `1-0-1-8-0-255`.
//!   Many meters write instantaneous values with two groups only, `C.D` (`32.7(231.2*V)`,
//!   `31.7(1.23*A)`: Iskraemeco MT174 and others); their tariff (E) is 0, so `32.7` is
//!   `1-0:32.7.0*255`. Addresses that carry A-B (`1-0:1.8.0*255`) keep theirs.
//! * **Values** are the first value of a set, as an exact decimal in the digits the meter sent
//!   (`001234.567` → `1234.567`). The unit is the meter's, as written (`kWh`); none is `""`.
//! * **Time**: the meter's clock, time `0.9.1` and date `0.9.2`, read in the meter's time zone,
//!   is the timestamp of every value. A set with a second value that is a time stamp
//!   (`1.6.0(0.235*kW)(2311301415)`, a maximum demand and when it occurred) has that time
//!   instead.
//! * **Left out**: a set that gives no value — no address (`(ERROR)`), an address that is no
//!   OBIS code (`F.F`, manufacturer registers), a value that is no number (texts, the gas
//!   meter's time stamp), a second set for a series already mapped — is never dropped
//!   silently: it is in [`Mapped::left_out`] as the meter wrote it, with the reason, and
//!   logged at debug. Sets the meter's selection does not ask for are not left out: they
//!   were not wanted.

use std::collections::HashSet;

use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use jiff::{SignedDuration, Timestamp};

use super::dataset::{DataSet, write_set};
use super::profile::{Profile, Season};
use crate::meter::rows::{Row, Rows};
use crate::meter::{Selection, Value};
use crate::reading::{Decimal, Flags, Obis, ObisError, Stamp};

/// What became of a readout.
#[derive(Debug, Default)]
pub struct Mapped {
    pub values: Vec<Value>,
    /// The meter's clock (0.9.1 and 0.9.2), if it sent both and they are a valid time.
    pub meter_time: Option<Stamp>,
    /// Every set that gave no value (see the module doc); its length is the count to report.
    pub left_out: Vec<LeftOut>,
}

/// A data set that gave no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// The set as the meter wrote it: `F.F(00000000)`.
    pub raw: String,
    pub why: &'static str,
}

impl Mapped {
    fn leave_out(&mut self, set: &DataSet, why: &'static str) {
        let mut raw = String::new();
        write_set(set, &mut raw);
        tracing::debug!(raw = %raw, why, "Data set left out of the readout's values");
        self.left_out.push(LeftOut { raw, why });
    }
}

/// The series of a data-set address: a full OBIS code, `C.D.E` with the meter's `ab`, or
/// `C.D` with tariff 0 (each with an optional `*F`).
pub fn series(address: &str, ab: [u8; 2]) -> Result<Obis, ObisError> {
    Obis::parse_with(address, ab).or_else(|e| match with_tariff_zero(address) {
        Some(full) => Obis::parse_with(&full, ab).map_err(|_| e),
        None => Err(e),
    })
}

/// `[A-B:]C.D[*F]` as `[A-B:]C.D.0[*F]`; `None` for any other shape.
fn with_tariff_zero(address: &str) -> Option<String> {
    let (head, f) = address.split_at(address.find(['*', '&']).unwrap_or(address.len()));
    let (ab, cd) = match head.split_once(':') {
        Some((ab, cd)) => (&head[..=ab.len()], cd),
        None => ("", head),
    };
    let (c, d) = cd.split_once('.')?;
    if c.is_empty() || d.is_empty() || d.contains('.') {
        return None;
    }
    Some(format!("{ab}{c}.{d}.0{f}"))
}

/// The values of `sets` that `selection` wants. `ab` is the meter's medium and channel; `tz`
/// the zone of its clock.
pub fn values(sets: &[DataSet], ab: [u8; 2], selection: &Selection, tz: &TimeZone) -> Mapped {
    let mut out = Mapped::default();
    let parsed: Vec<(Option<Obis>, &DataSet)> = sets
        .iter()
        .map(|s| {
            let obis = s.address.as_deref().and_then(|a| series(a, ab).ok());
            (obis, s)
        })
        .collect();
    let clock = |e: u8| {
        parsed.iter().find_map(|(o, s)| match o {
            Some(Obis([_, _, 0, 9, ee, _])) if *ee == e => s.values.first(),
            _ => None,
        })
    };
    out.meter_time = match (clock(1), clock(2)) {
        (Some(time), Some(date)) => parse_date(&date.value)
            .zip(parse_time(&time.value))
            .and_then(|((y, mo, d), (h, mi, s))| stamp(tz, y, mo, d, h, mi, s)),
        _ => None,
    };
    let mut seen = HashSet::new();
    for (obis, set) in parsed {
        let Some(series) = obis else {
            let why = match set.address {
                Some(_) => "the address is not an OBIS code",
                None => "no address",
            };
            out.leave_out(set, why);
            continue;
        };
        if matches!(series.0[2..5], [0, 9, 1] | [0, 9, 2]) {
            continue;
        }
        let Some(first) = set.values.first() else {
            out.leave_out(set, "no value");
            continue;
        };
        let Ok(value) = Decimal::parse(&first.value) else {
            out.leave_out(set, "the value is not a number");
            continue;
        };
        if !selection.wants(&series) {
            continue;
        }
        if !seen.insert(series) {
            out.leave_out(set, "a second set for a series already mapped");
            continue;
        }
        let own_time = set
            .values
            .get(1)
            .and_then(|v| parse_stamp(&v.value))
            .and_then(|(y, mo, d, h, mi)| stamp(tz, y, mo, d, h, mi, 0));
        out.values.push(Value {
            series,
            value,
            unit: first.unit.clone().unwrap_or_default(),
            meter_time: own_time.or(out.meter_time),
        });
    }
    out
}

/// The digits of a time or date value, without separators and a trailing season flag
/// (`13:23:08S` → `132308`). `None` if anything else is in it.
fn digits(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s
        .strip_suffix(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '0'..='9' => out.push(c),
            ':' | '-' | '.' | '/' | ' ' => {}
            _ => return None,
        }
    }
    Some(out)
}

fn num(s: &str) -> Option<i16> {
    s.parse().ok()
}

/// `hhmmss`, `hh:mm:ss`, `hhmm`.
fn parse_time(s: &str) -> Option<(i8, i8, i8)> {
    let d = digits(s)?;
    let (h, m, sec) = match d.len() {
        6 => (&d[0..2], &d[2..4], &d[4..6]),
        4 => (&d[0..2], &d[2..4], "0"),
        _ => return None,
    };
    Some((num(h)? as i8, num(m)? as i8, num(sec)? as i8))
}

/// `YYMMDD`, `YY-MM-DD`, `YYYYMMDD`, `YYYY-MM-DD`. Two-digit years are 2000-2099.
fn parse_date(s: &str) -> Option<(i16, i8, i8)> {
    let d = digits(s)?;
    let (y, m, day) = match d.len() {
        6 => (2000 + num(&d[0..2])?, &d[2..4], &d[4..6]),
        8 => (num(&d[0..4])?, &d[4..6], &d[6..8]),
        _ => return None,
    };
    Some((y, num(m)? as i8, num(day)? as i8))
}

/// `YYMMDDhhmm` (the time stamp of a maximum or a stored value), with or without separators.
fn parse_stamp(s: &str) -> Option<(i16, i8, i8, i8, i8)> {
    let d = digits(s)?;
    if d.len() != 10 {
        return None;
    }
    Some((
        2000 + num(&d[0..2])?,
        num(&d[2..4])? as i8,
        num(&d[4..6])? as i8,
        num(&d[6..8])? as i8,
        num(&d[8..10])? as i8,
    ))
}

/// A wall-clock time in `tz`. In the hour that repeats when clocks go back, the earlier
/// instant is taken (a meter without a season flag does not say which).
fn stamp(tz: &TimeZone, y: i16, mo: i8, d: i8, h: i8, mi: i8, s: i8) -> Option<Stamp> {
    let dt = DateTime::new(y, mo, d, h, mi, s, 0).ok()?;
    let ts = tz.to_ambiguous_timestamp(dt).compatible().ok()?;
    Some(Stamp::in_zone(ts, tz))
}

// --- Load profile rows -----------------------------------------------------------------------

/// The bits of a load profile block's status word (`P.01(…)(SSSS)…`), in the EDIS/VDEW coding
/// the IEC 62056-21 meters use for their profiles and logbooks (LEM EM4T II manual, "Status
/// word bit coding" of `P.01` and `P.98`; the low byte is also the DLMS "AMR profile status"
/// of the DLMS UA Blue Book, which the Landis+Gyr ZMD/ZxD "status code" follows):
///
/// | bit | hex | meaning | flag |
/// |---|---|---|---|
/// | 0 | `01` | fatal device error | `data_invalid` |
/// | 1 | `02` | the clock's power reserve is exhausted: its time is invalid | `clock_invalid` |
/// | 2 | `04` | the measurement period is incomplete / data not valid | `data_invalid` |
/// | 3 | `08` | season change (EDIS) or DST active (AMR) | none: the season digit says it |
/// | 5 | `20` | the clock was set | `clock_adjusted` |
/// | 6 | `40` | supply voltage returned (EDIS) | `power_down` |
/// | 7 | `80` | supply voltage failed / power down | `power_down` |
///
/// Bit 3 means "a season change happened" in one coding and "summer time" in the other, so it
/// is not used: `dst` comes from the header's season digit (`1`), which all of them write.
/// The other bits (configuration changed, profile or logbook cleared …) give no flag.
pub mod profile_status {
    pub const FATAL_ERROR: u32 = 1 << 0;
    pub const CLOCK_INVALID: u32 = 1 << 1;
    pub const DATA_INVALID: u32 = 1 << 2;
    pub const CLOCK_SET: u32 = 1 << 5;
    pub const POWER_RETURNED: u32 = 1 << 6;
    pub const POWER_FAILED: u32 = 1 << 7;
}

/// The flags of a profile status word (see [`profile_status`]).
pub fn status_flags(status: u32) -> Flags {
    use profile_status as s;
    let mut flags = Flags::empty();
    for (bit, flag) in [
        (s::FATAL_ERROR, Flags::DATA_INVALID),
        (s::CLOCK_INVALID, Flags::CLOCK_INVALID),
        (s::DATA_INVALID, Flags::DATA_INVALID),
        (s::CLOCK_SET, Flags::CLOCK_ADJUSTED),
        (s::POWER_RETURNED, Flags::POWER_DOWN),
        (s::POWER_FAILED, Flags::POWER_DOWN),
    ] {
        if status & bit != 0 {
            flags.insert(flag);
        }
    }
    flags
}

/// The instant of the meter's local time `dt` in `tz`, its season digit choosing between the
/// two offsets where the zone has two: in the autumn fold (02:30 happens twice) summer time is
/// the first, normal time the second; in the spring gap (02:30 does not happen) the season
/// says which side the meter's clock was on. Summer time is the larger of the two offsets.
/// Returns the instant and the offset the meter's time was written in; `None`: not a time
/// (out of range).
pub fn instant(dt: DateTime, season: Season, tz: &TimeZone) -> Option<(Timestamp, Offset)> {
    let offset = match season {
        Season::Utc => Offset::UTC,
        Season::Normal | Season::Summer => match tz.to_ambiguous_timestamp(dt).offset() {
            AmbiguousOffset::Unambiguous { offset } => offset,
            AmbiguousOffset::Gap { before, after } | AmbiguousOffset::Fold { before, after } => {
                let (summer, normal) = if before > after {
                    (before, after)
                } else {
                    (after, before)
                };
                if season == Season::Summer {
                    summer
                } else {
                    normal
                }
            }
        },
    };
    offset.to_timestamp(dt).ok().map(|t| (t, offset))
}

/// The rows of a profile answer captured in `from ..= to` (a meter may send a row more at
/// either end): each row's time is its block's start plus a capture period per line before
/// it, with the offset of the block's season (the spring's last normal-time row is 02:00
/// +01:00, not the same instant's 03:00 +02:00; a UTC block's rows are +00:00), its flags the block's status and season, its values the channels' (OBIS as
/// [`series`], exact decimals, the header's unit). A value that is not a number, or a
/// channel whose id is no OBIS code, counts in [`Rows::unmapped`].
pub fn rows(profile: &Profile, ab: [u8; 2], tz: &TimeZone, from: Timestamp, to: Timestamp) -> Rows {
    let mut out = Rows {
        period: profile
            .blocks
            .first()
            .map(|b| std::time::Duration::from_secs(u64::from(b.period_min) * 60)),
        ..Rows::default()
    };
    for block in &profile.blocks {
        let cells = block.rows.len() * block.channels.len();
        let Some((start, offset)) = instant(block.start, block.season, tz) else {
            out.unmapped += cells;
            continue;
        };
        let columns: Vec<Option<Obis>> = block
            .channels
            .iter()
            .map(|c| series(&c.id, ab).ok())
            .collect();
        let mut flags = status_flags(block.status);
        if block.season == Season::Summer {
            flags.insert(Flags::DST);
        }
        for (k, row) in block.rows.iter().enumerate() {
            let minutes = i64::from(block.period_min) * k as i64;
            let Some(at) = start.checked_add(SignedDuration::from_mins(minutes)).ok() else {
                out.unmapped += row.len();
                continue;
            };
            if at < from || at > to {
                continue;
            }
            let mut values = Vec::with_capacity(row.len());
            for ((v, channel), column) in row.iter().zip(&block.channels).zip(&columns) {
                match (column, Decimal::parse(v)) {
                    (Some(series), Ok(value)) => values.push(Value {
                        series: *series,
                        value,
                        unit: channel.unit.clone(),
                        meter_time: None,
                    }),
                    _ => out.unmapped += 1,
                }
            }
            out.rows.push(Row {
                at: Stamp {
                    ms: at.as_millisecond(),
                    offset: offset.seconds(),
                },
                flags,
                values,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::iec62056_21::dataset::parse_readout;

    fn stockholm() -> TimeZone {
        TimeZone::get("Europe/Stockholm").unwrap()
    }

    fn obis(s: &str) -> Obis {
        s.parse().unwrap()
    }

    /// (series, value, unit) of each value.
    fn triples(m: &Mapped) -> Vec<(String, &str, &str)> {
        m.values
            .iter()
            .map(|v| (v.series.to_string(), v.value.as_str(), v.unit.as_str()))
            .collect()
    }

    fn raw(m: &Mapped) -> Vec<String> {
        m.left_out.iter().map(|l| l.raw.clone()).collect()
    }

    const LGZ: &str = "F.F(00000000)\r\n0.0.0(61234567)\r\n0.9.1(123456)\r\n0.9.2(260321)\r\n\
        C.1.0(61234567)\r\n1.8.0(001234.567*kWh)\r\n1.8.1(000800.123*kWh)\r\n\
        1.6.0(02.345*kW)(2603201415)\r\nC.7.0(0003)\r\n32.7.0(231.2*V)\r\nC.90.2(LGZ V1.2)\r\n!\r\n";

    #[test]
    fn readout_should_map_to_series_exact_values_units_and_meter_time() {
        let sets = parse_readout(LGZ).unwrap();
        let m = values(&sets, [1, 0], &Selection::All, &stockholm());
        // 2026-03-21 12:34:56 in Stockholm is CET, +01:00.
        let clock = Stamp {
            ms: jiff::Timestamp::from_second(1_774_092_896)
                .unwrap()
                .as_millisecond(),
            offset: 3600,
        };
        assert_eq!(clock.rfc3339(), "2026-03-21T12:34:56+01:00");
        assert_eq!(m.meter_time, Some(clock));
        assert_eq!(
            triples(&m),
            vec![
                ("1-0-0-0-0-255".into(), "61234567", ""),
                ("1-0-96-1-0-255".into(), "61234567", ""),
                ("1-0-1-8-0-255".into(), "1234.567", "kWh"),
                ("1-0-1-8-1-255".into(), "800.123", "kWh"),
                ("1-0-1-6-0-255".into(), "2.345", "kW"),
                ("1-0-96-7-0-255".into(), "3", ""),
                ("1-0-32-7-0-255".into(), "231.2", "V"),
            ]
        );
        // The maximum has its own time; the rest the meter's clock.
        let max = m.values.iter().find(|v| v.series == obis("1.6.0")).unwrap();
        assert_eq!(
            max.meter_time.map(|t| t.rfc3339()),
            Some("2026-03-20T14:15:00+01:00".into())
        );
        assert!(
            m.values
                .iter()
                .filter(|v| v.series != obis("1.6.0"))
                .all(|v| v.meter_time == Some(clock))
        );
        // `F.F` is no OBIS code, the firmware text no number.
        assert_eq!(
            raw(&m),
            vec!["F.F(00000000)".to_owned(), "C.90.2(LGZ V1.2)".to_owned()]
        );
    }

    #[test]
    fn selection_should_keep_only_the_listed_series() {
        let sets = parse_readout(LGZ).unwrap();
        let sel = Selection::Series(vec![obis("1-0:1.8.0"), obis("1-0:32.7.0")]);
        let m = values(&sets, [1, 0], &sel, &stockholm());
        let series: Vec<Obis> = m.values.iter().map(|v| v.series).collect();
        assert_eq!(series, vec![obis("1.8.0"), obis("32.7.0")]);
    }

    #[test]
    fn addresses_with_medium_and_billing_period_should_keep_them() {
        // jonkerj/go-iec62056 pkg/samples/iskra_mt382_1000_dsmr5.go (gas on channel 1).
        let sets = parse_readout(
            "1-0:1.8.1(000004.426*kWh)\r\n0-1:24.2.1(170102161005W)(00000.107*m3)\r\n\
             1.8.0*19(000101.71*kWh)\r\n!\r\n",
        )
        .unwrap();
        let m = values(&sets, [6, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(m.values[0].series, Obis([1, 0, 1, 8, 1, 255]));
        // A code without A-B takes the meter's medium; `*19` is billing period 19.
        assert_eq!(m.values[1].series, Obis([6, 0, 1, 8, 0, 19]));
        assert_eq!(m.values[1].value.as_str(), "101.71");
        // The gas set's first value is a time stamp with a season flag, not a number: the
        // value is not guessed from its second.
        assert_eq!(
            raw(&m),
            vec!["0-1:24.2.1(170102161005W)(00000.107*m3)".to_owned()]
        );
        assert_eq!(m.meter_time, None);
    }

    #[test]
    fn clock_with_separators_and_season_flag_should_parse() {
        let sets =
            parse_readout("0.9.1(13:23:08S)\r\n0.9.2(17-11-03)\r\n1.8.0(1*kWh)\r\n!\r\n").unwrap();
        let m = values(&sets, [1, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(
            m.meter_time.map(|t| t.rfc3339()),
            Some("2017-11-03T13:23:08+00:00".into())
        );
    }

    #[test]
    fn impossible_clock_should_leave_no_meter_time() {
        for (t, d) in [("256161", "260321"), ("123456", "261332"), ("12", "260321")] {
            let text = format!("0.9.1({t})\r\n0.9.2({d})\r\n1.8.0(1*kWh)\r\n!\r\n");
            let m = values(
                &parse_readout(&text).unwrap(),
                [1, 0],
                &Selection::All,
                &TimeZone::UTC,
            );
            assert_eq!(m.meter_time, None, "{t} {d}");
            assert_eq!(m.values[0].meter_time, None);
        }
    }

    #[test]
    fn repeated_series_should_keep_the_first() {
        let sets = parse_readout("1.8.0(1*kWh)\r\n1.8.0(2*kWh)\r\n!\r\n").unwrap();
        let m = values(&sets, [1, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(m.values.len(), 1);
        assert_eq!(m.values[0].value.as_str(), "1");
    }

    #[test]
    fn short_codes_should_map_with_the_meters_medium_and_tariff_zero() {
        // Iskraemeco MT174: voltages and currents per phase with two groups only.
        let sets = parse_readout(
            "1.8.0(0012345.678*kWh)\r\n32.7(231.2*V)\r\n52.7(230.9*V)\r\n72.7(229.8*V)\r\n\
             31.7(1.23*A)\r\n51.7(0.98*A)\r\n71.7(1.05*A)\r\n1-1:14.7(49.98*Hz)\r\n!\r\n",
        )
        .unwrap();
        let m = values(&sets, [1, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(
            triples(&m),
            vec![
                ("1-0-1-8-0-255".into(), "12345.678", "kWh"),
                ("1-0-32-7-0-255".into(), "231.2", "V"),
                ("1-0-52-7-0-255".into(), "230.9", "V"),
                ("1-0-72-7-0-255".into(), "229.8", "V"),
                ("1-0-31-7-0-255".into(), "1.23", "A"),
                ("1-0-51-7-0-255".into(), "0.98", "A"),
                ("1-0-71-7-0-255".into(), "1.05", "A"),
                ("1-1-14-7-0-255".into(), "49.98", "Hz"),
            ]
        );
        assert!(m.left_out.is_empty(), "{:?}", m.left_out);
        // The meter's medium completes them, as for three groups.
        let gas = values(&sets, [7, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(gas.values[1].series, Obis([7, 0, 32, 7, 0, 255]));
    }

    #[test]
    fn short_codes_should_be_selectable_by_their_full_code() {
        let sets = parse_readout("32.7(231.2*V)\r\n31.7(1.23*A)\r\n!\r\n").unwrap();
        let sel = Selection::Series(vec![obis("1-0:32.7.0*255")]);
        let m = values(&sets, [1, 0], &sel, &TimeZone::UTC);
        assert_eq!(m.values.len(), 1);
        assert_eq!(m.values[0].value.as_str(), "231.2");
    }

    #[test]
    fn series_should_take_two_three_or_all_six_groups_and_nothing_else() {
        for (address, want) in [
            ("32.7", Some("1-0-32-7-0-255")),
            ("32.7*01", Some("1-0-32-7-0-1")),
            ("0-1:24.2", Some("0-1-24-2-0-255")),
            ("C.1", Some("1-0-96-1-0-255")),
            ("1.8.0", Some("1-0-1-8-0-255")),
            ("1-0:1.8.0*255", Some("1-0-1-8-0-255")),
            ("F.F", None),
            ("32", None),
            ("32.", None),
            (".7", None),
            ("32.7.0.1", None),
            ("1-0:", None),
            ("", None),
        ] {
            let got = series(address, [1, 0]).ok().map(|o| o.to_string());
            assert_eq!(got.as_deref(), want, "{address:?}");
        }
    }

    #[test]
    fn every_set_that_gives_no_value_should_be_left_out_with_its_text() {
        let sets = parse_readout(
            "(ERROR)\r\nF.F(00)\r\n1.8.0(1*kWh)\r\nC.90.2(LGZ V1.2)\r\n1.8.0(2*kWh)\r\n\
             99.1.2.3(4)\r\n2.8.0(5*kWh)\r\n!\r\n",
        )
        .unwrap();
        let m = values(&sets, [1, 0], &Selection::All, &TimeZone::UTC);
        assert_eq!(m.values.len(), 2);
        let got: Vec<(&str, &str)> = m.left_out.iter().map(|l| (l.raw.as_str(), l.why)).collect();
        assert_eq!(
            got,
            vec![
                ("(ERROR)", "no address"),
                ("F.F(00)", "the address is not an OBIS code"),
                ("C.90.2(LGZ V1.2)", "the value is not a number"),
                ("1.8.0(2*kWh)", "a second set for a series already mapped"),
                ("99.1.2.3(4)", "the address is not an OBIS code"),
            ]
        );
        // Every set is a value, the clock, or left out: none vanishes.
        assert_eq!(m.values.len() + m.left_out.len(), sets.len());
    }

    #[test]
    fn sets_not_selected_should_not_count_as_left_out() {
        let sets = parse_readout("1.8.0(1*kWh)\r\n2.8.0(5*kWh)\r\n!\r\n").unwrap();
        let sel = Selection::Series(vec![obis("1-0:2.8.0")]);
        let m = values(&sets, [1, 0], &sel, &TimeZone::UTC);
        assert_eq!(m.values.len(), 1);
        assert!(m.left_out.is_empty());
    }

    mod profile_rows {
        use super::super::*;
        use crate::meter::iec62056_21::profile::{self, Block, Channel};

        fn stockholm() -> TimeZone {
            TimeZone::get("Europe/Stockholm").unwrap()
        }

        fn ts(s: &str) -> Timestamp {
            s.parse().unwrap()
        }

        fn block(start: DateTime, season: Season, status: u32, rows: &[&str]) -> Block {
            Block {
                start,
                season,
                status,
                period_min: 15,
                channels: vec![Channel {
                    id: "1.5.0".into(),
                    unit: "kW".into(),
                }],
                rows: rows.iter().map(|r| vec![(*r).to_owned()]).collect(),
            }
        }

        fn times(rows: &Rows) -> Vec<String> {
            rows.rows.iter().map(|r| r.at.rfc3339()).collect()
        }

        const ALL: (&str, &str) = ("2000-01-01T00:00:00Z", "2099-01-01T00:00:00Z");

        fn all(p: &Profile, tz: &TimeZone) -> Rows {
            rows(p, [1, 0], tz, ts(ALL.0), ts(ALL.1))
        }

        #[test]
        fn spring_forward_should_leave_no_0230_row_and_no_hole_in_instants() {
            // 29 March 2026 in Stockholm: 02:00 CET is followed by 03:00 CEST.
            let p = Profile {
                blocks: vec![
                    block(
                        jiff::civil::date(2026, 3, 29).at(1, 30, 0, 0),
                        Season::Normal,
                        0,
                        &["1", "2", "3"],
                    ),
                    block(
                        jiff::civil::date(2026, 3, 29).at(3, 15, 0, 0),
                        Season::Summer,
                        0,
                        &["4", "5"],
                    ),
                ],
            };
            let r = all(&p, &stockholm());
            assert_eq!(
                times(&r),
                [
                    "2026-03-29T01:30:00+01:00",
                    "2026-03-29T01:45:00+01:00",
                    "2026-03-29T02:00:00+01:00",
                    "2026-03-29T03:15:00+02:00",
                    "2026-03-29T03:30:00+02:00",
                ]
            );
            // Every quarter hour once: the 02:00 CET row is 01:00Z, the next 01:15Z.
            let ms: Vec<i64> = r.rows.iter().map(|x| x.at.ms).collect();
            assert!(ms.windows(2).all(|w| w[1] - w[0] == 900_000), "{ms:?}");
            assert_eq!(r.rows[2].flags, Flags::empty());
            assert_eq!(r.rows[3].flags, Flags::DST);
            assert_eq!(r.period, Some(std::time::Duration::from_secs(900)));
        }

        #[test]
        fn autumn_fold_should_give_two_0230_rows_told_apart_by_the_season() {
            // 25 October 2026: 03:00 CEST is followed by 02:00 CET; 02:30 happens twice.
            let day = jiff::civil::date(2026, 10, 25);
            let p = Profile {
                blocks: vec![
                    block(day.at(2, 15, 0, 0), Season::Summer, 0, &["1", "2", "3"]),
                    block(day.at(2, 0, 0, 0), Season::Normal, 0, &["4", "5", "6"]),
                ],
            };
            let r = all(&p, &stockholm());
            assert_eq!(
                times(&r),
                [
                    "2026-10-25T02:15:00+02:00",
                    "2026-10-25T02:30:00+02:00",
                    "2026-10-25T02:45:00+02:00",
                    "2026-10-25T02:00:00+01:00",
                    "2026-10-25T02:15:00+01:00",
                    "2026-10-25T02:30:00+01:00",
                ]
            );
            assert_eq!(r.rows[1].at.ms, ts("2026-10-25T00:30:00Z").as_millisecond());
            assert_eq!(r.rows[5].at.ms, ts("2026-10-25T01:30:00Z").as_millisecond());
            let ms: Vec<i64> = r.rows.iter().map(|x| x.at.ms).collect();
            assert!(ms.windows(2).all(|w| w[1] - w[0] == 900_000), "{ms:?}");
            assert!(r.rows[..3].iter().all(|x| x.flags == Flags::DST));
            assert!(r.rows[3..].iter().all(|x| x.flags == Flags::empty()));
        }

        #[test]
        fn a_time_in_the_spring_gap_should_take_the_side_its_season_says() {
            let t = jiff::civil::date(2026, 3, 29).at(2, 30, 0, 0);
            let tz = stockholm();
            let at = |dt, season| instant(dt, season, &tz).map(|(t, _)| t);
            assert_eq!(at(t, Season::Normal), Some(ts("2026-03-29T01:30:00Z")));
            assert_eq!(at(t, Season::Summer), Some(ts("2026-03-29T00:30:00Z")));
            // Outside the transitions the zone decides; season 2 is UTC.
            let noon = jiff::civil::date(2026, 7, 1).at(12, 0, 0, 0);
            assert_eq!(at(noon, Season::Normal), Some(ts("2026-07-01T10:00:00Z")));
            assert_eq!(at(noon, Season::Utc), Some(ts("2026-07-01T12:00:00Z")));
        }

        #[test]
        fn status_bits_should_become_flags() {
            use profile_status as s;
            assert_eq!(status_flags(0), Flags::empty());
            assert_eq!(status_flags(s::POWER_FAILED), Flags::POWER_DOWN);
            assert_eq!(status_flags(s::POWER_RETURNED), Flags::POWER_DOWN);
            assert_eq!(status_flags(s::CLOCK_SET), Flags::CLOCK_ADJUSTED);
            assert_eq!(status_flags(s::CLOCK_INVALID), Flags::CLOCK_INVALID);
            assert_eq!(status_flags(s::DATA_INVALID), Flags::DATA_INVALID);
            assert_eq!(status_flags(s::FATAL_ERROR), Flags::DATA_INVALID);
            // Bit 3 (season change / DST) and the high bits give no flag.
            assert_eq!(status_flags(0x0008 | 0x4000 | 0x0100), Flags::empty());
            let mut both = Flags::POWER_DOWN;
            both.insert(Flags::CLOCK_ADJUSTED);
            assert_eq!(status_flags(0xA0), both);
        }

        #[test]
        fn rows_should_carry_exact_values_units_series_and_stay_in_the_range() {
            let p = profile::parse(
                "P.01(02607011000)(0080)(15)(2)(1.5.0)(kW)(1-0:2.5.0)(kvar)\r\n\
                 (000.125)(1.000)\r\n(0.130)(x)\r\n(0.140)(0.002)\r\n",
            )
            .unwrap();
            // The meter's clock is in UTC here (the zone has no summer time).
            let r = rows(
                &p,
                [1, 0],
                &TimeZone::UTC,
                ts("2026-07-01T10:10:00Z"),
                ts("2026-07-01T10:30:00Z"),
            );
            assert_eq!(
                times(&r),
                ["2026-07-01T10:15:00+00:00", "2026-07-01T10:30:00+00:00"]
            );
            let row = &r.rows[0];
            assert_eq!(row.flags, Flags::POWER_DOWN);
            assert_eq!(
                row.values
                    .iter()
                    .map(|v| (
                        v.series.to_string(),
                        v.value.as_str().to_owned(),
                        v.unit.as_str()
                    ))
                    .collect::<Vec<_>>(),
                [("1-0-1-5-0-255".to_owned(), "0.130".to_owned(), "kW"),]
            );
            // `x` is no number.
            assert_eq!(r.unmapped, 1);
            assert_eq!(r.rows[1].values.len(), 2);
        }
    }
}
