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

use super::codec::{self, Decoder, Frame, Identification, Mode};
use super::dataset::{self, DataError, DataSet};

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
}

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

/// A successful readout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readout {
    pub identification: Identification,
    /// The rate the data message came at.
    pub baud: u32,
    pub sets: Vec<DataSet>,
}

/// The message a session was waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Identification,
    Readout,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Identification => "identification",
            Phase::Readout => "readout",
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
    },
    /// Waiting tr before the break.
    Closing(Result<Readout, SessionError>),
    /// The break is out.
    Breaking(Result<Readout, SessionError>),
    Done,
}

/// One readout.
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
                // V = 0: normal protocol procedure; Y = 0: data readout.
                Action::Send(codec::option_select(b'0', code, b'0'))
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
                ..
            } => {
                let phase = Phase::Readout;
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
        match id.mode() {
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

    fn await_data(&mut self, id: Identification, baud: u32) -> Action {
        self.state = State::AwaitData {
            id,
            baud,
            switched: baud != 300,
            skipped_before: self.decoder.skipped(),
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

    fn config() -> SessionConfig {
        SessionConfig {
            address: Some("61234567".into()),
            max_baud: 9600,
            switch_baud: true,
            answer_timeout: Duration::from_millis(1600),
            gap_timeout: TR_MAX,
            readout_timeout: Duration::from_secs(60),
            max_block: codec::DEFAULT_MAX_BLOCK,
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

    #[test]
    fn calls_out_of_order_should_finish_with_an_error() {
        let mut s = Session::new(config());
        assert!(matches!(
            s.silence(Silence::First),
            Action::Finish(Err(SessionError::OutOfOrder(_)))
        ));
    }
}
