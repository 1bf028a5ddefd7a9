//! The application layer (EN 13757-3): the RSP_UD's CI field, its data header, and the
//! variable data structure's records — DIB (DIF, DIFEs), VIB (VIF, VIFEs), data — decoded
//! without allocating: a [`Telegram`] borrows the frame's bytes and its [`Record`]s borrow
//! their data. Values are exact: integers and BCD become `mantissa × 10^exponent` with the
//! VIF's multiplier applied in decimal ([`Number`]); only the standard's 32-bit real is a
//! float.
//!
//! # CI fields understood
//!
//! | CI | meaning |
//! |---|---|
//! | `72` | variable data, long header (id, manufacturer, version, medium, access, status, signature) |
//! | `76` | the same, mode 2 (multi-byte data most significant byte first) |
//! | `7A` | variable data, short header (access, status, signature) |
//! | `78` | variable data, no header |
//! | `73`, `77` | fixed data structure (EN 1434-3): two counters |
//! | `70` | application error report from the slave ([`AppError::Application`]) |
//!
//! # Records
//!
//! `DIF [DIFE…] VIF [VIFE…] data`. The DIF gives the data field type (bits 0–3), the function
//! (instantaneous, maximum, minimum, during error; bits 4–5) and the storage number's first
//! bit (bit 6); each DIFE adds four bits of storage number, two of tariff and one of subunit.
//! DIF `2F` is a filler, `0F`/`1F` start manufacturer-specific data up to the end of the
//! telegram (`1F`: more records follow in the next telegram). At most 10 DIFEs and 10 VIFEs
//! (the standard's limit; more is an error, as libmbus and the meters' error codes have it).

use super::vif::{self, Meaning, Quantity, TimeKind};
use crate::reading::{Decimal, DecimalError};

/// Most DIFEs (and VIFEs) a record may have.
pub const MAX_EXTENSIONS: usize = 10;

/// Why a telegram cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    #[error("the frame is a {0}, not an RSP_UD long frame")]
    NotUserData(&'static str),
    #[error("CI field {0:#04x} is not a variable or fixed data answer")]
    UnsupportedCi(u8),
    #[error("the slave reports an application error: {0}")]
    Application(ApplicationError),
    #[error("the data header needs {need} bytes, the telegram has {got}")]
    ShortHeader { need: usize, got: usize },
    #[error("record at byte {at}: the telegram ends inside its DIF/DIFEs")]
    EndInDib { at: usize },
    #[error("record at byte {at}: more than 10 DIFEs")]
    TooManyDifes { at: usize },
    #[error("record at byte {at}: the telegram ends inside its VIF/VIFEs")]
    EndInVib { at: usize },
    #[error("record at byte {at}: more than 10 VIFEs")]
    TooManyVifes { at: usize },
    #[error("record at byte {at}: the plain-text unit of {len} bytes runs past the telegram")]
    PlainTextTooLong { at: usize, len: usize },
    #[error("record at byte {at}: needs {need} data bytes, {got} left")]
    EndInData { at: usize, need: usize, got: usize },
    #[error("record at byte {at}: DIF {dif:#04x} is reserved")]
    ReservedDif { at: usize, dif: u8 },
    #[error("record at byte {at}: variable length byte {lvar:#04x} is reserved")]
    ReservedLvar { at: usize, lvar: u8 },
}

/// The slave's own error report (CI `70`), EN 13757-3 Table 24 / libmbus codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplicationError {
    Unspecified,
    UnimplementedCi,
    BufferTooLong,
    TooManyRecords,
    PrematureEndOfRecord,
    TooManyDifes,
    TooManyVifes,
    Reserved(u8),
    ApplicationBusy,
    TooManyReadouts,
}

impl ApplicationError {
    fn from_code(code: Option<u8>) -> Self {
        match code {
            None | Some(0) => ApplicationError::Unspecified,
            Some(1) => ApplicationError::UnimplementedCi,
            Some(2) => ApplicationError::BufferTooLong,
            Some(3) => ApplicationError::TooManyRecords,
            Some(4) => ApplicationError::PrematureEndOfRecord,
            Some(5) => ApplicationError::TooManyDifes,
            Some(6) => ApplicationError::TooManyVifes,
            Some(8) => ApplicationError::ApplicationBusy,
            Some(9) => ApplicationError::TooManyReadouts,
            Some(c) => ApplicationError::Reserved(c),
        }
    }
}

impl std::fmt::Display for ApplicationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplicationError::Unspecified => f.write_str("unspecified error"),
            ApplicationError::UnimplementedCi => f.write_str("unimplemented CI field"),
            ApplicationError::BufferTooLong => f.write_str("buffer too long, truncated"),
            ApplicationError::TooManyRecords => f.write_str("too many records"),
            ApplicationError::PrematureEndOfRecord => f.write_str("premature end of record"),
            ApplicationError::TooManyDifes => f.write_str("more than 10 DIFEs"),
            ApplicationError::TooManyVifes => f.write_str("more than 10 VIFEs"),
            ApplicationError::Reserved(c) => write!(f, "reserved error code {c}"),
            ApplicationError::ApplicationBusy => f.write_str("application busy"),
            ApplicationError::TooManyReadouts => f.write_str("too many readouts"),
        }
    }
}

/// The identity in a long header — and a secondary address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The identification number, 8 BCD digits, as sent (least significant byte first).
    pub id: [u8; 4],
    /// Three letters packed in 15 bits (`((c1-64)·32 + (c2-64))·32 + (c3-64)`).
    pub manufacturer: u16,
    pub version: u8,
    pub medium: u8,
}

impl Identity {
    /// The identification number as its 8 digits (`"12345678"`); a non-decimal nibble is
    /// written as its hex digit.
    pub fn id_string(&self) -> String {
        let mut s = String::with_capacity(8);
        for b in self.id.iter().rev() {
            for nib in [b >> 4, b & 0x0F] {
                s.push(char::from_digit(u32::from(nib), 16).unwrap_or('?'));
            }
        }
        s.to_ascii_uppercase()
    }

    /// The manufacturer's three letters (`"KAM"`).
    pub fn manufacturer_code(&self) -> [u8; 3] {
        manufacturer_letters(self.manufacturer)
    }

    /// The manufacturer's three letters as a string.
    pub fn manufacturer_str(&self) -> String {
        self.manufacturer_code()
            .iter()
            .map(|&c| char::from(c))
            .collect()
    }
}

/// Unpacks the manufacturer code's three letters.
pub fn manufacturer_letters(m: u16) -> [u8; 3] {
    let l = |shift: u16| (((m >> shift) & 0x1F) as u8).wrapping_add(64);
    [l(10), l(5), l(0)]
}

/// Packs three letters (`b"KAM"`) into the manufacturer code.
pub fn manufacturer_code(letters: [u8; 3]) -> u16 {
    letters.iter().fold(0u16, |acc, &c| {
        (acc << 5) | u16::from(c.to_ascii_uppercase().wrapping_sub(64) & 0x1F)
    })
}

/// The data header after the CI field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Long header only.
    pub identity: Option<Identity>,
    pub access: u8,
    pub status: u8,
    pub signature: u16,
}

/// How the body is structured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Variable,
    /// Fixed data structure (CI 73/77): two counters.
    Fixed,
}

/// One decoded RSP_UD's user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Telegram<'a> {
    pub ci: u8,
    /// `None` for CI 78.
    pub header: Option<Header>,
    body: &'a [u8],
    kind: Body,
    /// CI 76: multi-byte fields most significant byte first.
    msb_first: bool,
    /// Where the records end (the manufacturer data or the telegram's end).
    records_end: usize,
    /// Bytes after DIF `0F`/`1F`.
    pub manufacturer_data: Option<&'a [u8]>,
    /// DIF `1F`: the slave has more records in its next telegram.
    pub more_follows: bool,
}

impl<'a> Telegram<'a> {
    /// Decodes an RSP_UD frame from [`super::link::parse`].
    pub fn from_frame(frame: super::link::Frame<'a>) -> Result<Self, AppError> {
        match frame {
            super::link::Frame::Long { ci, data, .. } if frame.is_rsp_ud() => {
                Telegram::parse(ci, data)
            }
            f => Err(AppError::NotUserData(f.kind())),
        }
    }

    /// Decodes the user data after the CI field, checking every record. After this, every
    /// record of [`Telegram::records`] is known to decode.
    pub fn parse(ci: u8, data: &'a [u8]) -> Result<Self, AppError> {
        let (header, kind, msb_first, header_len) = match ci {
            0x72 | 0x76 => (Some(long_header(data)?), Body::Variable, ci == 0x76, 12),
            0x7A => (Some(short_header(data)?), Body::Variable, false, 4),
            0x78 => (None, Body::Variable, false, 0),
            0x73 | 0x77 => {
                if data.len() < 16 {
                    return Err(AppError::ShortHeader {
                        need: 16,
                        got: data.len(),
                    });
                }
                let header = Header {
                    identity: None,
                    access: data[4],
                    status: data[5],
                    signature: 0,
                };
                (Some(header), Body::Fixed, ci == 0x77, 0)
            }
            0x70 => {
                return Err(AppError::Application(ApplicationError::from_code(
                    data.first().copied(),
                )));
            }
            _ => return Err(AppError::UnsupportedCi(ci)),
        };
        let body = &data[header_len..];
        let mut t = Telegram {
            ci,
            header,
            body,
            kind,
            msb_first,
            records_end: body.len(),
            manufacturer_data: None,
            more_follows: false,
        };
        if kind == Body::Variable {
            let mut at = 0;
            loop {
                match next_record(body, at, msb_first)? {
                    Next::Record(_, next) => at = next,
                    Next::Manufacturer { at: start, more } => {
                        t.records_end = start;
                        t.manufacturer_data = Some(&body[start + 1..]);
                        t.more_follows = more;
                        break;
                    }
                    Next::End => break,
                }
            }
        }
        Ok(t)
    }

    /// The identity in a long header.
    pub fn identity(&self) -> Option<Identity> {
        self.header.and_then(|h| h.identity)
    }

    /// The fixed data structure's identity and medium (CI 73): id and medium, no manufacturer.
    pub fn fixed_medium(&self) -> Option<u8> {
        if self.kind != Body::Fixed {
            return None;
        }
        Some((self.body[6] >> 6) | ((self.body[7] >> 6) << 2))
    }

    /// The fixed structure's identification number, as sent.
    pub fn fixed_id(&self) -> Option<[u8; 4]> {
        if self.kind != Body::Fixed {
            return None;
        }
        Some([self.body[0], self.body[1], self.body[2], self.body[3]])
    }

    /// The records, in order. Allocation-free; each borrows the telegram.
    pub fn records(&self) -> Records<'a> {
        Records {
            body: &self.body[..self.records_end],
            at: 0,
            msb_first: self.msb_first,
            fixed: self.kind == Body::Fixed,
        }
    }
}

fn long_header(data: &[u8]) -> Result<Header, AppError> {
    if data.len() < 12 {
        return Err(AppError::ShortHeader {
            need: 12,
            got: data.len(),
        });
    }
    Ok(Header {
        identity: Some(Identity {
            id: [data[0], data[1], data[2], data[3]],
            manufacturer: u16::from_le_bytes([data[4], data[5]]),
            version: data[6],
            medium: data[7],
        }),
        access: data[8],
        status: data[9],
        signature: u16::from_le_bytes([data[10], data[11]]),
    })
}

fn short_header(data: &[u8]) -> Result<Header, AppError> {
    if data.len() < 4 {
        return Err(AppError::ShortHeader {
            need: 4,
            got: data.len(),
        });
    }
    Ok(Header {
        identity: None,
        access: data[0],
        status: data[1],
        signature: u16::from_le_bytes([data[2], data[3]]),
    })
}

/// What a DIF's function bits say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    Instantaneous,
    Maximum,
    Minimum,
    DuringError,
}

impl Function {
    pub fn name(self) -> &'static str {
        match self {
            Function::Instantaneous => "Instantaneous value",
            Function::Maximum => "Maximum value",
            Function::Minimum => "Minimum value",
            Function::DuringError => "Value during error state",
        }
    }
}

/// The data field's coding (DIF bits 0–3), with a variable length resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    NoData,
    /// Integer of this many bytes (1, 2, 3, 4, 6, 8), two's complement.
    Int(u8),
    Real,
    /// BCD of this many digits (2–12, or more in a variable-length field).
    Bcd(u8),
    /// Negative BCD of a variable-length field (LVAR D0–D9).
    NegativeBcd(u8),
    /// Selection for readout (DIF x8): no data.
    Selection,
    /// Variable length: text (LVAR 00–BF), characters last-first on the wire.
    Text,
    /// Variable length binary number (LVAR E0–EF), unsigned.
    Binary,
    /// Variable length raw bytes (LVAR F0–F6).
    Bytes,
}

/// A record's unit: from the tables, or a plain-text VIF's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit<'a> {
    Standard(&'static str),
    /// Plain-text VIF (`FC`): the ASCII as on the wire (last character first).
    Text(&'a [u8]),
}

impl std::fmt::Display for Unit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Standard(s) => f.write_str(s),
            Unit::Text(t) => {
                for &c in t.iter().rev() {
                    write!(f, "{}", char::from(c))?;
                }
                Ok(())
            }
        }
    }
}

/// One data record, borrowing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Offset of its DIF in the telegram body.
    pub at: usize,
    pub function: Function,
    pub storage: u64,
    pub tariff: u32,
    pub subunit: u32,
    pub coding: Coding,
    /// The DIB and VIB as on the wire (DIF, DIFEs, VIF, VIFEs, plain text).
    pub dib: &'a [u8],
    pub vib: &'a [u8],
    pub meaning: Meaning,
    pub unit: Unit<'a>,
    /// The data bytes (without an LVAR byte).
    pub data: &'a [u8],
    msb_first: bool,
}

/// A number, exactly: `mantissa × 10^exponent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Number {
    pub mantissa: i128,
    pub exponent: i32,
}

impl Number {
    pub fn to_decimal(self) -> Result<Decimal, DecimalError> {
        Decimal::from_scaled(self.mantissa, self.exponent)
    }
}

/// A record's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// Integers and BCD, multiplier applied.
    Number(Number),
    /// The 32-bit real and its decimal multiplier.
    Real {
        value: f32,
        exponent: i32,
    },
    Time(DateTime),
    /// Variable-length text, last character first as on the wire.
    Text(&'a [u8]),
    /// Variable-length binary data, kept raw.
    Bytes(&'a [u8]),
    /// BCD with a non-decimal digit (meters use `A`–`E` for error states); raw.
    InvalidBcd(&'a [u8]),
    /// No data, or a selection for readout.
    Empty,
}

impl Value<'_> {
    /// The value as an exact decimal, for numbers and reals.
    pub fn to_decimal(&self) -> Option<Decimal> {
        match *self {
            Value::Number(n) => n.to_decimal().ok(),
            Value::Real { value, exponent } => Decimal::from_f32(value)
                .ok()
                .and_then(|d| d.shift(exponent).ok()),
            _ => None,
        }
    }

    /// Text as written (characters in reading order).
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Text(t) => Some(t.iter().rev().map(|&c| char::from(c)).collect()),
            _ => None,
        }
    }
}

/// Date and time of types G (date), F (date and minutes), I (with seconds), J (time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// Type G (date only), F, I or J.
    pub kind: char,
    /// The IV bit: the meter says this time is not valid.
    pub invalid: bool,
    /// The SU bit: summer time.
    pub summer: bool,
}

impl DateTime {
    fn year(yy: u8, hundreds: u8) -> u16 {
        let yy = u16::from(yy);
        if hundreds != 0 {
            1900 + 100 * u16::from(hundreds) + yy
        } else if yy <= 80 {
            // Meters from before the century bits existed mean 2000-2080.
            2000 + yy
        } else {
            1900 + yy
        }
    }

    /// Type G, 16 bits.
    pub fn type_g(b: [u8; 2]) -> Self {
        let yy = ((b[0] & 0xE0) >> 5) | ((b[1] & 0xF0) >> 1);
        DateTime {
            year: Self::year(yy, 0),
            month: b[1] & 0x0F,
            day: b[0] & 0x1F,
            hour: 0,
            minute: 0,
            second: 0,
            kind: 'G',
            invalid: false,
            summer: false,
        }
    }

    /// Type F, 32 bits.
    pub fn type_f(b: [u8; 4]) -> Self {
        let yy = ((b[2] & 0xE0) >> 5) | ((b[3] & 0xF0) >> 1);
        DateTime {
            year: Self::year(yy, (b[1] >> 5) & 3),
            month: b[3] & 0x0F,
            day: b[2] & 0x1F,
            hour: b[1] & 0x1F,
            minute: b[0] & 0x3F,
            second: 0,
            kind: 'F',
            invalid: b[0] & 0x80 != 0,
            summer: b[1] & 0x80 != 0,
        }
    }

    /// Type I, 48 bits.
    pub fn type_i(b: [u8; 6]) -> Self {
        let yy = ((b[3] & 0xE0) >> 5) | ((b[4] & 0xF0) >> 1);
        DateTime {
            year: Self::year(yy, 0),
            month: b[4] & 0x0F,
            day: b[3] & 0x1F,
            hour: b[2] & 0x1F,
            minute: b[1] & 0x3F,
            second: b[0] & 0x3F,
            kind: 'I',
            invalid: b[1] & 0x80 != 0,
            summer: b[2] & 0x40 != 0,
        }
    }

    /// Type J, 24 bits (time of day).
    pub fn type_j(b: [u8; 3]) -> Self {
        DateTime {
            year: 0,
            month: 0,
            day: 0,
            hour: b[2] & 0x1F,
            minute: b[1] & 0x3F,
            second: b[0] & 0x3F,
            kind: 'J',
            invalid: false,
            summer: false,
        }
    }

    /// The calendar date and time, if it is one (a valid, non-zero date).
    pub fn civil(&self) -> Option<jiff::civil::DateTime> {
        if self.invalid || self.kind == 'J' {
            return None;
        }
        jiff::civil::DateTime::new(
            i16::try_from(self.year).ok()?,
            i8::try_from(self.month).ok()?,
            i8::try_from(self.day).ok()?,
            i8::try_from(self.hour).ok()?,
            i8::try_from(self.minute).ok()?,
            i8::try_from(self.second).ok()?,
            0,
        )
        .ok()
    }
}

impl std::fmt::Display for DateTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            'G' => write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day),
            'J' => write!(f, "{:02}:{:02}:{:02}", self.hour, self.minute, self.second),
            _ => write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                self.year, self.month, self.day, self.hour, self.minute, self.second
            ),
        }
    }
}

impl<'a> Record<'a> {
    /// Decodes the data. Never fails: data that are not a number (BCD with error digits,
    /// variable-length bytes) come back raw.
    pub fn value(&self) -> Value<'a> {
        let d = self.data;
        let exp = self.meaning.exponent;
        let mut buf = [0u8; 16];
        // Mode 2 (CI 76): reverse multi-byte fields into least significant first.
        let le: &[u8] = if self.msb_first && d.len() <= 16 {
            let b = &mut buf[..d.len()];
            b.copy_from_slice(d);
            b.reverse();
            b
        } else {
            d
        };
        match self.coding {
            Coding::NoData | Coding::Selection => Value::Empty,
            Coding::Int(n) => {
                if let Some(kind) = self.meaning.time {
                    if let Some(t) = time(kind, le) {
                        return Value::Time(t);
                    }
                }
                let _ = n;
                Value::Number(Number {
                    mantissa: signed_le(le),
                    exponent: exp,
                })
            }
            Coding::Real => {
                let v = f32::from_le_bytes([le[0], le[1], le[2], le[3]]);
                Value::Real {
                    value: v,
                    exponent: exp,
                }
            }
            Coding::Bcd(_) => match bcd(le, true) {
                Some(m) => Value::Number(Number {
                    mantissa: m,
                    exponent: exp,
                }),
                None => Value::InvalidBcd(d),
            },
            Coding::NegativeBcd(_) => match bcd(le, false) {
                Some(m) => Value::Number(Number {
                    mantissa: -m,
                    exponent: exp,
                }),
                None => Value::InvalidBcd(d),
            },
            Coding::Binary => {
                let m = le
                    .iter()
                    .rev()
                    .fold(0i128, |acc, &b| (acc << 8) | i128::from(b));
                Value::Number(Number {
                    mantissa: m,
                    exponent: exp,
                })
            }
            Coding::Text => Value::Text(d),
            Coding::Bytes => Value::Bytes(d),
        }
    }

    /// Whether the record's data are manufacturer specific (VIF `7F`/`FF`, or an `FF` VIFE).
    pub fn manufacturer_specific(&self) -> bool {
        self.meaning.quantity == Quantity::ManufacturerSpecific || self.meaning.manufacturer_vife
    }
}

fn time(kind: TimeKind, le: &[u8]) -> Option<DateTime> {
    match (kind, le.len()) {
        (_, 2) => Some(DateTime::type_g([le[0], le[1]])),
        (_, 3) => Some(DateTime::type_j([le[0], le[1], le[2]])),
        (_, 4) => Some(DateTime::type_f([le[0], le[1], le[2], le[3]])),
        (_, 6) => Some(DateTime::type_i([le[0], le[1], le[2], le[3], le[4], le[5]])),
        _ => None,
    }
}

/// Two's complement integer, least significant byte first (up to 16 bytes).
fn signed_le(b: &[u8]) -> i128 {
    if b.is_empty() {
        return 0;
    }
    let mut v: i128 = 0;
    for &x in b.iter().rev() {
        v = (v << 8) | i128::from(x);
    }
    let bits = 8 * b.len() as u32;
    if bits < 128 && b[b.len() - 1] & 0x80 != 0 {
        v -= 1i128 << bits;
    }
    v
}

/// BCD, least significant byte first. With `signed`, an `F` in the top nibble is a minus
/// sign (EN 13757-3 annex B). `None` for any other non-decimal digit.
fn bcd(b: &[u8], signed: bool) -> Option<i128> {
    let mut v: i128 = 0;
    let mut negative = false;
    for (i, &x) in b.iter().enumerate().rev() {
        for (j, nib) in [x >> 4, x & 0x0F].into_iter().enumerate() {
            let top = i == b.len() - 1 && j == 0;
            if nib > 9 {
                if signed && top && nib == 0x0F {
                    negative = true;
                    continue;
                }
                return None;
            }
            v = v * 10 + i128::from(nib);
        }
    }
    Some(if negative { -v } else { v })
}

/// The records of a telegram.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    body: &'a [u8],
    at: usize,
    msb_first: bool,
    fixed: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.fixed {
            return self.next_fixed();
        }
        // Telegram::parse checked every record, so an error cannot happen here; stop anyway.
        match next_record(self.body, self.at, self.msb_first) {
            Ok(Next::Record(r, next)) => {
                self.at = next;
                Some(r)
            }
            _ => {
                self.at = self.body.len();
                None
            }
        }
    }
}

impl<'a> Records<'a> {
    /// The fixed data structure's two counters (CI 73/77, EN 1434-3): counter 1 at offset
    /// 8, counter 2 at 12, units in bytes 6 and 7; status bit 7 clear: BCD.
    fn next_fixed(&mut self) -> Option<Record<'a>> {
        let i = match self.at {
            0 => 0,
            1 => 1,
            _ => return None,
        };
        self.at += 1;
        let b = self.body;
        let bcd = b[5] & 0x80 == 0;
        let meaning = vif::fixed_unit(b[6 + i]);
        let data = &b[8 + 4 * i..12 + 4 * i];
        Some(Record {
            at: 8 + 4 * i,
            function: Function::Instantaneous,
            storage: i as u64,
            tariff: 0,
            subunit: 0,
            coding: if bcd { Coding::Bcd(8) } else { Coding::Int(4) },
            dib: &[],
            vib: &b[6 + i..7 + i],
            meaning,
            unit: Unit::Standard(meaning.unit),
            data,
            msb_first: self.msb_first,
        })
    }
}

enum Next<'a> {
    Record(Record<'a>, usize),
    /// DIF 0F or 1F at this offset.
    Manufacturer {
        at: usize,
        more: bool,
    },
    End,
}

/// The record starting at or after `at` (after fillers).
fn next_record(body: &[u8], mut at: usize, msb_first: bool) -> Result<Next<'_>, AppError> {
    while body.get(at) == Some(&0x2F) {
        at += 1;
    }
    let start = at;
    let Some(&dif) = body.get(at) else {
        return Ok(Next::End);
    };
    match dif {
        0x0F | 0x1F => {
            return Ok(Next::Manufacturer {
                at,
                more: dif == 0x1F,
            });
        }
        // 3F-6F reserved; 7F global readout request (master to slave only).
        0x3F | 0x4F | 0x5F | 0x6F | 0x7F => {
            return Err(AppError::ReservedDif { at: start, dif });
        }
        _ => {}
    }
    at += 1;
    let mut storage = u64::from((dif >> 6) & 1);
    let mut tariff = 0u32;
    let mut subunit = 0u32;
    let mut ext = dif & 0x80 != 0;
    let mut n = 0;
    while ext {
        if n == MAX_EXTENSIONS {
            return Err(AppError::TooManyDifes { at: start });
        }
        let Some(&dife) = body.get(at) else {
            return Err(AppError::EndInDib { at: start });
        };
        at += 1;
        storage |= u64::from(dife & 0x0F) << (1 + 4 * n);
        tariff |= u32::from((dife >> 4) & 3) << (2 * n);
        subunit |= u32::from((dife >> 6) & 1) << n;
        ext = dife & 0x80 != 0;
        n += 1;
    }
    let dib_end = at;
    // VIB.
    let Some(&vif_byte) = body.get(at) else {
        return Err(AppError::EndInVib { at: start });
    };
    at += 1;
    let mut unit_text: Option<&[u8]> = None;
    let mut vifes = 0usize;
    let mut next_vife = |at: &mut usize| -> Result<u8, AppError> {
        if vifes == MAX_EXTENSIONS {
            return Err(AppError::TooManyVifes { at: start });
        }
        vifes += 1;
        let b = *body.get(*at).ok_or(AppError::EndInVib { at: start })?;
        *at += 1;
        Ok(b)
    };
    let mut meaning;
    let mut ext = vif_byte & 0x80 != 0;
    match vif_byte {
        0xFB | 0xFD => {
            let e = next_vife(&mut at)?;
            meaning = if vif_byte == 0xFB {
                vif::extension_fb(e)
            } else {
                vif::extension_fd(e)
            };
            ext = e & 0x80 != 0;
        }
        0x7C | 0xFC => {
            meaning = vif::primary(vif_byte);
            let len = usize::from(*body.get(at).ok_or(AppError::EndInVib { at: start })?);
            at += 1;
            let text = body
                .get(at..at + len)
                .ok_or(AppError::PlainTextTooLong { at: start, len })?;
            unit_text = Some(text);
            at += len;
        }
        // 7B and 7D without the extension bit are not escapes: reserved.
        _ => meaning = vif::primary(vif_byte),
    }
    let manufacturer_vif = meaning.quantity == Quantity::ManufacturerSpecific;
    let mut orthogonal = !manufacturer_vif;
    while ext {
        let e = next_vife(&mut at)?;
        if orthogonal {
            orthogonal = vif::combine(&mut meaning, e);
        }
        ext = e & 0x80 != 0;
    }
    let vib_end = at;
    // Data.
    let field = dif & 0x0F;
    let (coding, len) = match field {
        0x0 => (Coding::NoData, 0),
        0x1 => (Coding::Int(1), 1),
        0x2 => (Coding::Int(2), 2),
        0x3 => (Coding::Int(3), 3),
        0x4 => (Coding::Int(4), 4),
        0x5 => (Coding::Real, 4),
        0x6 => (Coding::Int(6), 6),
        0x7 => (Coding::Int(8), 8),
        0x8 => (Coding::Selection, 0),
        0x9 => (Coding::Bcd(2), 1),
        0xA => (Coding::Bcd(4), 2),
        0xB => (Coding::Bcd(6), 3),
        0xC => (Coding::Bcd(8), 4),
        0xE => (Coding::Bcd(12), 6),
        0xD => {
            let lvar = *body.get(at).ok_or(AppError::EndInData {
                at: start,
                need: 1,
                got: 0,
            })?;
            at += 1;
            let l = usize::from(lvar);
            match lvar {
                0x00..=0xBF => (Coding::Text, l),
                0xC0..=0xC9 => (Coding::Bcd(2 * (lvar - 0xC0)), l - 0xC0),
                0xD0..=0xD9 => (Coding::NegativeBcd(2 * (lvar - 0xD0)), l - 0xD0),
                0xE0..=0xEF => (Coding::Binary, l - 0xE0),
                0xF0..=0xF4 => (Coding::Bytes, 4 * (l - 0xEC)),
                0xF5 => (Coding::Bytes, 48),
                0xF6 => (Coding::Bytes, 64),
                _ => return Err(AppError::ReservedLvar { at: start, lvar }),
            }
        }
        // 0xF: the special functions, handled above.
        _ => return Err(AppError::ReservedDif { at: start, dif }),
    };
    let data = body.get(at..at + len).ok_or(AppError::EndInData {
        at: start,
        need: len,
        got: body.len() - at.min(body.len()),
    })?;
    at += len;
    let unit = match unit_text {
        Some(t) => Unit::Text(t),
        None => Unit::Standard(meaning.unit),
    };
    Ok(Next::Record(
        Record {
            at: start,
            function: match (dif >> 4) & 3 {
                0 => Function::Instantaneous,
                1 => Function::Maximum,
                2 => Function::Minimum,
                _ => Function::DuringError,
            },
            storage,
            tariff,
            subunit,
            coding,
            dib: &body[start..dib_end],
            vib: &body[dib_end..vib_end],
            meaning,
            unit,
            data,
            msb_first,
        },
        at,
    ))
}

/// Decodes a whole RSP_UD frame: link layer, then application layer.
pub fn decode(frame: &[u8]) -> Result<Telegram<'_>, DecodeError> {
    let f = super::link::parse(frame)?;
    Ok(Telegram::from_frame(f)?)
}

/// A frame that is not a valid RSP_UD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("link layer: {0}")]
    Link(#[from] super::link::LinkError),
    #[error("application layer: {0}")]
    App(#[from] AppError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telegram(records: &[u8]) -> Vec<u8> {
        let mut d = vec![
            0x78, 0x56, 0x34, 0x12, 0x2D, 0x2C, 0x01, 0x04, 0x05, 0x00, 0, 0,
        ];
        d.extend_from_slice(records);
        d
    }

    fn one(records: &[u8]) -> (Record<'static>, Value<'static>) {
        let d: &'static [u8] = Box::leak(telegram(records).into_boxed_slice());
        let t = Telegram::parse(0x72, d).unwrap();
        let r = t.records().next().unwrap();
        (r, r.value())
    }

    #[test]
    fn long_header_should_give_the_identity() {
        let d = telegram(&[]);
        let t = Telegram::parse(0x72, &d).unwrap();
        let id = t.identity().unwrap();
        assert_eq!(id.id_string(), "12345678");
        assert_eq!(id.manufacturer_str(), "KAM");
        assert_eq!(manufacturer_code(*b"KAM"), 0x2C2D);
    }

    #[test]
    fn energy_in_bcd_should_scale_in_decimal() {
        // 0C 06: 8-digit BCD, kWh.
        let (r, v) = one(&[0x0C, 0x06, 0x27, 0x04, 0x85, 0x02]);
        assert_eq!(r.unit, Unit::Standard("Wh"));
        assert_eq!(v.to_decimal().unwrap().as_str(), "2850427000");
    }

    #[test]
    fn negative_bcd_should_read_the_f_nibble_as_minus() {
        let (_, v) = one(&[0x0A, 0x5A, 0x12, 0xF3]);
        assert_eq!(v.to_decimal().unwrap().as_str(), "-31.2");
    }

    #[test]
    fn bcd_with_error_digits_should_stay_raw() {
        let (_, v) = one(&[0x0A, 0x5A, 0xAA, 0xAA]);
        assert_eq!(v, Value::InvalidBcd(&[0xAA, 0xAA]));
    }

    #[test]
    fn signed_integers_should_be_twos_complement() {
        let (_, v) = one(&[0x02, 0x5B, 0xFE, 0xFF]);
        assert_eq!(v.to_decimal().unwrap().as_str(), "-2");
        let (_, v) = one(&[0x06, 0x03, 1, 0, 0, 0, 0, 0x80]);
        assert_eq!(
            v.to_decimal().unwrap().as_str(),
            (-(1i64 << 47) + 1).to_string()
        );
    }

    #[test]
    fn difes_should_give_storage_tariff_and_subunit() {
        // DIF 0x84 (storage bit 0, ext), DIFE 0x50 (tariff 1, subunit 1), DIFE 0x03 (storage).
        let (r, _) = one(&[0xC4, 0xD0, 0x03, 0x13, 1, 0, 0, 0]);
        assert_eq!(r.storage, 1 | (3 << 5));
        assert_eq!(r.tariff, 1);
        assert_eq!(r.subunit, 1);
    }

    #[test]
    fn dates_should_decode_types_g_and_f() {
        let (_, v) = one(&[0x42, 0x6C, 0x5F, 0x1C]);
        assert_eq!(v, Value::Time(DateTime::type_g([0x5F, 0x1C])));
        let Value::Time(t) = v else { panic!() };
        assert_eq!(t.to_string(), "2010-12-31");
        let (_, v) = one(&[0x04, 0x6D, 0x1A, 0x2F, 0x65, 0x11]);
        let Value::Time(t) = v else { panic!() };
        assert_eq!(t.to_string(), "2011-01-05T15:26:00");
    }

    #[test]
    fn extension_tables_and_orthogonal_vife_should_combine() {
        // FD 48: volts 10^-1; 0x74 after a primary VIF: ×10^-2.
        let (r, v) = one(&[0x02, 0xFD, 0x48, 0xE6, 0x08]);
        assert_eq!(r.meaning.quantity, Quantity::Voltage);
        assert_eq!(v.to_decimal().unwrap().as_str(), "227.8");
        let (r, v) = one(&[0x02, 0x94, 0x74, 0x10, 0x00]);
        assert_eq!(r.meaning.exponent, -4);
        assert_eq!(v.to_decimal().unwrap().as_str(), "0.0016");
    }

    #[test]
    fn plain_text_unit_should_be_read_in_order() {
        let (r, v) = one(&[0x02, 0xFC, 0x03, 0x48, 0x52, 0x25, 0x74, 0xD4, 0x11]);
        assert_eq!(r.unit.to_string(), "%RH");
        assert_eq!(v.to_decimal().unwrap().as_str(), "45.64");
    }

    #[test]
    fn lvar_text_should_be_reversed() {
        let (_, v) = one(&[0x0D, 0x78, 0x03, b'C', b'B', b'A']);
        assert_eq!(v.text().unwrap(), "ABC");
    }

    #[test]
    fn manufacturer_data_should_end_the_records() {
        let d = telegram(&[0x01, 0x13, 0x05, 0x1F, 0xAA, 0xBB]);
        let t = Telegram::parse(0x72, &d).unwrap();
        assert!(t.more_follows);
        assert_eq!(t.manufacturer_data, Some(&[0xAA, 0xBB][..]));
        assert_eq!(t.records().count(), 1);
    }

    #[test]
    fn truncated_records_should_be_errors() {
        for cut in [
            &[0x84][..],
            &[0x04],
            &[0x04, 0x13, 0x01],
            &[0x04, 0x93],
            &[0x02, 0xFC, 0x05, b'a'],
            &[0x0D, 0x13],
            &[0x0D, 0x13, 0xF9],
        ] {
            assert!(Telegram::parse(0x72, &telegram(cut)).is_err(), "{cut:02x?}");
        }
        let mut many = vec![0x84];
        many.extend([0x80; 10]);
        many.extend([0x00, 0x13, 1, 0, 0, 0]);
        assert_eq!(
            Telegram::parse(0x72, &telegram(&many)),
            Err(AppError::TooManyDifes { at: 0 })
        );
    }

    #[test]
    fn application_errors_should_be_named() {
        assert_eq!(
            Telegram::parse(0x70, &[8]),
            Err(AppError::Application(ApplicationError::ApplicationBusy))
        );
    }
}
