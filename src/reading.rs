//! Readings and system events: what flows from the meters to the centre.
//!
//! A [`Reading`] is one value of one series of one meter at one time (SPEC §3). Values are
//! exact decimal strings ([`Decimal`]) from the moment a driver decodes them: a float never
//! round-trips through JSON. Series are OBIS codes ([`Obis`]), written `A-B-C-D-E-F` as the
//! centre expects. Times are instants with the offset they were observed in ([`Stamp`]).
//!
//! The reading id `{gateway}-{sequence}` is not stored in the reading: the store assigns the
//! sequence when the reading becomes durable, so a redelivered reading carries the same id.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::{Offset, TimeZone};
use serde::{Deserialize, Serialize};

/// An OBIS code (IEC 62056-61): medium, channel, quantity, measurement type, tariff, billing
/// period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Obis(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not an OBIS code ({reason}); write it as `1-0:1.8.0`, `1-0:1.8.0*255` or `1-0-1-8-0-255`"
)]
pub struct ObisError {
    input: String,
    reason: &'static str,
}

impl Obis {
    /// Medium and channel used when a code is written without them (`1.8.0`): electricity,
    /// channel 0.
    pub const DEFAULT_AB: [u8; 2] = [1, 0];

    /// Parses the forms used in configs and by meters:
    /// `1-0:1.8.0*255`, `1-0:1.8.0`, `1-0-1-8-0-255`, `1.8.0` and `1.8.0*255` (the medium and
    /// channel come from `ab`), and the IEC 62056-21 letters in group C (`C.1.0` is 96.1.0,
    /// `F` 97, `L` 98, `P` 99). A missing billing period (F) is 255, "not used".
    pub fn parse_with(input: &str, ab: [u8; 2]) -> Result<Self, ObisError> {
        let err = |reason| ObisError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        if !s.contains([':', '.', '*']) {
            // The centre's own form: six groups joined by '-'.
            let groups: Vec<&str> = s.split('-').collect();
            if groups.len() != 6 {
                return Err(err("expected six groups A-B-C-D-E-F"));
            }
            let mut out = [0u8; 6];
            for (slot, g) in out.iter_mut().zip(&groups) {
                *slot = parse_group(g).ok_or_else(|| err("a group is not 0-255"))?;
            }
            return Ok(Obis(out));
        }
        let (ab_part, rest) = match s.split_once(':') {
            Some((ab_part, rest)) => {
                let (a, b) = ab_part
                    .split_once('-')
                    .ok_or_else(|| err("medium and channel must be written A-B"))?;
                let a = parse_group(a).ok_or_else(|| err("medium (A) is not 0-255"))?;
                let b = parse_group(b).ok_or_else(|| err("channel (B) is not 0-255"))?;
                ([a, b], rest)
            }
            None => (ab, s),
        };
        let (cde, f) = match rest.split_once(['*', '&']) {
            Some((cde, f)) => (
                cde,
                parse_group(f).ok_or_else(|| err("billing period (F) is not 0-255"))?,
            ),
            None => (rest, 255),
        };
        let groups: Vec<&str> = cde.split('.').collect();
        if groups.len() != 3 {
            return Err(err("expected three groups C.D.E"));
        }
        let c = match groups[0] {
            "C" => 96,
            "F" => 97,
            "L" => 98,
            "P" => 99,
            g => parse_group(g).ok_or_else(|| err("quantity (C) is not 0-255"))?,
        };
        let d = parse_group(groups[1]).ok_or_else(|| err("type (D) is not 0-255"))?;
        let e = parse_group(groups[2]).ok_or_else(|| err("tariff (E) is not 0-255"))?;
        Ok(Obis([ab_part[0], ab_part[1], c, d, e, f]))
    }
}

fn parse_group(g: &str) -> Option<u8> {
    if g.is_empty() || g.len() > 3 || !g.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    g.parse().ok()
}

impl FromStr for Obis {
    type Err = ObisError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Obis::parse_with(s, Obis::DEFAULT_AB)
    }
}

impl fmt::Display for Obis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a}-{b}-{c}-{d}-{e}-{g}")
    }
}

/// An exact decimal number, kept as its canonical string: optional `-`, digits, optionally
/// `.` and digits. No exponent, no leading `+`, no float noise.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Decimal(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("`{0}` is not a decimal number")]
    Syntax(String),
    #[error("{0} is not a finite number")]
    NotFinite(String),
    #[error("{0} does not fit in a decimal of 38 digits")]
    Overflow(String),
}

impl Decimal {
    /// `mantissa × 10^exponent`, written exactly: `from_scaled(14567125, -3)` is `14567.125`.
    pub fn from_scaled(mantissa: i128, exponent: i32) -> Result<Self, DecimalError> {
        let overflow = || DecimalError::Overflow(format!("{mantissa}e{exponent}"));
        if exponent >= 0 {
            let factor = 10i128.checked_pow(exponent as u32).ok_or_else(overflow)?;
            let v = mantissa.checked_mul(factor).ok_or_else(overflow)?;
            return Ok(Decimal(v.to_string()));
        }
        let places = exponent.unsigned_abs() as usize;
        if places > 38 {
            return Err(overflow());
        }
        let digits = mantissa.unsigned_abs().to_string();
        let digits = format!("{digits:0>width$}", width = places + 1);
        let (int, frac) = digits.split_at(digits.len() - places);
        let sign = if mantissa < 0 { "-" } else { "" };
        Ok(Decimal(format!("{sign}{int}.{frac}")))
    }

    /// The shortest decimal that reads back as the same `f32`: a register holding `230.1f32`
    /// gives `230.1`, not `230.10000610351562` (what widening it to f64 would print).
    pub fn from_f32(v: f32) -> Result<Self, DecimalError> {
        if !v.is_finite() {
            return Err(DecimalError::NotFinite(v.to_string()));
        }
        // Rust prints the shortest round-trip representation, never an exponent, a `+` or a
        // leading zero before the integer part: already what `parse` would make of it, but for
        // negative zero, which it prints as `-0`. No second string for every register read
        // (checked against `parse` by a property test).
        if v == 0.0 {
            return Ok(Decimal("0".to_owned()));
        }
        Ok(Decimal(v.to_string()))
    }

    /// The shortest decimal that reads back as the same `f64`.
    pub fn from_f64(v: f64) -> Result<Self, DecimalError> {
        if !v.is_finite() {
            return Err(DecimalError::NotFinite(v.to_string()));
        }
        Self::parse(&v.to_string())
    }

    /// Accepts what meters write: `001234.567`, `+5`, `-0.5`, `12.`; normalises leading zeros
    /// of the integer part but keeps the fraction as given (its digits carry the precision).
    pub fn parse(s: &str) -> Result<Self, DecimalError> {
        let syntax = || DecimalError::Syntax(s.to_owned());
        let t = s.trim();
        let (neg, body) = match t.as_bytes().first() {
            Some(b'-') => (true, &t[1..]),
            Some(b'+') => (false, &t[1..]),
            _ => (false, t),
        };
        let (int, frac) = match body.split_once(['.', ',']) {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(syntax());
        }
        let int = int.trim_start_matches('0');
        let int = if int.is_empty() { "0" } else { int };
        let zero = int == "0" && frac.bytes().all(|b| b == b'0');
        let mut out = String::with_capacity(t.len() + 1);
        if neg && !zero {
            out.push('-');
        }
        out.push_str(int);
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        Ok(Decimal(out))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `(mantissa, exponent)` with `self == mantissa × 10^exponent`.
    pub fn parts(&self) -> Result<(i128, i32), DecimalError> {
        let (int, frac) = self.0.split_once('.').unwrap_or((&self.0, ""));
        let digits = format!("{int}{frac}");
        let mantissa: i128 = digits
            .parse()
            .map_err(|_| DecimalError::Overflow(self.0.clone()))?;
        Ok((mantissa, -(frac.len() as i32)))
    }

    /// `self × other`, exactly.
    pub fn mul(&self, other: &Decimal) -> Result<Self, DecimalError> {
        let (a, ea) = self.parts()?;
        let (b, eb) = other.parts()?;
        let m = a
            .checked_mul(b)
            .ok_or_else(|| DecimalError::Overflow(format!("{self} × {other}")))?;
        Decimal::from_scaled(m, ea + eb)
    }

    /// `self × 10^exponent`, exactly: shifts the decimal point.
    pub fn shift(self, exponent: i32) -> Result<Self, DecimalError> {
        if exponent == 0 {
            // Every constructor normalises, as `parse` does, and `parse` of a normalised
            // decimal is itself: a register without an exponent costs no new string.
            return Ok(self);
        }
        let (neg, body) = match self.0.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, self.0.as_str()),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let mut digits: String = format!("{int}{frac}");
        let mut point = int.len() as i64 + i64::from(exponent);
        if point < 0 {
            digits.insert_str(0, &"0".repeat(point.unsigned_abs() as usize));
            point = 0;
        }
        while (digits.len() as i64) < point {
            digits.push('0');
        }
        let (i, f) = digits.split_at(point as usize);
        let i = if i.is_empty() { "0" } else { i };
        let s = if f.is_empty() {
            format!("{}{i}", if neg { "-" } else { "" })
        } else {
            format!("{}{i}.{f}", if neg { "-" } else { "" })
        };
        Self::parse(&s)
    }
}

impl TryFrom<String> for Decimal {
    type Error = DecimalError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Decimal::parse(&s)
    }
}

impl From<Decimal> for String {
    fn from(d: Decimal) -> Self {
        d.0
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instant and the UTC offset it was observed in, to the millisecond. Rendered as RFC 3339
/// with that offset (`2026-11-21T00:15:00+01:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch.
    pub ms: i64,
    /// Seconds east of UTC.
    pub offset: i32,
}

impl Stamp {
    /// `ts` as seen in `tz`.
    pub fn in_zone(ts: Timestamp, tz: &TimeZone) -> Self {
        Stamp {
            ms: ts.as_millisecond(),
            offset: tz.to_offset(ts).seconds(),
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp::from_millisecond(self.ms).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    pub fn rfc3339(&self) -> String {
        self.to_string()
    }

    /// The RFC 3339 text as jiff's `strftime` writes it, by arithmetic: the drain writes two
    /// per reading, and jiff's formatter was a tenth of the agent's instructions per reading
    /// (callgrind, `benches/run.sh cpu`). Years 0–9999 and whole-minute offsets (every real
    /// one); anything else goes to jiff.
    fn write_fast(&self, f: &mut fmt::Formatter<'_>) -> Option<fmt::Result> {
        if self.offset % 60 != 0 || self.offset.abs() >= 24 * 3600 {
            return None;
        }
        let local_ms = self.ms.checked_add(i64::from(self.offset) * 1000)?;
        let (days, ms_of_day) = (
            local_ms.div_euclid(86_400_000),
            local_ms.rem_euclid(86_400_000),
        );
        // Days since 1970-01-01 to a civil date (H. Hinnant's days_from_civil, inverted).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        if !(0..=9999).contains(&year) {
            return None;
        }
        let secs = ms_of_day / 1000;
        let (h, m, sec, milli) = (secs / 3600, secs / 60 % 60, secs % 60, ms_of_day % 1000);
        let mut b = [0u8; 29];
        let two = |b: &mut [u8], at: usize, v: i64| {
            b[at] = b'0' + (v / 10) as u8;
            b[at + 1] = b'0' + (v % 10) as u8;
        };
        two(&mut b, 0, year / 100);
        two(&mut b, 2, year % 100);
        b[4] = b'-';
        two(&mut b, 5, month);
        b[7] = b'-';
        two(&mut b, 8, day);
        b[10] = b'T';
        two(&mut b, 11, h);
        b[13] = b':';
        two(&mut b, 14, m);
        b[16] = b':';
        two(&mut b, 17, sec);
        let mut n = 19;
        if milli != 0 {
            b[19] = b'.';
            b[20] = b'0' + (milli / 100) as u8;
            two(&mut b, 21, milli % 100);
            n = 23;
        }
        let off = self.offset.abs() / 60;
        b[n] = if self.offset < 0 { b'-' } else { b'+' };
        two(&mut b, n + 1, i64::from(off / 60));
        b[n + 3] = b':';
        two(&mut b, n + 4, i64::from(off % 60));
        n += 6;
        // Only ASCII digits and punctuation were written.
        Some(f.write_str(std::str::from_utf8(&b[..n]).unwrap_or_default()))
    }

    fn write_jiff(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let offset = Offset::from_seconds(self.offset).unwrap_or(Offset::UTC);
        let zoned = self.timestamp().to_zoned(TimeZone::fixed(offset));
        if self.ms.rem_euclid(1000) == 0 {
            write!(f, "{}", zoned.strftime("%Y-%m-%dT%H:%M:%S%:z"))
        } else {
            write!(f, "{}", zoned.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z"))
        }
    }
}

impl fmt::Display for Stamp {
    /// RFC 3339, with milliseconds when there are any: `2025-11-21T00:15:01.250+01:00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.write_fast(f) {
            Some(r) => r,
            None => self.write_jiff(f),
        }
    }
}

/// [`Stamp`]'s two writers side by side, for the test that they agree.
#[cfg(test)]
pub(crate) fn rfc3339_both(s: Stamp) -> (String, String) {
    struct Jiff(Stamp);
    impl fmt::Display for Jiff {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.write_jiff(f)
        }
    }
    (s.to_string(), Jiff(s).to_string())
}

/// Why a meter was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cadence {
    Quarterly,
    Hourly,
    Daily,
    Monthly,
    Yearly,
    OnDemand,
}

impl Cadence {
    /// The scheduled cadences, shortest period first.
    pub const SCHEDULED: [Cadence; 5] = [
        Cadence::Quarterly,
        Cadence::Hourly,
        Cadence::Daily,
        Cadence::Monthly,
        Cadence::Yearly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cadence::Quarterly => "quarterly",
            Cadence::Hourly => "hourly",
            Cadence::Daily => "daily",
            Cadence::Monthly => "monthly",
            Cadence::Yearly => "yearly",
            Cadence::OnDemand => "on_demand",
        }
    }

    /// Queue priority on a bus: lower is served first. On-demand polls jump the queue, then
    /// the longer periods go first, because they are the ones billing depends on.
    pub fn priority(self) -> u8 {
        match self {
            Cadence::OnDemand => 0,
            Cadence::Yearly => 1,
            Cadence::Monthly => 2,
            Cadence::Daily => 3,
            Cadence::Hourly => 4,
            Cadence::Quarterly => 5,
        }
    }

    /// Whether readings of this cadence are evicted first when the store is full (SPEC §8):
    /// quarterly, hourly and on-demand values are profile data; daily, monthly and yearly are
    /// the billing reads and are kept longest.
    pub fn evict_first(self) -> bool {
        matches!(
            self,
            Cadence::Quarterly | Cadence::Hourly | Cadence::OnDemand
        )
    }
}

impl fmt::Display for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Cadence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "quarterly" => Cadence::Quarterly,
            "hourly" => Cadence::Hourly,
            "daily" => Cadence::Daily,
            "monthly" => Cadence::Monthly,
            "yearly" => Cadence::Yearly,
            "on_demand" => Cadence::OnDemand,
            _ => {
                return Err(format!(
                    "unknown cadence `{s}` (quarterly, hourly, daily, monthly, yearly, on_demand)"
                ));
            }
        })
    }
}

/// Qualities of a reading, as bits. On disk a postcard varint: one byte for the flags below
/// 128 (the first two were a `u8`, whose encoding is the same for them), two above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flags(u16);

impl Flags {
    /// A catch-up read after downtime, for a boundary that passed while the agent was down.
    pub const LATE: Flags = Flags(1);
    /// Taken while the gateway clock was not synchronised: `read_at` (and a boundary-derived
    /// `timestamp`) may be wrong.
    pub const CLOCK_UNSYNCED: Flags = Flags(2);
    /// A row of the meter's own load profile: `timestamp` is the interval the row closes.
    pub const FROM_PROFILE: Flags = Flags(4);
    /// Read on the centre's `backfill` order.
    pub const BACKFILL: Flags = Flags(8);
    /// The row's status (or its time's clock status) says the meter's clock was invalid or
    /// doubtful when it was captured.
    pub const CLOCK_INVALID: Flags = Flags(16);
    /// Captured while daylight saving time was in effect (the row's status says so).
    pub const DST: Flags = Flags(32);
    /// The interval saw a power failure (the row's status says so).
    pub const POWER_DOWN: Flags = Flags(64);
    /// The meter's clock was set during the interval (the row's status says so).
    pub const CLOCK_ADJUSTED: Flags = Flags(128);
    /// The row's status says its values are not valid (a meter error during the interval).
    pub const DATA_INVALID: Flags = Flags(256);
    /// Read while the meter's clock was off from the gateway's by more than the meter's
    /// `clock_limit` (a `clock_problem` event says by how much).
    pub const CLOCK_OFF: Flags = Flags(512);

    const NAMES: [(Flags, &'static str); 10] = [
        (Flags::LATE, "late"),
        (Flags::CLOCK_UNSYNCED, "clock_unsynced"),
        (Flags::FROM_PROFILE, "from_profile"),
        (Flags::BACKFILL, "backfill"),
        (Flags::CLOCK_INVALID, "clock_invalid"),
        (Flags::DST, "dst"),
        (Flags::POWER_DOWN, "power_down"),
        (Flags::CLOCK_ADJUSTED, "clock_adjusted"),
        (Flags::DATA_INVALID, "data_invalid"),
        (Flags::CLOCK_OFF, "clock_off"),
    ];

    pub const fn empty() -> Self {
        Flags(0)
    }
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }
    pub fn names(self) -> Vec<&'static str> {
        Flags::NAMES
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// One value of one series of one meter at one time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub meter: String,
    /// What kind of id `meter` is, at the centre (`name` unless the meter config says
    /// otherwise).
    pub id_type: String,
    pub series: Obis,
    pub value: Decimal,
    pub unit: String,
    /// The meter's own time where the protocol gives it, else the boundary the read is for.
    pub timestamp: Stamp,
    /// Gateway time of the read.
    pub read_at: Stamp,
    pub cadence: Cadence,
    pub flags: Flags,
}

/// What a system event is about. The centre routes on these names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The meter did not answer within the timeout.
    MeterNotAnswering,
    /// The link to the meter failed: port missing, connection refused or closed.
    LinkError,
    /// A frame failed its checksum (Modbus CRC, IEC 62056-21 BCC).
    ChecksumError,
    /// The meter answered, but not in a form we could decode.
    MalformedResponse,
    /// The meter answered with a protocol exception (Modbus exception code).
    ExceptionResponse,
    /// Another device than the one addressed answered.
    WrongDeviceAnswered,
    /// A cadence's polls were still queued at its next boundary.
    Overrun,
    /// Readings were evicted from the full store: data loss, reported.
    Eviction,
    /// The gateway clock is unsynchronised or jumped.
    ClockProblem,
    /// The store could not write (disk full, I/O error).
    StoreError,
    /// A record in the store could not be read back and was set aside.
    StoreCorruption,
    /// The meter refused the association's security: wrong password or key, a counter it
    /// rejects.
    SecurityError,
    /// A configuration sent by the centre (`configure`) was not confirmed in time, or did not
    /// start, and the gateway went back to the previous one.
    ConfigReverted,
    /// A meter's load profile did not reach back far enough to fill a range the agent (or
    /// the centre) asked for: those intervals are not in the meter any more.
    ProfileGap,
}

impl EventKind {
    /// The kind [`EventKind::as_str`] names `name`, by serde's names (which a test checks
    /// are the same), so a kind added later needs no second list here.
    pub fn from_name(name: &str) -> Option<EventKind> {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            name.into_deserializer();
        EventKind::deserialize(de).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::MeterNotAnswering => "meter_not_answering",
            EventKind::LinkError => "link_error",
            EventKind::ChecksumError => "checksum_error",
            EventKind::MalformedResponse => "malformed_response",
            EventKind::ExceptionResponse => "exception_response",
            EventKind::WrongDeviceAnswered => "wrong_device_answered",
            EventKind::Overrun => "overrun",
            EventKind::Eviction => "eviction",
            EventKind::ClockProblem => "clock_problem",
            EventKind::StoreError => "store_error",
            EventKind::StoreCorruption => "store_corruption",
            EventKind::SecurityError => "security_error",
            EventKind::ConfigReverted => "config_reverted",
            EventKind::ProfileGap => "profile_gap",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something the centre should know about the gateway or a meter that is not a reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemEvent {
    pub kind: EventKind,
    pub meter: Option<String>,
    pub bus: Option<String>,
    pub at: Stamp,
    /// One line for a human.
    pub message: String,
    /// Machine-readable details (exception code, counts, sequence ranges …).
    pub details: Vec<(String, String)>,
}

impl SystemEvent {
    pub fn new(kind: EventKind, at: Stamp, message: impl Into<String>) -> Self {
        SystemEvent {
            kind,
            meter: None,
            bus: None,
            at,
            message: message.into(),
            details: Vec::new(),
        }
    }
    pub fn meter(mut self, meter: impl Into<String>) -> Self {
        self.meter = Some(meter.into());
        self
    }
    pub fn bus(mut self, bus: impl Into<String>) -> Self {
        self.bus = Some(bus.into());
        self
    }
    pub fn detail(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.details.push((key.into(), value.to_string()));
        self
    }
}

#[cfg(test)]
mod tests;
