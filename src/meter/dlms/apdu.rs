//! The application layer's APDUs, sans-IO: ACSE (AARQ/AARE, RLRQ/RLRE, in BER) and xDLMS
//! (InitiateRequest/Response, GET, ACTION, exceptions, in A-XDR), logical-name referencing.
//!
//! Only what a reading client sends is encoded; everything a meter may answer with is decoded,
//! and anything else is an [`ApduError`] the association turns into a `Malformed` failure.

use super::axdr::{self, Data, DateTime, DecodeError, Reader, put_length};

/// The conformance block's bits (IEC 62056-5-3, 7.3.1), as the 24-bit value sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Conformance(pub u32);

impl Conformance {
    const fn bit(n: u32) -> u32 {
        1 << (23 - n)
    }
    pub const GENERAL_PROTECTION: u32 = Self::bit(1);
    pub const GENERAL_BLOCK_TRANSFER: u32 = Self::bit(2);
    pub const ATTRIBUTE0_WITH_SET: u32 = Self::bit(8);
    pub const PRIORITY_MGMT: u32 = Self::bit(9);
    pub const ATTRIBUTE0_WITH_GET: u32 = Self::bit(10);
    pub const BLOCK_TRANSFER_GET: u32 = Self::bit(11);
    pub const BLOCK_TRANSFER_SET: u32 = Self::bit(12);
    pub const BLOCK_TRANSFER_ACTION: u32 = Self::bit(13);
    pub const MULTIPLE_REFERENCES: u32 = Self::bit(14);
    pub const DATA_NOTIFICATION: u32 = Self::bit(16);
    pub const ACCESS: u32 = Self::bit(17);
    pub const GET: u32 = Self::bit(19);
    pub const SET: u32 = Self::bit(20);
    pub const SELECTIVE_ACCESS: u32 = Self::bit(21);
    pub const EVENT_NOTIFICATION: u32 = Self::bit(22);
    pub const ACTION: u32 = Self::bit(23);

    /// What a reading client proposes: GET with block transfer, with list and selective
    /// access, and ACTION (for HLS pass 3).
    pub const CLIENT: Conformance = Conformance(
        Self::GET
            | Self::SELECTIVE_ACCESS
            | Self::BLOCK_TRANSFER_GET
            | Self::MULTIPLE_REFERENCES
            | Self::ACTION
            | Self::PRIORITY_MGMT
            | Self::ATTRIBUTE0_WITH_GET,
    );

    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0x5F, 0x1F, 0x04, 0x00]);
        out.extend_from_slice(&self.0.to_be_bytes()[1..]);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, ApduError> {
        if r.take(2)? != [0x5F, 0x1F] {
            return Err(ApduError::Invalid("conformance tag"));
        }
        if r.u8()? != 4 {
            return Err(ApduError::Invalid("conformance length"));
        }
        let _unused_bits = r.u8()?;
        let b = r.array::<3>()?;
        Ok(Conformance(u32::from_be_bytes([0, b[0], b[1], b[2]])))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApduError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("unknown APDU tag {0:#04x}")]
    UnknownTag(u8),
    #[error("{0} bytes after the APDU")]
    Trailing(usize),
}

/// Application context names (the last arc of 2.16.756.5.8.1.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Context {
    LnNoCiphering = 1,
    LnCiphering = 3,
}

/// Authentication mechanism names (the last arc of 2.16.756.5.8.2.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mechanism {
    Lowest = 0,
    Lls = 1,
    HlsGmac = 5,
}

const CONTEXT_PREFIX: [u8; 6] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x01];
const MECHANISM_PREFIX: [u8; 6] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x02];

/// xDLMS InitiateRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitiateRequest {
    pub dedicated_key: Option<Vec<u8>>,
    pub conformance: Conformance,
    pub max_receive_pdu: u16,
}

impl InitiateRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0x01];
        match &self.dedicated_key {
            Some(k) => {
                out.push(0x01);
                put_length(&mut out, k.len());
                out.extend_from_slice(k);
            }
            None => out.push(0x00),
        }
        // response-allowed (default TRUE), proposed-quality-of-service absent, version 6.
        out.extend_from_slice(&[0x00, 0x00, 0x06]);
        self.conformance.encode(&mut out);
        out.extend_from_slice(&self.max_receive_pdu.to_be_bytes());
        out
    }

    /// Decoded for the tests and the test vectors (a meter's side).
    pub fn decode(b: &[u8]) -> Result<Self, ApduError> {
        let mut r = Reader::new(b);
        if r.u8()? != 0x01 {
            return Err(ApduError::Invalid("InitiateRequest tag"));
        }
        let dedicated_key = if r.u8()? != 0 {
            let n = r.length()?;
            Some(r.take(n)?.to_vec())
        } else {
            None
        };
        if r.u8()? != 0 {
            r.u8()?;
        }
        if r.u8()? != 0 {
            r.u8()?;
        }
        let _version = r.u8()?;
        let conformance = Conformance::decode(&mut r)?;
        let max_receive_pdu = r.u16()?;
        Ok(InitiateRequest {
            dedicated_key,
            conformance,
            max_receive_pdu,
        })
    }
}

/// xDLMS InitiateResponse: what the meter agreed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitiateResponse {
    pub dlms_version: u8,
    pub conformance: Conformance,
    pub max_receive_pdu: u16,
    pub vaa_name: u16,
}

impl InitiateResponse {
    pub fn decode(b: &[u8]) -> Result<Self, ApduError> {
        let mut r = Reader::new(b);
        if r.u8()? != 0x08 {
            return Err(ApduError::Invalid("InitiateResponse tag"));
        }
        if r.u8()? != 0 {
            r.u8()?;
        }
        let dlms_version = r.u8()?;
        let conformance = Conformance::decode(&mut r)?;
        let max_receive_pdu = r.u16()?;
        let vaa_name = r.u16()?;
        Ok(InitiateResponse {
            dlms_version,
            conformance,
            max_receive_pdu,
            vaa_name,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0x08, 0x00, self.dlms_version];
        self.conformance.encode(&mut out);
        out.extend_from_slice(&self.max_receive_pdu.to_be_bytes());
        out.extend_from_slice(&self.vaa_name.to_be_bytes());
        out
    }
}

/// The AARQ a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aarq {
    pub context: Context,
    pub mechanism: Mechanism,
    /// The client's system title (calling-AP-title), for ciphered contexts.
    pub calling_ap_title: Option<[u8; 8]>,
    /// The LLS password or the HLS client-to-server challenge.
    pub authentication_value: Option<Vec<u8>>,
    /// The encoded InitiateRequest, or its glo-initiate-request.
    pub user_information: Vec<u8>,
}

fn tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    put_length(out, value.len());
    out.extend_from_slice(value);
}

impl Aarq {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut ctx = vec![0x06, 0x07];
        ctx.extend_from_slice(&CONTEXT_PREFIX);
        ctx.push(self.context as u8);
        tlv(&mut body, 0xA1, &ctx);
        if let Some(st) = &self.calling_ap_title {
            let mut v = vec![0x04, 0x08];
            v.extend_from_slice(st);
            tlv(&mut body, 0xA6, &v);
        }
        if self.mechanism != Mechanism::Lowest {
            // sender-acse-requirements: authentication.
            tlv(&mut body, 0x8A, &[0x07, 0x80]);
            let mut m = MECHANISM_PREFIX.to_vec();
            m.push(self.mechanism as u8);
            tlv(&mut body, 0x8B, &m);
        }
        if let Some(v) = &self.authentication_value {
            let mut inner = Vec::new();
            tlv(&mut inner, 0x80, v);
            tlv(&mut body, 0xAC, &inner);
        }
        let mut ui = Vec::new();
        tlv(&mut ui, 0x04, &self.user_information);
        tlv(&mut body, 0xBE, &ui);
        let mut out = Vec::new();
        tlv(&mut out, 0x60, &body);
        out
    }
}

/// Where an association diagnostic comes from, and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnostic {
    /// acse-service-user: 0 null, 1 no reason, 2 application context name not supported,
    /// 11 mechanism name not recognised, 12 mechanism name required, 13 authentication
    /// failure, 14 authentication required.
    User(u8),
    /// acse-service-provider: 0 null, 1 no reason, 2 no common ACSE version.
    Provider(u8),
}

impl Diagnostic {
    pub fn describe(self) -> &'static str {
        match self {
            Diagnostic::User(0) | Diagnostic::Provider(0) => "null",
            Diagnostic::User(1) | Diagnostic::Provider(1) => "no reason given",
            Diagnostic::User(2) => "application context name not supported",
            Diagnostic::User(3..=10) => "calling or called AP title or qualifier not recognised",
            Diagnostic::User(11) => "authentication mechanism name not recognised",
            Diagnostic::User(12) => "authentication mechanism name required",
            Diagnostic::User(13) => "authentication failure",
            Diagnostic::User(14) => "authentication required",
            Diagnostic::Provider(2) => "no common ACSE version",
            _ => "unknown diagnostic",
        }
    }
}

/// The meter's AARE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aare {
    pub context: u8,
    /// 0 accepted, 1 rejected permanently, 2 rejected transiently.
    pub result: u8,
    pub diagnostic: Diagnostic,
    pub responding_ap_title: Option<Vec<u8>>,
    pub mechanism: Option<u8>,
    /// The HLS server-to-client challenge.
    pub authentication_value: Option<Vec<u8>>,
    /// The encoded InitiateResponse, its glo-initiate-response, or a ConfirmedServiceError.
    pub user_information: Option<Vec<u8>>,
}

fn read_tlv<'a>(r: &mut Reader<'a>) -> Result<(u8, &'a [u8]), ApduError> {
    let tag = r.u8()?;
    let n = r.length()?;
    Ok((tag, r.take(n)?))
}

fn ber_integer(v: &[u8]) -> Result<u8, ApduError> {
    let mut r = Reader::new(v);
    let (t, b) = read_tlv(&mut r)?;
    if t != 0x02 || b.is_empty() {
        return Err(ApduError::Invalid("BER integer"));
    }
    Ok(b[b.len() - 1])
}

impl Aare {
    pub fn decode(b: &[u8]) -> Result<Self, ApduError> {
        let mut r = Reader::new(b);
        let (tag, body) = read_tlv(&mut r)?;
        if tag != 0x61 {
            return Err(ApduError::Invalid("AARE tag"));
        }
        if !r.is_empty() {
            return Err(ApduError::Trailing(r.remaining()));
        }
        let mut aare = Aare {
            context: 0,
            result: 0xFF,
            diagnostic: Diagnostic::User(0),
            responding_ap_title: None,
            mechanism: None,
            authentication_value: None,
            user_information: None,
        };
        let mut r = Reader::new(body);
        while !r.is_empty() {
            let (t, v) = read_tlv(&mut r)?;
            match t {
                0xA1 => {
                    let mut c = Reader::new(v);
                    let (_, oid) = read_tlv(&mut c)?;
                    aare.context = *oid.last().ok_or(ApduError::Invalid("context name"))?;
                }
                0xA2 => aare.result = ber_integer(v)?,
                0xA3 => {
                    let mut c = Reader::new(v);
                    let (which, inner) = read_tlv(&mut c)?;
                    let d = ber_integer(inner)?;
                    aare.diagnostic = match which {
                        0xA1 => Diagnostic::User(d),
                        0xA2 => Diagnostic::Provider(d),
                        _ => return Err(ApduError::Invalid("diagnostic source")),
                    };
                }
                0xA4 => {
                    let mut c = Reader::new(v);
                    let (_, st) = read_tlv(&mut c)?;
                    aare.responding_ap_title = Some(st.to_vec());
                }
                0x89 => aare.mechanism = v.last().copied(),
                0xAA => {
                    let mut c = Reader::new(v);
                    let (_, value) = read_tlv(&mut c)?;
                    aare.authentication_value = Some(value.to_vec());
                }
                0xBE => {
                    let mut c = Reader::new(v);
                    let (t, ui) = read_tlv(&mut c)?;
                    if t != 0x04 {
                        return Err(ApduError::Invalid("user-information"));
                    }
                    aare.user_information = Some(ui.to_vec());
                }
                // Responder ACSE requirements, implementation data, AE qualifiers ...: not
                // needed by a client.
                _ => {}
            }
        }
        if aare.result == 0xFF {
            return Err(ApduError::Invalid("AARE without a result"));
        }
        Ok(aare)
    }

    /// Encoded for the scripted meter in the tests.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut ctx = vec![0x06, 0x07];
        ctx.extend_from_slice(&CONTEXT_PREFIX);
        ctx.push(self.context);
        tlv(&mut body, 0xA1, &ctx);
        tlv(&mut body, 0xA2, &[0x02, 0x01, self.result]);
        let (which, d) = match self.diagnostic {
            Diagnostic::User(d) => (0xA1, d),
            Diagnostic::Provider(d) => (0xA2, d),
        };
        let mut diag = Vec::new();
        tlv(&mut diag, which, &[0x02, 0x01, d]);
        tlv(&mut body, 0xA3, &diag);
        if let Some(st) = &self.responding_ap_title {
            let mut v = Vec::new();
            tlv(&mut v, 0x04, st);
            tlv(&mut body, 0xA4, &v);
        }
        if let Some(m) = self.mechanism {
            tlv(&mut body, 0x88, &[0x07, 0x80]);
            let mut v = MECHANISM_PREFIX.to_vec();
            v.push(m);
            tlv(&mut body, 0x89, &v);
        }
        if let Some(a) = &self.authentication_value {
            let mut v = Vec::new();
            tlv(&mut v, 0x80, a);
            tlv(&mut body, 0xAA, &v);
        }
        if let Some(ui) = &self.user_information {
            let mut v = Vec::new();
            tlv(&mut v, 0x04, ui);
            tlv(&mut body, 0xBE, &v);
        }
        let mut out = Vec::new();
        tlv(&mut out, 0x61, &body);
        out
    }
}

/// RLRQ with reason "normal".
pub fn rlrq() -> Vec<u8> {
    vec![0x62, 0x03, 0x80, 0x01, 0x00]
}

/// A COSEM attribute by logical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AttributeRef {
    pub class: u16,
    pub obis: [u8; 6],
    pub attribute: i8,
}

impl AttributeRef {
    pub const fn new(class: u16, obis: [u8; 6], attribute: i8) -> Self {
        AttributeRef {
            class,
            obis,
            attribute,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.class.to_be_bytes());
        out.extend_from_slice(&self.obis);
        out.push(self.attribute as u8);
    }
}

impl std::fmt::Display for AttributeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.obis;
        write!(
            f,
            "class {} {a}-{b}:{c}.{d}.{e}*{g} attribute {}",
            self.class, self.attribute
        )
    }
}

/// A capture object definition: a column of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureObject {
    pub attribute: AttributeRef,
    pub data_index: u16,
}

impl CaptureObject {
    /// The clock's time, the usual first column and the one range reads restrict by.
    pub const CLOCK: CaptureObject = CaptureObject {
        attribute: AttributeRef::new(8, [0, 0, 1, 0, 0, 255], 2),
        data_index: 0,
    };

    pub fn to_data(self) -> Data {
        Data::Structure(vec![
            Data::UInt16(self.attribute.class),
            Data::OctetString(self.attribute.obis.to_vec()),
            Data::Int8(self.attribute.attribute),
            Data::UInt16(self.data_index),
        ])
    }
}

/// Selective access to a profile generic buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Selector {
    /// Selector 1: rows whose `restricting` column lies in `from ..= to`, only `columns`
    /// (all when empty).
    Range {
        restricting: CaptureObject,
        from: DateTime,
        to: DateTime,
        columns: Vec<CaptureObject>,
    },
    /// Selector 2: rows `from_entry ..= to_entry` (1-based; 0 as `to` is "the last"),
    /// columns `from_column ..= to_column` (0 as `to` is "the last").
    Entry {
        from_entry: u32,
        to_entry: u32,
        from_column: u16,
        to_column: u16,
    },
}

impl Selector {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Selector::Range {
                restricting,
                from,
                to,
                columns,
            } => {
                out.push(1);
                Data::Structure(vec![
                    restricting.to_data(),
                    Data::OctetString(from.encode().to_vec()),
                    Data::OctetString(to.encode().to_vec()),
                    Data::Array(columns.iter().map(|c| c.to_data()).collect()),
                ])
                .encode(out);
            }
            Selector::Entry {
                from_entry,
                to_entry,
                from_column,
                to_column,
            } => {
                out.push(2);
                Data::Structure(vec![
                    Data::UInt32(*from_entry),
                    Data::UInt32(*to_entry),
                    Data::UInt16(*from_column),
                    Data::UInt16(*to_column),
                ])
                .encode(out);
            }
        }
    }
}

fn put_access(out: &mut Vec<u8>, access: Option<&Selector>) {
    match access {
        Some(s) => {
            out.push(0x01);
            s.encode(out);
        }
        None => out.push(0x00),
    }
}

/// Invoke id and priority: high priority, confirmed service, `invoke` (0-15).
pub fn invoke_id_and_priority(invoke: u8) -> u8 {
    0xC0 | (invoke & 0x0F)
}

pub fn get_request_normal(invoke: u8, attr: &AttributeRef, access: Option<&Selector>) -> Vec<u8> {
    let mut out = vec![0xC0, 0x01, invoke_id_and_priority(invoke)];
    attr.encode(&mut out);
    put_access(&mut out, access);
    out
}

pub fn get_request_next(invoke: u8, block: u32) -> Vec<u8> {
    let mut out = vec![0xC0, 0x02, invoke_id_and_priority(invoke)];
    out.extend_from_slice(&block.to_be_bytes());
    out
}

pub fn get_request_with_list(invoke: u8, attrs: &[(AttributeRef, Option<Selector>)]) -> Vec<u8> {
    let mut out = vec![0xC0, 0x03, invoke_id_and_priority(invoke)];
    put_length(&mut out, attrs.len());
    for (a, s) in attrs {
        a.encode(&mut out);
        put_access(&mut out, s.as_ref());
    }
    out
}

/// ACTION-Request-Normal on `method` of an object.
pub fn action_request(
    invoke: u8,
    class: u16,
    obis: [u8; 6],
    method: i8,
    param: Option<&Data>,
) -> Vec<u8> {
    let mut out = vec![0xC3, 0x01, invoke_id_and_priority(invoke)];
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&obis);
    out.push(method as u8);
    match param {
        Some(d) => {
            out.push(0x01);
            d.encode(&mut out);
        }
        None => out.push(0x00),
    }
    out
}

/// A data-access-result other than success: the meter understood and refused, or has no such
/// object — not a link failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name} ({code})", name = describe_access(self.0), code = self.0)]
pub struct AccessError(pub u8);

impl AccessError {
    pub const HARDWARE_FAULT: u8 = 1;
    pub const TEMPORARY_FAILURE: u8 = 2;
    pub const READ_WRITE_DENIED: u8 = 3;
    pub const OBJECT_UNDEFINED: u8 = 4;
    pub const OBJECT_CLASS_INCONSISTENT: u8 = 9;
    pub const OBJECT_UNAVAILABLE: u8 = 11;
    pub const TYPE_UNMATCHED: u8 = 12;
    pub const SCOPE_OF_ACCESS_VIOLATED: u8 = 13;
    pub const DATA_BLOCK_UNAVAILABLE: u8 = 14;
    pub const LONG_GET_ABORTED: u8 = 15;
    pub const NO_LONG_GET_IN_PROGRESS: u8 = 16;
    pub const DATA_BLOCK_NUMBER_INVALID: u8 = 19;
    pub const OTHER_REASON: u8 = 250;

    pub fn name(self) -> &'static str {
        describe_access(self.0)
    }
}

pub fn describe_access(code: u8) -> &'static str {
    match code {
        0 => "success",
        1 => "hardware-fault",
        2 => "temporary-failure",
        3 => "read-write-denied",
        4 => "object-undefined",
        9 => "object-class-inconsistent",
        11 => "object-unavailable",
        12 => "type-unmatched",
        13 => "scope-of-access-violated",
        14 => "data-block-unavailable",
        15 => "long-get-aborted",
        16 => "no-long-get-in-progress",
        17 => "long-set-aborted",
        18 => "no-long-set-in-progress",
        19 => "data-block-number-invalid",
        250 => "other-reason",
        _ => "unknown data-access-result",
    }
}

/// A Get-Data-Result.
pub type GetResult = Result<Data, AccessError>;

/// A decoded answer APDU (unciphered).
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    GetNormal {
        invoke: u8,
        result: GetResult,
    },
    GetBlock {
        invoke: u8,
        last: bool,
        block: u32,
        raw: Result<Vec<u8>, AccessError>,
    },
    GetWithList {
        invoke: u8,
        results: Vec<GetResult>,
    },
    Action {
        invoke: u8,
        /// action-result: 0 success, else the same codes as data-access-result mostly.
        result: u8,
        data: Option<GetResult>,
    },
    /// ExceptionResponse: the meter could not handle the request at all.
    Exception {
        state_error: u8,
        service_error: u8,
    },
    /// ConfirmedServiceError: the service (often initiate) failed, with its choice and value.
    ServiceError {
        service: u8,
        kind: u8,
        value: u8,
    },
    Aare(Aare),
    Rlre {
        reason: Option<u8>,
    },
    /// A ciphered APDU: its tag, then the bytes after the length (security header and text);
    /// for general-glo-ciphering, the system title too.
    Ciphered {
        tag: u8,
        system_title: Option<Vec<u8>>,
        content: Vec<u8>,
    },
}

fn get_data_result(r: &mut Reader<'_>) -> Result<GetResult, ApduError> {
    match r.u8()? {
        0 => Ok(Ok(Data::decode(r)?)),
        1 => Ok(Err(AccessError(r.u8()?))),
        _ => Err(ApduError::Invalid("Get-Data-Result choice")),
    }
}

/// Decodes the results of a GET-Response-With-List (also the reassembled blocks of one).
pub fn decode_result_list(b: &[u8]) -> Result<Vec<GetResult>, ApduError> {
    let mut r = Reader::new(b);
    let n = r.count(2)?;
    let mut results = Vec::with_capacity(n);
    for _ in 0..n {
        results.push(get_data_result(&mut r)?);
    }
    if !r.is_empty() {
        return Err(ApduError::Trailing(r.remaining()));
    }
    Ok(results)
}

/// Tags of ciphered APDUs this client handles.
pub mod ciphered {
    pub const GLO_INITIATE_REQUEST: u8 = 0x21;
    pub const GLO_INITIATE_RESPONSE: u8 = 0x28;
    pub const GLO_GET_REQUEST: u8 = 0xC8;
    pub const GLO_ACTION_REQUEST: u8 = 0xCB;
    pub const GLO_GET_RESPONSE: u8 = 0xCC;
    pub const GLO_ACTION_RESPONSE: u8 = 0xCF;
    pub const GLO_CONFIRMED_SERVICE_ERROR: u8 = 0x2E;
    pub const GLO_EXCEPTION_RESPONSE: u8 = 0xDD;
    pub const GENERAL_GLO_CIPHERING: u8 = 0xDB;

    /// The glo- tag of a plain APDU's tag, for requests.
    pub fn glo_of(plain: u8) -> Option<u8> {
        Some(match plain {
            0x01 => GLO_INITIATE_REQUEST,
            0xC0 => GLO_GET_REQUEST,
            0xC3 => GLO_ACTION_REQUEST,
            _ => return None,
        })
    }
}

impl Response {
    pub fn decode(b: &[u8]) -> Result<Response, ApduError> {
        let mut r = Reader::new(b);
        let tag = r.u8()?;
        let resp = match tag {
            0xC4 => {
                let kind = r.u8()?;
                let invoke = r.u8()? & 0x0F;
                match kind {
                    1 => Response::GetNormal {
                        invoke,
                        result: get_data_result(&mut r)?,
                    },
                    2 => {
                        let last = r.u8()? != 0;
                        let block = r.u32()?;
                        let raw = match r.u8()? {
                            0 => {
                                let n = r.length()?;
                                Ok(r.take(n)?.to_vec())
                            }
                            1 => Err(AccessError(r.u8()?)),
                            _ => return Err(ApduError::Invalid("DataBlock-G result choice")),
                        };
                        Response::GetBlock {
                            invoke,
                            last,
                            block,
                            raw,
                        }
                    }
                    3 => {
                        let n = r.count(2)?;
                        let mut results = Vec::with_capacity(n);
                        for _ in 0..n {
                            results.push(get_data_result(&mut r)?);
                        }
                        Response::GetWithList { invoke, results }
                    }
                    _ => return Err(ApduError::Invalid("GET-Response choice")),
                }
            }
            0xC7 => {
                if r.u8()? != 1 {
                    return Err(ApduError::Invalid("ACTION-Response choice"));
                }
                let invoke = r.u8()? & 0x0F;
                let result = r.u8()?;
                let data = if !r.is_empty() && r.u8()? != 0 {
                    Some(get_data_result(&mut r)?)
                } else {
                    None
                };
                Response::Action {
                    invoke,
                    result,
                    data,
                }
            }
            0xD8 => {
                let state_error = r.u8()?;
                let service_error = r.u8()?;
                // Newer meters add the invocation counter for service error 6; ignore it.
                let _ = r.rest();
                return Ok(Response::Exception {
                    state_error,
                    service_error,
                });
            }
            0x0E => Response::ServiceError {
                service: r.u8()?,
                kind: r.u8()?,
                value: r.u8()?,
            },
            0x61 => return Ok(Response::Aare(Aare::decode(b)?)),
            0x63 => {
                let n = r.length()?;
                let body = r.take(n)?;
                let mut br = Reader::new(body);
                let mut reason = None;
                while !br.is_empty() {
                    let (t, v) = read_tlv(&mut br)?;
                    if t == 0x80 {
                        reason = v.first().copied();
                    }
                }
                Response::Rlre { reason }
            }
            ciphered::GENERAL_GLO_CIPHERING => {
                let n = r.length()?;
                let st = r.take(n)?.to_vec();
                let n = r.length()?;
                Response::Ciphered {
                    tag,
                    system_title: Some(st),
                    content: r.take(n)?.to_vec(),
                }
            }
            ciphered::GLO_INITIATE_RESPONSE
            | ciphered::GLO_GET_RESPONSE
            | ciphered::GLO_ACTION_RESPONSE
            | ciphered::GLO_CONFIRMED_SERVICE_ERROR
            | ciphered::GLO_EXCEPTION_RESPONSE => {
                let n = r.length()?;
                Response::Ciphered {
                    tag,
                    system_title: None,
                    content: r.take(n)?.to_vec(),
                }
            }
            t => return Err(ApduError::UnknownTag(t)),
        };
        if !r.is_empty() {
            return Err(ApduError::Trailing(r.remaining()));
        }
        Ok(resp)
    }
}

/// What an exception response's codes mean.
pub fn describe_exception(state_error: u8, service_error: u8) -> String {
    let state = match state_error {
        1 => "service not allowed",
        2 => "service unknown",
        _ => "unknown state error",
    };
    let service = match service_error {
        1 => "operation not possible",
        2 => "service not supported",
        3 => "other reason",
        4 => "PDU too long",
        5 => "deciphering error",
        6 => "invocation counter error",
        _ => "unknown service error",
    };
    format!("{state}, {service}")
}

/// A date-time for a range bound: re-exported for callers building selectors.
pub type RangeBound = axdr::DateTime;

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn initiate_request_should_match_published_bytes() {
        let ir = InitiateRequest {
            dedicated_key: None,
            conformance: Conformance(0x007E1F),
            max_receive_pdu: 1200,
        };
        assert_eq!(ir.encode(), hex("01000000065F1F0400007E1F04B0"));
        assert_eq!(InitiateRequest::decode(&ir.encode()).unwrap(), ir);
    }

    #[test]
    fn public_aarq_should_match_published_bytes() {
        // dlms-cosem (pwitab) tests: LN no ciphering, lowest level.
        let aarq = Aarq {
            context: Context::LnNoCiphering,
            mechanism: Mechanism::Lowest,
            calling_ap_title: None,
            authentication_value: None,
            user_information: hex("01000000065F1F0400007E1F04B0"),
        };
        assert_eq!(
            aarq.encode(),
            hex("601DA109060760857405080101BE10040E01000000065F1F0400007E1F04B0")
        );
    }

    #[test]
    fn lls_aarq_should_match_published_bytes() {
        let aarq = Aarq {
            context: Context::LnNoCiphering,
            mechanism: Mechanism::Lls,
            calling_ap_title: None,
            authentication_value: Some(b"12345678".to_vec()),
            user_information: hex("01000000065F1F0400007E1F04B0"),
        };
        let mut expected = hex("6036A1090607608574050801018A0207808B0760857405080201AC0A8008");
        expected.extend_from_slice(b"12345678");
        expected.extend(hex("BE10040E01000000065F1F0400007E1F04B0"));
        assert_eq!(aarq.encode(), expected);
    }

    #[test]
    fn accepted_aare_should_decode_with_its_initiate_response() {
        let b = hex(
            "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007",
        );
        let aare = Aare::decode(&b).unwrap();
        assert_eq!(aare.result, 0);
        assert_eq!(aare.diagnostic, Diagnostic::User(0));
        let ir = InitiateResponse::decode(aare.user_information.as_deref().unwrap()).unwrap();
        assert_eq!(ir.conformance, Conformance(0x00501F));
        assert_eq!(ir.max_receive_pdu, 0x01F4);
        assert_eq!(ir.vaa_name, 7);
        assert_eq!(ir.encode(), hex("0800065F1F040000501F01F40007"));
    }

    #[test]
    fn hls_aare_should_carry_the_server_challenge() {
        let b = hex(
            "6142A109060760857405080101A203020100A305A10302010E88020780890760857405080205AA0A8008503677524A323146BE10040E0800065F1F040000501F01F40007",
        );
        let aare = Aare::decode(&b).unwrap();
        assert_eq!(aare.diagnostic, Diagnostic::User(14));
        assert_eq!(aare.mechanism, Some(5));
        assert_eq!(aare.authentication_value.unwrap(), hex("503677524A323146"));
    }

    #[test]
    fn rejected_aare_should_decode_its_diagnostic() {
        let b = hex("611FA109060760857405080101A203020101A305A103020101BE0604040E010601");
        let aare = Aare::decode(&b).unwrap();
        assert_eq!(aare.result, 1);
        assert_eq!(
            Response::decode(aare.user_information.as_deref().unwrap()).unwrap(),
            Response::ServiceError {
                service: 1,
                kind: 6,
                value: 1
            }
        );
    }

    #[test]
    fn get_requests_should_match_published_bytes() {
        let clock = AttributeRef::new(1, [0, 0, 0x2B, 1, 0, 0xFF], 2);
        assert_eq!(
            get_request_normal(1, &clock, None),
            b"\xc0\x01\xc1\x00\x01\x00\x00+\x01\x00\xff\x02\x00"
        );
        assert_eq!(get_request_next(1, 3), b"\xc0\x02\xc1\x00\x00\x00\x03");
    }

    #[test]
    fn range_descriptor_should_match_published_bytes() {
        // dlms-cosem (pwitab) tests: buffer of 1-0:99.1.0 from 2018-06-01 00:03 (dev -120)
        // to 2021-01-06 00:03 (dev -60), clock column, all columns.
        let dt = |b: &[u8]| DateTime::decode(b).unwrap();
        let sel = Selector::Range {
            restricting: CaptureObject::CLOCK,
            from: dt(b"\x07\xe2\x06\x01\xff\x00\x03\x00\xff\xff\x88\x80"),
            to: dt(b"\x07\xe5\x01\x06\xff\x00\x03\x00\xff\xff\xc4\x00"),
            columns: vec![],
        };
        let req = get_request_normal(
            1,
            &AttributeRef::new(7, [1, 0, 99, 1, 0, 255], 2),
            Some(&sel),
        );
        let expected: &[u8] = b"\xc0\x01\xc1\x00\x07\x01\x00c\x01\x00\xff\x02\x01\x01\
            \x02\x04\x02\x04\x12\x00\x08\t\x06\x00\x00\x01\x00\x00\xff\x0f\x02\x12\x00\x00\
            \t\x0c\x07\xe2\x06\x01\xff\x00\x03\x00\xff\xff\x88\x80\
            \t\x0c\x07\xe5\x01\x06\xff\x00\x03\x00\xff\xff\xc4\x00\x01\x00";
        assert_eq!(req, expected);
    }

    #[test]
    fn entry_descriptor_should_encode_selector_2() {
        let sel = Selector::Entry {
            from_entry: 1,
            to_entry: 0,
            from_column: 1,
            to_column: 0,
        };
        let req = get_request_normal(
            2,
            &AttributeRef::new(7, [1, 0, 99, 1, 0, 255], 2),
            Some(&sel),
        );
        assert_eq!(
            &req[12..],
            [
                0x01, 0x02, 0x02, 0x04, 0x06, 0, 0, 0, 1, 0x06, 0, 0, 0, 0, 0x12, 0, 1, 0x12, 0, 0
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn aare_should_round_trip(result in 0u8..3, diag in 0u8..15, user: bool,
                                  st in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 8)),
                                  ch in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 8..64))) {
            let a = Aare {
                context: 1,
                result,
                diagnostic: if user { Diagnostic::User(diag) } else { Diagnostic::Provider(diag) },
                responding_ap_title: st,
                mechanism: ch.as_ref().map(|_| 5),
                authentication_value: ch,
                user_information: Some(vec![0x08, 0x00, 0x06]),
            };
            proptest::prop_assert_eq!(Aare::decode(&a.encode()).unwrap(), a);
        }
    }

    #[test]
    fn get_responses_should_decode() {
        assert_eq!(
            Response::decode(b"\xc4\x01\xc1\x00\x06\x00\x00\x13\x91").unwrap(),
            Response::GetNormal {
                invoke: 1,
                result: Ok(Data::UInt32(0x1391))
            }
        );
        assert_eq!(
            Response::decode(b"\xc4\x01\xc1\x01\x01").unwrap(),
            Response::GetNormal {
                invoke: 1,
                result: Err(AccessError(1))
            }
        );
        assert_eq!(
            Response::decode(b"\xc4\x02\xc1\x01\x00\x00\x00\x01\x01\x01").unwrap(),
            Response::GetBlock {
                invoke: 1,
                last: true,
                block: 1,
                raw: Err(AccessError(1))
            }
        );
    }

    #[test]
    fn action_with_hls_reply_should_decode() {
        let b =
            b"\xc7\x01\xc0\x00\x01\x00\t\x11\x10\x00\x00\x1a\xfd\xe8\x85{r\x8a4\x99\x10j\xa6e\xd1";
        match Response::decode(b).unwrap() {
            Response::Action {
                result: 0,
                data: Some(Ok(Data::OctetString(v))),
                ..
            } => assert_eq!(v.len(), 17),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            action_request(
                0,
                15,
                [0, 0, 40, 0, 0, 255],
                1,
                Some(&Data::OctetString(vec![0; 17]))
            )[..13],
            b"\xc3\x01\xc0\x00\x0f\x00\x00(\x00\x00\xff\x01\x01"[..]
        );
    }

    #[test]
    fn rlre_should_decode() {
        assert_eq!(
            Response::decode(b"c\x03\x80\x01\x00").unwrap(),
            Response::Rlre { reason: Some(0) }
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_answers_should_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Response::decode(&b);
            let _ = Aare::decode(&b);
        }
    }
}
