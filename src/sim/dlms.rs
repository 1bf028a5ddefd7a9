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
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Public,
    Lls,
    Hls,
}

#[derive(Debug)]
struct Assoc {
    level: Level,
    /// HLS: pass 3 and 4 done.
    authenticated: bool,
    client_title: [u8; 8],
    stoc: Vec<u8>,
    /// HLS: the client's challenge (the AARQ's authentication value).
    ctos: Vec<u8>,
    max_pdu: usize,
    conformance: Conformance,
}

/// The rest of a long answer, sent block by block.
#[derive(Debug)]
struct Pending {
    invoke: u8,
    raw: Vec<u8>,
    block: u32,
    block_size: usize,
}

/// One client's association with a meter, sans-IO.
#[derive(Debug)]
pub struct Session {
    meter: Meter,
    client_sap: u16,
    assoc: Option<Assoc>,
    pending: Option<Pending>,
}

/// What the meter does with a malformed request: an exception response.
const EXCEPTION_NOT_ALLOWED: [u8; 3] = [0xD8, 0x01, 0x01];
const EXCEPTION_UNKNOWN: [u8; 3] = [0xD8, 0x02, 0x02];
const EXCEPTION_DECIPHERING: [u8; 3] = [0xD8, 0x01, 0x05];
const EXCEPTION_COUNTER: [u8; 3] = [0xD8, 0x01, 0x06];

fn tlvs(body: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while !r.is_empty() {
        let tag = r.u8().ok()?;
        let n = r.length().ok()?;
        out.push((tag, r.take(n).ok()?));
    }
    Some(out)
}

/// An AARQ as the meter reads it.
#[derive(Debug, Default)]
struct Aarq {
    context: u8,
    calling_title: Option<[u8; 8]>,
    mechanism: u8,
    authentication_value: Option<Vec<u8>>,
    user_information: Vec<u8>,
}

impl Aarq {
    fn decode(b: &[u8]) -> Option<Aarq> {
        let mut r = Reader::new(b);
        if r.u8().ok()? != 0x60 {
            return None;
        }
        let n = r.length().ok()?;
        let mut aarq = Aarq::default();
        for (tag, v) in tlvs(r.take(n).ok()?)? {
            match tag {
                0xA1 => aarq.context = *v.last()?,
                0xA6 => {
                    let (_, t) = *tlvs(v)?.first()?;
                    aarq.calling_title = t.try_into().ok();
                }
                0x8B => aarq.mechanism = *v.last()?,
                0xAC => aarq.authentication_value = Some(tlvs(v)?.first()?.1.to_vec()),
                0xBE => aarq.user_information = tlvs(v)?.first()?.1.to_vec(),
                _ => {}
            }
        }
        Some(aarq)
    }
}

impl Session {
    pub fn new(meter: Meter, client_sap: u16) -> Self {
        Session {
            meter,
            client_sap,
            assoc: None,
            pending: None,
        }
    }

    pub fn client_sap(&self) -> u16 {
        self.client_sap
    }

    /// The meter's answer to one APDU; `None`: the meter stays silent.
    pub fn apdu(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        self.meter.lock().requests += 1;
        let tag = *req.first()?;
        match tag {
            0x60 => return Some(self.aarq(req)),
            0x62 => {
                self.assoc = None;
                self.pending = None;
                return Some(vec![0x63, 0x03, 0x80, 0x01, 0x00]);
            }
            _ => {}
        }
        let Some(assoc) = &self.assoc else {
            return Some(EXCEPTION_NOT_ALLOWED.to_vec());
        };
        if assoc.level != Level::Hls {
            if ciphered_request(tag) {
                return Some(EXCEPTION_NOT_ALLOWED.to_vec());
            }
            return Some(self.plain(req));
        }
        // HLS: every request ciphered by the client's system title, the counter rising.
        let (plain, _ic) = match self.decipher(req) {
            Ok(p) => p,
            Err(e) => return Some(e.to_vec()),
        };
        let answer = self.plain(&plain);
        Some(self.cipher(answer))
    }

    fn decipher(&mut self, req: &[u8]) -> Result<(Vec<u8>, u32), &'static [u8]> {
        let assoc = self.assoc.as_ref().ok_or(&EXCEPTION_NOT_ALLOWED[..])?;
        let mut r = Reader::new(req);
        let tag = r.u8().map_err(|_| &EXCEPTION_UNKNOWN[..])?;
        let mut title = assoc.client_title;
        if tag == ciphered::GENERAL_GLO_CIPHERING {
            let n = r.length().map_err(|_| &EXCEPTION_UNKNOWN[..])?;
            title = r
                .take(n)
                .ok()
                .and_then(|t| t.try_into().ok())
                .ok_or(&EXCEPTION_UNKNOWN[..])?;
        } else if !ciphered_request(tag) {
            return Err(&EXCEPTION_NOT_ALLOWED[..]);
        }
        let n = r.length().map_err(|_| &EXCEPTION_UNKNOWN[..])?;
        let content = r.take(n).map_err(|_| &EXCEPTION_UNKNOWN[..])?;
        let (sc, ic, text) = security::split(content).map_err(|_| &EXCEPTION_DECIPHERING[..])?;
        if sc & security::SC_AUTHENTICATED == 0 {
            return Err(&EXCEPTION_DECIPHERING[..]);
        }
        let plain = security::decrypt(sc, &title, ic, &self.meter.spec.keys, text)
            .map_err(|_| &EXCEPTION_DECIPHERING[..])?;
        self.accept_ic(ic).map_err(|_| &EXCEPTION_COUNTER[..])?;
        Ok((plain, ic))
    }

    fn accept_ic(&self, ic: u32) -> Result<(), ()> {
        let mut c = self.meter.lock();
        if c.client_ic.is_some_and(|last| ic <= last) {
            return Err(());
        }
        c.client_ic = Some(ic);
        Ok(())
    }

    fn cipher(&self, plain: Vec<u8>) -> Vec<u8> {
        let tag = match plain.first() {
            Some(0xC4) => ciphered::GLO_GET_RESPONSE,
            Some(0xC7) => ciphered::GLO_ACTION_RESPONSE,
            _ => return plain,
        };
        let ic = self.meter.next_server_ic();
        let sc = security::SC_AUTHENTICATED_ENCRYPTED;
        match security::encrypt(
            sc,
            &self.meter.spec.system_title,
            ic,
            &self.meter.spec.keys,
            &plain,
        ) {
            Ok(text) => security::wrap(tag, sc, ic, &text),
            Err(_) => EXCEPTION_NOT_ALLOWED.to_vec(),
        }
    }

    fn aarq(&mut self, req: &[u8]) -> Vec<u8> {
        self.assoc = None;
        self.pending = None;
        let Some(aarq) = Aarq::decode(req) else {
            return reject(1, Diagnostic::Provider(1), 1);
        };
        let spec = self.meter.spec.clone();
        let (level, context) = match self.client_sap {
            PUBLIC_SAP => (Level::Public, 1),
            LLS_SAP => (Level::Lls, 1),
            HLS_SAP => (Level::Hls, 3),
            _ => return reject(1, Diagnostic::User(1), 1),
        };
        if aarq.context != context {
            return reject(1, Diagnostic::User(2), aarq.context);
        }
        let mechanism = match level {
            Level::Public => 0,
            Level::Lls => 1,
            Level::Hls => 5,
        };
        if aarq.mechanism != mechanism {
            return reject(1, Diagnostic::User(11), context);
        }
        let mut client_title = [0u8; 8];
        let initiate = match level {
            Level::Lls if aarq.authentication_value.as_deref() != Some(&spec.password[..]) => {
                return reject(1, Diagnostic::User(13), context);
            }
            Level::Public | Level::Lls => InitiateRequest::decode(&aarq.user_information).ok(),
            Level::Hls => {
                let Some(title) = aarq.calling_title else {
                    return reject(1, Diagnostic::User(7), context);
                };
                client_title = title;
                let plain = glo_content(&aarq.user_information, ciphered::GLO_INITIATE_REQUEST)
                    .and_then(|(sc, ic, text)| {
                        let p = security::decrypt(sc, &title, ic, &spec.keys, text).ok()?;
                        self.accept_ic(ic).ok()?;
                        Some(p)
                    });
                match plain {
                    Some(p) => InitiateRequest::decode(&p).ok(),
                    None => return reject(1, Diagnostic::User(13), context),
                }
            }
        };
        let Some(initiate) = initiate else {
            return reject(1, Diagnostic::User(1), context);
        };
        let offered = Conformance::GET
            | Conformance::SELECTIVE_ACCESS
            | Conformance::BLOCK_TRANSFER_GET
            | Conformance::MULTIPLE_REFERENCES
            | Conformance::ACTION
            | Conformance::PRIORITY_MGMT
            | Conformance::ATTRIBUTE0_WITH_GET;
        let conformance = Conformance(initiate.conformance.0 & offered);
        let response = InitiateResponse {
            dlms_version: 6,
            conformance,
            max_receive_pdu: SERVER_MAX_PDU,
            vaa_name: 7,
        }
        .encode();
        let client_max = match initiate.max_receive_pdu {
            0 => usize::from(u16::MAX),
            n => usize::from(n),
        };
        let stoc = if level == Level::Hls {
            match security::challenge(16) {
                Ok(c) => c,
                Err(_) => return reject(2, Diagnostic::User(1), context),
            }
        } else {
            vec![]
        };
        let mut aare = Aare {
            context,
            result: 0,
            diagnostic: Diagnostic::User(0),
            responding_ap_title: None,
            mechanism: None,
            authentication_value: None,
            user_information: Some(response.clone()),
        };
        match level {
            Level::Public => {}
            Level::Lls => aare.mechanism = Some(1),
            Level::Hls => {
                let ic = self.meter.next_server_ic();
                let sc = security::SC_AUTHENTICATED_ENCRYPTED;
                let Ok(text) = security::encrypt(sc, &spec.system_title, ic, &spec.keys, &response)
                else {
                    return reject(2, Diagnostic::User(1), context);
                };
                aare.diagnostic = Diagnostic::User(14);
                aare.responding_ap_title = Some(spec.system_title.to_vec());
                aare.mechanism = Some(5);
                aare.authentication_value = Some(stoc.clone());
                aare.user_information = Some(security::wrap(
                    ciphered::GLO_INITIATE_RESPONSE,
                    sc,
                    ic,
                    &text,
                ));
            }
        }
        self.assoc = Some(Assoc {
            level,
            authenticated: level != Level::Hls,
            client_title,
            stoc,
            ctos: aarq.authentication_value.clone().unwrap_or_default(),
            max_pdu: client_max.min(usize::from(SERVER_MAX_PDU)),
            conformance,
        });
        self.meter.lock().associations += 1;
        aare.encode()
    }

    /// An unciphered request in an open association.
    fn plain(&mut self, req: &[u8]) -> Vec<u8> {
        let Some(assoc) = &self.assoc else {
            return EXCEPTION_NOT_ALLOWED.to_vec();
        };
        let (authenticated, max_pdu, conformance) =
            (assoc.authenticated, assoc.max_pdu, assoc.conformance);
        let mut r = Reader::new(req);
        let (Ok(tag), Ok(kind), Ok(invoke)) = (r.u8(), r.u8(), r.u8()) else {
            return EXCEPTION_UNKNOWN.to_vec();
        };
        match (tag, kind) {
            (0xC3, 1) => self.action(invoke, &mut r),
            _ if !authenticated => EXCEPTION_NOT_ALLOWED.to_vec(),
            (0xC0, 1) => {
                let Some((attr, access)) = attribute_descriptor(&mut r) else {
                    return EXCEPTION_UNKNOWN.to_vec();
                };
                if access.is_some() && !conformance.has(Conformance::SELECTIVE_ACCESS) {
                    return EXCEPTION_NOT_ALLOWED.to_vec();
                }
                let result = self.get(&attr, access.as_ref());
                let mut raw = Vec::new();
                let mut resp = vec![0xC4, 0x01, invoke];
                match &result {
                    Ok(d) => {
                        d.encode(&mut raw);
                        resp.push(0);
                        resp.extend_from_slice(&raw);
                    }
                    Err(e) => resp.extend_from_slice(&[1, *e]),
                }
                if result.is_ok() && resp.len() + CIPHER_OVERHEAD > max_pdu {
                    return self.first_block(invoke, raw, max_pdu, conformance);
                }
                resp
            }
            (0xC0, 2) => self.next_block(invoke, &mut r),
            (0xC0, 3) => {
                if !conformance.has(Conformance::MULTIPLE_REFERENCES) {
                    return EXCEPTION_NOT_ALLOWED.to_vec();
                }
                let Ok(n) = r.length() else {
                    return EXCEPTION_UNKNOWN.to_vec();
                };
                let mut raw = Vec::new();
                put_length(&mut raw, n);
                for _ in 0..n {
                    let Some((attr, access)) = attribute_descriptor(&mut r) else {
                        return EXCEPTION_UNKNOWN.to_vec();
                    };
                    match self.get(&attr, access.as_ref()) {
                        Ok(d) => {
                            raw.push(0);
                            d.encode(&mut raw);
                        }
                        Err(e) => raw.extend_from_slice(&[1, e]),
                    }
                }
                let mut resp = vec![0xC4, 0x03, invoke];
                resp.extend_from_slice(&raw);
                if resp.len() + CIPHER_OVERHEAD > max_pdu {
                    return self.first_block(invoke, raw, max_pdu, conformance);
                }
                resp
            }
            _ => EXCEPTION_UNKNOWN.to_vec(),
        }
    }

    fn first_block(
        &mut self,
        invoke: u8,
        raw: Vec<u8>,
        max_pdu: usize,
        conformance: Conformance,
    ) -> Vec<u8> {
        if !conformance.has(Conformance::BLOCK_TRANSFER_GET) {
            // Too long and no block transfer agreed: what a meter says.
            return vec![0xC4, 0x01, invoke, 1, AccessError::OTHER_REASON];
        }
        let block_size = max_pdu.saturating_sub(CIPHER_OVERHEAD + 12).max(16);
        self.pending = Some(Pending {
            invoke,
            raw,
            block: 0,
            block_size,
        });
        self.send_block()
    }

    fn next_block(&mut self, invoke: u8, r: &mut Reader<'_>) -> Vec<u8> {
        let Ok(n) = r.u32() else {
            return EXCEPTION_UNKNOWN.to_vec();
        };
        match &self.pending {
            Some(p) if p.block == n => self.send_block(),
            Some(p) => {
                let resp = block_error(p.invoke, n, AccessError::DATA_BLOCK_NUMBER_INVALID);
                self.pending = None;
                resp
            }
            None => block_error(invoke, n, AccessError::NO_LONG_GET_IN_PROGRESS),
        }
    }

    fn send_block(&mut self) -> Vec<u8> {
        let Some(p) = &mut self.pending else {
            return EXCEPTION_UNKNOWN.to_vec();
        };
        let start = p.block as usize * p.block_size;
        let end = (start + p.block_size).min(p.raw.len());
        p.block += 1;
        let last = end == p.raw.len();
        let mut out = vec![0xC4, 0x02, p.invoke, u8::from(last)];
        out.extend_from_slice(&p.block.to_be_bytes());
        out.push(0);
        put_length(&mut out, end - start);
        out.extend_from_slice(&p.raw[start..end]);
        if last {
            self.pending = None;
        }
        out
    }

    /// HLS pass 3: the client's f(StoC); the answer is the meter's f(CtoS).
    fn action(&mut self, invoke: u8, r: &mut Reader<'_>) -> Vec<u8> {
        let fail = |code: u8| vec![0xC7, 0x01, invoke, code, 0x00];
        let (Ok(class_id), Ok(obis), Ok(method), Ok(has_param)) =
            (r.u16(), r.array::<6>(), r.u8(), r.u8())
        else {
            return EXCEPTION_UNKNOWN.to_vec();
        };
        if class_id != class::ASSOCIATION_LN || obis != ASSOCIATION_OBIS || method != 1 {
            return fail(AccessError::READ_WRITE_DENIED);
        }
        let spec = self.meter.spec.clone();
        let Some(assoc) = &mut self.assoc else {
            return EXCEPTION_NOT_ALLOWED.to_vec();
        };
        if assoc.level != Level::Hls || has_param != 1 {
            return fail(AccessError::READ_WRITE_DENIED);
        }
        let Some(f) = Data::decode(r)
            .ok()
            .and_then(|d| d.as_octets().map(<[u8]>::to_vec))
        else {
            return fail(AccessError::TYPE_UNMATCHED);
        };
        let ok = f.len() == 5 + security::TAG_LEN && {
            let ic = u32::from_be_bytes([f[1], f[2], f[3], f[4]]);
            security::hls_gmac(&assoc.client_title, ic, &spec.keys, &assoc.stoc) == f
        };
        if !ok {
            self.assoc = None;
            return fail(AccessError::READ_WRITE_DENIED);
        }
        assoc.authenticated = true;
        let ic = self.meter.next_server_ic();
        let reply = security::hls_gmac(&spec.system_title, ic, &spec.keys, &assoc.ctos);
        let mut out = vec![0xC7, 0x01, invoke, 0x00, 0x01, 0x00];
        Data::OctetString(reply).encode(&mut out);
        out
    }

    /// An attribute's value, or the data-access-result a meter answers.
    fn get(&self, attr: &AttributeRef, access: Option<&(u8, Data)>) -> Result<Data, u8> {
        let spec = &self.meter.spec;
        let t = self.meter.now().as_second();
        let Some(&(class_id, _, obis, attributes)) = objects().iter().find(|o| o.2 == attr.obis)
        else {
            return Err(AccessError::OBJECT_UNDEFINED);
        };
        if class_id != attr.class {
            return Err(AccessError::OBJECT_CLASS_INCONSISTENT);
        }
        if attr.attribute < 1 || attr.attribute as u8 > attributes {
            return Err(AccessError::OBJECT_UNDEFINED);
        }
        if access.is_some() && !(class_id == class::PROFILE_GENERIC && attr.attribute == 2) {
            return Err(AccessError::OTHER_REASON);
        }
        if attr.attribute == 1 {
            return Ok(Data::OctetString(obis.to_vec()));
        }
        let a = attr.attribute;
        Ok(match (class_id, obis, a) {
            (class::ASSOCIATION_LN, _, 2) => object_list(),
            (class::ASSOCIATION_LN, _, 3) => Data::Structure(vec![
                Data::Int8(self.client_sap as i8),
                Data::UInt16(LOGICAL),
            ]),
            (class::ASSOCIATION_LN, _, 4) => Data::OctetString(vec![
                0x60,
                0x85,
                0x74,
                0x05,
                0x08,
                0x01,
                self.assoc
                    .as_ref()
                    .map_or(1, |a| if a.level == Level::Hls { 3 } else { 1 }),
            ]),
            (class::ASSOCIATION_LN, _, 6) => Data::OctetString(vec![
                0x60,
                0x85,
                0x74,
                0x05,
                0x08,
                0x02,
                self.assoc.as_ref().map_or(0, |a| match a.level {
                    Level::Public => 0,
                    Level::Lls => 1,
                    Level::Hls => 5,
                }),
            ]),
            (class::ASSOCIATION_LN, _, 7) => Data::OctetString(vec![]),
            (class::ASSOCIATION_LN, _, 8) => Data::Enum(2),
            (class::ASSOCIATION_LN, _, 5) => Data::Structure(vec![
                Data::BitString {
                    bits: 24,
                    bytes: self
                        .assoc
                        .as_ref()
                        .map_or(0, |a| a.conformance.0)
                        .to_be_bytes()[1..]
                        .to_vec(),
                },
                Data::UInt16(SERVER_MAX_PDU),
                Data::UInt16(SERVER_MAX_PDU),
                Data::UInt8(6),
                Data::Int8(0),
                Data::Int8(0),
            ]),
            (class::CLOCK, _, 2) => date_time(t),
            (class::CLOCK, _, 3) => Data::Int16(0),
            (class::CLOCK, _, 4) => Data::UInt8(0),
            (class::CLOCK, _, 5) | (class::CLOCK, _, 6) => Data::OctetString(
                DateTime::decode(&[
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x80, 0x00, 0xFF,
                ])
                .map(|d| d.encode().to_vec())
                .unwrap_or_default(),
            ),
            (class::CLOCK, _, 7) => Data::Int8(0),
            (class::CLOCK, _, 8) => Data::Boolean(false),
            (class::CLOCK, _, 9) => Data::Enum(1),
            (class::DATA, SERIAL, 2) => {
                Data::OctetString(format!("AMR{:08}", spec.physical).into_bytes())
            }
            (class::DATA, FRAME_COUNTER, 2) => {
                Data::UInt32(self.meter.lock().client_ic.unwrap_or(0))
            }
            (class::REGISTER, _, 2) => {
                let r = REGISTERS
                    .iter()
                    .find(|r| r.0 == obis)
                    .ok_or(AccessError::OBJECT_UNDEFINED)?;
                (r.3)(t, spec.physical)
            }
            (class::REGISTER, _, 3) => {
                let r = REGISTERS
                    .iter()
                    .find(|r| r.0 == obis)
                    .ok_or(AccessError::OBJECT_UNDEFINED)?;
                Data::Structure(vec![Data::Int8(r.1), Data::Enum(r.2)])
            }
            (class::PROFILE_GENERIC, _, 2) => return self.buffer(t, access),
            (class::PROFILE_GENERIC, _, 3) => {
                Data::Array(capture_objects().iter().map(|c| c.to_data()).collect())
            }
            (class::PROFILE_GENERIC, _, 4) => Data::UInt32(CAPTURE_PERIOD as u32),
            (class::PROFILE_GENERIC, _, 5) => Data::Enum(1),
            (class::PROFILE_GENERIC, _, 6) => CaptureObject {
                attribute: AttributeRef::new(0, [0; 6], 0),
                data_index: 0,
            }
            .to_data(),
            (class::PROFILE_GENERIC, _, 7) | (class::PROFILE_GENERIC, _, 8) => {
                Data::UInt32(96 * spec.profile_days)
            }
            _ => return Err(AccessError::OBJECT_UNDEFINED),
        })
    }

    /// The profile buffer, whole or as the selector asks.
    fn buffer(&self, t: i64, access: Option<&(u8, Data)>) -> Result<Data, u8> {
        let spec = &self.meter.spec;
        let times = row_times(t, spec.profile_days);
        let all: Vec<usize> = (0..3).collect();
        let (times, columns): (Vec<i64>, Vec<usize>) = match access {
            None => (times, all),
            Some((1, Data::Structure(p))) if p.len() == 4 => {
                let bound = |d: &Data| -> Option<i64> {
                    let dt = match d {
                        Data::OctetString(b) => DateTime::decode(b).ok()?,
                        Data::DateTime(dt) => *dt,
                        _ => return None,
                    };
                    dt.to_timestamp(&jiff::tz::TimeZone::UTC)
                        .map(|ts| ts.as_second())
                };
                let (Some(from), Some(to)) = (bound(&p[1]), bound(&p[2])) else {
                    return Err(AccessError::TYPE_UNMATCHED);
                };
                let columns = match p[3].as_list() {
                    Some([]) | None => all,
                    Some(cols) => {
                        let mut out = Vec::new();
                        for c in cols {
                            out.push(column_of(c).ok_or(AccessError::OTHER_REASON)?);
                        }
                        out
                    }
                };
                (
                    times
                        .into_iter()
                        .filter(|x| (from..=to).contains(x))
                        .collect(),
                    columns,
                )
            }
            Some((2, Data::Structure(p))) if p.len() == 4 => {
                let n = |d: &Data| d.as_integer().and_then(|v| usize::try_from(v).ok());
                let (Some(fe), Some(te), Some(fc), Some(tc)) =
                    (n(&p[0]), n(&p[1]), n(&p[2]), n(&p[3]))
                else {
                    return Err(AccessError::TYPE_UNMATCHED);
                };
                let te = if te == 0 {
                    times.len()
                } else {
                    te.min(times.len())
                };
                let tc = if tc == 0 { 3 } else { tc.min(3) };
                let fe = fe.max(1);
                let fc = fc.max(1);
                let rows = if fe > te {
                    vec![]
                } else {
                    times[fe - 1..te].to_vec()
                };
                let cols = if fc > tc {
                    vec![]
                } else {
                    (fc - 1..tc).collect()
                };
                (rows, cols)
            }
            Some(_) => return Err(AccessError::OTHER_REASON),
        };
        Ok(Data::Array(
            times
                .iter()
                .map(|&x| {
                    let r = row(x, spec.physical);
                    Data::Structure(columns.iter().map(|c| r[*c].clone()).collect())
                })
                .collect(),
        ))
    }
}

/// Bytes a ciphered answer adds (tag, length, SC, IC, GCM tag), kept free in every answer
/// so the same block size serves every security level.
const CIPHER_OVERHEAD: usize = 3 + 5 + security::TAG_LEN;

fn column_of(d: &Data) -> Option<usize> {
    let s = d.as_list()?;
    let class_id = u16::try_from(s.first()?.as_integer()?).ok()?;
    let obis = s.get(1)?.as_octets()?;
    let attr = s.get(2)?.as_integer()?;
    capture_objects().iter().position(|c| {
        c.attribute.class == class_id
            && c.attribute.obis[..] == *obis
            && i128::from(c.attribute.attribute) == attr
    })
}

fn block_error(invoke: u8, block: u32, code: u8) -> Vec<u8> {
    let mut out = vec![0xC4, 0x02, invoke, 1];
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&[1, code]);
    out
}

fn ciphered_request(tag: u8) -> bool {
    matches!(
        tag,
        ciphered::GLO_GET_REQUEST | ciphered::GLO_ACTION_REQUEST | ciphered::GENERAL_GLO_CIPHERING
    ) || tag == 0xC9
        || tag == ciphered::GLO_INITIATE_REQUEST
}

/// SC, IC and text of a glo-APDU with tag `tag`.
fn glo_content(b: &[u8], tag: u8) -> Option<(u8, u32, &[u8])> {
    let mut r = Reader::new(b);
    if r.u8().ok()? != tag {
        return None;
    }
    let n = r.length().ok()?;
    security::split(r.take(n).ok()?).ok()
}

fn attribute_descriptor(r: &mut Reader<'_>) -> Option<(AttributeRef, Option<(u8, Data)>)> {
    let class_id = r.u16().ok()?;
    let obis = r.array::<6>().ok()?;
    let attribute = r.u8().ok()? as i8;
    let access = match r.u8().ok()? {
        0 => None,
        _ => {
            let selector = r.u8().ok()?;
            Some((selector, Data::decode(r).ok()?))
        }
    };
    Some((AttributeRef::new(class_id, obis, attribute), access))
}

fn reject(result: u8, diagnostic: Diagnostic, context: u8) -> Vec<u8> {
    Aare {
        context,
        result,
        diagnostic,
        responding_ap_title: None,
        mechanism: None,
        authentication_value: None,
        // ConfirmedServiceError: initiate, initiate error, other.
        user_information: Some(vec![0x0E, 0x01, 0x06, 0x00]),
    }
    .encode()
}

// ---------------------------------------------------------------------------------------------
// The links, sans-IO
// ---------------------------------------------------------------------------------------------

/// The IEC 62056-47 wrapper side of one TCP connection to a meter.
#[derive(Debug)]
pub struct WrapperServer {
    meter: Meter,
    splitter: wrapper::Splitter,
    session: Option<Session>,
}

impl WrapperServer {
    pub fn new(meter: Meter) -> Self {
        WrapperServer {
            meter,
            splitter: wrapper::Splitter::new(usize::from(SERVER_MAX_PDU) + 64),
            session: None,
        }
    }

    /// Bytes from the client; what the meter sends back.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.splitter.push(bytes);
        let mut out = Vec::new();
        while let Some(r) = self.splitter.next_apdu() {
            let Ok(w) = r else { continue };
            // Another logical device: not this meter's to answer.
            if w.destination != LOGICAL {
                continue;
            }
            if self.session.as_ref().map(Session::client_sap) != Some(w.source) {
                self.session = Some(Session::new(self.meter.clone(), w.source));
            }
            if let Some(answer) = self.session.as_mut().and_then(|s| s.apdu(&w.apdu)) {
                out.extend(wrapper::encode(LOGICAL, w.source, &answer));
            }
        }
        out
    }
}

/// One meter's end of the HDLC link.
#[derive(Debug)]
struct Station {
    meter: Meter,
    connected: bool,
    vs: u8,
    vr: u8,
    max_info_tx: usize,
    client: Address,
    session: Option<Session>,
    incoming: Vec<u8>,
    outgoing: std::collections::VecDeque<Vec<u8>>,
    last_sent: Vec<u8>,
}

impl Station {
    fn frame(&self, control: Control, segmented: bool, info: Vec<u8>) -> Vec<u8> {
        Frame {
            destination: self.client,
            source: Address::server(LOGICAL, Some(self.meter.spec.physical)),
            control,
            segmented,
            info,
        }
        .encode()
    }

    fn next_segment(&mut self) -> Vec<u8> {
        let info = self.outgoing.pop_front().unwrap_or_default();
        let more = !self.outgoing.is_empty();
        let f = self.frame(
            Control::I {
                ns: self.vs,
                nr: self.vr,
                pf: true,
            },
            more,
            info,
        );
        self.vs = (self.vs + 1) & 7;
        f
    }

    fn handle(&mut self, f: Frame) -> Option<Vec<u8>> {
        self.client = f.source;
        match f.control {
            Control::Snrm => {
                let theirs = Parameters::decode(&f.info).unwrap_or_default();
                let ours = Parameters {
                    max_info_tx: theirs.max_info_rx.min(SERVER_MAX_INFO),
                    max_info_rx: theirs.max_info_tx.min(SERVER_MAX_INFO),
                    window_tx: 1,
                    window_rx: 1,
                };
                self.connected = true;
                self.vs = 0;
                self.vr = 0;
                self.max_info_tx = usize::from(ours.max_info_tx.max(32));
                self.session = Some(Session::new(
                    self.meter.clone(),
                    u16::from(f.source.upper as u8),
                ));
                self.incoming.clear();
                self.outgoing.clear();
                Some(self.frame(Control::Ua, false, ours.encode()))
            }
            Control::Disc => {
                let was = self.connected;
                self.connected = false;
                self.session = None;
                Some(self.frame(if was { Control::Ua } else { Control::Dm }, false, vec![]))
            }
            _ if !self.connected => Some(self.frame(Control::Dm, false, vec![])),
            Control::I { ns, .. } => {
                if ns != self.vr {
                    // A repeat: our answer was lost.
                    return Some(self.last_sent.clone());
                }
                self.vr = (self.vr + 1) & 7;
                self.incoming.extend_from_slice(&f.info);
                if f.segmented {
                    return Some(self.frame(
                        Control::Rr {
                            nr: self.vr,
                            pf: true,
                        },
                        false,
                        vec![],
                    ));
                }
                let info = std::mem::take(&mut self.incoming);
                let apdu = info.strip_prefix(&hdlc::LLC_REQUEST[..])?;
                let answer = self.session.as_mut()?.apdu(apdu)?;
                let mut info = hdlc::LLC_RESPONSE.to_vec();
                info.extend_from_slice(&answer);
                self.outgoing = info.chunks(self.max_info_tx).map(<[u8]>::to_vec).collect();
                Some(self.next_segment())
            }
            Control::Rr { nr, .. } => {
                if !self.outgoing.is_empty() && nr == self.vs {
                    return Some(self.next_segment());
                }
                if nr != self.vs {
                    return Some(self.last_sent.clone());
                }
                Some(self.frame(
                    Control::Rr {
                        nr: self.vr,
                        pf: true,
                    },
                    false,
                    vec![],
                ))
            }
            _ => None,
        }
    }
}

/// HDLC on a line shared by several meters, each answering its physical address (logical
/// address 1) and nothing else.
#[derive(Debug)]
pub struct HdlcServer {
    splitter: hdlc::Splitter,
    stations: Vec<Station>,
}

impl HdlcServer {
    pub fn new(meters: Vec<Meter>) -> Self {
        HdlcServer {
            splitter: hdlc::Splitter::new(),
            stations: meters
                .into_iter()
                .map(|meter| Station {
                    meter,
                    connected: false,
                    vs: 0,
                    vr: 0,
                    max_info_tx: usize::from(SERVER_MAX_INFO),
                    client: Address::client(16),
                    session: None,
                    incoming: Vec::new(),
                    outgoing: Default::default(),
                    last_sent: Vec::new(),
                })
                .collect(),
        }
    }

    /// Whether any meter on the line has an open HDLC connection.
    pub fn connected(&self) -> bool {
        self.stations.iter().any(|s| s.connected)
    }

    /// Drops every connection and half-received frame (the line went quiet, the probe was
    /// taken off).
    pub fn reset(&mut self) {
        self.splitter.clear();
        for s in &mut self.stations {
            s.connected = false;
            s.session = None;
        }
    }

    /// Bytes from the line; what the meters send back. Damaged frames and frames for other
    /// addresses get no answer.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.splitter.push(bytes);
        let mut out = Vec::new();
        while let Some(r) = self.splitter.next_frame() {
            let Ok(f) = r else { continue };
            let Some(station) = self
                .stations
                .iter_mut()
                .find(|s| f.destination == Address::server(LOGICAL, Some(s.meter.spec.physical)))
            else {
                continue;
            };
            if let Some(answer) = station.handle(f) {
                station.last_sent = answer.clone();
                out.extend(answer);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// I/O
// ---------------------------------------------------------------------------------------------

/// Serves the wrapper on every connection `listener` accepts, until the task is dropped.
pub async fn serve_wrapper(listener: TcpListener, meter: Meter) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let meter = meter.clone();
        tokio::spawn(async move {
            let mut server = WrapperServer::new(meter);
            let mut stream = stream;
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let out = server.received(&buf[..n]);
                        if !out.is_empty() && stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Binds 127.0.0.1 on a free port and serves the wrapper there; returns the address.
pub async fn spawn_wrapper(meter: Meter) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_wrapper(listener, meter));
    Ok(addr)
}

/// Serves HDLC for `meters` on `io` until it fails.
pub async fn serve_hdlc<S>(mut io: S, meters: Vec<Meter>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = HdlcServer::new(meters);
    let mut buf = vec![0u8; 2048];
    loop {
        match io.read(&mut buf).await {
            Ok(0) => {
                // A pty master reads 0 while no one holds the slave open.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                server.reset();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => return,
            Ok(n) => {
                let out = server.received(&buf[..n]);
                if !out.is_empty() && io.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The mode E front end of an optical port (IEC 62056-21 annex E), then HDLC: a sign-on
/// `/?!` at 300 Bd is answered with an identification offering HDLC (`\2`) at 9600 Bd;
/// `ACK 2 Z 2` switches the meter to HDLC at rate Z until the client's DISC (or 5 s of
/// silence) brings it back to waiting for a sign-on. `peer_baud` reads the rate the client's
/// end of the line is set to, where it can be known (a pty): bytes sent at a rate the meter is
/// not listening at are lost, as on a real line.
pub async fn serve_mode_e<S>(mut io: S, peer_baud: impl Fn() -> Option<u32>, meter: Meter)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use crate::meter::iec62056_21::codec::{self, Identification};
    const IDLE: Duration = Duration::from_secs(5);
    let ident = codec::identification(&Identification {
        manufacturer: "AMR".into(),
        baud_code: b'5',
        enhanced: Some(b'2'),
        ident: "SIMDLMS".into(),
    });
    let heard_at = |baud: u32| peer_baud().is_none_or(|b| b == baud);
    let mut server = HdlcServer::new(vec![meter]);
    let mut line: Vec<u8> = Vec::new();
    // None: waiting for a sign-on; Some(None): identified; Some(Some(rate)): HDLC at rate.
    let mut mode: Option<Option<u32>> = None;
    let mut buf = vec![0u8; 2048];
    loop {
        let n = match tokio::time::timeout(IDLE, io.read(&mut buf)).await {
            Err(_) => {
                mode = None;
                line.clear();
                server.reset();
                continue;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Ok(Ok(n)) => n,
        };
        match mode {
            Some(Some(rate)) => {
                if !heard_at(rate) {
                    continue;
                }
                let was = server.connected();
                let out = server.received(&buf[..n]);
                if !out.is_empty() && io.write_all(&out).await.is_err() {
                    return;
                }
                if was && !server.connected() {
                    // DISC answered: back to the optical sign-on.
                    mode = None;
                    server.reset();
                }
            }
            _ => {
                // The acknowledgement is sent at 300 Bd, but the client may have switched its
                // end to the new rate by the time these bytes are read here (a pty has no
                // wire): once identified, take it whatever the rate reads now.
                if !heard_at(300) && mode != Some(None) {
                    continue;
                }
                line.extend_from_slice(&buf[..n]);
                while let Some(end) = line.iter().position(|b| *b == b'\n') {
                    let mut msg: Vec<u8> = line.drain(..=end).collect();
                    // Noise before a sign-on: a meter starts listening at the `/`.
                    if let Some(start) = msg.windows(2).position(|w| w == b"/?") {
                        msg.drain(..start);
                    }
                    if msg.starts_with(b"/?") && msg.ends_with(b"!\r\n") {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if io.write_all(&ident).await.is_err() {
                            return;
                        }
                        mode = Some(None);
                    } else if mode == Some(None)
                        && msg.len() == 6
                        && msg[0] == codec::ACK
                        && msg[1] == b'2'
                        && msg[3] == b'2'
                    {
                        mode = codec::baud_of_code(msg[2]).map(Some);
                        server.reset();
                        // HDLC may follow in the same read.
                        let rest = std::mem::take(&mut line);
                        let out = server.received(&rest);
                        if !out.is_empty() && io.write_all(&out).await.is_err() {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// A simulated line on a pty: the path the agent opens; stopped on drop.
pub struct DlmsPty {
    path: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DlmsPty {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for DlmsPty {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `meters` over HDLC on a new pty (an RS-485 segment), in a thread of its own.
pub fn spawn_hdlc_pty(meters: Vec<Meter>) -> std::io::Result<DlmsPty> {
    spawn_pty("sim-dlms-hdlc", move |master, _baud| {
        serve_hdlc(master, meters)
    })
}

/// Serves one meter behind an optical probe (mode E, then HDLC) on a new pty.
pub fn spawn_mode_e_pty(meter: Meter) -> std::io::Result<DlmsPty> {
    spawn_pty("sim-dlms-mode-e", move |master, baud| {
        serve_mode_e(master, baud, meter)
    })
}

type PeerBaud = Box<dyn Fn() -> Option<u32> + Send>;

fn spawn_pty<F, Fut>(name: &str, serve: F) -> std::io::Result<DlmsPty>
where
    F: FnOnce(tokio_serial::SerialStream, PeerBaud) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (path_tx, path_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = path_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                match open_pty() {
                    Ok((master, path, baud)) => {
                        let _ = path_tx.send(Ok(path));
                        tokio::select! {
                            () = serve(master, baud) => {}
                            _ = stop_rx => {}
                        }
                    }
                    Err(e) => {
                        let _ = path_tx.send(Err(e));
                    }
                }
            });
        })?;
    let path = path_rx.recv().map_err(|_| {
        std::io::Error::other("the simulator thread ended before opening its pty")
    })??;
    Ok(DlmsPty {
        path,
        stop: Some(stop_tx),
    })
}

/// The master end, the slave's path, and how to read the rate the slave is set to (Linux
/// shares one termios per pty pair; the serial crate sets rates with `termios2`).
fn open_pty() -> std::io::Result<(tokio_serial::SerialStream, std::path::PathBuf, PeerBaud)> {
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::from)?;
    let path = slave
        .name()
        .map(std::path::PathBuf::from)
        .ok_or_else(|| std::io::Error::other("the pty slave has no name"))?;
    // The agent opens the slave by its path and locks it (TIOCEXCL) while it has it open.
    drop(slave);
    // SAFETY: the descriptor belongs to `master`, open for this call; the clone is owned.
    let fd: OwnedFd = unsafe { BorrowedFd::borrow_raw(master.as_raw_fd()) }.try_clone_to_owned()?;
    Ok((master, path, Box::new(move || pty_baud(&fd))))
}

#[cfg(target_os = "linux")]
fn pty_baud(fd: &std::os::fd::OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut t = std::mem::MaybeUninit::<libc::termios2>::uninit();
    // SAFETY: `fd` is open; TCGETS2 fills `t` when it returns 0.
    let t = unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::TCGETS2 as _, t.as_mut_ptr()) != 0 {
            return None;
        }
        t.assume_init()
    };
    Some(t.c_ospeed)
}

#[cfg(not(target_os = "linux"))]
fn pty_baud(_: &std::os::fd::OwnedFd) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
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
                    v.value == expected(obis.0, before, 17)
                        || v.value == expected(obis.0, after, 17),
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
}
