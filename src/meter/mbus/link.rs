//! The link layer (EN 13757-2, after IEC 60870-5-1/-2 format class FT 1.2) as bytes: frame
//! parsing with checksums and lengths checked, the master's frame builders, the FCB rule, and
//! a [`split`] of a received byte stream into frames. Sans-IO.
//!
//! # Frames
//!
//! | frame | bytes |
//! |---|---|
//! | single character (ACK) | `E5` |
//! | short | `10 C A CS 16` |
//! | control | `68 03 03 68 C A CI CS 16` |
//! | long | `68 L L 68 C A CI data… CS 16`, L = 3 + data length (≤ 252 data bytes) |
//!
//! CS is the arithmetic sum, modulo 256, of the bytes from C to the last data byte.
//!
//! # The FCB rule
//!
//! A request with FCV = 1 (REQ_UD2, SND_UD) carries a frame count bit. The master toggles it
//! for every new request to the same slave and keeps it for a repetition, so a slave whose
//! answer was lost sends the same answer again, and one that got the request moves on (the
//! next telegram of a multi-telegram answer). After SND_NKE — or a selection — the slave
//! expects FCB = 1 first. [`Fcb`] is that per-slave state.

/// The single-character acknowledgement.
pub const ACK: u8 = 0xE5;
pub const SHORT_START: u8 = 0x10;
pub const LONG_START: u8 = 0x68;
pub const STOP: u8 = 0x16;

/// C field: SND_NKE, link reset.
pub const C_SND_NKE: u8 = 0x40;
/// C field: SND_UD (user data to the slave), FCB clear.
pub const C_SND_UD: u8 = 0x53;
/// C field: REQ_UD2 (class 2 data), FCB clear.
pub const C_REQ_UD2: u8 = 0x5B;
/// C field: REQ_UD1 (class 1 data), FCB clear.
pub const C_REQ_UD1: u8 = 0x5A;
/// C field: RSP_UD, without ACD and DFC.
pub const C_RSP_UD: u8 = 0x08;
/// Frame count bit of a master's C field.
pub const FCB: u8 = 0x20;
/// Frame count valid bit of a master's C field.
pub const FCV: u8 = 0x10;

/// Primary addresses 1–250 are slaves; 0 is an unconfigured slave (factory default).
pub const MAX_PRIMARY: u8 = 250;
/// The network layer address: the slave selected by secondary address.
pub const ADDR_NETWORK: u8 = 253;
/// Broadcast, every slave answers (only for a single slave on the segment).
pub const ADDR_BROADCAST_REPLY: u8 = 254;
/// Broadcast, no slave answers.
pub const ADDR_BROADCAST: u8 = 255;

/// CI field: application reset (SND_UD).
pub const CI_APP_RESET: u8 = 0x50;
/// CI field: selection of a slave by secondary address (SND_UD to 253).
pub const CI_SELECT: u8 = 0x52;

/// Longest frame on the wire: 4 header bytes, L = 255, checksum and stop.
pub const MAX_FRAME: usize = 4 + 255 + 2;

/// One frame as received, borrowing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `E5`.
    Ack,
    /// `10 C A CS 16`.
    Short { control: u8, address: u8 },
    /// `68 L L 68 C A CI data CS 16`; a control frame has no data.
    Long {
        control: u8,
        address: u8,
        ci: u8,
        data: &'a [u8],
    },
}

impl Frame<'_> {
    /// The frame's name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Ack => "ACK",
            Frame::Short { .. } => "short frame",
            Frame::Long { data: [], .. } => "control frame",
            Frame::Long { .. } => "long frame",
        }
    }

    /// Whether this is a slave's RSP_UD (C = 08, with any ACD/DFC bits).
    pub fn is_rsp_ud(&self) -> bool {
        matches!(self, Frame::Long { control, .. } if control & 0xCF == C_RSP_UD)
    }
}

/// Why bytes are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("empty input")]
    Empty,
    #[error("byte {0:#04x} cannot start a frame (E5, 10 or 68)")]
    BadStart(u8),
    #[error("the frame stops after {got} of {need} bytes")]
    Truncated { got: usize, need: usize },
    #[error("the two length bytes differ ({0:#04x}, {1:#04x})")]
    LengthMismatch(u8, u8),
    #[error("length {0} is shorter than C, A and CI")]
    LengthTooShort(u8),
    #[error("the second start byte is {0:#04x}, not 68")]
    BadSecondStart(u8),
    #[error("checksum {got:#04x}, computed {computed:#04x}")]
    Checksum { got: u8, computed: u8 },
    #[error("the stop byte is {0:#04x}, not 16")]
    BadStop(u8),
    #[error("{0} bytes after the end of the frame")]
    Trailing(usize),
}

/// The checksum: sum of the bytes modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Parses exactly one frame; `bytes` must be the whole frame.
pub fn parse(bytes: &[u8]) -> Result<Frame<'_>, LinkError> {
    match split(bytes) {
        Split::Frame(n) if n == bytes.len() => frame_at(bytes),
        Split::Frame(n) => Err(LinkError::Trailing(bytes.len() - n)),
        Split::Incomplete { need } => {
            if bytes.is_empty() {
                Err(LinkError::Empty)
            } else {
                Err(LinkError::Truncated {
                    got: bytes.len(),
                    need,
                })
            }
        }
        Split::Invalid { error, .. } => Err(error),
    }
}

/// The frame at the start of `bytes`, known to be complete and valid (from [`split`]).
fn frame_at(bytes: &[u8]) -> Result<Frame<'_>, LinkError> {
    match bytes.first() {
        Some(&ACK) => Ok(Frame::Ack),
        Some(&SHORT_START) if bytes.len() >= 5 => Ok(Frame::Short {
            control: bytes[1],
            address: bytes[2],
        }),
        Some(&LONG_START) if bytes.len() >= 9 => {
            let l = usize::from(bytes[1]);
            Ok(Frame::Long {
                control: bytes[4],
                address: bytes[5],
                ci: bytes[6],
                data: &bytes[7..4 + l],
            })
        }
        Some(&b) => Err(LinkError::BadStart(b)),
        None => Err(LinkError::Empty),
    }
}

/// What the start of a received byte stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// A complete, valid frame of this many bytes: take them with [`parse`].
    Frame(usize),
    /// The start of a frame; at least `need` bytes in all are needed to tell.
    Incomplete { need: usize },
    /// The first `skip` bytes are not a frame (line noise, or two slaves answering at once:
    /// a collision garbles their bytes). Drop them and split again.
    Invalid { skip: usize, error: LinkError },
}

/// Looks at the start of `buf`: a complete frame, not yet enough bytes, or garbage.
///
/// A receiver keeps the bytes of one answer window, calls `split`, and drops what it is told
/// to. Garbage is dropped one byte at a time when the first byte cannot start a frame, and a
/// whole would-be frame when its lengths or checksum are wrong — the caller decides whether
/// garbage inside an answer window means a collision.
pub fn split(buf: &[u8]) -> Split {
    let Some(&first) = buf.first() else {
        return Split::Incomplete { need: 1 };
    };
    match first {
        ACK => Split::Frame(1),
        SHORT_START => {
            if buf.len() < 5 {
                return Split::Incomplete { need: 5 };
            }
            let computed = checksum(&buf[1..3]);
            if buf[3] != computed {
                return Split::Invalid {
                    skip: 5,
                    error: LinkError::Checksum {
                        got: buf[3],
                        computed,
                    },
                };
            }
            if buf[4] != STOP {
                return Split::Invalid {
                    skip: 5,
                    error: LinkError::BadStop(buf[4]),
                };
            }
            Split::Frame(5)
        }
        LONG_START => {
            if buf.len() < 4 {
                return Split::Incomplete { need: 4 };
            }
            if buf[1] != buf[2] {
                return Split::Invalid {
                    skip: 1,
                    error: LinkError::LengthMismatch(buf[1], buf[2]),
                };
            }
            if buf[3] != LONG_START {
                return Split::Invalid {
                    skip: 1,
                    error: LinkError::BadSecondStart(buf[3]),
                };
            }
            if buf[1] < 3 {
                return Split::Invalid {
                    skip: 4,
                    error: LinkError::LengthTooShort(buf[1]),
                };
            }
            let l = usize::from(buf[1]);
            let total = 4 + l + 2;
            if buf.len() < total {
                return Split::Incomplete { need: total };
            }
            let computed = checksum(&buf[4..4 + l]);
            if buf[4 + l] != computed {
                return Split::Invalid {
                    skip: total,
                    error: LinkError::Checksum {
                        got: buf[4 + l],
                        computed,
                    },
                };
            }
            if buf[total - 1] != STOP {
                return Split::Invalid {
                    skip: total,
                    error: LinkError::BadStop(buf[total - 1]),
                };
            }
            Split::Frame(total)
        }
        b => Split::Invalid {
            skip: 1,
            error: LinkError::BadStart(b),
        },
    }
}

/// A short frame `10 C A CS 16`.
pub fn short(control: u8, address: u8) -> [u8; 5] {
    [
        SHORT_START,
        control,
        address,
        control.wrapping_add(address),
        STOP,
    ]
}

/// A long (or, without data, control) frame. `data` longer than 252 bytes is a caller bug
/// and is cut.
pub fn long(control: u8, address: u8, ci: u8, data: &[u8]) -> Vec<u8> {
    let data = &data[..data.len().min(252)];
    let l = (3 + data.len()) as u8;
    let mut out = Vec::with_capacity(data.len() + 9);
    out.extend_from_slice(&[LONG_START, l, l, LONG_START, control, address, ci]);
    out.extend_from_slice(data);
    out.push(checksum(&out[4..]));
    out.push(STOP);
    out
}

/// SND_NKE: resets the slave's link (its FCB state); to 253 it deselects a selected slave.
pub fn snd_nke(address: u8) -> [u8; 5] {
    short(C_SND_NKE, address)
}

/// REQ_UD2 with the given FCB (FCV set).
pub fn req_ud2(address: u8, fcb: bool) -> [u8; 5] {
    short(C_REQ_UD2 | if fcb { FCB } else { 0 }, address)
}

/// SND_UD with a CI field and data (FCV set).
pub fn snd_ud(address: u8, fcb: bool, ci: u8, data: &[u8]) -> Vec<u8> {
    long(C_SND_UD | if fcb { FCB } else { 0 }, address, ci, data)
}

/// SND_UD CI 0x50: application reset (no data: reset everything).
pub fn app_reset(address: u8, fcb: bool) -> Vec<u8> {
    snd_ud(address, fcb, CI_APP_RESET, &[])
}

/// SND_UD CI 0x52 to 253: select the slave(s) matching `mask`.
pub fn select(fcb: bool, mask: &super::SecondaryMask) -> Vec<u8> {
    snd_ud(ADDR_NETWORK, fcb, CI_SELECT, &mask.to_bytes())
}

/// The per-slave frame count bit (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fcb {
    next: bool,
}

impl Default for Fcb {
    fn default() -> Self {
        Fcb { next: true }
    }
}

impl Fcb {
    /// After SND_NKE or a selection: the slave expects FCB = 1.
    pub fn reset(&mut self) {
        self.next = true;
    }

    /// The bit for a new request; the next new request gets the other one.
    pub fn new_request(&mut self) -> bool {
        let bit = self.next;
        self.next = !bit;
        bit
    }

    /// The bit for repeating the last request (its answer was lost): the one last sent.
    pub fn repeat(&self) -> bool {
        !self.next
    }
}

/// How long `bytes` take on the wire at `baud`: 11 bits a byte (start, 8 data, even
/// parity, stop).
pub fn wire_time(bytes: usize, baud: u32) -> std::time::Duration {
    bit_time(11 * bytes as u64, baud)
}

/// `bits` bit times at `baud`.
pub fn bit_time(bits: u64, baud: u32) -> std::time::Duration {
    std::time::Duration::from_nanos(bits.saturating_mul(1_000_000_000) / u64::from(baud.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_frame_should_round_trip() {
        let f = req_ud2(5, true);
        assert_eq!(f, [0x10, 0x7B, 0x05, 0x80, 0x16]);
        assert_eq!(
            parse(&f),
            Ok(Frame::Short {
                control: 0x7B,
                address: 5
            })
        );
    }

    #[test]
    fn snd_nke_should_match_the_standard_bytes() {
        assert_eq!(snd_nke(0xFD), [0x10, 0x40, 0xFD, 0x3D, 0x16]);
    }

    #[test]
    fn long_frame_should_round_trip_and_check_its_checksum() {
        let f = long(0x08, 1, 0x72, &[1, 2, 3]);
        assert_eq!(
            parse(&f),
            Ok(Frame::Long {
                control: 8,
                address: 1,
                ci: 0x72,
                data: &[1, 2, 3]
            })
        );
        let mut bad = f.clone();
        bad[8] ^= 1;
        assert!(matches!(parse(&bad), Err(LinkError::Checksum { .. })));
        let mut bad = f.clone();
        *bad.last_mut().unwrap() = 0x17;
        assert_eq!(parse(&bad), Err(LinkError::BadStop(0x17)));
        let mut bad = f;
        bad[2] = 7;
        assert_eq!(parse(&bad), Err(LinkError::LengthMismatch(6, 7)));
    }

    #[test]
    fn control_frame_should_parse_without_data() {
        let f = long(0x53, 0xFD, 0x50, &[]);
        assert_eq!(f.len(), 9);
        assert!(matches!(
            parse(&f),
            Ok(Frame::Long {
                ci: 0x50,
                data: [],
                ..
            })
        ));
    }

    #[test]
    fn split_should_say_need_more_for_partial_input() {
        let f = long(0x08, 1, 0x72, &[9; 20]);
        for cut in 1..f.len() {
            assert!(
                matches!(split(&f[..cut]), Split::Incomplete { .. }),
                "cut at {cut}"
            );
        }
        assert_eq!(split(&f), Split::Frame(f.len()));
    }

    #[test]
    fn split_should_skip_garbage_before_a_frame() {
        let mut buf = vec![0x00, 0xFF, 0x42];
        buf.push(ACK);
        let mut at = 0;
        let mut skipped = 0;
        loop {
            match split(&buf[at..]) {
                Split::Invalid { skip, .. } => {
                    at += skip;
                    skipped += skip;
                }
                Split::Frame(n) => {
                    assert_eq!(parse(&buf[at..at + n]), Ok(Frame::Ack));
                    break;
                }
                Split::Incomplete { .. } => panic!("incomplete"),
            }
        }
        assert_eq!(skipped, 3);
    }

    #[test]
    fn garbled_answers_should_be_invalid_not_frames() {
        // Two slaves' answers ORed together, as a collision on the bus looks.
        let a = long(0x08, 1, 0x72, &[0x12; 12]);
        let b = long(0x08, 2, 0x72, &[0x21; 12]);
        let garbled: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x | y).collect();
        assert!(matches!(split(&garbled), Split::Invalid { .. }));
    }

    #[test]
    fn fcb_should_toggle_on_new_requests_and_not_on_repeats() {
        let mut fcb = Fcb::default();
        assert!(fcb.new_request());
        assert!(fcb.repeat());
        assert!(fcb.repeat());
        assert!(!fcb.new_request());
        assert!(!fcb.repeat());
        assert!(fcb.new_request());
        fcb.reset();
        assert!(fcb.new_request());
    }

    #[test]
    fn wire_time_should_count_eleven_bits_a_byte() {
        assert_eq!(wire_time(5, 2400).as_micros(), 22_916);
    }
}
