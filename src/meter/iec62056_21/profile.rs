//! The text of a load profile answer (`R5` `P.01(from;to)` in programming mode). Sans-IO,
//! std and jiff's civil times only (the fuzz target compiles this file on its own).
//!
//! The answer is lines of data sets in the readout syntax ([`super::dataset`]), in blocks. A
//! block starts with a header line, and each line after it is one interval:
//!
//! ```text
//! P.01(12603011015)(0000)(15)(2)(1.5.0)(kW)(2.5.0)(kW)    header
//! (0.123)(0.000)                                        10:15
//! (0.130)(0.000)                                        10:30
//! P.01(02603011200)(0080)(15)(2)(1.5.0)(kW)(2.5.0)(kW)    the status changed: a new header
//! (0.050)(0.000)                                        12:00
//! ```
//!
//! The header is `P.01(ZYYMMDDhhmm[ss])(SSSS)(RP)(z)(K1)(E1)…(Kz)(Ez)` (IEC 62056-21 annex,
//! the VDEW/EDIS profile format the Landis+Gyr ZMD/ZxD, Iskra MT and Elster AS meters
//! write):
//!
//! * `Z`, the season: `0` normal time, `1` summer time, `2` UTC; then the meter's local time
//!   of the block's first interval (the end of it). Some meters add seconds.
//! * `SSSS`, the status word of the block's rows in hex (2 to 8 digits: meters write one byte
//!   to four); see [`super::mapping`] for its bits.
//! * `RP`, the capture period in minutes; `z`, the number of channels; then each channel's
//!   id (an OBIS code, `1.5.0` or `1-0:2.5.0`) and unit (possibly empty).
//!
//! A value line holds exactly `z` values; its time is the previous line's plus `RP`. The meter
//! starts a new block whenever the status changes or the series is interrupted (a power
//! failure, the clock set). `(ERROR)` or `P.01(ERROR)` as the whole answer means the meter
//! holds no rows in the range asked for: an empty [`Profile`], not an error.

use jiff::civil::DateTime;

use super::dataset::{self, DataError, DataSet};

/// The longest capture period accepted, in minutes (a day).
pub const MAX_PERIOD_MIN: u32 = 1440;
/// The most channels accepted in one block.
pub const MAX_CHANNELS: usize = 64;

/// The season digit `Z` of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Season {
    /// `0`: normal (standard, winter) time.
    Normal,
    /// `1`: summer (daylight saving) time.
    Summer,
    /// `2`: the meter's times are UTC.
    Utc,
}

impl Season {
    pub fn digit(self) -> char {
        match self {
            Season::Normal => '0',
            Season::Summer => '1',
            Season::Utc => '2',
        }
    }

    fn of(c: u8) -> Option<Self> {
        match c {
            b'0' => Some(Season::Normal),
            b'1' => Some(Season::Summer),
            b'2' => Some(Season::Utc),
            _ => None,
        }
    }
}

/// One channel of a block: its id as the meter writes it, and its unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub unit: String,
}

/// A header and the value lines after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The meter's local time of the first row (the end of its interval).
    pub start: DateTime,
    pub season: Season,
    /// The status word of every row of the block.
    pub status: u32,
    /// The capture period, minutes.
    pub period_min: u32,
    pub channels: Vec<Channel>,
    /// One entry per interval, `channels.len()` values each, as the meter wrote them.
    pub rows: Vec<Vec<String>>,
}

/// A parsed answer; no blocks: no rows in the range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub blocks: Vec<Block>,
}

/// Why an answer is not a load profile.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ProfileError {
    pub line: usize,
    pub reason: &'static str,
}

/// `P.0D(YYMMDDhhmm;YYMMDDhhmm)`: the data of the `R5` command asking profile `number` for
/// the rows from `from` to `to`, the meter's local times.
pub fn request(number: u8, from: DateTime, to: DateTime) -> String {
    format!(
        "P.{number:02}({};{})",
        from.strftime("%y%m%d%H%M"),
        to.strftime("%y%m%d%H%M")
    )
}

/// The range of a `P.0D(from;to)` request: the profile number and both local times. For the
/// simulated meter.
pub fn parse_request(data: &str) -> Option<(u8, DateTime, DateTime)> {
    let rest = data.strip_prefix("P.")?;
    let (number, rest) = rest.split_once('(')?;
    let number: u8 = number.parse().ok()?;
    let (from, to) = rest.strip_suffix(')')?.split_once(';')?;
    Some((number, civil(from)?, civil(to)?))
}

/// Parses the text of a complete profile answer (between `STX` and `ETX`, every partial
/// block joined).
pub fn parse(text: &str) -> Result<Profile, ProfileError> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut ended = false;
    let mut lines = 0usize;
    let mut no_data = false;
    for (i, raw) in text.split('\n').enumerate() {
        let n = i + 1;
        let err = |reason| ProfileError { line: n, reason };
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        if ended || no_data {
            return Err(err("text after the end of the profile"));
        }
        // Not asked for by the standard after R5, but some meters close with it.
        if line == "!" {
            ended = true;
            continue;
        }
        lines += 1;
        let mut sets = Vec::new();
        dataset::parse_line(line, n, &mut sets).map_err(|e| match e {
            DataError::Line { reason, .. } => err(reason),
            _ => err("not a line of data sets"),
        })?;
        match sets.as_slice() {
            [DataSet { address, values }]
                if values.len() == 1
                    && values[0].value == "ERROR"
                    && address.as_deref().is_none_or(is_profile_address) =>
            {
                if lines > 1 {
                    return Err(err("an error inside the profile"));
                }
                no_data = true;
            }
            [
                DataSet {
                    address: Some(a),
                    values,
                },
            ] if is_profile_address(a) => {
                // As written: a channel id may be `1-0:1.5.0*255`.
                let raw: Vec<String> = values
                    .iter()
                    .map(|v| match &v.unit {
                        Some(u) => format!("{}*{u}", v.value),
                        None => v.value.clone(),
                    })
                    .collect();
                let v: Vec<&str> = raw.iter().map(String::as_str).collect();
                blocks.push(header(&v).map_err(err)?);
            }
            [
                DataSet {
                    address: None,
                    values,
                },
            ] => {
                let Some(block) = blocks.last_mut() else {
                    return Err(err("values before the first header"));
                };
                if values.len() != block.channels.len() {
                    return Err(err("a line with another number of values than channels"));
                }
                if values.iter().any(|v| v.unit.is_some()) {
                    // The unit is the header's; a value that brings its own is not this format.
                    if values
                        .iter()
                        .zip(&block.channels)
                        .any(|(v, c)| v.unit.as_deref().is_some_and(|u| u != c.unit))
                    {
                        return Err(err("a value whose unit is not its channel's"));
                    }
                }
                block
                    .rows
                    .push(values.iter().map(|v| v.value.clone()).collect());
            }
            _ => return Err(err("neither a header `P.01(…)` nor a line of values")),
        }
    }
    Ok(Profile { blocks })
}

/// `P.01`, `P.02` …: a load profile's address.
fn is_profile_address(a: &str) -> bool {
    a.strip_prefix("P.")
        .is_some_and(|d| (1..=2).contains(&d.len()) && d.bytes().all(|c| c.is_ascii_digit()))
}

fn header(v: &[&str]) -> Result<Block, &'static str> {
    let [time, status, period, z, channels @ ..] = v else {
        return Err("a header with fewer than four values");
    };
    let t = time.as_bytes();
    if !(t.len() == 11 || t.len() == 13) {
        return Err("a header time that is not ZYYMMDDhhmm[ss]");
    }
    let season = Season::of(t[0]).ok_or("a season digit other than 0, 1 or 2")?;
    let start = civil(&time[1..]).ok_or("a header time that is not a valid date and time")?;
    if status.is_empty() || status.len() > 8 || !status.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err("a status that is not 1-8 hex digits");
    }
    let status = u32::from_str_radix(status, 16).map_err(|_| "a status that is not hex")?;
    let period_min = digits(period)
        .filter(|p| (1..=MAX_PERIOD_MIN).contains(p))
        .ok_or("a capture period that is not 1-1440 minutes")?;
    let z = digits(z)
        .map(|z| z as usize)
        .filter(|z| (1..=MAX_CHANNELS).contains(z))
        .ok_or("a channel count that is not 1-64")?;
    if channels.len() != 2 * z {
        return Err("a header whose channel count does not match its ids and units");
    }
    let channels = channels
        .chunks(2)
        .map(|c| Channel {
            id: c[0].to_owned(),
            unit: c[1].to_owned(),
        })
        .collect::<Vec<_>>();
    if channels.iter().any(|c| c.id.is_empty()) {
        return Err("a channel without an id");
    }
    Ok(Block {
        start,
        season,
        status,
        period_min,
        channels,
        rows: Vec::new(),
    })
}

/// A number of at most 4 digits.
fn digits(s: &str) -> Option<u32> {
    ((1..=4).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// `YYMMDDhhmm[ss]` as a civil time in 2000-2099.
fn civil(s: &str) -> Option<DateTime> {
    if !(s.len() == 10 || s.len() == 12) || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| s[i..i + 2].parse::<i8>().ok();
    let second = if s.len() == 12 { n(10)? } else { 0 };
    DateTime::new(
        2000 + i16::from(n(0)?),
        n(2)?,
        n(4)?,
        n(6)?,
        n(8)?,
        second,
        0,
    )
    .ok()
}

/// The text of a profile answer: each block's header and value lines. The inverse of
/// [`parse`] (for the simulated meter and the tests); no blocks is `(ERROR)`.
pub fn write(profile: &Profile) -> String {
    if profile.blocks.is_empty() {
        return "(ERROR)\r\n".into();
    }
    let mut s = String::new();
    for b in &profile.blocks {
        let time = if b.start.second() == 0 {
            b.start.strftime("%y%m%d%H%M")
        } else {
            b.start.strftime("%y%m%d%H%M%S")
        };
        s.push_str(&format!(
            "P.01({}{})({:04X})({})({})",
            b.season.digit(),
            time,
            b.status,
            b.period_min,
            b.channels.len()
        ));
        for c in &b.channels {
            s.push_str(&format!("({})({})", c.id, c.unit));
        }
        s.push_str("\r\n");
        for row in &b.rows {
            for v in row {
                s.push('(');
                s.push_str(v);
                s.push(')');
            }
            s.push_str("\r\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    const TWO: &str = "P.01(12603011015)(0000)(15)(2)(1.5.0)(kW)(1-0:2.5.0)(kW)\r\n\
                       (0.123)(0.000)\r\n\
                       (0.130)(0.001)\r\n\
                       P.01(12603011200)(0080)(15)(2)(1.5.0)(kW)(1-0:2.5.0)(kW)\r\n\
                       (0.050)(0.000)\r\n";

    #[test]
    fn blocks_should_parse_with_headers_and_rows() {
        let p = parse(TWO).unwrap();
        assert_eq!(p.blocks.len(), 2);
        let b = &p.blocks[0];
        assert_eq!(b.start, date(2026, 3, 1).at(10, 15, 0, 0));
        assert_eq!(b.season, Season::Summer);
        assert_eq!((b.status, b.period_min), (0, 15));
        assert_eq!(
            b.channels,
            vec![
                Channel {
                    id: "1.5.0".into(),
                    unit: "kW".into()
                },
                Channel {
                    id: "1-0:2.5.0".into(),
                    unit: "kW".into()
                }
            ]
        );
        assert_eq!(b.rows, vec![vec!["0.123", "0.000"], vec!["0.130", "0.001"]]);
        assert_eq!(p.blocks[1].status, 0x80);
        assert_eq!(p.blocks[1].rows.len(), 1);
        assert_eq!(write(&p), TWO);
    }

    #[test]
    fn landis_gyr_header_with_seconds_and_one_status_byte_should_parse() {
        // L+G ZMD: `P.01(1040210150000)(00)(15)(2)(1.5.0)(kW)(2.5.0)(kW)`, seconds in the time.
        let p = parse("P.01(1040210150000)(00)(15)(2)(1.5.0)(kW)(2.5.0)(kW)\r\n(0.1)(0.2)\r\n")
            .unwrap();
        assert_eq!(p.blocks[0].start, date(2004, 2, 10).at(15, 0, 0, 0));
        assert_eq!(p.blocks[0].season, Season::Summer);
        assert_eq!(p.blocks[0].rows.len(), 1);
        // Channel ids with a billing period keep it; seconds are written back.
        let text = "P.01(02603011015)(00)(15)(1)(1-0:1.5.0*255)(kW)\r\n(0.1)\r\n";
        let p = parse(text).unwrap();
        assert_eq!(p.blocks[0].channels[0].id, "1-0:1.5.0*255");
        let with_seconds = Profile {
            blocks: vec![Block {
                start: date(2026, 3, 1).at(10, 15, 30, 0),
                ..p.blocks[0].clone()
            }],
        };
        assert_eq!(parse(&write(&with_seconds)), Ok(with_seconds));
    }

    #[test]
    fn error_answers_should_be_no_rows() {
        for text in ["(ERROR)\r\n", "P.01(ERROR)\r\n", "P.01(ERROR)", "", "!\r\n"] {
            assert_eq!(parse(text), Ok(Profile::default()), "{text:?}");
        }
        assert_eq!(write(&Profile::default()), "(ERROR)\r\n");
    }

    #[test]
    fn malformed_answers_should_name_the_line() {
        for (text, line) in [
            ("(0.1)(0.2)\r\n", 1),
            ("P.01(12603011015)(0000)(15)(2)(1.5.0)(kW)\r\n", 1),
            ("P.01(32603011015)(0000)(15)(1)(1.5.0)(kW)\r\n", 1),
            ("P.01(12613011015)(0000)(15)(1)(1.5.0)(kW)\r\n", 1),
            ("P.01(12603011015)(00G0)(15)(1)(1.5.0)(kW)\r\n", 1),
            ("P.01(12603011015)(0000)(0)(1)(1.5.0)(kW)\r\n", 1),
            ("P.01(12603011015)(0000)(15)(1)(1.5.0)(kW)\r\n(1)(2)\r\n", 2),
            (
                "P.01(12603011015)(0000)(15)(1)(1.5.0)(kW)\r\n(1)\r\n(ERROR)\r\n",
                3,
            ),
            (
                "P.01(12603011015)(0000)(15)(1)(1.5.0)(kW)\r\n(1*kvar)\r\n",
                2,
            ),
            (
                "P.01(12603011015)(0000)(15)(1)(1.5.0)(kW)\r\n1.8.0(1)\r\n",
                2,
            ),
            ("(ERROR)\r\n(1)\r\n", 2),
        ] {
            match parse(text) {
                Err(ProfileError { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn request_should_be_written_in_local_minutes_and_read_back() {
        let from = date(2026, 3, 1).at(10, 0, 0, 0);
        let to = date(2026, 3, 2).at(0, 0, 0, 0);
        let r = request(1, from, to);
        assert_eq!(r, "P.01(2603011000;2603020000)");
        assert_eq!(parse_request(&r), Some((1, from, to)));
        assert_eq!(parse_request("P.01(2603011000)"), None);
    }

    mod properties {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::super::*;

        fn block() -> impl Strategy<Value = Block> {
            (
                (0i16..99, 1i8..=12, 1i8..=28, 0i8..24, 0i8..60),
                0usize..3,
                any::<u16>(),
                1u32..=60,
                vec(
                    ("[0-9CFP]{1,2}\\.[0-9]{1,2}\\.[0-9]", "[a-zA-Z]{0,4}"),
                    1..4,
                ),
                vec(any::<prop::sample::Index>(), 0..6),
            )
                .prop_flat_map(|((y, mo, d, h, mi), s, status, period, chans, _)| {
                    let z = chans.len();
                    (
                        Just((y, mo, d, h, mi, s, status, period, chans)),
                        vec(vec("-?[0-9]{1,6}\\.[0-9]{3}", z..=z), 0..8),
                    )
                })
                .prop_map(
                    |((y, mo, d, h, mi, s, status, period, chans), rows)| Block {
                        start: DateTime::new(2000 + y, mo, d, h, mi, 0, 0).unwrap(),
                        season: [Season::Normal, Season::Summer, Season::Utc][s],
                        status: u32::from(status),
                        period_min: period,
                        channels: chans
                            .into_iter()
                            .map(|(id, unit)| Channel { id, unit })
                            .collect(),
                        rows,
                    },
                )
        }

        proptest! {
            #[test]
            fn written_profiles_should_parse_back(blocks in vec(block(), 1..5)) {
                let p = Profile { blocks };
                prop_assert_eq!(parse(&write(&p)), Ok(p));
            }

            #[test]
            fn garbage_should_be_an_error_or_a_profile_never_a_panic(text in "\\PC{0,300}") {
                let _ = parse(&text);
            }

            #[test]
            fn a_flipped_bit_should_never_panic_and_never_pass_as_the_same_profile_under_bcc(
                blocks in vec(block(), 1..4),
                pick in any::<prop::sample::Index>(),
                bit in 0u8..7,
            ) {
                use crate::meter::iec62056_21::codec::{Decoder, Frame, data_message};
                let p = Profile { blocks };
                let mut bytes = data_message(write(&p).as_bytes());
                let i = pick.index(bytes.len());
                bytes[i] ^= 1 << bit;
                for f in Decoder::default().feed(&bytes) {
                    if let Ok(Frame::Data { text, complete: true }) = f {
                        // Whatever got past the block check parses or fails, without a panic;
                        // the BCC catches every single flipped bit.
                        prop_assert_ne!(parse(&text), Ok(p.clone()));
                    }
                }
                // Unchecked, the flipped text still only ever parses or fails.
                let mut text = write(&p).into_bytes();
                let j = pick.index(text.len());
                text[j] ^= 1 << bit;
                let _ = parse(&String::from_utf8_lossy(&text));
            }
        }
    }
}
