//! One association, sans-IO: an APDU in, the APDU a meter answers out.

#[allow(unused_imports)]
use super::*;

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
    pub(super) fn get(&self, attr: &AttributeRef, access: Option<&(u8, Data)>) -> Result<Data, u8> {
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
