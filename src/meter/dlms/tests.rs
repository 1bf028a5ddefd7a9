//! The association against a small scripted meter: a server side written here from the
//! standard (not from any DLMS library), with the codecs' encoders for the bytes.

use std::collections::HashMap;
use std::time::Duration;

use super::apdu::{
    self, Aare, AccessError, Conformance, Diagnostic, InitiateRequest, InitiateResponse,
};
use super::association::{
    Association, AssociationConfig, Error, Event, LinkConfig, Output, Request, SecurityConfig,
};
use super::axdr::{Data, DateTime, Reader};
use super::hdlc::{self, Address, Control, Frame, Parameters};
use super::security::{self, InvocationCounter, Keys, MemoryCounter};
use super::wrapper;
use super::{cosem, reads};
use crate::reading::Obis;

const SERVER_ST: [u8; 8] = *b"MTR12345";
const CLIENT_ST: [u8; 8] = *b"AMREDGE1";

fn keys() -> Keys {
    Keys {
        encryption: *b"0123456789ABCDEF",
        authentication: *b"authentication!!",
    }
}

type Key = (u16, [u8; 6], i8);

/// The meter's application: objects and how it answers.
struct App {
    objects: HashMap<Key, Data>,
    conformance: Conformance,
    password: Option<Vec<u8>>,
    hls: bool,
    /// Largest raw-data block sent in a GET block transfer.
    block: usize,
    refuse_lists: bool,
    /// Lists longer than this are answered with an exception (a limit of the meter's own).
    longest_list: usize,
    wrong_ctos: bool,
    max_pdu: u16,
    // State.
    pending: Vec<u8>,
    next_block: u32,
    pending_invoke: u8,
    ctos: Vec<u8>,
    stoc: Vec<u8>,
    server_ic: u32,
    client_ics: Vec<u32>,
    requests: Vec<u8>,
    authenticated: bool,
}

impl App {
    fn new() -> Self {
        let mut objects = HashMap::new();
        let su = |s: i8, u: u8| Data::Structure(vec![Data::Int8(s), Data::Enum(u)]);
        objects.insert((3, [1, 0, 1, 8, 0, 255], 2), Data::UInt32(14_567_125));
        objects.insert((3, [1, 0, 1, 8, 0, 255], 3), su(-3, 30));
        objects.insert((3, [1, 0, 32, 7, 0, 255], 2), Data::UInt16(2301));
        objects.insert((3, [1, 0, 32, 7, 0, 255], 3), su(-1, 35));
        App {
            objects,
            conformance: Conformance::CLIENT,
            password: None,
            hls: false,
            block: 200,
            refuse_lists: false,
            longest_list: usize::MAX,
            wrong_ctos: false,
            max_pdu: 512,
            pending: vec![],
            next_block: 0,
            pending_invoke: 0,
            ctos: vec![],
            stoc: b"StoC-challenge!!".to_vec(),
            server_ic: 100,
            client_ics: vec![],
            requests: vec![],
            authenticated: false,
        }
    }

    fn protect(&mut self, tag: u8, plain: &[u8]) -> Vec<u8> {
        if !self.hls {
            return plain.to_vec();
        }
        self.server_ic += 1;
        let text = security::encrypt(0x30, &SERVER_ST, self.server_ic, &keys(), plain).unwrap();
        security::wrap(tag, 0x30, self.server_ic, &text)
    }

    fn unprotect(&mut self, apdu: &[u8]) -> Vec<u8> {
        if !self.hls || !matches!(apdu[0], 0x21 | 0xC8 | 0xCB) {
            return apdu.to_vec();
        }
        let mut r = Reader::new(&apdu[1..]);
        let n = r.length().unwrap();
        let (sc, ic, text) = security::split(r.take(n).unwrap()).unwrap();
        self.client_ics.push(ic);
        security::decrypt(sc, &CLIENT_ST, ic, &keys(), text).unwrap()
    }

    fn aare(&mut self, aarq: &[u8]) -> Vec<u8> {
        // Find the authentication value (AC) and user information (BE) by scanning the TLVs.
        let mut r = Reader::new(aarq);
        r.u8().unwrap();
        let n = r.length().unwrap();
        let mut body = Reader::new(r.take(n).unwrap());
        let mut auth = None;
        let mut ui = vec![];
        while !body.is_empty() {
            let t = body.u8().unwrap();
            let n = body.length().unwrap();
            let v = body.take(n).unwrap();
            match t {
                0xAC => auth = Some(v[2..].to_vec()),
                0xBE => ui = v[2..].to_vec(),
                _ => {}
            }
        }
        let ui = self.unprotect(&ui);
        let ir = InitiateRequest::decode(&ui).unwrap();
        let mut result = 0;
        let mut diagnostic = Diagnostic::User(0);
        if let Some(p) = &self.password {
            if auth.as_ref() != Some(p) {
                result = 1;
                diagnostic = Diagnostic::User(13);
            }
        }
        let mut aare = Aare {
            context: if self.hls { 3 } else { 1 },
            result,
            diagnostic,
            responding_ap_title: None,
            mechanism: None,
            authentication_value: None,
            user_information: None,
        };
        let resp = InitiateResponse {
            dlms_version: 6,
            conformance: Conformance(self.conformance.0 & ir.conformance.0),
            max_receive_pdu: self.max_pdu,
            vaa_name: 7,
        }
        .encode();
        if self.hls {
            self.ctos = auth.unwrap();
            aare.diagnostic = Diagnostic::User(14);
            aare.responding_ap_title = Some(SERVER_ST.to_vec());
            aare.mechanism = Some(5);
            aare.authentication_value = Some(self.stoc.clone());
            aare.user_information = Some(self.protect(0x28, &resp));
        } else {
            self.authenticated = result == 0;
            aare.user_information = Some(resp);
        }
        aare.encode()
    }

    fn get_data(&self, r: &mut Reader<'_>) -> Result<Data, u8> {
        let class = r.u16().unwrap();
        let obis: [u8; 6] = r.array().unwrap();
        let attr = r.u8().unwrap() as i8;
        if r.u8().unwrap() == 1 {
            let _selector = r.u8().unwrap();
            let _params = Data::decode(r).unwrap();
        }
        self.objects
            .get(&(class, obis, attr))
            .cloned()
            .ok_or(AccessError::OBJECT_UNDEFINED)
    }

    fn respond_block(&mut self, invoke: u8) -> Vec<u8> {
        let n = self.pending.len().min(self.block);
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        self.next_block += 1;
        let mut out = vec![0xC4, 0x02, 0xC0 | invoke, u8::from(self.pending.is_empty())];
        out.extend_from_slice(&self.next_block.to_be_bytes());
        out.push(0);
        super::axdr::put_length(&mut out, chunk.len());
        out.extend_from_slice(&chunk);
        out
    }

    fn get(&mut self, req: &[u8]) -> Vec<u8> {
        let invoke = req[2] & 0x0F;
        let mut r = Reader::new(&req[3..]);
        self.requests.push(req[1]);
        match req[1] {
            1 => {
                let mut body = vec![];
                match self.get_data(&mut r) {
                    Ok(d) => {
                        body.push(0);
                        d.encode(&mut body);
                    }
                    Err(e) => body.extend_from_slice(&[1, e]),
                }
                if body[0] == 0 && body.len() - 1 > self.block {
                    self.pending = body[1..].to_vec();
                    self.next_block = 0;
                    self.pending_invoke = invoke;
                    return self.respond_block(invoke);
                }
                let mut out = vec![0xC4, 0x01, 0xC0 | invoke];
                out.extend(body);
                out
            }
            2 => self.respond_block(invoke),
            3 => {
                if self.refuse_lists {
                    return vec![0xD8, 0x01, 0x02];
                }
                let n = r.length().unwrap();
                if n > self.longest_list {
                    return vec![0xD8, 0x01, 0x02];
                }
                let mut body = vec![];
                super::axdr::put_length(&mut body, n);
                for _ in 0..n {
                    match self.get_data(&mut r) {
                        Ok(d) => {
                            body.push(0);
                            d.encode(&mut body);
                        }
                        Err(e) => body.extend_from_slice(&[1, e]),
                    }
                }
                if body.len() > self.block {
                    self.pending = body;
                    self.next_block = 0;
                    return self.respond_block(invoke);
                }
                let mut out = vec![0xC4, 0x03, 0xC0 | invoke];
                out.extend(body);
                out
            }
            _ => vec![0xD8, 0x01, 0x02],
        }
    }

    fn action(&mut self, req: &[u8]) -> Vec<u8> {
        let invoke = req[2] & 0x0F;
        let d = Data::from_bytes(&req[13..]).unwrap();
        let f = d.as_octets().unwrap().to_vec();
        let ic = u32::from_be_bytes([f[1], f[2], f[3], f[4]]);
        let ok = security::hls_gmac(&CLIENT_ST, ic, &keys(), &self.stoc) == f;
        self.client_ics.push(ic);
        if !ok {
            return vec![0xC7, 0x01, 0xC0 | invoke, 0x01, 0x00];
        }
        self.authenticated = true;
        self.server_ic += 1;
        let mut ctos = self.ctos.clone();
        if self.wrong_ctos {
            ctos[0] ^= 1;
        }
        let reply = security::hls_gmac(&SERVER_ST, self.server_ic, &keys(), &ctos);
        let mut out = vec![0xC7, 0x01, 0xC0 | invoke, 0x00, 0x01, 0x00];
        Data::OctetString(reply).encode(&mut out);
        out
    }

    /// One request APDU in, one answer APDU out.
    fn handle(&mut self, apdu: &[u8]) -> Vec<u8> {
        let plain = self.unprotect(apdu);
        match plain[0] {
            0x60 => self.aare(&plain),
            0x62 => vec![0x63, 0x03, 0x80, 0x01, 0x00],
            0xC0 => {
                let a = self.get(&plain);
                self.protect(0xCC, &a)
            }
            0xC3 => {
                let a = self.action(&plain);
                self.protect(0xCF, &a)
            }
            _ => vec![0xD8, 0x01, 0x02],
        }
    }
}

enum MeterLink {
    Wrapper(wrapper::Splitter),
    Hdlc {
        splitter: hdlc::Splitter,
        me: Address,
        client: Address,
        max_info: usize,
        vs: u8,
        vr: u8,
        incoming: Vec<u8>,
        outgoing: Vec<Vec<u8>>,
    },
}

/// The scripted meter: bytes in, bytes out (empty: silence).
struct Meter {
    link: MeterLink,
    app: App,
    /// Silence for the next n requests.
    mute: usize,
    /// Frames received.
    frames: usize,
}

impl Meter {
    fn wrapper(app: App) -> Self {
        Meter {
            link: MeterLink::Wrapper(wrapper::Splitter::new(65535)),
            app,
            mute: 0,
            frames: 0,
        }
    }

    fn hdlc(app: App, max_info: usize) -> Self {
        Meter {
            link: MeterLink::Hdlc {
                splitter: hdlc::Splitter::new(),
                me: Address::server(1, Some(17)),
                client: Address::client(16),
                max_info,
                vs: 0,
                vr: 0,
                incoming: vec![],
                outgoing: vec![],
            },
            app,
            mute: 0,
            frames: 0,
        }
    }

    fn handle(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.mute > 0 {
            self.mute -= 1;
            return vec![];
        }
        let app = &mut self.app;
        match &mut self.link {
            MeterLink::Wrapper(s) => {
                s.push(bytes);
                let mut out = vec![];
                while let Some(Ok(w)) = s.next_apdu() {
                    self.frames += 1;
                    out.extend(wrapper::encode(1, 16, &app.handle(&w.apdu)));
                }
                out
            }
            MeterLink::Hdlc {
                splitter,
                me,
                client,
                max_info,
                vs,
                vr,
                incoming,
                outgoing,
            } => {
                splitter.push(bytes);
                let mut out = vec![];
                while let Some(r) = splitter.next_frame() {
                    let Ok(f) = r else { continue };
                    self.frames += 1;
                    if f.destination != *me {
                        continue;
                    }
                    let frame = |control, segmented, info| {
                        Frame {
                            destination: *client,
                            source: *me,
                            control,
                            segmented,
                            info,
                        }
                        .encode()
                    };
                    let send_i = |info: Vec<u8>, seg: bool, vs: &mut u8, vr: u8| {
                        let b = frame(
                            Control::I {
                                ns: *vs,
                                nr: vr,
                                pf: true,
                            },
                            seg,
                            info,
                        );
                        *vs = (*vs + 1) & 7;
                        b
                    };
                    match f.control {
                        Control::Snrm => {
                            *vs = 0;
                            *vr = 0;
                            let p = Parameters {
                                max_info_tx: *max_info as u16,
                                max_info_rx: *max_info as u16,
                                window_tx: 1,
                                window_rx: 1,
                            };
                            out.extend(frame(Control::Ua, false, p.encode()));
                        }
                        Control::Disc => out.extend(frame(Control::Ua, false, vec![])),
                        Control::I { ns, .. } => {
                            assert_eq!(ns, *vr, "client N(S)");
                            *vr = (*vr + 1) & 7;
                            incoming.extend_from_slice(&f.info);
                            if f.segmented {
                                out.extend(frame(Control::Rr { nr: *vr, pf: true }, false, vec![]));
                                continue;
                            }
                            let info = std::mem::take(incoming);
                            assert_eq!(&info[..3], &hdlc::LLC_REQUEST);
                            let mut answer = hdlc::LLC_RESPONSE.to_vec();
                            answer.extend(app.handle(&info[3..]));
                            let mut segs: Vec<Vec<u8>> =
                                answer.chunks(*max_info).map(<[u8]>::to_vec).collect();
                            segs.reverse();
                            let first = segs.pop().unwrap();
                            *outgoing = segs;
                            out.extend(send_i(first, !outgoing.is_empty(), vs, *vr));
                        }
                        Control::Rr { .. } => {
                            if let Some(next) = outgoing.pop() {
                                out.extend(send_i(next, !outgoing.is_empty(), vs, *vr));
                            }
                        }
                        _ => {}
                    }
                }
                out
            }
        }
    }
}

/// Runs the machine against the meter until an event or a failure.
fn run<C: InvocationCounter>(
    a: &mut Association<C>,
    m: &mut Meter,
    first: Output,
) -> Result<Event, Error> {
    let mut out = first;
    for _ in 0..10_000 {
        out = match out {
            Output::Done(e) => return Ok(e),
            Output::Failed(e) => return Err(e),
            Output::Send { bytes, .. } => {
                let answer = m.handle(&bytes);
                if answer.is_empty() {
                    a.timed_out()
                } else {
                    a.received(&answer).unwrap_or_else(|| a.timed_out())
                }
            }
        };
    }
    panic!("the exchange did not end");
}

fn wrapper_config(security: SecurityConfig) -> AssociationConfig {
    AssociationConfig::new(
        LinkConfig::Wrapper {
            client: 16,
            server: 1,
        },
        security,
    )
}

fn hdlc_config(max_info: u16) -> AssociationConfig {
    AssociationConfig::new(
        LinkConfig::Hdlc {
            client: 16,
            server_logical: 1,
            server_physical: Some(17),
            max_info,
        },
        SecurityConfig::None,
    )
}

fn energy_and_voltage() -> Vec<reads::Object> {
    vec![
        reads::Object {
            class: 3,
            obis: Obis([1, 0, 1, 8, 0, 255]),
        },
        reads::Object {
            class: 3,
            obis: Obis([1, 0, 32, 7, 0, 255]),
        },
    ]
}

fn read_registers<C: InvocationCounter>(
    a: &mut Association<C>,
    m: &mut Meter,
) -> Vec<(String, Option<&'static str>)> {
    let objs: Vec<reads::Target> = energy_and_voltage().into_iter().map(Into::into).collect();
    let first = a.get(reads::requests(&objs));
    let Event::Values(v) = run(a, m, first).unwrap() else {
        panic!()
    };
    reads::values(&objs, &v)
        .into_iter()
        .map(|r| {
            let r = r.value.unwrap();
            (r.value.as_str().to_owned(), r.unit)
        })
        .collect()
}

#[test]
fn wrapper_public_client_should_connect_read_and_release() {
    let mut m = Meter::wrapper(App::new());
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    let Event::Connected(n) = run(&mut a, &mut m, first).unwrap() else {
        panic!()
    };
    assert!(n.conformance.has(Conformance::MULTIPLE_REFERENCES));
    assert_eq!(n.server_max_receive_pdu, 512);
    assert_eq!(
        read_registers(&mut a, &mut m),
        [
            ("14567.125".into(), Some("Wh")),
            ("230.1".into(), Some("V"))
        ]
    );
    // One GET-Request-With-List for four attributes.
    assert_eq!(m.app.requests, [3]);
    let first = a.release();
    assert_eq!(run(&mut a, &mut m, first), Ok(Event::Released));
}

#[test]
fn without_multiple_references_gets_should_fall_back_to_normal() {
    let mut app = App::new();
    app.conformance = Conformance(Conformance::GET | Conformance::BLOCK_TRANSFER_GET);
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    assert_eq!(read_registers(&mut a, &mut m).len(), 2);
    assert_eq!(m.app.requests, [1, 1, 1, 1]);
}

#[test]
fn small_meter_pdu_should_shorten_the_lists() {
    let mut app = App::new();
    // Room for two attributes a list (3 + 1 + 2 × 10 bytes), not four.
    app.max_pdu = 30;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    assert_eq!(read_registers(&mut a, &mut m).len(), 2);
    assert_eq!(m.app.requests, [3, 3]);
}

#[test]
fn refused_list_should_fall_back_to_normal_gets() {
    let mut app = App::new();
    app.refuse_lists = true;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    assert_eq!(read_registers(&mut a, &mut m).len(), 2);
    // The list of 4, then of 2, then one at a time.
    assert_eq!(m.app.requests, [3, 3, 1, 1, 1, 1]);
}

#[test]
fn meter_limiting_list_length_should_get_lists_halved_until_it_takes_them() {
    let mut app = App::new();
    app.longest_list = 3;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    assert_eq!(read_registers(&mut a, &mut m).len(), 2);
    // 4 attributes refused, then two lists of 2; the next read keeps the shorter lists.
    assert_eq!(m.app.requests, [3, 3, 3]);
    assert_eq!(read_registers(&mut a, &mut m).len(), 2);
    assert_eq!(m.app.requests, [3, 3, 3, 3, 3]);
}

#[test]
fn missing_object_should_be_an_access_error_among_good_results() {
    let mut m = Meter::wrapper(App::new());
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    let first = a.get(vec![
        Request::from(apdu::AttributeRef::new(3, [1, 0, 99, 99, 0, 255], 2)),
        Request::from(apdu::AttributeRef::new(3, [1, 0, 1, 8, 0, 255], 2)),
    ]);
    let Event::Values(v) = run(&mut a, &mut m, first).unwrap() else {
        panic!()
    };
    assert_eq!(v[0], Err(AccessError(AccessError::OBJECT_UNDEFINED)));
    assert_eq!(v[1], Ok(Data::UInt32(14_567_125)));
}

#[test]
fn long_answer_should_be_read_in_blocks() {
    let mut app = App::new();
    let t0: jiff::Timestamp = "2024-03-01T00:00:00Z".parse().unwrap();
    let rows: Vec<Data> = (0..96)
        .map(|i| {
            let t = t0 + jiff::SignedDuration::from_secs(900 * i);
            Data::Structure(vec![
                Data::OctetString(DateTime::from_timestamp_utc(t, 0).encode().to_vec()),
                Data::UInt32(1000 + i as u32),
            ])
        })
        .collect();
    let p = [1, 0, 99, 1, 0, 255];
    app.objects.insert((7, p, 2), Data::Array(rows));
    app.objects.insert(
        (7, p, 3),
        Data::Array(vec![
            apdu::CaptureObject::CLOCK.to_data(),
            apdu::CaptureObject {
                attribute: apdu::AttributeRef::new(3, [1, 0, 1, 8, 0, 255], 2),
                data_index: 0,
            }
            .to_data(),
        ]),
    );
    app.objects.insert((7, p, 4), Data::UInt32(900));
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    let first = a.get(vec![reads::profile_buffer_request(
        Obis(p),
        None,
        Some((t0, t0 + jiff::SignedDuration::from_hours(24))),
    )]);
    let Event::Values(v) = run(&mut a, &mut m, first).unwrap() else {
        panic!()
    };
    assert!(
        m.app.requests.iter().filter(|r| **r == 2).count() > 5,
        "{:?}",
        m.app.requests
    );
    let header = [
        m.app.objects[&(7, p, 3)].clone(),
        m.app.objects[&(7, p, 4)].clone(),
    ];
    let profile = reads::Profile::new(
        &header[0],
        &header[1],
        vec![
            None,
            Some(cosem::ScalerUnit {
                scaler: -3,
                unit: 30,
            }),
        ],
        v[0].as_ref().unwrap(),
        &jiff::tz::TimeZone::UTC,
    )
    .unwrap();
    let values = profile.values();
    assert_eq!(values.len(), 96);
    assert_eq!(values[95].value.as_str(), "1.095");
    assert_eq!(values[95].timestamp.to_string(), "2024-03-01T23:45:00Z");
}

#[test]
fn long_list_answer_should_be_read_in_blocks() {
    let mut app = App::new();
    app.block = 7;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::None),
        MemoryCounter::default(),
    );
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    assert_eq!(
        read_registers(&mut a, &mut m),
        [
            ("14567.125".into(), Some("Wh")),
            ("230.1".into(), Some("V"))
        ]
    );
    assert_eq!(m.app.requests[0], 3);
    assert!(m.app.requests[1..].iter().all(|r| *r == 2) && m.app.requests.len() > 2);
}

#[test]
fn hdlc_should_negotiate_and_segment_both_ways() {
    // A 32-byte information field: the AARQ goes out in segments, the answers come in them.
    let mut m = Meter::hdlc(App::new(), 32);
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let first = a.connect();
    let Event::Connected(n) = run(&mut a, &mut m, first).unwrap() else {
        panic!()
    };
    assert_eq!(n.hdlc.unwrap().max_info_tx, 32);
    assert_eq!(
        read_registers(&mut a, &mut m),
        [
            ("14567.125".into(), Some("Wh")),
            ("230.1".into(), Some("V"))
        ]
    );
    let first = a.release();
    assert_eq!(run(&mut a, &mut m, first), Ok(Event::Released));
    // SNRM, the AARQ in two segments, RRs polling the segmented answers, RLRQ, DISC.
    assert!(m.frames >= 8, "{} frames", m.frames);
}

#[test]
fn silent_meter_should_be_asked_again_then_fail_as_no_answer() {
    let mut m = Meter::hdlc(App::new(), 128);
    m.mute = 100;
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let first = a.connect();
    let e = run(&mut a, &mut m, first).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NoAnswer {
                waiting_for: "SNRM",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_link());
    assert_eq!(m.mute, 97, "one SNRM and two retries");
}

#[test]
fn one_lost_answer_should_be_recovered_by_a_retry() {
    let mut m = Meter::hdlc(App::new(), 128);
    m.mute = 1;
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let first = a.connect();
    assert!(matches!(
        run(&mut a, &mut m, first),
        Ok(Event::Connected(_))
    ));
}

#[test]
fn frames_for_another_client_should_be_ignored() {
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let ua_for_other = Frame {
        destination: Address::client(1),
        source: Address::server(1, Some(17)),
        control: Control::Ua,
        segmented: false,
        info: vec![],
    }
    .encode();
    assert_eq!(a.received(&ua_for_other), None);
    assert_eq!(a.ignored_frames(), 1);
}

#[test]
fn damaged_frame_then_silence_should_fail_as_checksum() {
    let mut cfg = hdlc_config(128);
    cfg.retries = 0;
    let mut a = Association::new(cfg, MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let mut ua = Frame {
        destination: Address::client(16),
        source: Address::server(1, Some(17)),
        control: Control::Ua,
        segmented: false,
        info: Parameters::default().encode(),
    }
    .encode();
    ua[12] ^= 0x40;
    assert_eq!(a.received(&ua), None);
    assert!(matches!(a.timed_out(), Output::Failed(Error::Checksum(_))));
}

#[test]
fn dm_to_snrm_should_be_link_refused() {
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let dm = Frame {
        destination: Address::client(16),
        source: Address::server(1, Some(17)),
        control: Control::Dm,
        segmented: false,
        info: vec![],
    }
    .encode();
    assert_eq!(a.received(&dm), Some(Output::Failed(Error::LinkRefused)));
}

#[test]
fn wrong_lls_password_should_be_an_authentication_failure() {
    let mut app = App::new();
    app.password = Some(b"secret12".to_vec());
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(
        wrapper_config(SecurityConfig::Lls {
            password: b"wrong".to_vec(),
        }),
        MemoryCounter::default(),
    );
    let first = a.connect();
    let e = run(&mut a, &mut m, first).unwrap_err();
    assert_eq!(
        e,
        Error::Rejected {
            result: 1,
            diagnostic: Diagnostic::User(13)
        }
    );
    assert!(!e.is_link());
    assert!(e.to_string().contains("authentication failure"));

    let mut a = Association::new(
        wrapper_config(SecurityConfig::Lls {
            password: b"secret12".to_vec(),
        }),
        MemoryCounter::default(),
    );
    let first = a.connect();
    assert!(matches!(
        run(&mut a, &mut m, first),
        Ok(Event::Connected(_))
    ));
}

fn hls() -> SecurityConfig {
    SecurityConfig::HlsGmac {
        keys: keys(),
        client_system_title: CLIENT_ST,
    }
}

#[test]
fn hls_gmac_should_authenticate_cipher_and_never_repeat_a_counter() {
    let mut app = App::new();
    app.hls = true;
    let mut m = Meter::hdlc(app, 64);
    let mut a = Association::new(
        AssociationConfig {
            security: hls(),
            ..hdlc_config(128)
        },
        MemoryCounter::after(41),
    );
    let first = a.connect();
    let Event::Connected(n) = run(&mut a, &mut m, first).unwrap() else {
        panic!()
    };
    assert_eq!(n.server_system_title, Some(SERVER_ST));
    assert!(m.app.authenticated);
    assert_eq!(
        read_registers(&mut a, &mut m),
        [
            ("14567.125".into(), Some("Wh")),
            ("230.1".into(), Some("V"))
        ]
    );
    // glo-initiate-request, f(StoC), glo-action-request, glo-get-request: 42, 43, 44, 45.
    let mut ics = m.app.client_ics.clone();
    ics.sort();
    assert_eq!(ics, [42, 43, 44, 45]);
    assert_eq!(a.counter().last(), Some(45));
}

#[test]
fn meter_without_the_keys_should_fail_hls() {
    let mut app = App::new();
    app.hls = true;
    app.wrong_ctos = true;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(wrapper_config(hls()), MemoryCounter::default());
    let first = a.connect();
    assert!(matches!(
        run(&mut a, &mut m, first),
        Err(Error::AuthenticationFailed(_))
    ));
}

#[test]
fn exhausted_counter_should_stop_before_sending() {
    let mut a = Association::new(wrapper_config(hls()), MemoryCounter::after(u32::MAX));
    assert!(matches!(
        a.connect(),
        Output::Failed(Error::Counter(security::CounterError::Exhausted))
    ));
}

#[test]
fn unciphered_answer_in_a_ciphered_association_should_be_refused() {
    let mut app = App::new();
    app.hls = true;
    let mut m = Meter::wrapper(app);
    let mut a = Association::new(wrapper_config(hls()), MemoryCounter::default());
    let first = a.connect();
    run(&mut a, &mut m, first).unwrap();
    let Output::Send { .. } = a.get(vec![cosem::CLOCK_TIME.into()]) else {
        panic!()
    };
    let plain = wrapper::encode(1, 16, b"\xc4\x01\xc1\x00\x11\x05");
    assert_eq!(a.received(&plain), Some(Output::Failed(Error::Unprotected)));
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a meter answers at any step, the machine fails or goes on; it never panics.
        #[test]
        fn arbitrary_answers_should_never_panic(
            steps in 0usize..6,
            junk in proptest::collection::vec(any::<u8>(), 0..120),
            hdlc_link: bool,
            framed: bool,
        ) {
            let (mut m, cfg) = if hdlc_link {
                (Meter::hdlc(App::new(), 64), hdlc_config(128))
            } else {
                (Meter::wrapper(App::new()), wrapper_config(SecurityConfig::None))
            };
            let mut a = Association::new(cfg, MemoryCounter::default());
            let mut out = a.connect();
            for _ in 0..steps {
                out = match out {
                    Output::Send { bytes, .. } => a.received(&m.handle(&bytes)).unwrap_or_else(|| a.timed_out()),
                    Output::Done(Event::Connected(_)) => {
                        let objs: Vec<reads::Target> = energy_and_voltage().into_iter().map(Into::into).collect();
                        a.get(reads::requests(&objs))
                    },
                    _ => break,
                };
            }
            if matches!(out, Output::Send { .. }) {
                // Wrap the junk as the link would, so it reaches the APDU decoder too.
                let bytes = match (framed, hdlc_link) {
                    (true, true) => Frame {
                        destination: Address::client(16),
                        source: Address::server(1, Some(17)),
                        control: Control::I { ns: 0, nr: 1, pf: true },
                        segmented: false,
                        info: [&hdlc::LLC_RESPONSE[..], &junk].concat(),
                    }.encode(),
                    (true, false) => wrapper::encode(1, 16, &junk),
                    _ => junk,
                };
                if let Some(o) = a.received(&bytes) {
                    let _ = format!("{o:?}");
                }
                let _ = a.timed_out();
            }
        }
    }
}

fn profile_app() -> (App, [u8; 6], jiff::Timestamp) {
    let mut app = App::new();
    let t0: jiff::Timestamp = "2024-03-01T00:00:00Z".parse().unwrap();
    let rows: Vec<Data> = (0..8)
        .map(|i| {
            let t = t0 + jiff::SignedDuration::from_secs(900 * i);
            Data::Structure(vec![
                if i % 2 == 0 {
                    Data::OctetString(DateTime::from_timestamp_utc(t, 0x80).encode().to_vec())
                } else {
                    // Rows between are sent without a time: the previous row's plus the period.
                    Data::Null
                },
                Data::UInt32(1000 + i as u32),
                Data::UInt8(0),
            ])
        })
        .collect();
    let p = [1, 0, 99, 1, 0, 255];
    app.objects.insert((7, p, 2), Data::Array(rows));
    app.objects.insert(
        (7, p, 3),
        Data::Array(vec![
            apdu::CaptureObject::CLOCK.to_data(),
            apdu::CaptureObject {
                attribute: apdu::AttributeRef::new(3, [1, 0, 1, 8, 0, 255], 2),
                data_index: 0,
            }
            .to_data(),
            apdu::CaptureObject {
                attribute: apdu::AttributeRef::new(1, [0, 0, 96, 10, 1, 255], 2),
                data_index: 0,
            }
            .to_data(),
        ]),
    );
    app.objects.insert((7, p, 4), Data::UInt32(900));
    (app, p, t0)
}

async fn serve(meter: Meter) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Meter>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_end, mut meter_end) = tokio::io::duplex(4096);
    let mut meter = meter;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match meter_end.read(&mut buf).await {
                Ok(0) | Err(_) => return meter,
                Ok(n) => n,
            };
            let answer = meter.handle(&buf[..n]);
            if meter_end.write_all(&answer).await.is_err() {
                return meter;
            }
        }
    });
    (client_end, task)
}

#[tokio::test(start_paused = true)]
async fn profile_range_should_come_back_as_timed_scaled_values() {
    let (app, p, t0) = profile_app();
    let (io, task) = serve(Meter::hdlc(app, 64)).await;
    let mut client = super::transport::Client::new(io, hdlc_config(128), MemoryCounter::default());
    client.connect().await.unwrap();
    let profile = client
        .read_profile(
            Obis(p),
            Some((t0, t0 + jiff::SignedDuration::from_hours(2))),
            &jiff::tz::TimeZone::UTC,
        )
        .await
        .unwrap();
    client.release().await.unwrap();
    assert_eq!(profile.capture_period_s, 900);
    assert_eq!(
        profile.scalers[1],
        Some(cosem::ScalerUnit {
            scaler: -3,
            unit: 30
        })
    );
    let values = profile.values();
    // Eight rows of two numeric columns (energy, and a status word without scaler).
    assert_eq!(values.len(), 16);
    let last = &values[14];
    assert_eq!(last.timestamp.to_string(), "2024-03-01T01:45:00Z");
    assert_eq!((last.value.as_str(), last.unit), ("1.007", Some("Wh")));
    assert_eq!(values[0].clock_status, Some(0x80));
    drop(client.into_parts());
    let meter = task.await.unwrap();
    // Header with list, scalers, then the buffer.
    assert_eq!(meter.app.requests[..3], [3, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn client_should_read_over_a_stream_and_time_out_on_silence() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_end, mut meter_end) = tokio::io::duplex(4096);
    let mut meter = Meter::hdlc(App::new(), 128);
    let server = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match meter_end.read(&mut buf).await {
                Ok(0) | Err(_) => return meter,
                Ok(n) => n,
            };
            let answer = meter.handle(&buf[..n]);
            if meter_end.write_all(&answer).await.is_err() {
                return meter;
            }
        }
    });
    let mut client =
        super::transport::Client::new(client_end, hdlc_config(128), MemoryCounter::default());
    client.connect().await.unwrap();
    let values = client.read_values(&energy_and_voltage()).await.unwrap();
    assert_eq!(values[0].1.as_ref().unwrap().value.as_str(), "14567.125");
    client.release().await.unwrap();
    drop(client.into_parts());
    assert!(server.await.unwrap().frames >= 4);
    // A meter that never answers: the per-frame timeout, retries, then NoAnswer.
    let (io, _silent) = tokio::io::duplex(4096);
    let mut dead = super::transport::Client::new(io, hdlc_config(128), MemoryCounter::default());
    let started = tokio::time::Instant::now();
    let e = dead.connect().await.unwrap_err();
    assert!(
        matches!(
            e,
            super::transport::TransportError::Dlms(Error::NoAnswer { .. })
        ),
        "{e}"
    );
    // One SNRM and two retries, each given the answer timeout.
    assert_eq!(started.elapsed(), Duration::from_secs(9));
}

fn from_meter(control: Control, info: Vec<u8>) -> Vec<u8> {
    Frame {
        destination: Address::client(16),
        source: Address::server(1, Some(17)),
        control,
        segmented: false,
        info,
    }
    .encode()
}

#[test]
fn busy_meter_should_be_polled_then_given_up() {
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let ua = from_meter(Control::Ua, Parameters::default().encode());
    let Some(Output::Send { .. }) = a.received(&ua) else {
        panic!("AARQ")
    };
    let rnr = from_meter(Control::Rnr { nr: 1, pf: true }, vec![]);
    for _ in 0..10 {
        let Some(Output::Send { bytes, .. }) = a.received(&rnr) else {
            panic!("RR poll")
        };
        let mut s = hdlc::Splitter::new();
        s.push(&bytes);
        assert_eq!(
            s.next_frame().unwrap().unwrap().control,
            Control::Rr { nr: 0, pf: true }
        );
    }
    assert_eq!(a.received(&rnr), Some(Output::Failed(Error::Busy)));
}

#[test]
fn frame_reject_should_be_typed() {
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let ua = from_meter(Control::Ua, vec![]);
    let Some(Output::Send { .. }) = a.received(&ua) else {
        panic!("AARQ")
    };
    let frmr = from_meter(Control::Frmr, vec![0x10, 0x00, 0x01]);
    assert_eq!(
        a.received(&frmr),
        Some(Output::Failed(Error::FrameReject(vec![0x10, 0x00, 0x01])))
    );
}

#[test]
fn out_of_sequence_i_frame_should_be_a_sequence_error() {
    let mut a = Association::new(hdlc_config(128), MemoryCounter::default());
    let Output::Send { .. } = a.connect() else {
        panic!()
    };
    let Some(Output::Send { .. }) = a.received(&from_meter(Control::Ua, vec![])) else {
        panic!()
    };
    let wrong = from_meter(
        Control::I {
            ns: 3,
            nr: 1,
            pf: true,
        },
        hdlc::LLC_RESPONSE.to_vec(),
    );
    assert_eq!(
        a.received(&wrong),
        Some(Output::Failed(Error::Sequence {
            expected: 0,
            got: 3
        }))
    );
}
