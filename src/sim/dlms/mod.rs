//! A simulated DLMS/COSEM meter: the server side of an association, for `amr-edge demo`,
//! `amr-edge simulate` and the tests.
//!
//! # Layout
//!
//! * [`Meter`] — one meter's objects, secrets and counters; every value is computed from the
//!   meter's clock (system time + [`MeterSpec::clock_offset_s`]), so a reader can check any
//!   value without asking the simulator.
//! * [`Session`] — one association, sans-IO: an APDU in, the APDU a meter answers out
//!   (AARQ/AARE, GET normal / with list / next, the HLS pass 3 ACTION, RLRQ/RLRE, exception
//!   responses).
//! * [`WrapperServer`] and [`HdlcServer`] — the two links, sans-IO: bytes in, bytes out. HDLC
//!   serves several meters on one line, each by its physical address, and answers any other
//!   address with silence, as a meter does.
//! * [`serve_wrapper`], [`serve_hdlc`], [`serve_mode_e`] — the thin I/O around them;
//!   [`spawn_wrapper`] and [`spawn_hdlc_pty`] start one on loopback or a pty.
//!
//! It reuses the crate's codecs for frames and A-XDR, but decides everything a meter
//! decides: which client may associate how, what a request may read, block sizes, ciphering
//! of answers with its own system title and invocation counter.
//!
//! # Security (the client chooses by its SAP, as on the Gurux peer in tests/dlms)
//!
//! | SAP | level | needs |
//! | --- | --- | --- |
//! | 16 | lowest (public client) | nothing |
//! | 17 | LLS | [`MeterSpec::password`] |
//! | 1 | HLS-GMAC, suite 0 | [`MeterSpec::keys`]; every APDU glo-ciphered (SC 0x30); the client's invocation counter must rise across associations |
//!
//! # Objects and values (t: the meter's clock in UTC Unix seconds, q = t / 900, p: physical)
//!
//! | OBIS | class | value |
//! | --- | --- | --- |
//! | 0-0:1.0.0 | clock (8) | t as a date-time, deviation 0, status 0 |
//! | 0-0:96.1.0 | data (1) | serial, octet string `AMR` + p in 8 digits |
//! | 0-0:43.1.0 | data (1) | the highest client invocation counter seen (u32) |
//! | 1-0:1.8.0 | register (3) | `10*q + (q*q) % 7 + 1000*p`, u32, scaler -1, Wh |
//! | 1-0:2.8.0 | register (3) | `q / 32 + p`, u32, scaler 3, Wh |
//! | 1-0:1.7.0 | register (3) | `1500 + (t*37) % 1000`, i32, scaler 0, W |
//! | 1-0:32.7.0, 52.7.0, 72.7.0 | register (3) | phase k = 0, 1, 2: `2280 + (t/10 + 7k) % 41`, u16, scaler -1, V |
//! | 1-0:31.7.0, 51.7.0, 71.7.0 | register (3) | phase k: `500 + (13*(t/10) + 29k) % 300`, u16, scaler -2, A |
//! | 1-0:99.1.0 | profile generic (7) | capture objects clock, 1-0:1.8.0, 1-0:2.8.0 (attribute 2 each); period 900; 96·days rows |
//! | 0-0:40.0.0 | association LN (15) | the object list (attribute 2), the partners (3) |
//!
//! The energy formulas are those of tests/dlms/load_profile.py: the registers read now equal
//! the profile row of the current quarter hour. The profile's rows are the quarter hours
//! `last - k*900` (k = 0 .. 96·days-1, oldest first), `last` the latest multiple of 900 at or
//! before t; selective access by range (selector 1, on the clock column, chosen columns) and
//! by entry (selector 2). Answers longer than the client's max PDU go in GET blocks; HDLC
//! answers longer than the negotiated information field go in segments.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::meter::dlms::apdu::{Aare, AttributeRef, Diagnostic, InitiateRequest, ciphered};
use crate::meter::dlms::apdu::{AccessError, CaptureObject, Conformance, InitiateResponse};
use crate::meter::dlms::axdr::{Data, DateTime, Reader, put_length};
use crate::meter::dlms::cosem::{ASSOCIATION_OBIS, CLOCK_OBIS, class};
use crate::meter::dlms::hdlc::{self, Address, Control, Frame, Parameters};
use crate::meter::dlms::security::{self, Keys};
use crate::meter::dlms::wrapper;

pub const PUBLIC_SAP: u16 = 16;
pub const LLS_SAP: u16 = 17;
pub const HLS_SAP: u16 = 1;
/// The logical device every client talks to (wrapper wPort, HDLC upper address).
pub const LOGICAL: u16 = 1;
/// The profile the meter keeps.
pub const PROFILE_OBIS: [u8; 6] = [1, 0, 99, 1, 0, 255];
pub const CAPTURE_PERIOD: i64 = 900;
/// The largest APDU the meter accepts and sends (server-max-receive-pdu-size).
const SERVER_MAX_PDU: u16 = 1024;
/// The longest HDLC information field the meter sends or accepts.
const SERVER_MAX_INFO: u16 = 128;
const IMPORT: [u8; 6] = [1, 0, 1, 8, 0, 255];
const EXPORT: [u8; 6] = [1, 0, 2, 8, 0, 255];
const SERIAL: [u8; 6] = [0, 0, 96, 1, 0, 255];
const FRAME_COUNTER: [u8; 6] = [0, 0, 43, 1, 0, 255];

/// What a simulated meter is.
#[derive(Clone, Debug)]
pub struct MeterSpec {
    /// The HDLC physical (lower) address; also in the values.
    pub physical: u16,
    pub password: Vec<u8>,
    pub keys: Keys,
    pub system_title: [u8; 8],
    /// Days of load profile held.
    pub profile_days: u32,
    /// The meter's clock runs this far ahead of the system clock (negative: behind).
    pub clock_offset_s: i64,
}

impl MeterSpec {
    /// The defaults of the Gurux peer in tests/dlms: password `12345678`, block cipher key
    /// `000102…0F`, authentication key `D0D1…DF`, three days of profile.
    pub fn new(physical: u16) -> Self {
        let mut encryption = [0u8; 16];
        let mut authentication = [0u8; 16];
        for i in 0..16u8 {
            encryption[usize::from(i)] = i;
            authentication[usize::from(i)] = 0xD0 + i;
        }
        let mut system_title = *b"AMRS0000";
        let digits = format!("{:04}", physical % 10_000);
        system_title[4..].copy_from_slice(digits.as_bytes());
        MeterSpec {
            physical,
            password: b"12345678".to_vec(),
            keys: Keys {
                encryption,
                authentication,
            },
            system_title,
            profile_days: 3,
            clock_offset_s: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// The highest client invocation counter accepted (HLS).
    client_ic: Option<u32>,
    /// The meter's own invocation counter for the answers it ciphers.
    server_ic: u32,
    associations: u64,
    requests: u64,
}

/// A simulated meter, shared by its links.
#[derive(Clone, Debug)]
pub struct Meter {
    spec: Arc<MeterSpec>,
    counters: Arc<Mutex<Counters>>,
}

impl Meter {
    pub fn new(spec: MeterSpec) -> Self {
        Meter {
            spec: Arc::new(spec),
            counters: Arc::default(),
        }
    }

    pub fn spec(&self) -> &MeterSpec {
        &self.spec
    }

    /// The meter's clock now.
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(self.spec.clock_offset_s))
            .unwrap_or_else(|_| Timestamp::now())
    }

    /// Associations accepted so far.
    pub fn associations(&self) -> u64 {
        self.lock().associations
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_server_ic(&self) -> u32 {
        let mut c = self.lock();
        c.server_ic = c.server_ic.wrapping_add(1);
        c.server_ic
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// 1-0:1.8.0 at the meter's time `t` (raw, scaler -1, Wh).
pub fn import_raw(t: i64, physical: u16) -> u32 {
    let q = t.div_euclid(CAPTURE_PERIOD);
    (10 * q + (q * q) % 7 + 1000 * i64::from(physical)) as u32
}

/// 1-0:2.8.0 at `t` (raw, scaler 3, Wh).
pub fn export_raw(t: i64, physical: u16) -> u32 {
    let q = t.div_euclid(CAPTURE_PERIOD);
    (q / 32 + i64::from(physical)) as u32
}

/// The register objects: OBIS, scaler, unit code, value at `t`.
type RegisterFn = fn(i64, u16) -> Data;

const REGISTERS: [([u8; 6], i8, u8, RegisterFn); 9] = [
    (IMPORT, -1, 30, |t, p| Data::UInt32(import_raw(t, p))),
    (EXPORT, 3, 30, |t, p| Data::UInt32(export_raw(t, p))),
    ([1, 0, 1, 7, 0, 255], 0, 27, |t, _| {
        Data::Int32(1500 + (t * 37).rem_euclid(1000) as i32)
    }),
    ([1, 0, 32, 7, 0, 255], -1, 35, |t, _| voltage(t, 0)),
    ([1, 0, 52, 7, 0, 255], -1, 35, |t, _| voltage(t, 1)),
    ([1, 0, 72, 7, 0, 255], -1, 35, |t, _| voltage(t, 2)),
    ([1, 0, 31, 7, 0, 255], -2, 33, |t, _| current(t, 0)),
    ([1, 0, 51, 7, 0, 255], -2, 33, |t, _| current(t, 1)),
    ([1, 0, 71, 7, 0, 255], -2, 33, |t, _| current(t, 2)),
];

fn voltage(t: i64, phase: i64) -> Data {
    Data::UInt16((2280 + (t.div_euclid(10) + 7 * phase).rem_euclid(41)) as u16)
}

fn current(t: i64, phase: i64) -> Data {
    Data::UInt16((500 + (13 * t.div_euclid(10) + 29 * phase).rem_euclid(300)) as u16)
}

fn capture_objects() -> [CaptureObject; 3] {
    [
        CaptureObject::CLOCK,
        CaptureObject {
            attribute: AttributeRef::new(class::REGISTER, IMPORT, 2),
            data_index: 0,
        },
        CaptureObject {
            attribute: AttributeRef::new(class::REGISTER, EXPORT, 2),
            data_index: 0,
        },
    ]
}

fn date_time(t: i64) -> Data {
    let ts = Timestamp::from_second(t).unwrap_or(Timestamp::UNIX_EPOCH);
    Data::OctetString(DateTime::from_timestamp_utc(ts, 0).encode().to_vec())
}

/// The profile's capture times at the meter's time `now`, oldest first.
pub fn row_times(now: i64, days: u32) -> Vec<i64> {
    let last = now - now.rem_euclid(CAPTURE_PERIOD);
    let n = 96 * i64::from(days);
    (0..n)
        .map(|k| last - (n - 1 - k) * CAPTURE_PERIOD)
        .collect()
}

fn row(t: i64, physical: u16) -> [Data; 3] {
    [
        date_time(t),
        Data::UInt32(import_raw(t, physical)),
        Data::UInt32(export_raw(t, physical)),
    ]
}

/// The objects of the association: class, version, OBIS, readable attributes.
fn objects() -> Vec<(u16, u8, [u8; 6], u8)> {
    let mut v = vec![
        (class::ASSOCIATION_LN, 1, ASSOCIATION_OBIS, 8),
        (class::CLOCK, 0, CLOCK_OBIS, 9),
        (class::DATA, 0, SERIAL, 2),
        (class::DATA, 0, FRAME_COUNTER, 2),
    ];
    v.extend(REGISTERS.iter().map(|r| (class::REGISTER, 0, r.0, 3)));
    v.push((class::PROFILE_GENERIC, 1, PROFILE_OBIS, 8));
    v
}

fn object_list() -> Data {
    Data::Array(
        objects()
            .into_iter()
            .map(|(class, version, obis, attributes)| {
                let methods = if class == class::ASSOCIATION_LN {
                    vec![Data::Structure(vec![Data::Int8(1), Data::Enum(1)])]
                } else {
                    vec![]
                };
                Data::Structure(vec![
                    Data::UInt16(class),
                    Data::UInt8(version),
                    Data::OctetString(obis.to_vec()),
                    Data::Structure(vec![
                        Data::Array(
                            (1..=attributes as i8)
                                .map(|a| {
                                    Data::Structure(vec![Data::Int8(a), Data::Enum(1), Data::Null])
                                })
                                .collect(),
                        ),
                        Data::Array(methods),
                    ]),
                ])
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// The association

mod aarq;
mod io;
mod links;
mod session;

use aarq::{Aarq, reject};

pub use io::*;
pub use links::*;
pub use session::*;

#[cfg(test)]
mod tests;
