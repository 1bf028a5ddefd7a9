//! The IEC 62056-21 messages as bytes: encoders, the block check character, and a streaming
//! [`Decoder`]. Sans-IO: bytes in, frames out; nothing here knows about ports or time.
//!
//! The decoder serves both ends of the link — the agent decodes what meters send, the
//! simulated meter decodes what the agent sends — because on an optical head or a bus with
//! echo the agent also hears its own requests and has to recognise them.
//!
//! # Frames
//!
//! | frame | bytes |
//! |---|---|
//! | request | `/ ? [address] ! CR LF` |
//! | identification | `/ X X X Z [\ W] ident CR LF` |
//! | acknowledgement / option select | `ACK V Z Y CR LF` |
//! | acknowledge, repeat request | `ACK`, `NAK` |
//! | data message | `STX data ETX BCC` (`EOT` instead of `ETX` for a partial block) |
//! | command message | `SOH C D [STX data] ETX BCC`, e.g. break: `SOH B 0 ETX BCC` |
//!
//! The block check character is the XOR of the bytes after the first `SOH` or `STX` up to
//! and including `ETX`/`EOT`, each taken as 7 bits.
//!
//! # Tolerance
//!
//! Characters are 7 bits (7E1 framing): the decoder clears bit 7 of every byte, so a port
//! opened 8N1 by mistake, whose bit 7 is the parity bit, still decodes. Bytes between frames
//! that cannot start one (line noise, a baud-rate mismatch, a meter's stray CR LF) are counted
//! in [`Decoder::skipped`] and dropped. A frame start inside a frame ends the first one as
//! [`DecodeError::Truncated`] and begins the next, so a meter that restarts mid-message does
//! not swallow its next answer. Memory is bounded: the decoder holds at most the frame in
//! progress, and a frame longer than its limit is dropped as [`DecodeError::TooLong`].

use std::time::Duration;

pub const SOH: u8 = 0x01;
pub const STX: u8 = 0x02;
pub const ETX: u8 = 0x03;
pub const EOT: u8 = 0x04;
pub const ACK: u8 = 0x06;
pub const NAK: u8 = 0x15;
pub const CR: u8 = 0x0D;
pub const LF: u8 = 0x0A;

/// Longest request, identification or option select line accepted (the standard's longest,
/// a request with a 32-character address, is 37 bytes).
pub const MAX_LINE: usize = 64;
/// Default limit of a data or command message.
pub const DEFAULT_MAX_BLOCK: usize = 64 * 1024;

/// Bits on the wire per character in 7E1 framing: start, 7 data, parity, stop.
pub const BITS_PER_CHAR: u32 = 10;

/// The mode C baud rates by their code in the identification and option select (`0`-`6`).
pub const MODE_C_RATES: [u32; 7] = [300, 600, 1200, 2400, 4800, 9600, 19200];

/// How long `chars` characters take on the wire at `baud` (7E1).
pub fn wire_time(chars: usize, baud: u32) -> Duration {
    let bits = chars as u64 * u64::from(BITS_PER_CHAR);
    Duration::from_nanos(bits.saturating_mul(1_000_000_000) / u64::from(baud.max(1)))
}

/// The block check character: XOR of `bytes` taken as 7 bits.
pub fn bcc(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ (b & 0x7F))
}

/// The mode C code of a baud rate (`9600` → `b'5'`).
pub fn baud_code(baud: u32) -> Option<u8> {
    MODE_C_RATES
        .iter()
        .position(|r| *r == baud)
        .map(|i| b'0' + i as u8)
}

/// The baud rate of a mode C code (`b'5'` → `9600`); `None` for the reserved `7`-`9`.
pub fn baud_of_code(code: u8) -> Option<u32> {
    code.checked_sub(b'0')
        .and_then(|i| MODE_C_RATES.get(usize::from(i)))
        .copied()
}

/// The protocol mode the identification's baud character announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Any character other than `0`-`9` and `A`-`I`: the meter sends its data at 300 Bd
    /// right after the identification.
    A,
    /// `A`-`F` (`G`-`I` reserved, `None`): the meter switches to this rate right after the
    /// identification, without an acknowledgement.
    B(Option<u32>),
    /// `0`-`6` (`7`-`9` reserved, `None`): the agent chooses the rate in its option select.
    C(Option<u32>),
}

/// `/XXXZ[\W]ident CR LF`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identification {
    /// Three letters (FLAG manufacturer id).
    pub manufacturer: String,
    /// `Z`: the highest baud rate the meter offers, or its mode.
    pub baud_code: u8,
    /// `W` of the optional `\W` escape (enhanced capabilities; `2`: HDLC, mode E).
    pub enhanced: Option<u8>,
    /// The manufacturer's identification of the device type.
    pub ident: String,
}

impl Identification {
    /// The shortest time the meter may take to answer (IEC 62056-21 tr): 20 ms when the third
    /// letter of the manufacturer id is lower case, 200 ms otherwise. The agent keeps the same
    /// minimum before it answers the meter.
    pub fn reaction_time(&self) -> Duration {
        if self
            .manufacturer
            .as_bytes()
            .get(2)
            .is_some_and(|c| c.is_ascii_lowercase())
        {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(200)
        }
    }

    pub fn mode(&self) -> Mode {
        match self.baud_code {
            b'0'..=b'9' => Mode::C(baud_of_code(self.baud_code)),
            // `A` is 600 Bd, the second mode C rate; `G`-`I` fall off the table (reserved).
            b'A'..=b'I' => Mode::B(
                MODE_C_RATES
                    .get(usize::from(self.baud_code - b'A') + 1)
                    .copied(),
            ),
            _ => Mode::A,
        }
    }
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `/?address!` — sent by the agent; heard back as an echo on some optical heads.
    Request {
        address: String,
    },
    Identification(Identification),
    /// `ACK V Z Y` — `protocol` (V) `0` normal, `baud` (Z) the chosen rate's code, `mode` (Y)
    /// `0` readout, `1` programming.
    OptionSelect {
        protocol: u8,
        baud: u8,
        mode: u8,
    },
    Ack,
    Nak,
    /// `STX data ETX|EOT BCC`; `complete` is false for a partial block (`EOT`).
    Data {
        text: String,
        complete: bool,
    },
    /// `SOH C D [STX data] ETX|EOT BCC`: break (`B0`), password (`P0`/`P1`), read, write.
    Command {
        command: u8,
        kind: u8,
        data: Option<String>,
        complete: bool,
    },
}

impl Frame {
    /// What the frame is, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Request { .. } => "request",
            Frame::Identification(_) => "identification",
            Frame::OptionSelect { .. } => "option select",
            Frame::Ack => "ACK",
            Frame::Nak => "NAK",
            Frame::Data { .. } => "data message",
            Frame::Command { .. } => "command message",
        }
    }
}

/// Why bytes that started a frame did not make one. The decoder has already resynchronised.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The block check character does not match: the block was corrupted on the line.
    #[error("block check character {got:#04x}, expected {expected:#04x}")]
    Bcc { expected: u8, got: u8 },
    /// A new frame started before this one ended: the sender was cut off or restarted.
    #[error("{frame} cut off after {len} bytes by the start of another frame")]
    Truncated { frame: &'static str, len: usize },
    /// Longer than any valid frame of its kind: dropped, to bound memory.
    #[error("{frame} longer than {limit} bytes")]
    TooLong { frame: &'static str, limit: usize },
    /// Complete but not valid.
    #[error("malformed {frame}: {reason}")]
    Malformed {
        frame: &'static str,
        reason: &'static str,
    },
}

// --- Encoders -------------------------------------------------------------------------------

/// `/?[address]!CR LF`. An empty or absent address is the plain request of an optical probe
/// (any meter answers).
pub fn request(address: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(37);
    out.extend_from_slice(b"/?");
    out.extend_from_slice(address.unwrap_or("").as_bytes());
    out.extend_from_slice(b"!\r\n");
    out
}

/// `ACK V Z Y CR LF`.
pub fn option_select(protocol: u8, baud: u8, mode: u8) -> Vec<u8> {
    vec![ACK, protocol, baud, mode, CR, LF]
}

/// `/XXXZ[\W]ident CR LF`.
pub fn identification(id: &Identification) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + id.ident.len());
    out.push(b'/');
    out.extend_from_slice(id.manufacturer.as_bytes());
    out.push(id.baud_code);
    if let Some(w) = id.enhanced {
        out.extend_from_slice(&[b'\\', w]);
    }
    out.extend_from_slice(id.ident.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// `STX text ETX BCC`. A readout's `text` is its data lines followed by `!CR LF`.
pub fn data_message(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 3);
    out.push(STX);
    out.extend_from_slice(text);
    out.push(ETX);
    out.push(bcc(&out[1..]));
    out
}

/// `SOH C D [STX data] ETX BCC`.
pub fn command(command: u8, kind: u8, data: Option<&[u8]>) -> Vec<u8> {
    let mut out = vec![SOH, command, kind];
    if let Some(d) = data {
        out.push(STX);
        out.extend_from_slice(d);
    }
    out.push(ETX);
    out.push(bcc(&out[1..]));
    out
}

/// The break message `SOH B 0 ETX BCC`: ends the session, the meter returns to 300 Bd.
pub fn break_message() -> Vec<u8> {
    command(b'B', b'0', None)
}

// --- Decoder --------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between frames.
    Hunt,
    /// After `/`: a request (`?`) or an identification follows.
    Slash,
    /// A request, identification or option select line, up to LF.
    Line(LineKind),
    /// After `ACK`: an option select if a character follows, else a plain acknowledgement.
    AfterAck,
    /// Inside `STX … ETX` or `SOH … ETX`.
    Block,
    /// The next byte is the block check character.
    Bcc { complete: bool },
    /// Dropping an over-long frame until the next frame start.
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    Request,
    Identification,
    OptionSelect,
}

impl LineKind {
    fn name(self) -> &'static str {
        match self {
            LineKind::Request => "request",
            LineKind::Identification => "identification",
            LineKind::OptionSelect => "option select",
        }
    }
}

/// A streaming decoder: feed it bytes as they arrive, in any chunks, and take the frames.
///
/// A lone `ACK` is reported when the byte after it arrives, since `ACK` followed by a digit
/// is an option select; the meters' answers in a readout never end in one.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The frame in progress, from its start character.
    buf: Vec<u8>,
    /// Running block check over `buf[1..]`.
    bcc: u8,
    max_block: usize,
    skipped: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_BLOCK)
    }
}

impl Decoder {
    /// A decoder that drops data and command messages longer than `max_block` bytes.
    pub fn new(max_block: usize) -> Self {
        Decoder {
            state: State::Hunt,
            buf: Vec::new(),
            bcc: 0,
            max_block: max_block.max(MAX_LINE),
            skipped: 0,
        }
    }

    /// Bytes dropped so far because they could not start a frame.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Whether a frame has started and not ended.
    pub fn in_frame(&self) -> bool {
        !matches!(self.state, State::Hunt | State::Skip)
    }

    /// Bytes held for the frame in progress (bounded by the frame limits).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes a lone `ACK` that has not been reported yet because no byte followed it. An
    /// answer that is only an acknowledgement (to a password) ends with it; the caller that
    /// expects one asks here instead of waiting for a byte that will not come.
    pub fn take_ack(&mut self) -> bool {
        if self.state == State::AfterAck {
            self.state = State::Hunt;
            self.buf.clear();
            true
        } else {
            false
        }
    }

    /// Forgets any frame in progress and the skipped count (a new session).
    pub fn reset(&mut self) {
        self.state = State::Hunt;
        self.buf.clear();
        self.bcc = 0;
        self.skipped = 0;
    }

    /// Decodes `bytes`; returns the frames and errors they completed, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        let mut out = Vec::new();
        for &b in bytes {
            self.push(b & 0x7F, &mut out);
        }
        out
    }

    fn push(&mut self, b: u8, out: &mut Vec<Result<Frame, DecodeError>>) {
        match self.state {
            State::Hunt => self.start(b, out),
            State::Skip => {
                if is_start(b) {
                    self.start(b, out);
                }
            }
            State::Slash => {
                self.buf.push(b);
                self.state = if b == b'?' {
                    State::Line(LineKind::Request)
                } else if b == CR || b == LF || b == STX || b == SOH || b == b'/' {
                    self.restart(b, "identification", out);
                    return;
                } else {
                    State::Line(LineKind::Identification)
                };
            }
            State::AfterAck => {
                if b.is_ascii_digit() {
                    self.buf.push(b);
                    self.state = State::Line(LineKind::OptionSelect);
                } else {
                    self.emit(Ok(Frame::Ack), out);
                    self.start(b, out);
                }
            }
            State::Line(kind) => {
                if b == LF {
                    let line = std::mem::take(&mut self.buf);
                    self.state = State::Hunt;
                    out.push(parse_line(kind, &line));
                } else if b == STX || b == SOH || b == ACK || b == NAK || b == b'/' {
                    // `/` and `!` are not allowed inside a line: a new frame began.
                    self.restart(b, kind.name(), out);
                } else if self.buf.len() >= MAX_LINE {
                    self.too_long(kind.name(), MAX_LINE, out);
                } else {
                    self.buf.push(b);
                }
            }
            State::Block => {
                if b == ETX || b == EOT {
                    self.bcc ^= b;
                    self.buf.push(b);
                    self.state = State::Bcc { complete: b == ETX };
                } else if b == SOH || (b == STX && !self.stx_allowed()) {
                    let frame = self.block_name();
                    self.restart(b, frame, out);
                } else if self.buf.len() >= self.max_block {
                    let frame = self.block_name();
                    self.too_long(frame, self.max_block, out);
                } else {
                    self.bcc ^= b;
                    self.buf.push(b);
                }
            }
            State::Bcc { complete } => {
                let frame = std::mem::take(&mut self.buf);
                let expected = self.bcc;
                self.state = State::Hunt;
                self.bcc = 0;
                if b != expected {
                    out.push(Err(DecodeError::Bcc { expected, got: b }));
                } else {
                    out.push(parse_block(&frame, complete));
                }
            }
        }
    }

    /// In a command message (`SOH C D`), one `STX` may follow the command characters.
    fn stx_allowed(&self) -> bool {
        self.buf.first() == Some(&SOH) && self.buf.len() == 3
    }

    fn block_name(&self) -> &'static str {
        if self.buf.first() == Some(&SOH) {
            "command message"
        } else {
            "data message"
        }
    }

    fn start(&mut self, b: u8, out: &mut Vec<Result<Frame, DecodeError>>) {
        self.buf.clear();
        self.bcc = 0;
        match b {
            b'/' => {
                self.buf.push(b);
                self.state = State::Slash;
            }
            STX | SOH => {
                self.buf.push(b);
                self.state = State::Block;
            }
            ACK => {
                self.buf.push(b);
                self.state = State::AfterAck;
            }
            NAK => {
                self.state = State::Hunt;
                self.emit(Ok(Frame::Nak), out);
            }
            _ => {
                self.state = State::Hunt;
                self.skipped += 1;
            }
        }
    }

    /// The frame in progress was cut off by `b`, which starts the next one.
    fn restart(&mut self, b: u8, frame: &'static str, out: &mut Vec<Result<Frame, DecodeError>>) {
        out.push(Err(DecodeError::Truncated {
            frame,
            len: self.buf.len(),
        }));
        self.start(b, out);
    }

    fn too_long(
        &mut self,
        frame: &'static str,
        limit: usize,
        out: &mut Vec<Result<Frame, DecodeError>>,
    ) {
        out.push(Err(DecodeError::TooLong { frame, limit }));
        self.buf = Vec::new();
        self.bcc = 0;
        self.state = State::Skip;
    }

    fn emit(
        &mut self,
        frame: Result<Frame, DecodeError>,
        out: &mut Vec<Result<Frame, DecodeError>>,
    ) {
        self.buf.clear();
        out.push(frame);
    }
}

fn is_start(b: u8) -> bool {
    matches!(b, b'/' | STX | SOH | ACK | NAK)
}

/// `line` is the frame from its first byte up to, not including, LF.
fn parse_line(kind: LineKind, line: &[u8]) -> Result<Frame, DecodeError> {
    let frame = kind.name();
    let bad = |reason| Err(DecodeError::Malformed { frame, reason });
    let Some(body) = line.strip_suffix(b"\r") else {
        return bad("not ended by CR LF");
    };
    match kind {
        LineKind::Request => {
            // `/?address!`
            let Some(address) = body
                .strip_prefix(b"/?")
                .and_then(|rest| rest.strip_suffix(b"!"))
            else {
                return bad("not ended by `!`");
            };
            if address.len() > 32 {
                return bad("address longer than 32 characters");
            }
            if !address.iter().all(|c| c.is_ascii_graphic() && *c != b'!') {
                return bad("address with a character that is not printable");
            }
            Ok(Frame::Request {
                address: ascii(address),
            })
        }
        LineKind::Identification => {
            // `/XXXZ[\W]ident`
            if body.len() < 5 {
                return bad("shorter than `/XXXZ`");
            }
            let manufacturer = &body[1..4];
            if !manufacturer.iter().all(u8::is_ascii_alphabetic) {
                return bad("manufacturer id is not three letters");
            }
            let baud_code = body[4];
            if !baud_code.is_ascii_graphic() || baud_code == b'!' {
                return bad("baud rate character is not printable");
            }
            let mut rest = &body[5..];
            let mut enhanced = None;
            if let [b'\\', w, tail @ ..] = rest {
                enhanced = Some(*w);
                rest = tail;
            }
            if !rest.iter().all(|c| (0x20..0x7F).contains(c) && *c != b'!') {
                return bad("identification with a character that is not printable");
            }
            Ok(Frame::Identification(Identification {
                manufacturer: ascii(manufacturer),
                baud_code,
                enhanced,
                ident: ascii(rest),
            }))
        }
        LineKind::OptionSelect => match body {
            [ACK, v, z, y] if z.is_ascii_graphic() && y.is_ascii_graphic() => {
                Ok(Frame::OptionSelect {
                    protocol: *v,
                    baud: *z,
                    mode: *y,
                })
            }
            _ => bad("not `ACK V Z Y`"),
        },
    }
}

/// `frame` is from `STX`/`SOH` to `ETX`/`EOT`; its block check has been verified.
fn parse_block(frame: &[u8], complete: bool) -> Result<Frame, DecodeError> {
    // Drop the trailing ETX/EOT.
    let body = &frame[..frame.len().saturating_sub(1)];
    match body.first() {
        Some(&STX) => Ok(Frame::Data {
            text: ascii(&body[1..]),
            complete,
        }),
        Some(&SOH) => {
            let (command, kind) = match body {
                [_, c, d, ..] if c.is_ascii_uppercase() && d.is_ascii_alphanumeric() => (*c, *d),
                _ => {
                    return Err(DecodeError::Malformed {
                        frame: "command message",
                        reason: "no command and command type after SOH",
                    });
                }
            };
            let data = match &body[3..] {
                [] => None,
                [STX, data @ ..] => Some(ascii(data)),
                _ => {
                    return Err(DecodeError::Malformed {
                        frame: "command message",
                        reason: "data without STX",
                    });
                }
            };
            Ok(Frame::Command {
                command,
                kind,
                data,
                complete,
            })
        }
        _ => Err(DecodeError::Malformed {
            frame: "data message",
            reason: "no STX or SOH",
        }),
    }
}

/// Bytes already reduced to 7 bits are ASCII; anything else is replaced, never trusted.
fn ascii(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        Decoder::default().feed(bytes)
    }

    fn decode_bytewise(bytes: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        let mut d = Decoder::default();
        bytes.iter().flat_map(|b| d.feed(&[*b])).collect()
    }

    fn id(manufacturer: &str, z: u8, w: Option<u8>, ident: &str) -> Identification {
        Identification {
            manufacturer: manufacturer.into(),
            baud_code: z,
            enhanced: w,
            ident: ident.into(),
        }
    }

    // Worked vectors from pwitab/iec62056-21 (tests/test_bcc.py and tests/test_data.py): the
    // BCC is the XOR of everything after the first SOH or STX, up to and including ETX.
    #[test]
    fn public_bcc_vectors_should_check() {
        // test_bcc.py, test_bcc_bytes1: a write command, SOH W2 STX C003(910324092239) ETX.
        let write = [
            0x01, 0x57, 0x32, 0x02, 0x43, 0x30, 0x30, 0x33, 0x28, 0x39, 0x31, 0x30, 0x33, 0x32,
            0x34, 0x30, 0x39, 0x32, 0x32, 0x33, 0x39, 0x29, 0x03, 0x1b,
        ];
        // test_bcc.py, test_bcc_bytes_2: a password command.
        let password = b"\x01P0\x02(1234567)\x03P";
        // test_data.py: the break, an answer, a readout and a read command.
        let brk = b"\x01B0\x03q";
        let answer = b"\x023:171.0(0)\x03\x12";
        let readout = b"\x023:14(314*kWh)4:15(415*kWh)\r\n!\r\n\x03\"";
        let read = b"\x01R1\x021.8.0(1)\x03k";
        for v in [&write[..], password, brk, answer, readout, read] {
            let (body, check) = v.split_at(v.len() - 1);
            assert_eq!(bcc(&body[1..]), check[0], "{v:?}");
            assert!(matches!(decode_all(v).as_slice(), [Ok(_)]), "{v:?}");
        }
        assert_eq!(break_message(), brk);
        assert_eq!(command(b'R', b'1', Some(b"1.8.0(1)")), read);
        assert_eq!(command(b'P', b'0', Some(b"(1234567)")), password);
        assert_eq!(data_message(b"3:171.0(0)"), answer);
    }

    #[test]
    fn command_frames_should_decode_to_command_and_data() {
        assert_eq!(
            decode_all(b"\x01P0\x02(1234567)\x03P"),
            vec![Ok(Frame::Command {
                command: b'P',
                kind: b'0',
                data: Some("(1234567)".into()),
                complete: true
            })]
        );
        assert_eq!(
            decode_all(b"\x01B0\x03q"),
            vec![Ok(Frame::Command {
                command: b'B',
                kind: b'0',
                data: None,
                complete: true
            })]
        );
    }

    #[test]
    fn readout_with_wrong_bcc_should_be_a_bcc_error() {
        // test_data.py, test_invalid_bcc_raises_error: `x` instead of `"`.
        assert_eq!(
            decode_all(b"\x023:14(314*kWh)4:15(415*kWh)\r\n!\r\n\x03x"),
            vec![Err(DecodeError::Bcc {
                expected: b'"',
                got: b'x'
            })]
        );
    }

    #[test]
    fn request_should_encode_with_and_without_address() {
        // test_data.py, TestRequestMessage.
        assert_eq!(request(Some("45678903")), b"/?45678903!\r\n");
        assert_eq!(request(None), b"/?!\r\n");
        assert_eq!(
            decode_all(b"/?45678903!\r\n"),
            vec![Ok(Frame::Request {
                address: "45678903".into()
            })]
        );
        assert_eq!(
            decode_all(b"/?!\r\n"),
            vec![Ok(Frame::Request {
                address: String::new()
            })]
        );
    }

    #[test]
    fn option_select_should_round_trip() {
        // test_data.py, TestAckOptionSelectMessage: ACK 0 5 1 CR LF.
        assert_eq!(option_select(b'0', b'5', b'1'), b"\x06051\r\n");
        assert_eq!(
            decode_all(b"\x06050\r\n"),
            vec![Ok(Frame::OptionSelect {
                protocol: b'0',
                baud: b'5',
                mode: b'0'
            })]
        );
    }

    #[test]
    fn identification_with_enhanced_escape_should_split_it_off() {
        // pwitab/iec62056-21 test_data.py: an Elster EK280, `/Els6\2EK280`.
        let f = decode_all(b"/Els6\\2EK280\r\n");
        let want = id("Els", b'6', Some(b'2'), "EK280");
        assert_eq!(f, vec![Ok(Frame::Identification(want.clone()))]);
        assert_eq!(want.mode(), Mode::C(Some(19200)));
        // Lower-case third letter: a 20 ms meter.
        assert_eq!(want.reaction_time(), Duration::from_millis(20));
        // jonkerj/go-iec62056 pkg/samples/iskra_mt382_1000_dsmr5.go: `/ISk5\2MT382-1000`.
        let f = decode_all(b"/ISk5\\2MT382-1000\r\n");
        assert_eq!(
            f,
            vec![Ok(Frame::Identification(id(
                "ISk",
                b'5',
                Some(b'2'),
                "MT382-1000"
            )))]
        );
    }

    #[test]
    fn identification_without_enhanced_escape_should_keep_the_whole_ident() {
        // jonkerj/go-iec62056 pkg/samples/landis_gir_zcf100.go: `/XMX5LGBBFG1012530239`.
        let f = decode_all(b"/XMX5LGBBFG1012530239\r\n");
        let want = id("XMX", b'5', None, "LGBBFG1012530239");
        assert_eq!(f, vec![Ok(Frame::Identification(want.clone()))]);
        assert_eq!(want.mode(), Mode::C(Some(9600)));
        assert_eq!(want.reaction_time(), Duration::from_millis(200));
        assert_eq!(identification(&want), b"/XMX5LGBBFG1012530239\r\n");
    }

    #[test]
    fn identification_baud_character_should_tell_the_mode() {
        assert_eq!(id("ABC", b'0', None, "x").mode(), Mode::C(Some(300)));
        assert_eq!(id("ABC", b'9', None, "x").mode(), Mode::C(None));
        assert_eq!(id("ABC", b'A', None, "x").mode(), Mode::B(Some(600)));
        assert_eq!(id("ABC", b'F', None, "x").mode(), Mode::B(Some(19200)));
        assert_eq!(id("ABC", b'G', None, "x").mode(), Mode::B(None));
        assert_eq!(id("ABC", b'x', None, "x").mode(), Mode::A);
        assert_eq!(baud_code(9600), Some(b'5'));
        assert_eq!(baud_code(115_200), None);
        assert_eq!(baud_of_code(b'0'), Some(300));
        assert_eq!(baud_of_code(b'7'), None);
    }

    #[test]
    fn frames_fed_byte_by_byte_should_decode_as_when_fed_at_once() {
        let mut all = Vec::new();
        all.extend_from_slice(b"/?!\r\n");
        all.extend_from_slice(b"/LGZ5\\2ZMD3104407.B24\r\n");
        all.extend_from_slice(b"\x06050\r\n");
        all.extend(data_message(b"1.8.0(001234.567*kWh)\r\n!\r\n"));
        all.extend(break_message());
        let at_once = decode_all(&all);
        assert_eq!(at_once.len(), 5);
        assert!(at_once.iter().all(Result::is_ok), "{at_once:?}");
        assert_eq!(decode_bytewise(&all), at_once);
    }

    #[test]
    fn garbage_between_frames_should_be_skipped_and_counted() {
        let mut bytes = b"\x00\x7f\xff noise ".to_vec();
        bytes.extend_from_slice(b"/LGZ5ZMD\r\n");
        bytes.extend_from_slice(b"\r\n\x00\x00");
        bytes.extend(data_message(b"1.8.0(1*kWh)\r\n!\r\n"));
        bytes.extend_from_slice(b"trailing");
        let mut d = Decoder::default();
        let frames = d.feed(&bytes);
        assert!(matches!(
            frames.as_slice(),
            [Ok(Frame::Identification(_)), Ok(Frame::Data { .. })]
        ));
        assert_eq!(d.skipped(), 10 + 4 + 8);
        assert!(!d.in_frame());
    }

    #[test]
    fn high_bit_should_be_ignored_as_parity() {
        // A port opened 8N1 hears the parity bit as bit 7.
        let frame: Vec<u8> = data_message(b"1.8.0(1*kWh)\r\n!\r\n")
            .into_iter()
            .map(|b| b | 0x80)
            .collect();
        assert!(matches!(
            decode_all(&frame).as_slice(),
            [Ok(Frame::Data { complete: true, .. })]
        ));
    }

    #[test]
    fn frame_cut_off_by_a_new_frame_should_be_truncated_and_the_new_one_decoded() {
        let mut bytes = b"\x021.8.0(12".to_vec();
        bytes.extend(data_message(b"1.8.0(1*kWh)\r\n!\r\n"));
        assert!(matches!(
            decode_all(&bytes).as_slice(),
            [
                Err(DecodeError::Truncated {
                    frame: "data message",
                    len: 9
                }),
                Ok(Frame::Data { .. })
            ]
        ));
        // An identification interrupted by another.
        assert!(matches!(
            decode_all(b"/LGZ5ZM/LGZ5ZMD\r\n").as_slice(),
            [
                Err(DecodeError::Truncated { .. }),
                Ok(Frame::Identification(_))
            ]
        ));
    }

    #[test]
    fn partial_block_should_be_marked_incomplete() {
        let mut frame = vec![STX];
        frame.extend_from_slice(b"P.01(1)");
        frame.push(EOT);
        frame.push(bcc(&frame[1..]));
        assert_eq!(
            decode_all(&frame),
            vec![Ok(Frame::Data {
                text: "P.01(1)".into(),
                complete: false
            })]
        );
    }

    #[test]
    fn overlong_block_should_be_dropped_and_the_decoder_recover() {
        let mut d = Decoder::new(100);
        let mut bytes = vec![STX];
        bytes.extend(std::iter::repeat_n(b'1', 500));
        bytes.push(ETX);
        bytes.push(0);
        bytes.extend(data_message(b"!\r\n"));
        let frames = d.feed(&bytes);
        assert!(matches!(
            frames.as_slice(),
            [
                Err(DecodeError::TooLong {
                    frame: "data message",
                    limit: 100
                }),
                Ok(Frame::Data { .. })
            ]
        ));
        assert!(d.buffered() <= 100);
    }

    #[test]
    fn malformed_identification_should_say_why() {
        assert!(matches!(
            decode_all(b"/12345\r\n").as_slice(),
            [Err(DecodeError::Malformed {
                frame: "identification",
                ..
            })]
        ));
        assert!(matches!(
            decode_all(b"/LG\r\n").as_slice(),
            [Err(DecodeError::Malformed { .. })]
        ));
    }

    #[test]
    fn lone_ack_should_be_reported_when_the_next_byte_comes() {
        let mut d = Decoder::default();
        assert!(d.feed(&[ACK]).is_empty());
        assert_eq!(d.feed(&[NAK]), vec![Ok(Frame::Ack), Ok(Frame::Nak)]);
    }

    #[test]
    fn lone_ack_at_the_end_of_the_input_should_be_taken_on_request() {
        let mut d = Decoder::default();
        assert!(!d.take_ack());
        assert!(d.feed(&[ACK]).is_empty());
        assert!(d.in_frame());
        assert!(d.take_ack());
        assert!(!d.in_frame());
        assert!(!d.take_ack());
        // The option select is still one frame.
        assert!(matches!(
            d.feed(b"\x06051\r\n").as_slice(),
            [Ok(Frame::OptionSelect { .. })]
        ));
    }

    #[test]
    fn wire_time_should_count_ten_bits_per_character() {
        assert_eq!(wire_time(6, 300), Duration::from_millis(200));
        assert_eq!(wire_time(960, 9600), Duration::from_secs(1));
    }

    mod properties {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::super::*;
        use crate::meter::iec62056_21::dataset::{self, DataSet, DataValue};

        fn data_set() -> impl Strategy<Value = DataSet> {
            (
                proptest::option::of("[0-9CFLP]{1,2}\\.[0-9]{1,3}\\.[0-9]{1,3}(\\*[0-9]{2})?"),
                vec(
                    (
                        "-?[0-9]{1,9}(\\.[0-9]{1,4})?",
                        proptest::option::of("[a-zA-Z3]{1,5}"),
                    ),
                    1..3,
                ),
            )
                .prop_map(|(address, values)| DataSet {
                    address,
                    values: values
                        .into_iter()
                        .map(|(value, unit)| DataValue { value, unit })
                        .collect(),
                })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_should_never_panic_and_stay_bounded(
                chunks in vec(vec(any::<u8>(), 0..300), 0..40),
                max in 1usize..512,
            ) {
                let mut d = Decoder::new(max);
                let limit = max.max(MAX_LINE);
                for c in &chunks {
                    for f in d.feed(c) {
                        if let Ok(Frame::Data { text, .. }) = f {
                            let _ = dataset::parse_readout(&text);
                        }
                    }
                    prop_assert!(d.buffered() <= limit + 1);
                }
            }

            #[test]
            fn readout_should_decode_whole_however_it_is_chunked_and_whatever_noise_precedes_it(
                sets in vec(data_set(), 0..20),
                noise in vec(any::<u8>().prop_filter("not a frame start", |b| !is_start(b & 0x7F)), 0..50),
                cuts in vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let text = dataset::write_readout(&sets);
                let mut bytes = noise.clone();
                bytes.extend(data_message(text.as_bytes()));
                let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
                at.sort_unstable();
                let mut d = Decoder::default();
                let mut frames = Vec::new();
                let mut from = 0;
                for to in at.into_iter().chain([bytes.len()]) {
                    frames.extend(d.feed(&bytes[from..to]));
                    from = to;
                }
                prop_assert_eq!(d.skipped(), noise.len());
                match frames.as_slice() {
                    [Ok(Frame::Data { text: got, complete: true })] => {
                        prop_assert_eq!(&dataset::parse_readout(got).unwrap(), &sets);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }

            #[test]
            fn any_flipped_bit_in_a_readout_should_not_pass_as_the_same_readout(
                sets in vec(data_set(), 1..10),
                pick in any::<prop::sample::Index>(),
                bit in 0u8..7,
            ) {
                let text = dataset::write_readout(&sets);
                let mut bytes = data_message(text.as_bytes());
                let i = pick.index(bytes.len());
                bytes[i] ^= 1 << bit;
                let frames = Decoder::default().feed(&bytes);
                let same = frames.iter().any(|f| matches!(f, Ok(Frame::Data { text: t, complete: true }) if dataset::parse_readout(t).as_ref() == Ok(&sets)));
                prop_assert!(!same, "{:?}", frames);
            }
        }
    }
}
