//! One readout (mode C, with modes A and B understood) as a state machine. Sans-IO: the
//! [`Session`] says what to do next as an [`Action`] — set the rate, send, wait, receive —
//! and is told what happened; the transport ([`super::transport`]) does the I/O.
//!
//! # The exchange and its timing
//!
//! ```text
//! agent                                         meter
//!   set 300 Bd 7E1, drop stale input
//!   /?address! CR LF            ── 300 Bd ──►
//!                               ◄── 300 Bd ──   /XXXZ\W ident CR LF       after tr
//!   wait tr
//!   ACK 0 Z 0 CR LF             ── 300 Bd ──►
//!   (wait until it has left the UART, then switch to Z at once)
//!                                               (switches to Z after the LF)
//!                               ◄──  Z Bd  ──   STX data ! CR LF ETX BCC  after tr
//!   wait tr
//!   SOH B 0 ETX BCC             ──  Z Bd  ──►   (back to 300 Bd, idle)
//! ```
//!
//! * **tr**, the reaction time, is the pause between the end of one message and the start of
//!   its answer: at least 200 ms, or 20 ms when the third letter of the manufacturer id in the
//!   identification is lower case, and at most 1500 ms. The meter keeps it before each
//!   answer; the agent keeps the same minimum before each of its own (the ACK, the break), so
//!   a meter still turning its half-duplex line or optical receiver round is not talked over.
//! * **The baud switch** is the delicate step. The meter changes its rate right after the LF of
//!   the option select and starts the data message no earlier than tr (200 or 20 ms) later.
//!   The agent therefore must not change its UART before the LF has left the wire — the
//!   option select takes 6 × 33.3 ms = 200 ms at 300 Bd, and a rate change before that
//!   garbles its tail — and must have changed it before tr has passed, or it loses the start
//!   of the data message. So the agent waits for the transmission to finish (the transport
//!   drains the UART: `tcdrain`), then switches immediately, without any extra pause: any
//!   fixed sleep there would eat into the 20 ms a fast meter allows. Incoming bytes are not
//!   discarded at the switch, so an early first character is not thrown away.
//! * **Timeouts**: an answer that has not started within tr max (1500 ms, or the bus timeout
//!   if that is longer) is no answer; within a message, characters may be at most 1500 ms
//!   apart (ta); the whole data message has its own overall limit, since a readout at 300 Bd
//!   can take minutes.
//!
//! # What goes wrong, and how it is told apart
//!
//! Silence before the identification is [`SessionError::NoAnswer`]. Bytes that never form a
//! frame are [`SessionError::Noise`]; a frame that stops halfway is
//! [`SessionError::Stalled`]; a block check mismatch is a [`SessionError::Decode`]. After a
//! switch to a faster rate, a `NAK`, silence or noise instead of the data message means the
//! meter did not follow the switch (it refused it or kept 300 Bd, which the agent's UART
//! hears as noise): [`SessionError::SwitchRefused`], which the driver answers by reading
//! again at 300 Bd. Echoes of the agent's own request and option select (optical heads that
//! hear themselves) are ignored. After any answer, failed or not, the session ends with a
//! break so the meter is idle for the next one on the bus.

use std::time::Duration;

use super::codec::{self, ACK, Decoder, Frame, Identification, Mode};
use super::dataset::{self, DataError, DataSet};
use super::profile::{self, Profile, ProfileError};
use crate::primitives::Secret;

/// The longest reaction time a meter may take (tr max) and the longest pause between two
/// characters of a message (ta).
pub const TR_MAX: Duration = Duration::from_millis(1500);
/// The reaction time when the meter has not said (or before it has).
pub const TR_DEFAULT: Duration = Duration::from_millis(200);

/// What a session is asked to do.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// `None` or empty: the plain request `/?!` (optical probe, one meter).
    pub address: Option<String>,
    /// The fastest rate to accept from the meter's offer.
    pub max_baud: u32,
    /// Whether to ask for a faster rate at all (off after a meter refused the switch).
    pub switch_baud: bool,
    /// How long an answer may take to start (at least [`TR_MAX`]).
    pub answer_timeout: Duration,
    /// Longest pause between two characters of a message (ta).
    pub gap_timeout: Duration,
    /// Longest time for the whole data message.
    pub readout_timeout: Duration,
    /// Longest data message accepted.
    pub max_block: usize,
    /// What the session is for: the readout, or a load profile in programming mode.
    pub job: Job,
}

/// What a session does once signed on.
#[derive(Clone, Debug, Default)]
pub enum Job {
    /// The data readout (`ACK 0 Z 0`).
    #[default]
    Readout,
    /// Programming mode (`ACK 0 Z 1`), then a load profile read (`R5`).
    Profile(ProfileJob),
}

/// A load profile read: the P1 password, if the meter wants one, and the `R5` data.
#[derive(Clone, Debug)]
pub struct ProfileJob {
    /// Sent as `P1 (password)`; never logged (`Secret`'s Debug hides it).
    pub password: Option<Secret>,
    /// `P.01(YYMMDDhhmm;YYMMDDhhmm)` ([`profile::request`]).
    pub request: String,
}

/// The most text a profile answer sent in partial blocks may add up to, in blocks of the
/// session's `max_block`.
pub const MAX_PROFILE_BLOCKS: usize = 16;

/// How often a profile block that arrived corrupted (block check) is asked for again with
/// `NAK` before the read fails: a long answer at 300 Bd is not thrown away for one bad byte.
pub const MAX_REPEATS: u8 = 3;

/// What the transport should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the UART to `baud` (7E1); with `discard_input`, drop whatever was received and not
    /// read yet. Then call [`Session::completed`].
    SetBaud { baud: u32, discard_input: bool },
    /// Write the bytes and wait until they have left the UART; then [`Session::completed`].
    Send(Vec<u8>),
    /// Wait; then [`Session::completed`].
    Sleep(Duration),
    /// Read and pass everything to [`Session::received`] until it returns an action; if the
    /// line stays quiet, call [`Session::silence`].
    Receive(Limits),
    /// The session is over.
    Finish(Result<Readout, SessionError>),
}

/// Timeouts of one receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Until the first byte.
    pub first: Duration,
    /// Between two bytes once the answer has started.
    pub gap: Duration,
    /// For the whole receive.
    pub total: Duration,
}

/// Which timeout of a receive expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Silence {
    First,
    Gap,
    Total,
}

/// A successful readout or profile read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readout {
    pub identification: Identification,
    /// The rate the data message came at.
    pub baud: u32,
    /// The readout's data sets ([`Job::Readout`]; empty for a profile read).
    pub sets: Vec<DataSet>,
    /// The load profile's answer ([`Job::Profile`] only).
    pub profile: Option<Profile>,
}

/// The message a session was waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Identification,
    Readout,
    /// The meter's `P0` operand after the option select for programming mode.
    Operand,
    /// The meter's answer to the `P1` password.
    Password,
    /// The answer to `R5` `P.01(…)`.
    Profile,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Identification => "identification",
            Phase::Readout => "readout",
            Phase::Operand => "password operand (P0)",
            Phase::Password => "password acknowledgement",
            Phase::Profile => "load profile",
        })
    }
}

/// How a meter showed it did not follow the baud switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It answered the option select with `NAK`.
    Nak,
    /// Only noise at the new rate: it most likely answered at the old one.
    Noise(usize),
    /// Nothing at the new rate (or it is not there any more: the retry tells).
    Silence,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Nak => f.write_str("it answered the option select with NAK"),
            Refusal::Noise(n) => write!(
                f,
                "{n} bytes of line noise and no data message at the new rate (it most likely kept 300 Bd)"
            ),
            Refusal::Silence => f.write_str("no data message at the new rate"),
        }
    }
}

/// Why a session failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Nothing at all came back.
    #[error("no {phase} within {after:?}")]
    NoAnswer { phase: Phase, after: Duration },
    /// The answer started and stopped before its end (truncated).
    #[error("the {phase} stopped after {bytes} bytes")]
    Stalled { phase: Phase, bytes: usize },
    /// The answer was still coming when the overall limit passed.
    #[error("the {phase} was not complete within {limit:?}")]
    Overdue { phase: Phase, limit: Duration },
    /// Bytes came, but none formed a frame.
    #[error("{bytes} bytes of line noise and no {phase}")]
    Noise { phase: Phase, bytes: usize },
    /// A frame was corrupt (block check, truncation, length, syntax).
    #[error("{phase}: {error}")]
    Decode {
        phase: Phase,
        error: codec::DecodeError,
    },
    /// The readout's text is not a list of data sets.
    #[error("readout: {0}")]
    Data(#[from] DataError),
    /// The profile answer's text is not a load profile.
    #[error("load profile: {0}")]
    Profile(#[from] ProfileError),
    /// The meter refused the password, or access without one.
    #[error("{0}")]
    Security(String),
    /// A mode A or B meter: it has no programming mode, hence no load profile to read.
    #[error("the meter speaks mode {0} only: no programming mode, no load profile")]
    NoProgrammingMode(char),
    /// A valid frame, but not the one the exchange calls for.
    #[error("expected the {phase}, got a {got}")]
    Unexpected { phase: Phase, got: &'static str },
    /// The identification announces a rate the standard reserves.
    #[error("the identification announces a reserved baud rate character `{}`", char::from(*.0))]
    ReservedBaud(u8),
    /// The meter did not follow the switch to `baud`.
    #[error("the meter did not switch to {baud} Bd: {how}")]
    SwitchRefused { baud: u32, how: Refusal },
    /// The transport called the session in a state that does not expect it (a bug).
    #[error("session driven out of order: {0}")]
    OutOfOrder(&'static str),
}

#[derive(Debug)]
enum State {
    Begin,
    /// The rate is set; the request goes next.
    Ready,
    /// The request is out; receive the identification next.
    Requested,
    AwaitIdent,
    /// Waiting tr before the option select.
    Reacting {
        id: Identification,
        baud: u32,
    },
    /// The option select is out.
    Acked {
        id: Identification,
        baud: u32,
    },
    /// The UART is at the new rate (or stays); receive the data next.
    Switched {
        id: Identification,
        baud: u32,
    },
    AwaitData {
        id: Identification,
        baud: u32,
        switched: bool,
        skipped_before: usize,
        step: Step,
    },
    /// Waiting tr before sending `message` in programming mode; then receive `next`.
    Replying {
        id: Identification,
        baud: u32,
        message: Vec<u8>,
        next: Step,
    },
    /// `message` is out; receive `next`.
    Sent {
        id: Identification,
        baud: u32,
        next: Step,
    },
    /// Waiting tr before the break.
    Closing(Result<Readout, SessionError>),
    /// The break is out.
    Breaking(Result<Readout, SessionError>),
    Done,
}

/// What a message from the meter is awaited for.
#[derive(Debug)]
enum Step {
    /// The readout.
    Readout,
    /// The `P0` operand after `ACK 0 Z 1`.
    Operand,
    /// `ACK` to the password.
    PasswordAck,
    /// The answer to `R5`; `text` holds the partial blocks (`EOT`) received so far, `naks`
    /// the repeats asked for the block now awaited.
    Profile { text: String, naks: u8 },
}

impl Step {
    fn phase(&self) -> Phase {
        match self {
            Step::Readout => Phase::Readout,
            Step::Operand => Phase::Operand,
            Step::PasswordAck => Phase::Password,
            Step::Profile { .. } => Phase::Profile,
        }
    }
}

/// One readout or profile read.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    decoder: Decoder,
    reaction: Duration,
    /// Of the current receive.
    limits: Limits,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        let decoder = Decoder::new(config.max_block);
        Session {
            config,
            state: State::Begin,
            decoder,
            reaction: TR_DEFAULT,
            limits: Limits {
                first: Duration::ZERO,
                gap: Duration::ZERO,
                total: Duration::ZERO,
            },
        }
    }

    /// The first action: every session starts at 300 Bd with a clean input buffer, whatever
    /// the previous one on this port left behind.
    pub fn start(&mut self) -> Action {
        match self.state {
            State::Begin => {
                self.state = State::Ready;
                Action::SetBaud {
                    baud: 300,
                    discard_input: true,
                }
            }
            _ => self.out_of_order("start"),
        }
    }

    /// The last [`Action::SetBaud`], [`Action::Send`] or [`Action::Sleep`] is done.
    pub fn completed(&mut self) -> Action {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Ready => {
                self.state = State::Requested;
                let address = self.config.address.as_deref().filter(|a| !a.is_empty());
                Action::Send(codec::request(address))
            }
            State::Requested => {
                self.state = State::AwaitIdent;
                self.receive(Limits {
                    first: self.config.answer_timeout,
                    gap: self.config.gap_timeout,
                    // tr max and the longest identification line at 300 Bd.
                    total: self.config.answer_timeout + codec::wire_time(codec::MAX_LINE, 300),
                })
            }
            State::Reacting { id, baud } => {
                let code = codec::baud_code(baud).unwrap_or(b'0');
                self.state = State::Acked { id, baud };
                // V = 0: normal protocol procedure; Y = 0: data readout, 1: programming mode.
                let mode = match self.config.job {
                    Job::Readout => b'0',
                    Job::Profile(_) => b'1',
                };
                Action::Send(codec::option_select(b'0', code, mode))
            }
            State::Acked { id, baud } if baud != 300 => {
                // The option select has left the UART (the transport drained it): switch now,
                // before the meter's tr is over, and keep whatever already arrived.
                self.state = State::Switched { id, baud };
                Action::SetBaud {
                    baud,
                    discard_input: false,
                }
            }
            State::Acked { id, baud } | State::Switched { id, baud } => self.await_data(id, baud),
            State::Replying {
                id,
                baud,
                message,
                next,
            } => {
                self.state = State::Sent { id, baud, next };
                Action::Send(message)
            }
            State::Sent { id, baud, next } => self.await_step(id, baud, next, false),
            State::Closing(result) => {
                self.state = State::Breaking(result);
                Action::Send(codec::break_message())
            }
            State::Breaking(result) => Action::Finish(result),
            other => {
                self.state = other;
                self.out_of_order("completed")
            }
        }
    }

    /// Bytes from the line. `None`: keep receiving.
    pub fn received(&mut self, bytes: &[u8]) -> Option<Action> {
        for frame in self.decoder.feed(bytes) {
            let action = match &self.state {
                State::AwaitIdent => self.on_ident_frame(frame),
                State::AwaitData { .. } => self.on_data_frame(frame),
                _ => return Some(self.out_of_order("received")),
            };
            if action.is_some() {
                // Anything after the awaited frame in the same chunk is noise to this session.
                return action;
            }
        }
        // The answer to a password is a lone ACK: nothing follows it to tell it from the start
        // of an option select, which a meter never sends.
        if matches!(
            self.state,
            State::AwaitData {
                step: Step::PasswordAck,
                ..
            }
        ) && self.decoder.take_ack()
        {
            return self.on_data_frame(Ok(Frame::Ack));
        }
        None
    }

    /// The line stayed quiet past a limit of the current receive.
    pub fn silence(&mut self, silence: Silence) -> Action {
        let bytes = self.decoder.buffered();
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitIdent => {
                let phase = Phase::Identification;
                let error = if self.decoder.in_frame() {
                    stalled(phase, bytes, silence, self.limits.total)
                } else if self.decoder.skipped() > 0 {
                    SessionError::Noise {
                        phase,
                        bytes: self.decoder.skipped(),
                    }
                } else {
                    // Nobody there: no break to send to anyone.
                    return Action::Finish(Err(SessionError::NoAnswer {
                        phase,
                        after: self.limits.first,
                    }));
                };
                self.close(Err(error))
            }
            State::AwaitData {
                baud,
                switched,
                skipped_before,
                step,
                ..
            } => {
                let phase = step.phase();
                let noise = self.decoder.skipped() - skipped_before;
                let error = if self.decoder.in_frame() {
                    stalled(phase, bytes, silence, self.limits.total)
                } else if switched {
                    SessionError::SwitchRefused {
                        baud,
                        how: if noise > 0 {
                            Refusal::Noise(noise)
                        } else {
                            Refusal::Silence
                        },
                    }
                } else if noise > 0 {
                    SessionError::Noise {
                        phase,
                        bytes: noise,
                    }
                } else {
                    SessionError::NoAnswer {
                        phase,
                        after: self.limits.first,
                    }
                };
                self.close(Err(error))
            }
            other => {
                self.state = other;
                self.out_of_order("silence")
            }
        }
    }

    fn on_ident_frame(&mut self, frame: Result<Frame, codec::DecodeError>) -> Option<Action> {
        let phase = Phase::Identification;
        match frame {
            Ok(Frame::Identification(id)) => Some(self.on_identification(id)),
            // Our own request, heard back.
            Ok(Frame::Request { .. }) => None,
            Ok(other) => Some(self.close(Err(SessionError::Unexpected {
                phase,
                got: other.name(),
            }))),
            Err(error) => Some(self.close(Err(SessionError::Decode { phase, error }))),
        }
    }

    fn on_identification(&mut self, id: Identification) -> Action {
        self.reaction = id.reaction_time();
        let mode = id.mode();
        if let (Job::Profile(_), Mode::A | Mode::B(_)) = (&self.config.job, mode) {
            let letter = if mode == Mode::A { 'A' } else { 'B' };
            return self.close(Err(SessionError::NoProgrammingMode(letter)));
        }
        match mode {
            Mode::C(offered) => {
                let cap = if self.config.switch_baud {
                    offered.unwrap_or(300).min(self.config.max_baud)
                } else {
                    300
                };
                let baud = codec::MODE_C_RATES
                    .iter()
                    .copied()
                    .filter(|r| *r <= cap)
                    .max()
                    .unwrap_or(300);
                self.state = State::Reacting { id, baud };
                Action::Sleep(self.reaction)
            }
            // Mode B: the meter has switched already, without negotiation.
            Mode::B(Some(baud)) => {
                self.state = State::Switched { id, baud };
                Action::SetBaud {
                    baud,
                    discard_input: false,
                }
            }
            Mode::B(None) => self.close(Err(SessionError::ReservedBaud(id.baud_code))),
            // Mode A: the data follows at 300 Bd.
            Mode::A => self.await_data(id, 300),
        }
    }

    /// The first message after the option select (or the identification, modes A and B).
    fn await_data(&mut self, id: Identification, baud: u32) -> Action {
        let step = match self.config.job {
            Job::Readout => Step::Readout,
            Job::Profile(_) => Step::Operand,
        };
        self.await_step(id, baud, step, baud != 300)
    }

    /// Receives the meter's next message; `switched`: the first one at a new rate.
    fn await_step(&mut self, id: Identification, baud: u32, step: Step, switched: bool) -> Action {
        self.state = State::AwaitData {
            id,
            baud,
            switched,
            skipped_before: self.decoder.skipped(),
            step,
        };
        self.receive(Limits {
            first: self.config.answer_timeout,
            gap: self.config.gap_timeout,
            total: self.config.readout_timeout,
        })
    }

    fn receive(&mut self, limits: Limits) -> Action {
        self.limits = limits;
        Action::Receive(limits)
    }

    fn on_data_frame(&mut self, frame: Result<Frame, codec::DecodeError>) -> Option<Action> {
        if let State::AwaitData {
            baud,
            switched,
            step,
            ..
        } = &self.state
        {
            if !matches!(step, Step::Readout) {
                let (phase, baud, switched) = (step.phase(), *baud, *switched);
                return self.on_programming_frame(frame, phase, baud, switched);
            }
        }
        let phase = Phase::Readout;
        let State::AwaitData {
            id, baud, switched, ..
        } = &self.state
        else {
            return Some(self.out_of_order("data frame"));
        };
        let (baud, switched) = (*baud, *switched);
        match frame {
            Ok(Frame::Data {
                text,
                complete: true,
            }) => {
                let result = dataset::parse_readout(&text)
                    .map(|sets| Readout {
                        identification: id.clone(),
                        baud,
                        sets,
                        profile: None,
                    })
                    .map_err(SessionError::from);
                Some(self.close(result))
            }
            // Echoes of our own messages; a meter acknowledging the option select.
            Ok(Frame::OptionSelect { .. } | Frame::Request { .. } | Frame::Ack) => None,
            Ok(Frame::Nak) if switched => Some(self.close(Err(SessionError::SwitchRefused {
                baud,
                how: Refusal::Nak,
            }))),
            Ok(Frame::Data {
                complete: false, ..
            }) => Some(self.close(Err(SessionError::Unexpected {
                phase,
                got: "partial block (EOT)",
            }))),
            Ok(other) => Some(self.close(Err(SessionError::Unexpected {
                phase,
                got: other.name(),
            }))),
            Err(error) => Some(self.close(Err(SessionError::Decode { phase, error }))),
        }
    }

    /// A frame in programming mode: the operand, the password's acknowledgement, the profile.
    fn on_programming_frame(
        &mut self,
        frame: Result<Frame, codec::DecodeError>,
        phase: Phase,
        baud: u32,
        switched: bool,
    ) -> Option<Action> {
        let frame = match frame {
            Ok(f) => f,
            Err(error) => {
                // A corrupted profile block: NAK asks the meter to send it again.
                if let (
                    codec::DecodeError::Bcc { .. },
                    State::AwaitData {
                        step: Step::Profile { naks, .. },
                        ..
                    },
                ) = (&error, &self.state)
                {
                    if *naks < MAX_REPEATS {
                        if let State::AwaitData {
                            id,
                            step: Step::Profile { text, naks },
                            ..
                        } = std::mem::replace(&mut self.state, State::Done)
                        {
                            self.state = State::Replying {
                                id,
                                baud,
                                message: vec![codec::NAK],
                                next: Step::Profile {
                                    text,
                                    naks: naks + 1,
                                },
                            };
                            return Some(Action::Sleep(self.reaction));
                        }
                    }
                }
                return Some(self.close(Err(SessionError::Decode { phase, error })));
            }
        };
        // Echoes of our own messages (optical heads that hear themselves).
        match (&frame, phase) {
            (Frame::OptionSelect { .. } | Frame::Request { .. }, _)
            | (
                Frame::Command {
                    command: b'P',
                    kind: b'1',
                    ..
                },
                Phase::Password,
            )
            | (Frame::Command { command: b'R', .. }, Phase::Profile)
            | (Frame::Ack, Phase::Operand | Phase::Profile) => return None,
            _ => {}
        }
        let State::AwaitData { id, step, .. } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Some(self.out_of_order("programming frame"));
        };
        let job = match &self.config.job {
            Job::Profile(job) => job.clone(),
            Job::Readout => return Some(self.out_of_order("programming frame in a readout")),
        };
        let r5 = || codec::command(b'R', b'5', Some(job.request.as_bytes()));
        let reply = |this: &mut Self, message: Vec<u8>, next: Step| {
            this.state = State::Replying {
                id: id.clone(),
                baud,
                message,
                next,
            };
            Some(Action::Sleep(this.reaction))
        };
        match (step, frame) {
            (
                Step::Operand,
                Frame::Command {
                    command: b'P',
                    kind: b'0',
                    complete: true,
                    ..
                },
            ) => match &job.password {
                Some(pw) => {
                    let mut data = Vec::with_capacity(pw.expose().len() + 2);
                    data.push(b'(');
                    data.extend_from_slice(pw.expose().as_bytes());
                    data.push(b')');
                    reply(
                        self,
                        codec::command(b'P', b'1', Some(&data)),
                        Step::PasswordAck,
                    )
                }
                None => reply(self, r5(), Step::Profile {
                    text: String::new(),
                    naks: 0,
                }),
            },
            (Step::Operand, Frame::Nak) if switched => {
                Some(self.close(Err(SessionError::SwitchRefused {
                    baud,
                    how: Refusal::Nak,
                })))
            }
            (Step::PasswordAck, Frame::Ack) => {
                reply(self, r5(), Step::Profile {
                    text: String::new(),
                    naks: 0,
                })
            }
            (Step::PasswordAck, Frame::Nak) => Some(self.close(Err(SessionError::Security(
                "the meter refused the password (NAK)".into(),
            )))),
            (Step::PasswordAck, Frame::Command { command: b'B', .. }) => {
                Some(self.close(Err(SessionError::Security(
                    "the meter answered the password with a break (B0)".into(),
                ))))
            }
            (Step::PasswordAck, Frame::Data { text, .. }) => {
                Some(self.close(Err(SessionError::Security(format!(
                    "the meter answered the password with `{}`",
                    text.trim_end()
                )))))
            }
            (
                Step::Profile {
                    text: mut so_far, ..
                },
                Frame::Data { text, complete },
            ) => {
                so_far.push_str(&text);
                if so_far.len() > self.config.max_block.saturating_mul(MAX_PROFILE_BLOCKS) {
                    return Some(self.close(Err(SessionError::Decode {
                        phase,
                        error: codec::DecodeError::TooLong {
                            frame: "load profile",
                            limit: self.config.max_block.saturating_mul(MAX_PROFILE_BLOCKS),
                        },
                    })));
                }
                if !complete {
                    // A partial block (EOT): ACK asks for the next one.
                    return reply(
                        self,
                        vec![ACK],
                        Step::Profile {
                            text: so_far,
                            naks: 0,
                        },
                    );
                }
                let result = profile::parse(&so_far)
                    .map(|p| Readout {
                        identification: id.clone(),
                        baud,
                        sets: Vec::new(),
                        profile: Some(p),
                    })
                    .map_err(SessionError::from);
                Some(self.close(result))
            }
            (Step::Profile { .. }, Frame::Command { command: b'B', .. }) => {
                Some(self.close(Err(SessionError::Security(
                    "the meter broke off the session instead of answering the profile request (does it want a password?)".into(),
                ))))
            }
            (_, other) => Some(self.close(Err(SessionError::Unexpected {
                phase,
                got: other.name(),
            }))),
        }
    }

    /// Ends the session after the meter has spoken: wait tr, then send the break.
    fn close(&mut self, result: Result<Readout, SessionError>) -> Action {
        self.state = State::Closing(result);
        Action::Sleep(self.reaction)
    }

    fn out_of_order(&mut self, what: &'static str) -> Action {
        self.state = State::Done;
        Action::Finish(Err(SessionError::OutOfOrder(what)))
    }
}

fn stalled(phase: Phase, bytes: usize, silence: Silence, limit: Duration) -> SessionError {
    match silence {
        Silence::Total => SessionError::Overdue { phase, limit },
        Silence::First | Silence::Gap => SessionError::Stalled { phase, bytes },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::iec62056_21::codec::{NAK, break_message, data_message};
    use crate::primitives::Secret;

    fn config() -> SessionConfig {
        SessionConfig {
            address: Some("61234567".into()),
            max_baud: 9600,
            switch_baud: true,
            answer_timeout: Duration::from_millis(1600),
            gap_timeout: TR_MAX,
            readout_timeout: Duration::from_secs(60),
            max_block: codec::DEFAULT_MAX_BLOCK,
            job: Job::Readout,
        }
    }

    const READOUT: &[u8] = b"1.8.0(001234.567*kWh)\r\n!\r\n";

    /// Drives a session up to the receive of the identification.
    fn signed_on(config: SessionConfig) -> Session {
        let mut s = Session::new(config);
        assert_eq!(
            s.start(),
            Action::SetBaud {
                baud: 300,
                discard_input: true
            }
        );
        assert_eq!(s.completed(), Action::Send(b"/?61234567!\r\n".to_vec()));
        assert!(matches!(s.completed(), Action::Receive(_)));
        s
    }

    /// Drives a session through the identification and the switch to 9600 Bd.
    fn switched() -> Session {
        let mut s = signed_on(config());
        assert_eq!(
            s.received(b"/LGZ5\\2ZMD3104407.B24\r\n"),
            Some(Action::Sleep(Duration::from_millis(200)))
        );
        assert_eq!(s.completed(), Action::Send(b"\x06050\r\n".to_vec()));
        assert_eq!(
            s.completed(),
            Action::SetBaud {
                baud: 9600,
                discard_input: false
            }
        );
        assert!(matches!(s.completed(), Action::Receive(_)));
        s
    }

    /// After the meter has spoken: tr, the break, the result.
    fn closed(s: &mut Session, action: Option<Action>) -> Result<Readout, SessionError> {
        assert!(matches!(action, Some(Action::Sleep(_))), "{action:?}");
        assert_eq!(s.completed(), Action::Send(break_message()));
        match s.completed() {
            Action::Finish(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mode_c_readout_should_sign_on_switch_read_and_break() {
        let mut s = switched();
        let mut block = data_message(READOUT);
        let last = block.pop();
        assert_eq!(s.received(&block), None);
        let action = s.received(&[last.unwrap_or(0)]);
        let r = closed(&mut s, action).unwrap();
        assert_eq!(r.baud, 9600);
        assert_eq!(r.identification.manufacturer, "LGZ");
        assert_eq!(r.sets.len(), 1);
    }

    #[test]
    fn plain_request_should_have_no_address() {
        let mut s = Session::new(SessionConfig {
            address: None,
            ..config()
        });
        s.start();
        assert_eq!(s.completed(), Action::Send(b"/?!\r\n".to_vec()));
    }

    #[test]
    fn lower_case_manufacturer_should_shorten_the_reaction_to_20_ms() {
        let mut s = signed_on(config());
        assert_eq!(
            s.received(b"/ISk5\\2MT382-1000\r\n"),
            Some(Action::Sleep(Duration::from_millis(20)))
        );
    }

    #[test]
    fn offered_rate_above_max_baud_should_be_capped() {
        let mut s = signed_on(SessionConfig {
            max_baud: 4800,
            ..config()
        });
        s.received(b"/Els6\\2EK280\r\n");
        assert_eq!(s.completed(), Action::Send(b"\x06040\r\n".to_vec()));
        assert_eq!(
            s.completed(),
            Action::SetBaud {
                baud: 4800,
                discard_input: false
            }
        );
    }

    #[test]
    fn no_switch_should_ask_for_300_and_stay() {
        let mut s = signed_on(SessionConfig {
            switch_baud: false,
            ..config()
        });
        s.received(b"/LGZ5ZMD\r\n");
        assert_eq!(s.completed(), Action::Send(b"\x06000\r\n".to_vec()));
        assert!(matches!(s.completed(), Action::Receive(_)));
        // Silence now is plain silence, not a refused switch.
        let a = Some(s.silence(Silence::First));
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::NoAnswer {
                phase: Phase::Readout,
                ..
            })
        ));
    }

    #[test]
    fn mode_a_and_b_meters_should_send_without_option_select() {
        let mut s = signed_on(config());
        // Mode A: data follows at 300 Bd.
        assert!(matches!(
            s.received(b"/ABC:X\r\n"),
            Some(Action::Receive(_))
        ));
        let mut s = signed_on(config());
        // Mode B, `E`: the meter is at 9600 Bd already.
        assert_eq!(
            s.received(b"/ABCEX\r\n"),
            Some(Action::SetBaud {
                baud: 9600,
                discard_input: false
            })
        );
        assert!(matches!(s.completed(), Action::Receive(_)));
    }

    #[test]
    fn silence_before_identification_should_be_no_answer_without_break() {
        let mut s = signed_on(config());
        assert_eq!(
            s.silence(Silence::First),
            Action::Finish(Err(SessionError::NoAnswer {
                phase: Phase::Identification,
                after: Duration::from_millis(1600)
            }))
        );
    }

    #[test]
    fn noise_instead_of_identification_should_be_noise() {
        let mut s = signed_on(config());
        assert_eq!(s.received(b"\x00#*%&\x7f"), None);
        let a = Some(s.silence(Silence::Gap));
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::Noise {
                phase: Phase::Identification,
                bytes: 6
            })
        );
    }

    #[test]
    fn silence_after_switch_should_be_a_refused_switch() {
        let mut s = switched();
        let a = Some(s.silence(Silence::First));
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::SwitchRefused {
                baud: 9600,
                how: Refusal::Silence
            })
        );
    }

    #[test]
    fn noise_after_switch_should_be_a_refused_switch() {
        let mut s = switched();
        assert_eq!(s.received(&[0; 30]), None);
        let a = Some(s.silence(Silence::Gap));
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::SwitchRefused {
                baud: 9600,
                how: Refusal::Noise(30)
            })
        );
    }

    #[test]
    fn nak_to_option_select_should_be_a_refused_switch() {
        let mut s = switched();
        let a = s.received(&[NAK]);
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::SwitchRefused {
                baud: 9600,
                how: Refusal::Nak
            })
        );
    }

    #[test]
    fn bad_bcc_should_be_a_decode_error() {
        let mut s = switched();
        let mut block = data_message(READOUT);
        if let Some(b) = block.last_mut() {
            *b ^= 1;
        }
        let a = s.received(&block);
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::Decode {
                phase: Phase::Readout,
                error: codec::DecodeError::Bcc { .. }
            })
        ));
    }

    #[test]
    fn readout_that_stops_halfway_should_be_stalled() {
        let mut s = switched();
        let block = data_message(READOUT);
        assert_eq!(s.received(&block[..10]), None);
        let a = Some(s.silence(Silence::Gap));
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::Stalled {
                phase: Phase::Readout,
                bytes: 10
            })
        );
    }

    #[test]
    fn readout_still_coming_at_the_limit_should_be_overdue() {
        let mut s = switched();
        assert_eq!(s.received(&data_message(READOUT)[..10]), None);
        let a = Some(s.silence(Silence::Total));
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::Overdue { .. })
        ));
    }

    #[test]
    fn echoes_of_our_own_messages_should_be_ignored() {
        let mut s = signed_on(config());
        assert_eq!(s.received(b"/?61234567!\r\n"), None);
        assert!(s.received(b"/LGZ5ZMD\r\n").is_some());
        s.completed();
        s.completed();
        assert!(matches!(s.completed(), Action::Receive(_)));
        assert_eq!(s.received(b"\x06050\r\n"), None);
        let a = s.received(&data_message(READOUT));
        assert!(closed(&mut s, a).is_ok());
    }

    #[test]
    fn readout_without_end_line_should_be_a_data_error() {
        let mut s = switched();
        let a = s.received(&data_message(b"1.8.0(1*kWh)\r\n"));
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::Data(DataError::NoEnd { sets: 1 }))
        ));
    }

    fn profile_config(password: Option<&str>) -> SessionConfig {
        SessionConfig {
            job: Job::Profile(ProfileJob {
                password: password.map(Secret::new),
                request: "P.01(2603011000;2603020000)".into(),
            }),
            ..config()
        }
    }

    /// Drives a profile session through the identification, `ACK 0 5 1` and the switch, to
    /// the receive of the operand.
    fn programming(password: Option<&str>) -> Session {
        let mut s = signed_on(profile_config(password));
        assert!(s.received(b"/LGZ5\\2ZMD3104407.B24\r\n").is_some());
        assert_eq!(s.completed(), Action::Send(b"\x06051\r\n".to_vec()));
        assert_eq!(
            s.completed(),
            Action::SetBaud {
                baud: 9600,
                discard_input: false
            }
        );
        assert!(matches!(s.completed(), Action::Receive(_)));
        s
    }

    /// After a meter's message: tr, then `sent` goes out and the next receive starts.
    fn replies(s: &mut Session, action: Option<Action>, sent: &[u8]) {
        assert_eq!(action, Some(Action::Sleep(Duration::from_millis(200))));
        assert_eq!(s.completed(), Action::Send(sent.to_vec()));
        assert!(matches!(s.completed(), Action::Receive(_)));
    }

    const PROFILE: &[u8] = b"P.01(02603011015)(0000)(15)(1)(1.5.0)(kW)\r\n(0.123)\r\n(0.130)\r\n";

    fn r5() -> Vec<u8> {
        codec::command(b'R', b'5', Some(b"P.01(2603011000;2603020000)"))
    }

    #[test]
    fn profile_without_password_should_go_from_operand_to_r5_to_break() {
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(61234567)")));
        replies(&mut s, a, &r5());
        // Our own R5, heard back, is not the answer.
        assert_eq!(s.received(&r5()), None);
        let a = s.received(&data_message(PROFILE));
        let r = closed(&mut s, a).unwrap();
        let p = r.profile.expect("profile");
        assert_eq!(p.blocks.len(), 1);
        assert_eq!(p.blocks[0].rows, vec![vec!["0.123"], vec!["0.130"]]);
        assert!(r.sets.is_empty());
        assert_eq!(r.baud, 9600);
    }

    #[test]
    fn profile_with_password_should_send_p1_and_wait_for_its_ack() {
        let mut s = programming(Some("secret"));
        let a = s.received(&codec::command(b'P', b'0', Some(b"(61234567)")));
        replies(&mut s, a, &codec::command(b'P', b'1', Some(b"(secret)")));
        // A lone ACK, with nothing after it.
        let a = s.received(&[ACK]);
        replies(&mut s, a, &r5());
        let a = s.received(&data_message(PROFILE));
        assert!(closed(&mut s, a).unwrap().profile.is_some());
    }

    #[test]
    fn refused_password_should_be_a_security_error_however_the_meter_says_it() {
        for answer in [vec![NAK], break_message(), data_message(b"(ERROR)\r\n")] {
            let mut s = programming(Some("wrong"));
            let a = s.received(&codec::command(b'P', b'0', Some(b"(61234567)")));
            replies(&mut s, a, &codec::command(b'P', b'1', Some(b"(wrong)")));
            let a = s.received(&answer);
            assert!(
                matches!(closed(&mut s, a), Err(SessionError::Security(_))),
                "{answer:?}"
            );
        }
    }

    #[test]
    fn break_instead_of_the_profile_should_be_a_security_error() {
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        let a = s.received(&break_message());
        assert!(matches!(closed(&mut s, a), Err(SessionError::Security(_))));
    }

    #[test]
    fn partial_blocks_should_be_acknowledged_and_joined() {
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        let (head, tail) = PROFILE.split_at(20);
        let mut partial = vec![codec::STX];
        partial.extend_from_slice(head);
        partial.push(codec::EOT);
        partial.push(codec::bcc(&partial[1..]));
        let a = s.received(&partial);
        replies(&mut s, a, &[ACK]);
        let a = s.received(&data_message(tail));
        let p = closed(&mut s, a).unwrap().profile.unwrap();
        assert_eq!(p.blocks[0].rows.len(), 2);
    }

    #[test]
    fn corrupted_profile_block_should_be_asked_again_with_nak_up_to_the_limit() {
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        let mut bad = data_message(PROFILE);
        if let Some(b) = bad.last_mut() {
            *b ^= 1;
        }
        let a = s.received(&bad);
        replies(&mut s, a, &[NAK]);
        let a = s.received(&data_message(PROFILE));
        assert_eq!(closed(&mut s, a).unwrap().profile.unwrap().blocks.len(), 1);
        // Always corrupted: three repeats, then the block check error.
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        for _ in 0..MAX_REPEATS {
            let a = s.received(&bad);
            replies(&mut s, a, &[NAK]);
        }
        let a = s.received(&bad);
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::Decode {
                phase: Phase::Profile,
                error: codec::DecodeError::Bcc { .. }
            })
        ));
    }

    #[test]
    fn error_answer_should_be_an_empty_profile_and_garbage_a_profile_error() {
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        let a = s.received(&data_message(b"P.01(ERROR)\r\n"));
        assert_eq!(closed(&mut s, a).unwrap().profile, Some(Profile::default()));
        let mut s = programming(None);
        let a = s.received(&codec::command(b'P', b'0', Some(b"(1)")));
        replies(&mut s, a, &r5());
        let a = s.received(&data_message(b"(0.1)(0.2)\r\n"));
        assert!(matches!(closed(&mut s, a), Err(SessionError::Profile(_))));
    }

    #[test]
    fn silence_instead_of_the_operand_should_be_a_refused_switch() {
        let mut s = programming(None);
        let a = Some(s.silence(Silence::First));
        assert_eq!(
            closed(&mut s, a),
            Err(SessionError::SwitchRefused {
                baud: 9600,
                how: Refusal::Silence
            })
        );
    }

    #[test]
    fn readout_instead_of_the_operand_should_be_unexpected() {
        let mut s = programming(None);
        let a = s.received(&data_message(READOUT));
        assert!(matches!(
            closed(&mut s, a),
            Err(SessionError::Unexpected {
                phase: Phase::Operand,
                ..
            })
        ));
    }

    #[test]
    fn mode_a_meter_should_have_no_programming_mode() {
        let mut s = signed_on(profile_config(None));
        let a = s.received(b"/ABC:X\r\n");
        assert_eq!(closed(&mut s, a), Err(SessionError::NoProgrammingMode('A')));
    }

    #[test]
    fn calls_out_of_order_should_finish_with_an_error() {
        let mut s = Session::new(config());
        assert!(matches!(
            s.silence(Silence::First),
            Action::Finish(Err(SessionError::OutOfOrder(_)))
        ));
    }
}
