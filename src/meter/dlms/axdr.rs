//! A-XDR (IEC 61334-6) as DLMS uses it: the tagged `Data` CHOICE of the COSEM attribute values,
//! its variable-length length encoding, and the COSEM date-time, date and time octet strings.
//!
//! Decoding reads a borrowed slice with a [`Reader`] and never panics: every length is checked
//! against what is left before anything is allocated, nesting is bounded ([`MAX_DEPTH`]), and
//! anything outside the standard is a typed [`DecodeError`]. The encoder covers what requests
//! carry (selective access parameters, method parameters) and, for the tests, every type.

use std::fmt;

/// Deepest nesting of arrays and structures accepted. Real meters nest three or four deep
/// (profile buffer → row → value); the bound keeps a hostile answer from exhausting the stack.
pub const MAX_DEPTH: usize = 16;

/// Why bytes did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated at byte {at}: {need} more bytes needed")]
    Truncated { at: usize, need: usize },
    #[error("invalid {what} at byte {at}")]
    Invalid { what: &'static str, at: usize },
    #[error("unknown data type tag {tag} at byte {at}")]
    UnknownTag { tag: u8, at: usize },
    #[error("data nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("{0} bytes left over after the value")]
    Trailing(usize),
}

/// A cursor over borrowed bytes.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }
    pub fn invalid(&self, what: &'static str) -> DecodeError {
        DecodeError::Invalid { what, at: self.pos }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated {
                at: self.pos,
                need: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// The A-XDR/BER length: one byte below 0x80, else 0x8N followed by N bytes (N ≤ 4).
    pub fn length(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let first = self.u8()?;
        if first < 0x80 {
            return Ok(usize::from(first));
        }
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return Err(DecodeError::Invalid { what: "length", at });
        }
        let mut len = 0usize;
        for b in self.take(n)? {
            len = (len << 8) | usize::from(*b);
        }
        Ok(len)
    }
    /// A length, checked against the bytes left (each element needs at least `unit` bytes), so a
    /// claimed count never drives an allocation larger than the input.
    pub fn count(&mut self, unit: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.length()?;
        if n.saturating_mul(unit.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated {
                at,
                need: n.saturating_mul(unit.max(1)) - self.remaining(),
            });
        }
        Ok(n)
    }
}

/// Appends the A-XDR/BER length of `len`.
pub fn put_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xFF {
        out.extend_from_slice(&[0x81, len as u8]);
    } else if len <= 0xFFFF {
        out.push(0x82);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x84);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Data type tags (IEC 62056-6-2, the `Data` CHOICE).
pub mod tag {
    pub const NULL: u8 = 0;
    pub const ARRAY: u8 = 1;
    pub const STRUCTURE: u8 = 2;
    pub const BOOLEAN: u8 = 3;
    pub const BIT_STRING: u8 = 4;
    pub const INT32: u8 = 5;
    pub const UINT32: u8 = 6;
    pub const OCTET_STRING: u8 = 9;
    pub const VISIBLE_STRING: u8 = 10;
    pub const UTF8_STRING: u8 = 12;
    pub const BCD: u8 = 13;
    pub const INT8: u8 = 15;
    pub const INT16: u8 = 16;
    pub const UINT8: u8 = 17;
    pub const UINT16: u8 = 18;
    pub const COMPACT_ARRAY: u8 = 19;
    pub const INT64: u8 = 20;
    pub const UINT64: u8 = 21;
    pub const ENUM: u8 = 22;
    pub const FLOAT32: u8 = 23;
    pub const FLOAT64: u8 = 24;
    pub const DATE_TIME: u8 = 25;
    pub const DATE: u8 = 26;
    pub const TIME: u8 = 27;
    pub const DONT_CARE: u8 = 255;
}

/// A COSEM attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Null,
    Array(Vec<Data>),
    Structure(Vec<Data>),
    Boolean(bool),
    /// `bits` bits, most significant first in `bytes`.
    BitString {
        bits: usize,
        bytes: Vec<u8>,
    },
    Int32(i32),
    UInt32(u32),
    OctetString(Vec<u8>),
    /// ASCII by the standard; kept as bytes, a meter may send anything.
    VisibleString(Vec<u8>),
    Utf8String(String),
    Bcd(u8),
    Int8(i8),
    Int16(i16),
    UInt8(u8),
    UInt16(u16),
    Int64(i64),
    UInt64(u64),
    Enum(u8),
    Float32(f32),
    Float64(f64),
    DateTime(DateTime),
    Date(Date),
    Time(Time),
    DontCare,
}

impl Data {
    pub fn type_name(&self) -> &'static str {
        match self {
            Data::Null => "null",
            Data::Array(_) => "array",
            Data::Structure(_) => "structure",
            Data::Boolean(_) => "boolean",
            Data::BitString { .. } => "bit-string",
            Data::Int32(_) => "double-long",
            Data::UInt32(_) => "double-long-unsigned",
            Data::OctetString(_) => "octet-string",
            Data::VisibleString(_) => "visible-string",
            Data::Utf8String(_) => "utf8-string",
            Data::Bcd(_) => "bcd",
            Data::Int8(_) => "integer",
            Data::Int16(_) => "long",
            Data::UInt8(_) => "unsigned",
            Data::UInt16(_) => "long-unsigned",
            Data::Int64(_) => "long64",
            Data::UInt64(_) => "long64-unsigned",
            Data::Enum(_) => "enum",
            Data::Float32(_) => "float32",
            Data::Float64(_) => "float64",
            Data::DateTime(_) => "date-time",
            Data::Date(_) => "date",
            Data::Time(_) => "time",
            Data::DontCare => "dont-care",
        }
    }

    /// An integer value of any width (enum and BCD included), for scaling.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Data::Int8(v) => v.into(),
            Data::Int16(v) => v.into(),
            Data::Int32(v) => v.into(),
            Data::Int64(v) => v.into(),
            Data::UInt8(v) | Data::Enum(v) | Data::Bcd(v) => v.into(),
            Data::UInt16(v) => v.into(),
            Data::UInt32(v) => v.into(),
            Data::UInt64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_octets(&self) -> Option<&[u8]> {
        match self {
            Data::OctetString(b) | Data::VisibleString(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an array or structure.
    pub fn as_list(&self) -> Option<&[Data]> {
        match self {
            Data::Array(v) | Data::Structure(v) => Some(v),
            _ => None,
        }
    }

    /// A date-time, whether sent as its own type or (as COSEM attributes usually are) as a
    /// 12-byte octet string.
    pub fn as_date_time(&self) -> Option<DateTime> {
        match self {
            Data::DateTime(d) => Some(*d),
            Data::OctetString(b) if b.len() == 12 => DateTime::decode(b).ok(),
            _ => None,
        }
    }

    /// Decodes one value from the front of `r`.
    pub fn decode(r: &mut Reader<'_>) -> Result<Data, DecodeError> {
        decode_at(r, 0)
    }

    /// Decodes exactly one value filling `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Data, DecodeError> {
        let mut r = Reader::new(bytes);
        let d = Data::decode(&mut r)?;
        if !r.is_empty() {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        Ok(d)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Data::Null => out.push(tag::NULL),
            Data::Array(v) | Data::Structure(v) => {
                out.push(if matches!(self, Data::Array(_)) {
                    tag::ARRAY
                } else {
                    tag::STRUCTURE
                });
                put_length(out, v.len());
                for d in v {
                    d.encode(out);
                }
            }
            Data::Boolean(b) => out.extend_from_slice(&[tag::BOOLEAN, u8::from(*b)]),
            Data::BitString { bits, bytes } => {
                out.push(tag::BIT_STRING);
                put_length(out, *bits);
                out.extend_from_slice(bytes);
            }
            Data::Int32(v) => {
                out.push(tag::INT32);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::UInt32(v) => {
                out.push(tag::UINT32);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::OctetString(b) | Data::VisibleString(b) => {
                out.push(if matches!(self, Data::OctetString(_)) {
                    tag::OCTET_STRING
                } else {
                    tag::VISIBLE_STRING
                });
                put_length(out, b.len());
                out.extend_from_slice(b);
            }
            Data::Utf8String(s) => {
                out.push(tag::UTF8_STRING);
                put_length(out, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Data::Bcd(v) => out.extend_from_slice(&[tag::BCD, *v]),
            Data::Int8(v) => out.extend_from_slice(&[tag::INT8, *v as u8]),
            Data::Int16(v) => {
                out.push(tag::INT16);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::UInt8(v) => out.extend_from_slice(&[tag::UINT8, *v]),
            Data::UInt16(v) => {
                out.push(tag::UINT16);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::Int64(v) => {
                out.push(tag::INT64);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::UInt64(v) => {
                out.push(tag::UINT64);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::Enum(v) => out.extend_from_slice(&[tag::ENUM, *v]),
            Data::Float32(v) => {
                out.push(tag::FLOAT32);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::Float64(v) => {
                out.push(tag::FLOAT64);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Data::DateTime(d) => {
                out.push(tag::DATE_TIME);
                out.extend_from_slice(&d.encode());
            }
            Data::Date(d) => {
                out.push(tag::DATE);
                out.extend_from_slice(&d.encode());
            }
            Data::Time(t) => {
                out.push(tag::TIME);
                out.extend_from_slice(&t.encode());
            }
            Data::DontCare => out.push(tag::DONT_CARE),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

fn decode_at(r: &mut Reader<'_>, depth: usize) -> Result<Data, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let at = r.pos();
    let t = r.u8()?;
    decode_body(r, t, at, depth)
}

fn decode_body(r: &mut Reader<'_>, t: u8, at: usize, depth: usize) -> Result<Data, DecodeError> {
    Ok(match t {
        tag::NULL => Data::Null,
        tag::ARRAY | tag::STRUCTURE => {
            // Every element is at least its one tag byte.
            let n = r.count(1)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(decode_at(r, depth + 1)?);
            }
            if t == tag::ARRAY {
                Data::Array(v)
            } else {
                Data::Structure(v)
            }
        }
        tag::BOOLEAN => Data::Boolean(r.u8()? != 0),
        tag::BIT_STRING => {
            let bits = r.length()?;
            let bytes = r.take(bits.div_ceil(8))?.to_vec();
            Data::BitString { bits, bytes }
        }
        tag::INT32 => Data::Int32(r.u32()? as i32),
        tag::UINT32 => Data::UInt32(r.u32()?),
        tag::OCTET_STRING | tag::VISIBLE_STRING | tag::UTF8_STRING => {
            let n = r.length()?;
            let b = r.take(n)?;
            match t {
                tag::OCTET_STRING => Data::OctetString(b.to_vec()),
                tag::VISIBLE_STRING => Data::VisibleString(b.to_vec()),
                _ => Data::Utf8String(String::from_utf8(b.to_vec()).map_err(|_| {
                    DecodeError::Invalid {
                        what: "utf8-string",
                        at,
                    }
                })?),
            }
        }
        tag::BCD => Data::Bcd(r.u8()?),
        tag::INT8 => Data::Int8(r.u8()? as i8),
        tag::INT16 => Data::Int16(r.u16()? as i16),
        tag::UINT8 => Data::UInt8(r.u8()?),
        tag::UINT16 => Data::UInt16(r.u16()?),
        tag::COMPACT_ARRAY => compact_array(r, depth)?,
        tag::INT64 => Data::Int64(r.u64()? as i64),
        tag::UINT64 => Data::UInt64(r.u64()?),
        tag::ENUM => Data::Enum(r.u8()?),
        tag::FLOAT32 => Data::Float32(f32::from_be_bytes(r.array()?)),
        tag::FLOAT64 => Data::Float64(f64::from_be_bytes(r.array()?)),
        tag::DATE_TIME => Data::DateTime(DateTime::decode(r.take(12)?)?),
        tag::DATE => Data::Date(Date::decode(r.take(5)?)),
        tag::TIME => Data::Time(Time::decode(r.take(4)?)),
        tag::DONT_CARE => Data::DontCare,
        _ => return Err(DecodeError::UnknownTag { tag: t, at }),
    })
}

/// The type description of a compact array's elements.
#[derive(Clone, Debug, PartialEq)]
enum TypeDesc {
    Simple(u8),
    Array(u16, Box<TypeDesc>),
    Structure(Vec<TypeDesc>),
}

fn type_desc(r: &mut Reader<'_>, depth: usize) -> Result<TypeDesc, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let at = r.pos();
    Ok(match r.u8()? {
        tag::ARRAY => {
            let n = r.u16()?;
            TypeDesc::Array(n, Box::new(type_desc(r, depth + 1)?))
        }
        tag::STRUCTURE => {
            let n = r.count(1)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(type_desc(r, depth + 1)?);
            }
            TypeDesc::Structure(v)
        }
        tag::COMPACT_ARRAY => {
            return Err(DecodeError::Invalid {
                what: "compact-array inside a compact-array",
                at,
            });
        }
        t @ (tag::NULL..=tag::UINT32
        | tag::OCTET_STRING..=tag::UINT16
        | tag::INT64..=tag::TIME
        | tag::DONT_CARE) => TypeDesc::Simple(t),
        t => return Err(DecodeError::UnknownTag { tag: t, at }),
    })
}

fn untagged(r: &mut Reader<'_>, desc: &TypeDesc, depth: usize) -> Result<Data, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    match desc {
        TypeDesc::Simple(t) => {
            let at = r.pos();
            decode_body(r, *t, at, depth)
        }
        TypeDesc::Array(n, inner) => {
            let n = usize::from(*n);
            if n > r.remaining() {
                return Err(r.invalid("compact-array element count"));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(untagged(r, inner, depth + 1)?);
            }
            Ok(Data::Array(v))
        }
        TypeDesc::Structure(fields) => {
            let mut v = Vec::with_capacity(fields.len());
            for f in fields {
                v.push(untagged(r, f, depth + 1)?);
            }
            Ok(Data::Structure(v))
        }
    }
}

/// A compact array (tag 19): a type description, then the elements' contents without tags.
/// Decoded into an ordinary array.
fn compact_array(r: &mut Reader<'_>, depth: usize) -> Result<Data, DecodeError> {
    let desc = type_desc(r, depth + 1)?;
    let len = r.length()?;
    let contents = r.take(len)?;
    let mut inner = Reader::new(contents);
    let mut v = Vec::new();
    while !inner.is_empty() {
        let before = inner.remaining();
        v.push(untagged(&mut inner, &desc, depth + 1)?);
        if inner.remaining() == before {
            // Zero-width elements (null, an empty structure) would loop for ever.
            return Err(DecodeError::Invalid {
                what: "compact-array of zero-width elements",
                at: r.pos(),
            });
        }
    }
    Ok(Data::Array(v))
}

/// Clock status bits (IEC 62056-6-2, 4.1.6.1).
pub mod clock_status {
    pub const INVALID: u8 = 0x01;
    pub const DOUBTFUL: u8 = 0x02;
    pub const DIFFERENT_BASE: u8 = 0x04;
    pub const INVALID_STATUS: u8 = 0x08;
    pub const DAYLIGHT_SAVING: u8 = 0x80;
}

/// A COSEM date (5 bytes): year (0xFFFF not specified), month, day of month, day of week.
/// 0xFF in a field is "not specified"; month 0xFD/0xFE and day 0xFD/0xFE are the DST and
/// last-day wildcards, kept as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub weekday: u8,
}

impl Date {
    pub fn decode(b: &[u8]) -> Date {
        Date {
            year: u16::from_be_bytes([b[0], b[1]]),
            month: b[2],
            day: b[3],
            weekday: b[4],
        }
    }
    pub fn encode(&self) -> [u8; 5] {
        let y = self.year.to_be_bytes();
        [y[0], y[1], self.month, self.day, self.weekday]
    }
}

/// A COSEM time (4 bytes): hour, minute, second, hundredths; 0xFF not specified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub hundredths: u8,
}

impl Time {
    pub fn decode(b: &[u8]) -> Time {
        Time {
            hour: b[0],
            minute: b[1],
            second: b[2],
            hundredths: b[3],
        }
    }
    pub fn encode(&self) -> [u8; 4] {
        [self.hour, self.minute, self.second, self.hundredths]
    }
}

/// "Deviation not specified" (0x8000).
pub const DEVIATION_UNSPECIFIED: i16 = i16::MIN;

/// A COSEM date-time (12 bytes): date, time, deviation, clock status.
///
/// The deviation is minutes from local time to UTC as the Blue Book has it: UTC = local +
/// deviation, so a meter on CET (UTC+01:00) sends -60. [`DateTime::to_timestamp`] follows that
/// reading. 0x8000 is "not specified".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub date: Date,
    pub time: Time,
    pub deviation: i16,
    /// [`clock_status`] bits; 0xFF not specified.
    pub status: u8,
}

impl DateTime {
    pub fn decode(b: &[u8]) -> Result<DateTime, DecodeError> {
        if b.len() != 12 {
            return Err(DecodeError::Invalid {
                what: "date-time length",
                at: 0,
            });
        }
        Ok(DateTime {
            date: Date::decode(&b[0..5]),
            time: Time::decode(&b[5..9]),
            deviation: i16::from_be_bytes([b[9], b[10]]),
            status: b[11],
        })
    }

    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[0..5].copy_from_slice(&self.date.encode());
        out[5..9].copy_from_slice(&self.time.encode());
        out[9..11].copy_from_slice(&self.deviation.to_be_bytes());
        out[11] = self.status;
        out
    }

    /// The date-time of `ts` in UTC, deviation 0, with clock status `status` — what a client
    /// sends as the bounds of a profile range.
    pub fn from_timestamp_utc(ts: jiff::Timestamp, status: u8) -> DateTime {
        let dt = ts.to_zoned(jiff::tz::TimeZone::UTC).datetime();
        DateTime {
            date: Date {
                year: dt.year() as u16,
                month: dt.month() as u8,
                day: dt.day() as u8,
                weekday: dt.weekday().to_monday_one_offset() as u8,
            },
            time: Time {
                hour: dt.hour() as u8,
                minute: dt.minute() as u8,
                second: dt.second() as u8,
                hundredths: 0,
            },
            deviation: 0,
            status,
        }
    }

    /// The instant, when the date-time names one: all fields specified and in range. Without a
    /// deviation the local time is taken in `fallback`, the zone the meter is configured in.
    /// Hundredths of 0xFF count as 0.
    pub fn to_timestamp(&self, fallback: &jiff::tz::TimeZone) -> Option<jiff::Timestamp> {
        let d = self.date;
        let t = self.time;
        if d.year == 0xFFFF || d.month > 12 || d.day > 31 || t.hour > 23 || t.minute > 59 {
            return None;
        }
        if t.second > 59 {
            return None;
        }
        let hundredths = if t.hundredths == 0xFF {
            0
        } else if t.hundredths > 99 {
            return None;
        } else {
            t.hundredths
        };
        let civil = jiff::civil::DateTime::new(
            i16::try_from(d.year).ok()?,
            i8::try_from(d.month).ok()?,
            i8::try_from(d.day).ok()?,
            t.hour as i8,
            t.minute as i8,
            t.second as i8,
            i32::from(hundredths) * 10_000_000,
        )
        .ok()?;
        if self.deviation == DEVIATION_UNSPECIFIED {
            return civil.to_zoned(fallback.clone()).ok().map(|z| z.timestamp());
        }
        if !(-720..=840).contains(&self.deviation) {
            return None;
        }
        let offset = jiff::tz::Offset::from_seconds(-i32::from(self.deviation) * 60).ok()?;
        offset.to_timestamp(civil).ok()
    }

    /// The meter says its clock is not to be trusted.
    pub fn clock_invalid(&self) -> bool {
        self.status != 0xFF
            && self.status & (clock_status::INVALID | clock_status::INVALID_STATUS) != 0
    }
}

impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.date;
        let t = self.time;
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} dev {} status {:#04x}",
            d.year, d.month, d.day, t.hour, t.minute, t.second, self.deviation, self.status
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_lengths_should_round_trip() {
        for len in [0usize, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000] {
            let mut out = Vec::new();
            put_length(&mut out, len);
            assert_eq!(Reader::new(&out).length().unwrap(), len);
        }
    }

    #[test]
    fn register_value_and_scaler_unit_should_decode() {
        // double-long-unsigned 1234567, then structure { integer -3, enum 30 (Wh) }
        let d = Data::from_bytes(&[0x06, 0x00, 0x12, 0xD6, 0x87]).unwrap();
        assert_eq!(d, Data::UInt32(1_234_567));
        let s = Data::from_bytes(&[0x02, 0x02, 0x0F, 0xFD, 0x16, 0x1E]).unwrap();
        assert_eq!(s, Data::Structure(vec![Data::Int8(-3), Data::Enum(30)]));
    }

    #[test]
    fn date_time_of_a_cet_meter_should_be_its_utc_instant() {
        // 2019-12-19 (Thursday) 02:00:00, deviation -60 (CET), status 0.
        let b = [
            0x07, 0xE3, 0x0C, 0x13, 0x04, 0x02, 0x00, 0x00, 0x00, 0xFF, 0xC4, 0x00,
        ];
        let dt = DateTime::decode(&b).unwrap();
        assert_eq!(dt.deviation, -60);
        let ts = dt.to_timestamp(&jiff::tz::TimeZone::UTC).unwrap();
        assert_eq!(ts.to_string(), "2019-12-19T01:00:00Z");
        assert_eq!(dt.encode(), b);
    }

    #[test]
    fn unspecified_fields_should_name_no_instant() {
        let mut b = [0xFFu8; 12];
        b[9] = 0x80;
        b[10] = 0x00;
        assert!(
            DateTime::decode(&b)
                .unwrap()
                .to_timestamp(&jiff::tz::TimeZone::UTC)
                .is_none()
        );
    }

    #[test]
    fn compact_array_of_structures_should_decode_as_array() {
        // compact-array, type: structure { long-unsigned, integer }, contents: 2 elements.
        let b = [
            0x13, 0x02, 0x02, 0x12, 0x0F, 0x06, 0x00, 0x01, 0xFF, 0x00, 0x02, 0x05,
        ];
        let d = Data::from_bytes(&b).unwrap();
        assert_eq!(
            d,
            Data::Array(vec![
                Data::Structure(vec![Data::UInt16(1), Data::Int8(-1)]),
                Data::Structure(vec![Data::UInt16(2), Data::Int8(5)]),
            ])
        );
    }

    #[test]
    fn huge_claimed_array_should_be_truncated_not_allocated() {
        let b = [0x01, 0x84, 0xFF, 0xFF, 0xFF, 0xFF, 0x00];
        assert!(matches!(
            Data::from_bytes(&b),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn deep_nesting_should_be_refused() {
        let b = [0x01, 0x01].repeat(100);
        assert!(Data::from_bytes(&b).is_err());
    }

    #[test]
    fn unknown_tag_should_be_typed() {
        assert_eq!(
            Data::from_bytes(&[0x07]),
            Err(DecodeError::UnknownTag { tag: 7, at: 0 })
        );
    }

    fn leaf() -> impl Strategy<Value = Data> {
        prop_oneof![
            Just(Data::Null),
            any::<bool>().prop_map(Data::Boolean),
            any::<i8>().prop_map(Data::Int8),
            any::<i16>().prop_map(Data::Int16),
            any::<i32>().prop_map(Data::Int32),
            any::<i64>().prop_map(Data::Int64),
            any::<u8>().prop_map(Data::UInt8),
            any::<u16>().prop_map(Data::UInt16),
            any::<u32>().prop_map(Data::UInt32),
            any::<u64>().prop_map(Data::UInt64),
            any::<u8>().prop_map(Data::Enum),
            any::<u8>().prop_map(Data::Bcd),
            any::<u32>().prop_map(|b| Data::Float32(f32::from_bits(b & 0x7F7F_FFFF))),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Data::OctetString),
            "[ -~]{0,20}".prop_map(|s| Data::VisibleString(s.into_bytes())),
            "\\PC{0,10}".prop_map(Data::Utf8String),
            (0usize..40).prop_map(|bits| Data::BitString {
                bits,
                bytes: vec![0xA5; bits.div_ceil(8)]
            }),
            any::<[u8; 12]>().prop_map(|b| Data::DateTime(DateTime::decode(&b).unwrap())),
            any::<[u8; 5]>().prop_map(|b| Data::Date(Date::decode(&b))),
            any::<[u8; 4]>().prop_map(|b| Data::Time(Time::decode(&b))),
            Just(Data::DontCare),
        ]
    }

    fn data() -> impl Strategy<Value = Data> {
        leaf().prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Data::Array),
                proptest::collection::vec(inner, 0..8).prop_map(Data::Structure),
            ]
        })
    }

    proptest! {
        #[test]
        fn encoded_data_should_decode_to_itself(d in data()) {
            prop_assert_eq!(Data::from_bytes(&d.to_bytes()).unwrap(), d);
        }

        #[test]
        fn arbitrary_bytes_should_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Data::from_bytes(&b);
        }

        #[test]
        fn truncated_data_should_fail_not_panic(d in data(), cut in 0usize..1000) {
            let b = d.to_bytes();
            let cut = cut % b.len().max(1);
            if cut < b.len() {
                prop_assert!(Data::from_bytes(&b[..cut]).is_err());
            }
        }

        #[test]
        fn bit_flips_should_never_panic(d in data(), i in any::<usize>(), bit in 0u8..8) {
            let mut b = d.to_bytes();
            let n = b.len();
            b[i % n] ^= 1 << bit;
            let _ = Data::from_bytes(&b);
        }
    }
}
