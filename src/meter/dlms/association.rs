//! The client side of a DLMS/COSEM association as a sans-IO state machine.
//!
//! The machine never touches a socket or a port. Each call returns an [`Output`]: bytes to
//! send and how long to wait for the answer, an [`Event`] when an operation is complete, or
//! an [`Error`]. The caller (see [`super::transport`]) sends, reads, and feeds what arrives to
//! [`Association::received`], or tells [`Association::timed_out`] that nothing came in time.
//!
//! ```text
//! connect   wrapper:  AARQ ─────────────────────────────► AARE
//!           HDLC:     SNRM ─► UA (negotiated sizes), then AARQ in I-frames ─► AARE
//!           HLS-GMAC: … then ACTION reply_to_HLS_authentication(f(StoC)) ─► f(CtoS), checked
//! get       GET-Request-With-List when the meter agreed to multiple references, else one
//!           GET-Request-Normal each; GET-Request-Next for every block of a long answer;
//!           HDLC: segments sent one by one (RR between), received segments polled with RR
//! release   RLRQ ─► RLRE, then on HDLC DISC ─► UA or DM
//! ```
//!
//! Results keep the two kinds of failure apart: a value the meter refused or does not have
//! is an `Err(AccessError)` inside the results of a successful GET; a link, framing,
//! security or protocol failure is an [`Error`] and ends the operation. Anything the meter
//! sends that the client cannot make sense of is [`Error::Malformed`] with the raw bytes —
//! never a panic.
//!
//! # Invariants
//!
//! * A ciphered association takes every invocation counter value from the caller's
//!   [`InvocationCounter`], one per ciphered APDU (and one for f(StoC)), so no value is used
//!   twice as long as the counter keeps its contract. The machine holds no counter state.
//! * Server invocation counters must increase within an association; a repeat is refused
//!   ([`Error::Replay`]).
//! * The window is one frame each way (proposed in the SNRM): every I-frame the client sends
//!   has the poll bit and is answered before the next.

use std::collections::VecDeque;
use std::time::Duration;

use super::apdu::{
    self, Aarq, ApduError, AttributeRef, Conformance, Context, Diagnostic, GetResult,
    InitiateRequest, InitiateResponse, Mechanism, Response, Selector, ciphered,
};
use super::axdr::Data;
use super::cosem;
use super::hdlc::{self, Address, Control, Frame, FrameError, Parameters};
use super::security::{self, CounterError, CryptoError, InvocationCounter, Keys};
use super::wrapper;

/// How the association reaches the meter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkConfig {
    /// IEC 62056-47 over TCP: the client's and the server's wPort.
    Wrapper { client: u16, server: u16 },
    /// IEC 62056-46 HDLC on a serial line or an optical probe.
    Hdlc {
        client: u8,
        server_logical: u16,
        server_physical: Option<u16>,
        /// The longest information field proposed, both ways (the meter may lower it).
        max_info: u16,
    },
}

/// The security of the association.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecurityConfig {
    /// Lowest level: no authentication (the public client, SAP 16).
    None,
    /// Low level: a password in the AARQ.
    Lls { password: Vec<u8> },
    /// HLS mechanism 5 with security suite 0, every APDU authenticated and encrypted.
    HlsGmac {
        keys: Keys,
        client_system_title: [u8; 8],
    },
}

#[derive(Clone, Debug)]
pub struct AssociationConfig {
    pub link: LinkConfig,
    pub security: SecurityConfig,
    /// The largest APDU the client accepts (client-max-receive-pdu-size).
    pub max_receive_pdu: u16,
    pub conformance: Conformance,
    /// How long an answer may take (per frame).
    pub answer_timeout: Duration,
    /// How often an HDLC frame is sent again when no answer comes.
    pub retries: u8,
    /// The most attributes in one GET-Request-With-List. The standard sets no limit and
    /// neither does the client by default (`usize::MAX`): a list is as long as the meter's
    /// max receive PDU allows for the request, and an answer longer than the client's comes
    /// in GET blocks. A meter with a lower limit of its own that answers a list with an
    /// exception gets lists half as long, down to one GET per attribute.
    pub max_list: usize,
    /// The longest answer assembled from blocks and segments, to bound memory.
    pub max_answer: usize,
}

impl AssociationConfig {
    pub fn new(link: LinkConfig, security: SecurityConfig) -> Self {
        AssociationConfig {
            link,
            security,
            max_receive_pdu: 2048,
            conformance: Conformance::CLIENT,
            answer_timeout: Duration::from_secs(3),
            retries: 2,
            max_list: usize::MAX,
            max_answer: 1 << 20,
        }
    }
}

/// What the meter agreed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub conformance: Conformance,
    /// The largest APDU the meter accepts.
    pub server_max_receive_pdu: u16,
    pub dlms_version: u8,
    pub hdlc: Option<Parameters>,
    pub server_system_title: Option<[u8; 8]>,
}

/// One attribute to read, with selective access for profile buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub attribute: AttributeRef,
    pub access: Option<Selector>,
}

impl From<AttributeRef> for Request {
    fn from(attribute: AttributeRef) -> Self {
        Request {
            attribute,
            access: None,
        }
    }
}

/// What the caller does next.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send these bytes; an answer is due within `answer_within`.
    Send {
        bytes: Vec<u8>,
        answer_within: Duration,
    },
    Done(Event),
    Failed(Error),
}

#[derive(Debug, PartialEq)]
pub enum Event {
    Connected(Negotiated),
    /// One result per requested attribute, in order.
    Values(Vec<GetResult>),
    Released,
}

/// Why an operation failed. [`Error::is_link`] tells a link that failed from a meter that
/// answered and said no.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no answer to the {waiting_for} within {after:?}")]
    NoAnswer {
        waiting_for: &'static str,
        after: Duration,
    },
    #[error("only damaged frames arrived: {0}")]
    Checksum(FrameError),
    #[error("the meter refused the HDLC connection (DM)")]
    LinkRefused,
    #[error("the meter disconnected the HDLC link (DM)")]
    Disconnected,
    #[error("the meter rejected a frame (FRMR {0:02x?})")]
    FrameReject(Vec<u8>),
    #[error("HDLC sequence error: expected N(S) {expected}, got {got}")]
    Sequence { expected: u8, got: u8 },
    #[error("the meter stayed busy (RNR)")]
    Busy,
    #[error("association rejected ({}): {}", if *.result == 2 { "transient" } else { "permanent" }, .diagnostic.describe())]
    Rejected { result: u8, diagnostic: Diagnostic },
    #[error("the meter refused the xDLMS initiate (service error {kind}, value {value})")]
    InitiateRefused { kind: u8, value: u8 },
    #[error("HLS authentication failed: {0}")]
    AuthenticationFailed(&'static str),
    #[error("ciphering: {0}")]
    Crypto(CryptoError),
    #[error("the meter's invocation counter went back ({got} after {last})")]
    Replay { got: u32, last: u32 },
    #[error("an unprotected answer in a ciphered association")]
    Unprotected,
    #[error(transparent)]
    Counter(CounterError),
    #[error("exception response: {}", apdu::describe_exception(*.state_error, *.service_error))]
    Exception { state_error: u8, service_error: u8 },
    #[error("malformed answer ({reason}): {}", hex::encode(.raw))]
    Malformed { reason: String, raw: Vec<u8> },
    #[error("answer longer than {0} bytes")]
    TooLong(usize),
    #[error("{0}")]
    State(&'static str),
}

impl Error {
    /// The link or the framing failed (as opposed to the meter answering and refusing).
    pub fn is_link(&self) -> bool {
        matches!(
            self,
            Error::NoAnswer { .. }
                | Error::Checksum(_)
                | Error::Disconnected
                | Error::FrameReject(_)
                | Error::Sequence { .. }
                | Error::Busy
        )
    }

    fn malformed(reason: impl ToString, raw: &[u8]) -> Error {
        Error::Malformed {
            reason: reason.to_string(),
            raw: raw.to_vec(),
        }
    }
}

/// The link layer: framing only.
#[derive(Debug)]
enum Link {
    Wrapper {
        client: u16,
        server: u16,
        splitter: wrapper::Splitter,
    },
    Hdlc(Box<HdlcLink>),
}

#[derive(Debug)]
struct HdlcLink {
    client: Address,
    server: Address,
    proposed: Parameters,
    params: Parameters,
    vs: u8,
    vr: u8,
    splitter: hdlc::Splitter,
    /// Information-field segments of the APDU being sent, not yet sent.
    outgoing: VecDeque<Vec<u8>>,
    /// Segments of the APDU being received.
    incoming: Vec<u8>,
    rnr: u8,
}

/// What the link made of received bytes.
enum LinkEvent {
    /// A complete APDU.
    Apdu(Vec<u8>),
    /// Send this frame (the next segment, an RR) and keep waiting.
    Send(Vec<u8>),
    /// An unnumbered answer: UA (with its information), DM, FRMR.
    Unnumbered(Control, Vec<u8>),
    Failed(Error),
}

impl HdlcLink {
    fn frame(&self, control: Control, segmented: bool, info: Vec<u8>) -> Vec<u8> {
        Frame {
            destination: self.server,
            source: self.client,
            control,
            segmented,
            info,
        }
        .encode()
    }

    fn snrm(&self) -> Vec<u8> {
        self.frame(Control::Snrm, false, self.proposed.encode())
    }

    /// Queues an APDU and returns its first frame.
    fn send_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let mut info = hdlc::LLC_REQUEST.to_vec();
        info.extend_from_slice(apdu);
        let max = usize::from(self.params.max_info_tx.max(32));
        self.outgoing = info.chunks(max).map(<[u8]>::to_vec).collect();
        self.incoming.clear();
        self.next_segment()
    }

    fn next_segment(&mut self) -> Vec<u8> {
        let (control, more, info) = hdlc::next_segment(&mut self.outgoing, &mut self.vs, self.vr);
        self.frame(control, more, info)
    }

    fn rr(&self) -> Vec<u8> {
        self.frame(
            Control::Rr {
                nr: self.vr,
                pf: true,
            },
            false,
            vec![],
        )
    }

    fn handle(&mut self, f: Frame, max_answer: usize) -> Option<LinkEvent> {
        match f.control {
            Control::I { ns, .. } => {
                if ns != self.vr {
                    if ns == (self.vr + 7) & 7 {
                        // A repeat of the last frame: our acknowledgement was lost.
                        return Some(LinkEvent::Send(self.rr()));
                    }
                    return Some(LinkEvent::Failed(Error::Sequence {
                        expected: self.vr,
                        got: ns,
                    }));
                }
                self.vr = (self.vr + 1) & 7;
                if self.incoming.len() + f.info.len() > max_answer {
                    return Some(LinkEvent::Failed(Error::TooLong(max_answer)));
                }
                self.incoming.extend_from_slice(&f.info);
                if f.segmented {
                    return Some(LinkEvent::Send(self.rr()));
                }
                let info = std::mem::take(&mut self.incoming);
                match info.strip_prefix(&hdlc::LLC_RESPONSE[..]) {
                    Some(apdu) => Some(LinkEvent::Apdu(apdu.to_vec())),
                    None => Some(LinkEvent::Failed(Error::malformed(
                        "I-frame without the LLC header E6 E7 00",
                        &info,
                    ))),
                }
            }
            Control::Rr { nr, .. } => {
                self.rnr = 0;
                if !self.outgoing.is_empty() && nr == self.vs {
                    return Some(LinkEvent::Send(self.next_segment()));
                }
                if nr != self.vs {
                    // The meter missed our last frame: poll it again.
                    return Some(LinkEvent::Send(self.rr()));
                }
                None
            }
            Control::Rnr { .. } => {
                self.rnr += 1;
                if self.rnr > 10 {
                    return Some(LinkEvent::Failed(Error::Busy));
                }
                Some(LinkEvent::Send(self.rr()))
            }
            c @ (Control::Ua | Control::Dm | Control::Frmr) => {
                Some(LinkEvent::Unnumbered(c, f.info))
            }
            // A client ignores commands and UI frames.
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Idle,
    LinkConnecting,
    Associating { ctos: Option<Vec<u8>> },
    Authenticating { ctos: Vec<u8>, invoke: u8 },
    Ready,
    Getting(GetOp),
    Releasing,
    Disconnecting,
    Closed,
}

#[derive(Debug)]
struct GetOp {
    requests: Vec<Request>,
    results: Vec<GetResult>,
    /// Requests in the exchange under way: `results.len() .. results.len() + in_flight`.
    in_flight: usize,
    with_list: bool,
    invoke: u8,
    blocks: Vec<u8>,
    next_block: u32,
}

/// A DLMS/COSEM association with one meter. `C` supplies invocation counter values.
#[derive(Debug)]
pub struct Association<C: InvocationCounter> {
    config: AssociationConfig,
    counter: C,
    link: Link,
    phase: Phase,
    negotiated: Option<Negotiated>,
    /// The last frame or APDU sent, for a retry after a timeout.
    last_sent: Vec<u8>,
    retries_left: u8,
    last_frame_error: Option<FrameError>,
    invoke: u8,
    server_ic: Option<u32>,
    ignored_frames: usize,
    /// The longest list the meter took in this association (lowered when it refuses one).
    list_max: usize,
}

impl<C: InvocationCounter> Association<C> {
    pub fn new(config: AssociationConfig, counter: C) -> Self {
        let link = match &config.link {
            LinkConfig::Wrapper { client, server } => Link::Wrapper {
                client: *client,
                server: *server,
                splitter: wrapper::Splitter::new(usize::from(u16::MAX)),
            },
            LinkConfig::Hdlc {
                client,
                server_logical,
                server_physical,
                max_info,
            } => {
                let proposed = Parameters {
                    max_info_tx: *max_info,
                    max_info_rx: *max_info,
                    window_tx: 1,
                    window_rx: 1,
                };
                Link::Hdlc(Box::new(HdlcLink {
                    client: Address::client(*client),
                    server: Address::server(*server_logical, *server_physical),
                    proposed,
                    params: Parameters::default(),
                    vs: 0,
                    vr: 0,
                    splitter: hdlc::Splitter::new(),
                    outgoing: VecDeque::new(),
                    incoming: Vec::new(),
                    rnr: 0,
                }))
            }
        };
        Association {
            list_max: config.max_list.max(1),
            config,
            counter,
            link,
            phase: Phase::Idle,
            negotiated: None,
            last_sent: Vec::new(),
            retries_left: 0,
            last_frame_error: None,
            invoke: 0,
            server_ic: None,
            ignored_frames: 0,
        }
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Frames or APDUs dropped because they were for another address.
    pub fn ignored_frames(&self) -> usize {
        self.ignored_frames
    }

    /// The counter, e.g. to read back what was used.
    pub fn counter(&self) -> &C {
        &self.counter
    }

    pub fn into_counter(self) -> C {
        self.counter
    }

    fn ciphered(&self) -> bool {
        matches!(self.config.security, SecurityConfig::HlsGmac { .. })
    }

    fn send(&mut self, bytes: Vec<u8>) -> Output {
        self.last_sent = bytes.clone();
        self.retries_left = match self.link {
            Link::Hdlc(_) => self.config.retries,
            // TCP delivers or fails; sending again only confuses the meter.
            Link::Wrapper { .. } => 0,
        };
        self.last_frame_error = None;
        Output::Send {
            bytes,
            answer_within: self.config.answer_timeout,
        }
    }

    fn fail(&mut self, e: Error) -> Output {
        self.phase = Phase::Closed;
        Output::Failed(e)
    }

    fn next_invoke(&mut self) -> u8 {
        self.invoke = (self.invoke + 1) & 0x0F;
        self.invoke
    }

    /// Ciphers a request APDU in a ciphered association.
    fn protect(&mut self, apdu: Vec<u8>) -> Result<Vec<u8>, Error> {
        let SecurityConfig::HlsGmac {
            keys,
            client_system_title,
        } = &self.config.security
        else {
            return Ok(apdu);
        };
        let tag = apdu
            .first()
            .and_then(|t| ciphered::glo_of(*t))
            .ok_or(Error::State("no glo- form for this APDU"))?;
        let ic = self.counter.next().map_err(Error::Counter)?;
        let text = security::encrypt(
            security::SC_AUTHENTICATED_ENCRYPTED,
            client_system_title,
            ic,
            keys,
            &apdu,
        )
        .map_err(Error::Crypto)?;
        Ok(security::wrap(
            tag,
            security::SC_AUTHENTICATED_ENCRYPTED,
            ic,
            &text,
        ))
    }

    /// Deciphers a ciphered answer's content.
    fn unprotect(
        &mut self,
        system_title: Option<&[u8]>,
        content: &[u8],
        raw: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let SecurityConfig::HlsGmac { keys, .. } = &self.config.security else {
            return Err(Error::malformed(
                "a ciphered answer in an association without ciphering",
                raw,
            ));
        };
        let st: [u8; 8] = match system_title {
            Some(st) => st
                .try_into()
                .map_err(|_| Error::malformed("system title not 8 bytes", raw))?,
            None => self
                .negotiated
                .as_ref()
                .and_then(|n| n.server_system_title)
                .ok_or_else(|| Error::malformed("ciphered answer before the system title", raw))?,
        };
        let (sc, ic, text) = security::split(content).map_err(Error::Crypto)?;
        if sc & security::SC_AUTHENTICATED == 0 {
            // Without a tag anybody on the line could have written it.
            return Err(Error::Crypto(CryptoError::Unsupported(sc)));
        }
        if let Some(last) = self.server_ic {
            if ic <= last {
                return Err(Error::Replay { got: ic, last });
            }
        }
        let plain = security::decrypt(sc, &st, ic, keys, text).map_err(Error::Crypto)?;
        self.server_ic = Some(ic);
        Ok(plain)
    }

    /// Sends an APDU over the link.
    fn send_apdu(&mut self, apdu: Vec<u8>) -> Output {
        let bytes = match &mut self.link {
            Link::Wrapper { client, server, .. } => wrapper::encode(*client, *server, &apdu),
            Link::Hdlc(h) => h.send_apdu(&apdu),
        };
        self.send(bytes)
    }

    /// Opens the association: the HDLC link first where there is one, then AARQ (and the HLS
    /// passes 3 and 4).
    pub fn connect(&mut self) -> Output {
        if !matches!(self.phase, Phase::Idle | Phase::Closed) {
            return Output::Failed(Error::State("connect while an association is open"));
        }
        self.negotiated = None;
        self.server_ic = None;
        match &mut self.link {
            Link::Hdlc(h) => {
                h.vs = 0;
                h.vr = 0;
                h.splitter.clear();
                let snrm = h.snrm();
                self.phase = Phase::LinkConnecting;
                self.send(snrm)
            }
            Link::Wrapper { splitter, .. } => {
                splitter.clear();
                self.aarq()
            }
        }
    }

    fn aarq(&mut self) -> Output {
        let initiate = InitiateRequest {
            dedicated_key: None,
            conformance: self.config.conformance,
            max_receive_pdu: self.config.max_receive_pdu,
        }
        .encode();
        let (aarq, ctos) = match self.config.security.clone() {
            SecurityConfig::None => (
                Aarq {
                    context: Context::LnNoCiphering,
                    mechanism: Mechanism::Lowest,
                    calling_ap_title: None,
                    authentication_value: None,
                    user_information: initiate,
                },
                None,
            ),
            SecurityConfig::Lls { password } => (
                Aarq {
                    context: Context::LnNoCiphering,
                    mechanism: Mechanism::Lls,
                    calling_ap_title: None,
                    authentication_value: Some(password),
                    user_information: initiate,
                },
                None,
            ),
            SecurityConfig::HlsGmac {
                client_system_title,
                ..
            } => {
                let ctos = match security::challenge(16) {
                    Ok(c) => c,
                    Err(e) => return self.fail(Error::Counter(e)),
                };
                let user_information = match self.protect(initiate) {
                    Ok(u) => u,
                    Err(e) => return self.fail(e),
                };
                (
                    Aarq {
                        context: Context::LnCiphering,
                        mechanism: Mechanism::HlsGmac,
                        calling_ap_title: Some(client_system_title),
                        authentication_value: Some(ctos.clone()),
                        user_information,
                    },
                    Some(ctos),
                )
            }
        };
        self.phase = Phase::Associating { ctos };
        self.send_apdu(aarq.encode())
    }

    /// Reads attributes. Needs an open association.
    pub fn get(&mut self, requests: Vec<Request>) -> Output {
        if !matches!(self.phase, Phase::Ready) {
            return Output::Failed(Error::State("get without an open association"));
        }
        if requests.is_empty() {
            return Output::Done(Event::Values(vec![]));
        }
        let with_list = requests.len() > 1
            && self.list_max > 1
            && self
                .negotiated
                .as_ref()
                .is_some_and(|n| n.conformance.has(Conformance::MULTIPLE_REFERENCES));
        let op = GetOp {
            results: Vec::with_capacity(requests.len()),
            requests,
            in_flight: 0,
            with_list,
            invoke: 0,
            blocks: Vec::new(),
            next_block: 1,
        };
        self.next_get(op)
    }

    fn next_get(&mut self, mut op: GetOp) -> Output {
        let done = op.results.len();
        if done == op.requests.len() {
            self.phase = Phase::Ready;
            return Output::Done(Event::Values(op.results));
        }
        op.invoke = self.next_invoke();
        op.blocks.clear();
        op.next_block = 1;
        let rest = op.requests.len() - done;
        let apdu = if op.with_list && rest > 1 && self.list_max > 1 {
            // The request must fit the meter's max PDU, with room for the ciphering header
            // and tag; a meter with a small one gets shorter lists (down to a normal GET).
            let limit = self
                .negotiated
                .as_ref()
                .map_or(usize::MAX, |n| usize::from(n.server_max_receive_pdu))
                .saturating_sub(if self.ciphered() { 24 } else { 0 });
            let encode = |n: usize| {
                let list: Vec<(AttributeRef, Option<Selector>)> = op.requests[done..done + n]
                    .iter()
                    .map(|r| (r.attribute, r.access.clone()))
                    .collect();
                apdu::get_request_with_list(op.invoke, &list)
            };
            // The longest list that fits: the request grows with every attribute.
            let (mut lo, mut hi) = (1, rest.min(self.list_max));
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if encode(mid).len() <= limit {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            op.in_flight = lo;
            if lo == 1 {
                let r = &op.requests[done];
                apdu::get_request_normal(op.invoke, &r.attribute, r.access.as_ref())
            } else {
                encode(lo)
            }
        } else {
            op.in_flight = 1;
            let r = &op.requests[done];
            apdu::get_request_normal(op.invoke, &r.attribute, r.access.as_ref())
        };
        self.phase = Phase::Getting(op);
        match self.protect(apdu) {
            Ok(a) => self.send_apdu(a),
            Err(e) => self.fail(e),
        }
    }

    /// Releases the association (RLRQ) and, on HDLC, disconnects the link.
    pub fn release(&mut self) -> Output {
        match self.phase {
            Phase::Ready => {
                self.phase = Phase::Releasing;
                self.send_apdu(apdu::rlrq())
            }
            Phase::Idle | Phase::Closed => Output::Done(Event::Released),
            _ => self.disconnect(),
        }
    }

    fn disconnect(&mut self) -> Output {
        match &self.link {
            Link::Hdlc(h) => {
                let disc = h.frame(Control::Disc, false, vec![]);
                self.phase = Phase::Disconnecting;
                self.send(disc)
            }
            Link::Wrapper { .. } => {
                self.phase = Phase::Closed;
                Output::Done(Event::Released)
            }
        }
    }

    /// Nothing arrived within the time the last [`Output::Send`] gave.
    pub fn timed_out(&mut self) -> Output {
        let waiting_for = match self.phase {
            Phase::LinkConnecting => "SNRM",
            Phase::Associating { .. } => "AARQ",
            Phase::Authenticating { .. } => "HLS authentication",
            Phase::Getting(_) => "GET request",
            // A meter that does not answer the RLRQ is released anyway.
            Phase::Releasing => return self.disconnect(),
            Phase::Disconnecting => {
                self.phase = Phase::Closed;
                return Output::Done(Event::Released);
            }
            Phase::Idle | Phase::Ready | Phase::Closed => {
                return Output::Failed(Error::State("timeout with nothing outstanding"));
            }
        };
        if self.retries_left > 0 && !self.last_sent.is_empty() {
            self.retries_left -= 1;
            return Output::Send {
                bytes: self.last_sent.clone(),
                answer_within: self.config.answer_timeout,
            };
        }
        let e = match self.last_frame_error.take() {
            Some(fe) => Error::Checksum(fe),
            None => Error::NoAnswer {
                waiting_for,
                after: self.config.answer_timeout,
            },
        };
        self.fail(e)
    }

    /// Bytes arrived. `None`: keep reading (within the same deadline).
    pub fn received(&mut self, bytes: &[u8]) -> Option<Output> {
        let max_answer = self.config.max_answer;
        let event = match &mut self.link {
            Link::Wrapper {
                client,
                server,
                splitter,
            } => {
                splitter.push(bytes);
                let mut ev = None;
                while let Some(r) = splitter.next_apdu() {
                    match r {
                        Ok(w) if w.source == *server && w.destination == *client => {
                            ev = Some(LinkEvent::Apdu(w.apdu));
                            break;
                        }
                        Ok(_) => self.ignored_frames += 1,
                        Err(_) => {}
                    }
                }
                ev?
            }
            Link::Hdlc(h) => {
                h.splitter.push(bytes);
                let mut ev = None;
                while let Some(r) = h.splitter.next_frame() {
                    match r {
                        Ok(f) if f.destination == h.client && f.source == h.server => {
                            if let Some(e) = h.handle(f, max_answer) {
                                ev = Some(e);
                                break;
                            }
                        }
                        // Another station's frame, or an echo of our own.
                        Ok(_) => self.ignored_frames += 1,
                        Err(e) => self.last_frame_error = Some(e),
                    }
                }
                ev?
            }
        };
        Some(match event {
            LinkEvent::Send(bytes) => self.send(bytes),
            LinkEvent::Failed(e) => self.fail(e),
            LinkEvent::Unnumbered(c, info) => self.unnumbered(c, info),
            LinkEvent::Apdu(apdu) => self.apdu(apdu),
        })
    }

    fn unnumbered(&mut self, c: Control, info: Vec<u8>) -> Output {
        match (&self.phase, c) {
            (Phase::LinkConnecting, Control::Ua) => {
                let theirs = match Parameters::decode(&info) {
                    Ok(p) => p,
                    Err(e) => return self.fail(Error::malformed(e, &info)),
                };
                if let Link::Hdlc(h) = &mut self.link {
                    // The meter's UA states its own limits: what it sends and receives.
                    h.params = Parameters {
                        max_info_tx: theirs.max_info_rx.min(h.proposed.max_info_tx),
                        max_info_rx: theirs.max_info_tx.min(h.proposed.max_info_rx),
                        window_tx: 1,
                        window_rx: 1,
                    };
                }
                self.aarq()
            }
            (Phase::LinkConnecting, Control::Dm) => self.fail(Error::LinkRefused),
            (Phase::Disconnecting, Control::Ua | Control::Dm) => {
                self.phase = Phase::Closed;
                Output::Done(Event::Released)
            }
            (_, Control::Frmr) => self.fail(Error::FrameReject(info)),
            (_, Control::Dm) => self.fail(Error::Disconnected),
            _ => self.fail(Error::malformed("unexpected UA", &[c.encode()])),
        }
    }

    fn apdu(&mut self, raw: Vec<u8>) -> Output {
        let mut resp = match Response::decode(&raw) {
            Ok(r) => r,
            Err(e) => return self.fail(Error::malformed(e, &raw)),
        };
        let mut was_ciphered = false;
        if let Response::Ciphered {
            system_title,
            content,
            ..
        } = &resp
        {
            let plain =
                match self.unprotect(system_title.clone().as_deref(), &content.clone(), &raw) {
                    Ok(p) => p,
                    Err(e) => return self.fail(e),
                };
            resp = match Response::decode(&plain) {
                Ok(Response::Ciphered { .. }) => {
                    return self.fail(Error::malformed("ciphered twice", &raw));
                }
                Ok(r) => r,
                Err(e) => return self.fail(Error::malformed(e, &plain)),
            };
            was_ciphered = true;
        }
        if let Response::Exception {
            state_error,
            service_error,
        } = resp
        {
            if let Phase::Getting(op) = &self.phase {
                if op.with_list && op.in_flight > 1 {
                    // The meter agreed to multiple references but refuses this list: a limit
                    // of its own on the list's length, or none at all. Lists half as long,
                    // for the rest of the association, down to one attribute at a time.
                    let half = op.in_flight / 2;
                    if let Phase::Getting(op) = std::mem::replace(&mut self.phase, Phase::Ready) {
                        self.list_max = half;
                        return self.next_get(op);
                    }
                }
            }
            return self.fail(Error::Exception {
                state_error,
                service_error,
            });
        }
        let data_answer = matches!(
            resp,
            Response::GetNormal { .. }
                | Response::GetBlock { .. }
                | Response::GetWithList { .. }
                | Response::Action { .. }
        );
        if self.ciphered() && data_answer && !was_ciphered {
            return self.fail(Error::Unprotected);
        }
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Associating { ctos } => self.aare(resp, ctos, &raw),
            Phase::Authenticating { ctos, invoke } => self.hls_reply(resp, &ctos, invoke, &raw),
            Phase::Getting(op) => self.get_response(op, resp, &raw),
            Phase::Releasing => match resp {
                Response::Rlre { .. } => self.disconnect(),
                _ => self.fail(Error::malformed("expected RLRE", &raw)),
            },
            _ => self.fail(Error::malformed("an APDU nobody asked for", &raw)),
        }
    }

    fn aare(&mut self, resp: Response, ctos: Option<Vec<u8>>, raw: &[u8]) -> Output {
        let Response::Aare(aare) = resp else {
            return self.fail(Error::malformed("expected AARE", raw));
        };
        let server_system_title = aare
            .responding_ap_title
            .as_deref()
            .and_then(|st| <[u8; 8]>::try_from(st).ok());
        let hdlc = match &self.link {
            Link::Hdlc(h) => Some(h.params),
            Link::Wrapper { .. } => None,
        };
        self.negotiated = Some(Negotiated {
            conformance: Conformance(0),
            server_max_receive_pdu: 0,
            dlms_version: 0,
            hdlc,
            server_system_title,
        });
        // The user information: an InitiateResponse, ciphered in a ciphered context, or a
        // ConfirmedServiceError.
        let ui = match aare.user_information.as_deref() {
            Some(ui) => match Response::decode(ui) {
                Ok(Response::Ciphered {
                    system_title,
                    content,
                    ..
                }) => match self.unprotect(system_title.as_deref(), &content, raw) {
                    Ok(p) => Some(p),
                    Err(e) => return self.fail(e),
                },
                _ => Some(ui.to_vec()),
            },
            None => None,
        };
        if aare.result != 0 {
            if let Some(Ok(Response::ServiceError { kind, value, .. })) =
                ui.as_deref().map(Response::decode)
            {
                if aare.diagnostic == Diagnostic::User(1) || aare.diagnostic == Diagnostic::User(0)
                {
                    return self.fail(Error::InitiateRefused { kind, value });
                }
            }
            return self.fail(Error::Rejected {
                result: aare.result,
                diagnostic: aare.diagnostic,
            });
        }
        let Some(ui) = ui else {
            return self.fail(Error::malformed("AARE without an InitiateResponse", raw));
        };
        let ir = match InitiateResponse::decode(&ui) {
            Ok(ir) => ir,
            Err(_) => {
                if let Ok(Response::ServiceError { kind, value, .. }) = Response::decode(&ui) {
                    return self.fail(Error::InitiateRefused { kind, value });
                }
                return self.fail(Error::malformed("InitiateResponse", &ui));
            }
        };
        if let Some(n) = &mut self.negotiated {
            n.conformance = ir.conformance;
            n.server_max_receive_pdu = ir.max_receive_pdu;
            n.dlms_version = ir.dlms_version;
        }
        match (&self.config.security, ctos) {
            (
                SecurityConfig::HlsGmac {
                    keys,
                    client_system_title,
                },
                Some(ctos),
            ) => {
                if aare.diagnostic != Diagnostic::User(14) {
                    return self.fail(Error::AuthenticationFailed(
                        "the meter did not ask for HLS authentication",
                    ));
                }
                if server_system_title.is_none() {
                    return self.fail(Error::malformed(
                        "AARE without the meter's system title",
                        raw,
                    ));
                }
                let Some(stoc) = aare.authentication_value.clone() else {
                    return self.fail(Error::malformed("AARE without the HLS challenge", raw));
                };
                let (keys, st) = (keys.clone(), *client_system_title);
                let ic = match self.counter.next() {
                    Ok(ic) => ic,
                    Err(e) => return self.fail(Error::Counter(e)),
                };
                let f_stoc = security::hls_gmac(&st, ic, &keys, &stoc);
                let invoke = self.next_invoke();
                let action = apdu::action_request(
                    invoke,
                    cosem::class::ASSOCIATION_LN,
                    cosem::ASSOCIATION_OBIS,
                    1,
                    Some(&Data::OctetString(f_stoc)),
                );
                self.phase = Phase::Authenticating { ctos, invoke };
                match self.protect(action) {
                    Ok(a) => self.send_apdu(a),
                    Err(e) => self.fail(e),
                }
            }
            _ => self.connected(),
        }
    }

    fn connected(&mut self) -> Output {
        self.phase = Phase::Ready;
        match &self.negotiated {
            Some(n) => Output::Done(Event::Connected(n.clone())),
            None => self.fail(Error::State("connected without a negotiation")),
        }
    }

    fn hls_reply(&mut self, resp: Response, ctos: &[u8], invoke: u8, raw: &[u8]) -> Output {
        let Response::Action {
            invoke: got,
            result,
            data,
        } = resp
        else {
            return self.fail(Error::malformed("expected an ACTION response", raw));
        };
        if got != invoke {
            return self.fail(Error::malformed(
                "ACTION response to another invoke id",
                raw,
            ));
        }
        if result != 0 {
            return self.fail(Error::AuthenticationFailed(
                "the meter did not accept f(StoC)",
            ));
        }
        let Some(Ok(Data::OctetString(f))) = data else {
            return self.fail(Error::malformed("HLS reply without f(CtoS)", raw));
        };
        let (SecurityConfig::HlsGmac { keys, .. }, Some(st)) = (
            &self.config.security,
            self.negotiated.as_ref().and_then(|n| n.server_system_title),
        ) else {
            return self.fail(Error::State("HLS reply without HLS"));
        };
        if f.len() != 5 + security::TAG_LEN || f[0] != security::SC_AUTHENTICATED {
            return self.fail(Error::malformed("f(CtoS) is not SC IC tag", &f));
        }
        let ic = u32::from_be_bytes([f[1], f[2], f[3], f[4]]);
        if security::hls_gmac(&st, ic, keys, ctos) != f {
            return self.fail(Error::AuthenticationFailed(
                "the meter's f(CtoS) does not match: it does not hold the keys",
            ));
        }
        self.connected()
    }

    fn get_response(&mut self, mut op: GetOp, resp: Response, raw: &[u8]) -> Output {
        let invoke_of = |r: &Response| match r {
            Response::GetNormal { invoke, .. }
            | Response::GetBlock { invoke, .. }
            | Response::GetWithList { invoke, .. } => Some(*invoke),
            _ => None,
        };
        match invoke_of(&resp) {
            Some(i) if i == op.invoke => {}
            Some(_) => return self.fail(Error::malformed("answer to another invoke id", raw)),
            None => return self.fail(Error::malformed("expected a GET response", raw)),
        }
        match resp {
            Response::GetNormal { result, .. } if op.in_flight == 1 => {
                op.results.push(result);
                self.next_get(op)
            }
            Response::GetWithList { results, .. } if results.len() == op.in_flight => {
                op.results.extend(results);
                self.next_get(op)
            }
            Response::GetBlock {
                last,
                block,
                raw: data,
                ..
            } => {
                if block != op.next_block {
                    return self.fail(Error::malformed(
                        format!("block {block}, expected {}", op.next_block),
                        raw,
                    ));
                }
                let data = match data {
                    Ok(d) => d,
                    Err(access) => {
                        // The whole answer is refused.
                        for _ in 0..op.in_flight {
                            op.results.push(Err(access));
                        }
                        return self.next_get(op);
                    }
                };
                if op.blocks.len() + data.len() > self.config.max_answer {
                    return self.fail(Error::TooLong(self.config.max_answer));
                }
                op.blocks.extend_from_slice(&data);
                if !last {
                    op.next_block = block.wrapping_add(1);
                    let next = apdu::get_request_next(op.invoke, block);
                    self.phase = Phase::Getting(op);
                    return match self.protect(next) {
                        Ok(a) => self.send_apdu(a),
                        Err(e) => self.fail(e),
                    };
                }
                let whole = std::mem::take(&mut op.blocks);
                if op.in_flight == 1 {
                    match Data::from_bytes(&whole) {
                        Ok(d) => op.results.push(Ok(d)),
                        Err(e) => return self.fail(Error::malformed(ApduError::from(e), &whole)),
                    }
                } else {
                    match apdu::decode_result_list(&whole) {
                        Ok(r) if r.len() == op.in_flight => op.results.extend(r),
                        Ok(_) => return self.fail(Error::malformed("result count", &whole)),
                        Err(e) => return self.fail(Error::malformed(e, &whole)),
                    }
                }
                self.next_get(op)
            }
            _ => self.fail(Error::malformed("GET response of the wrong kind", raw)),
        }
    }
}
