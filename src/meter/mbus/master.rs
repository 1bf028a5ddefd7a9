//! Reading one meter, as a state machine. Sans-IO: a [`Read`] says what to send and what
//! answer to expect within which window ([`Step::Send`]); the transport writes the bytes,
//! feeds what comes back to [`Read::received`], and calls [`Read::silence`] when the window
//! (or the gap inside an answer) passes without what was expected. At the end the read says
//! [`Step::Done`] with the telegrams or a typed failure.
//!
//! # The exchange
//!
//! ```text
//! primary address a                       secondary address (mask m)
//!   SND_NKE a           → E5                SND_UD 253 CI 52 m      → E5  (selected)
//!   [SND_UD a CI 50     → E5]               [SND_UD 253 CI 50       → E5]
//!   REQ_UD2 a FCB=1     → RSP_UD            REQ_UD2 253 FCB=1       → RSP_UD (id checked)
//!   (DIF 1F: more)                          (DIF 1F: more)
//!   REQ_UD2 a FCB=0     → RSP_UD            REQ_UD2 253 FCB=0       → RSP_UD
//!   …                                       SND_NKE 253             → E5  (deselected)
//! ```
//!
//! * **FCB**: SND_NKE and a selection reset the slave's frame count bit; each new REQ_UD2
//!   toggles it, a repetition keeps it ([`super::link::Fcb`]), so a slave whose answer was
//!   lost sends the same telegram again instead of skipping to its next one.
//! * **Retries**: a step that gets no answer, a garbled one, or one that fails its checksum is
//!   repeated, up to `retries` times, with the same bytes. A telegram that decodes badly is
//!   not repeated (the meter would send the same one): the read fails with the decode error.
//! * **Multi-telegram answers** end at the first telegram without DIF `1F`; after
//!   `max_telegrams` the read fails with [`ReadError::TooManyTelegrams`], so a slave that
//!   always says "more" cannot hold the bus forever.
//! * **Collisions**: bytes in the answer window that never form a frame mean two slaves
//!   answered at once (or noise); after a selection it means the mask matched several meters.

use std::time::Duration;

use super::app::{self, Identity, Telegram};
use super::link::{self, Fcb, Frame, LinkError, Split};
use super::{Address, SecondaryMask, Timing};

/// Default bound of a multi-telegram answer.
pub const DEFAULT_MAX_TELEGRAMS: u8 = 16;

/// What to read and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadConfig {
    pub address: Address,
    /// SND_UD CI 50 before the first REQ_UD2.
    pub application_reset: bool,
    pub max_telegrams: u8,
    /// Repetitions of a step after the first try.
    pub retries: u8,
    pub timing: Timing,
}

impl ReadConfig {
    pub fn primary(address: u8, baud: u32) -> Self {
        ReadConfig {
            address: Address::Primary(address),
            application_reset: false,
            max_telegrams: DEFAULT_MAX_TELEGRAMS,
            retries: 2,
            timing: Timing::new(baud),
        }
    }

    pub fn secondary(mask: SecondaryMask, baud: u32) -> Self {
        ReadConfig {
            address: Address::Secondary(mask),
            ..ReadConfig::primary(0, baud)
        }
    }
}

/// What an answer must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `E5`.
    Ack,
    /// An RSP_UD long frame.
    UserData,
}

/// What to wait for after sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub answer: Answer,
    /// From the moment the bytes are handed to the port: the request's own wire time plus the
    /// standard's answer window.
    pub window: Duration,
    /// Once the answer has started, the longest pause between two of its bytes.
    pub gap: Duration,
}

/// What the transport should do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Wait `pause` (the bus's idle time between exchanges), write `bytes`, then receive.
    Send {
        bytes: Vec<u8>,
        pause: Duration,
        expect: Expect,
    },
    /// The read is over.
    Done(Result<ReadOut, ReadError>),
}

/// The step of the exchange, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// SND_NKE to the primary address.
    Reset,
    /// The selection by secondary address.
    Select,
    ApplicationReset,
    /// REQ_UD2 for the n-th telegram (1-based).
    Request(u8),
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Reset => f.write_str("SND_NKE"),
            Stage::Select => f.write_str("selection"),
            Stage::ApplicationReset => f.write_str("application reset"),
            Stage::Request(n) => write!(f, "REQ_UD2 for telegram {n}"),
        }
    }
}

/// Why a read failed; each says what the driver should report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The meter is not there or not listening: `meter_not_answering`.
    #[error("no answer to the {stage} after {tries} tries")]
    NoAnswer { stage: Stage, tries: u8 },
    /// Bytes came but no frame (several slaves answered at once, or noise): `link_error`.
    #[error(
        "{bytes} garbled bytes in answer to the {stage} after {tries} tries (a collision: several meters answered, or line noise)"
    )]
    Garbled {
        stage: Stage,
        bytes: usize,
        tries: u8,
    },
    /// A frame whose checksum or length was wrong: `checksum_error`.
    #[error("corrupt answer to the {stage} after {tries} tries: {error}")]
    Corrupt {
        stage: Stage,
        error: LinkError,
        tries: u8,
    },
    /// The answer started and stopped before its end: `link_error`.
    #[error("the answer to the {stage} stopped after {bytes} bytes ({tries} tries)")]
    Truncated {
        stage: Stage,
        bytes: usize,
        tries: u8,
    },
    /// A valid frame, but not the answer the step calls for: `malformed_response`.
    #[error("expected {expected} in answer to the {stage}, got a {got}")]
    Unexpected {
        stage: Stage,
        expected: &'static str,
        got: &'static str,
    },
    /// The telegram's records do not decode, or the slave reports an application error:
    /// `malformed_response`.
    #[error("telegram {telegram}: {error}")]
    Decode { telegram: u8, error: app::AppError },
    /// Another meter answered: `wrong_device_answered`.
    #[error("selected {expected}, but meter {got} ({manufacturer}) answered")]
    WrongSecondary {
        expected: String,
        got: String,
        manufacturer: String,
    },
    /// The meter kept saying "more records follow".
    #[error("the meter still had more telegrams after {telegrams}; stopped")]
    TooManyTelegrams { telegrams: u8 },
    /// The transport called the read when it did not expect it (a bug).
    #[error("the read was driven out of order")]
    OutOfOrder,
}

/// What goes over the wire, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    pub frames_sent: u32,
    pub bytes_sent: u32,
    pub frames_received: u32,
    pub bytes_received: u32,
}

/// A successful read: the RSP_UD frames, in order, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOut {
    pub frames: Vec<Vec<u8>>,
    /// The long header's identity of the first telegram (absent for CI 78/7A/73 answers).
    pub identity: Option<Identity>,
    pub wire: Wire,
}

impl ReadOut {
    /// The telegrams, decoded (each was checked when it arrived).
    pub fn telegrams(&self) -> impl Iterator<Item = Telegram<'_>> {
        self.frames.iter().filter_map(|f| app::decode(f).ok())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Waiting,
    Deselecting,
    Done,
}

/// One read of one meter (see the module doc).
#[derive(Debug)]
pub struct Read {
    config: ReadConfig,
    fcb: Fcb,
    stage: Stage,
    state: State,
    /// The bytes of the step in progress, for a repetition.
    request: Vec<u8>,
    tries: u8,
    rx: Vec<u8>,
    garbage: usize,
    last_link_error: Option<LinkError>,
    frames: Vec<Vec<u8>>,
    identity: Option<Identity>,
    wire: Wire,
    result: Option<Result<(), ReadError>>,
}

impl Read {
    pub fn new(config: ReadConfig) -> Self {
        Read {
            config,
            fcb: Fcb::default(),
            stage: Stage::Reset,
            state: State::Idle,
            request: Vec::new(),
            tries: 0,
            rx: Vec::with_capacity(link::MAX_FRAME),
            garbage: 0,
            last_link_error: None,
            frames: Vec::new(),
            identity: None,
            wire: Wire::default(),
            result: None,
        }
    }

    fn address(&self) -> u8 {
        match self.config.address {
            Address::Primary(a) => a,
            Address::Secondary(_) => link::ADDR_NETWORK,
        }
    }

    /// The first step.
    pub fn start(&mut self) -> Step {
        if self.state != State::Idle {
            return Step::Done(Err(ReadError::OutOfOrder));
        }
        match self.config.address {
            Address::Primary(a) => {
                self.stage = Stage::Reset;
                self.send(link::snd_nke(a).to_vec(), Answer::Ack, Duration::ZERO)
            }
            Address::Secondary(mask) => {
                self.stage = Stage::Select;
                // The FCB bit of a selection is not evaluated by slaves; send it clear.
                self.send(link::select(false, &mask), Answer::Ack, Duration::ZERO)
            }
        }
    }

    fn expect_for(&self, answer: Answer, bytes: usize) -> Expect {
        let t = self.config.timing;
        Expect {
            answer,
            window: link::wire_time(bytes, t.baud) + t.answer_window(),
            gap: t.gap,
        }
    }

    fn send(&mut self, bytes: Vec<u8>, answer: Answer, pause: Duration) -> Step {
        self.state = State::Waiting;
        self.tries = 1;
        self.rx.clear();
        self.garbage = 0;
        self.last_link_error = None;
        self.request = bytes.clone();
        self.count_sent(bytes.len());
        Step::Send {
            expect: self.expect_for(answer, bytes.len()),
            bytes,
            pause,
        }
    }

    fn count_sent(&mut self, n: usize) {
        self.wire.frames_sent += 1;
        self.wire.bytes_sent += n as u32;
    }

    fn answer(&self) -> Answer {
        match self.stage {
            Stage::Request(_) => Answer::UserData,
            _ => Answer::Ack,
        }
    }

    /// Bytes from the line. `None`: keep receiving (the window and gap still apply).
    pub fn received(&mut self, bytes: &[u8]) -> Option<Step> {
        if !matches!(self.state, State::Waiting | State::Deselecting) {
            return None;
        }
        self.rx.extend_from_slice(bytes);
        self.wire.bytes_received += bytes.len() as u32;
        loop {
            match link::split(&self.rx) {
                Split::Incomplete { .. } => return None,
                Split::Invalid { skip, error } => {
                    self.garbage += skip;
                    if matches!(error, LinkError::Checksum { .. } | LinkError::BadStop(_)) {
                        self.last_link_error = Some(error);
                    }
                    self.rx.drain(..skip);
                }
                Split::Frame(n) => {
                    let frame: Vec<u8> = self.rx.drain(..n).collect();
                    if frame == self.request {
                        // Our own request, echoed by a level converter.
                        self.wire.bytes_received -= n as u32;
                        continue;
                    }
                    self.wire.frames_received += 1;
                    return Some(self.on_frame(frame));
                }
            }
        }
    }

    /// The window (or the gap inside an answer) passed without a complete answer.
    pub fn silence(&mut self) -> Step {
        if self.state == State::Deselecting {
            // The deselection's acknowledgement is a courtesy; the read is complete.
            return self.finish();
        }
        if self.state != State::Waiting {
            return Step::Done(Err(ReadError::OutOfOrder));
        }
        let stage = self.stage;
        let tries = self.tries;
        let error = if let Some(error) = self.last_link_error {
            ReadError::Corrupt {
                stage,
                error,
                tries,
            }
        } else if !self.rx.is_empty() && self.garbage == 0 {
            ReadError::Truncated {
                stage,
                bytes: self.rx.len(),
                tries,
            }
        } else if self.garbage > 0 || !self.rx.is_empty() {
            ReadError::Garbled {
                stage,
                bytes: self.garbage + self.rx.len(),
                tries,
            }
        } else {
            ReadError::NoAnswer { stage, tries }
        };
        self.retry_or_fail(error)
    }

    fn retry_or_fail(&mut self, error: ReadError) -> Step {
        if self.tries > self.config.retries {
            return self.fail(error);
        }
        tracing::debug!(%error, try_ = self.tries, "M-Bus step repeated");
        self.tries += 1;
        self.rx.clear();
        self.garbage = 0;
        self.last_link_error = None;
        // A repetition keeps the FCB: the request bytes are the same.
        let bytes = self.request.clone();
        self.count_sent(bytes.len());
        Step::Send {
            expect: self.expect_for(self.answer(), bytes.len()),
            bytes,
            pause: self.config.timing.idle(),
        }
    }

    fn fail(&mut self, error: ReadError) -> Step {
        self.result = Some(Err(error));
        if let Address::Secondary(_) = self.config.address {
            if self.stage != Stage::Select {
                return self.deselect();
            }
        }
        self.finish()
    }

    fn deselect(&mut self) -> Step {
        self.state = State::Deselecting;
        self.rx.clear();
        let bytes = link::snd_nke(link::ADDR_NETWORK).to_vec();
        self.request = bytes.clone();
        self.count_sent(bytes.len());
        Step::Send {
            expect: self.expect_for(Answer::Ack, bytes.len()),
            bytes,
            pause: self.config.timing.idle(),
        }
    }

    fn finish(&mut self) -> Step {
        self.state = State::Done;
        match self.result.take() {
            Some(Err(e)) => Step::Done(Err(e)),
            _ => Step::Done(Ok(ReadOut {
                frames: std::mem::take(&mut self.frames),
                identity: self.identity,
                wire: self.wire,
            })),
        }
    }

    fn on_frame(&mut self, frame: Vec<u8>) -> Step {
        if self.state == State::Deselecting {
            return self.finish();
        }
        let Ok(parsed) = link::parse(&frame) else {
            return Step::Done(Err(ReadError::OutOfOrder));
        };
        match (self.answer(), parsed) {
            (Answer::Ack, Frame::Ack) => self.acked(),
            (Answer::UserData, f) if f.is_rsp_ud() => self.user_data(frame),
            (answer, f) => {
                let error = ReadError::Unexpected {
                    stage: self.stage,
                    expected: match answer {
                        Answer::Ack => "an ACK (E5)",
                        Answer::UserData => "an RSP_UD",
                    },
                    got: f.kind(),
                };
                self.retry_or_fail(error)
            }
        }
    }

    fn acked(&mut self) -> Step {
        let pause = self.config.timing.idle();
        if matches!(self.stage, Stage::Reset | Stage::Select) {
            self.fcb.reset();
        }
        let a = self.address();
        match self.stage {
            Stage::Reset | Stage::Select if self.config.application_reset => {
                self.stage = Stage::ApplicationReset;
                let fcb = self.fcb.new_request();
                self.send(link::app_reset(a, fcb), Answer::Ack, pause)
            }
            // After an application reset (sent with FCB 1) the request continues the sequence.
            Stage::Reset | Stage::Select | Stage::ApplicationReset => {
                self.stage = Stage::Request(1);
                let fcb = self.fcb.new_request();
                self.send(link::req_ud2(a, fcb).to_vec(), Answer::UserData, pause)
            }
            Stage::Request(_) => Step::Done(Err(ReadError::OutOfOrder)),
        }
    }

    fn user_data(&mut self, frame: Vec<u8>) -> Step {
        let Stage::Request(n) = self.stage else {
            return Step::Done(Err(ReadError::OutOfOrder));
        };
        let (identity, more) = match app::decode(&frame) {
            Ok(t) => (t.identity(), t.more_follows),
            Err(app::DecodeError::App(error)) => {
                return self.fail(ReadError::Decode { telegram: n, error });
            }
            Err(app::DecodeError::Link(_)) => return Step::Done(Err(ReadError::OutOfOrder)),
        };
        if let Address::Secondary(mask) = self.config.address {
            let wrong = match identity {
                Some(id) => !mask.matches(&id),
                None => false,
            };
            if wrong {
                let id = identity.unwrap_or(Identity {
                    id: [0; 4],
                    manufacturer: 0,
                    version: 0,
                    medium: 0,
                });
                return self.fail(ReadError::WrongSecondary {
                    expected: mask.id_string(),
                    got: id.id_string(),
                    manufacturer: id.manufacturer_str(),
                });
            }
        }
        if self.identity.is_none() {
            self.identity = identity;
        }
        self.frames.push(frame);
        if !more {
            self.result = Some(Ok(()));
            return match self.config.address {
                Address::Secondary(_) => self.deselect(),
                Address::Primary(_) => self.finish(),
            };
        }
        if n >= self.config.max_telegrams {
            return self.fail(ReadError::TooManyTelegrams { telegrams: n });
        }
        self.stage = Stage::Request(n + 1);
        let fcb = self.fcb.new_request();
        let a = self.address();
        let pause = self.config.timing.idle();
        self.send(link::req_ud2(a, fcb).to_vec(), Answer::UserData, pause)
    }
}

#[cfg(test)]
mod tests;
