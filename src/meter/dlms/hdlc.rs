//! HDLC frames of IEC 62056-46 (frame format type 3), sans-IO.
//!
//! ```text
//! 7E | format (2) | destination (1-4) | source (1-4) | control | [HCS (2) | information] | FCS (2) | 7E
//! ```
//!
//! * **Format**: `1010 S LLL LLLL LLLL`: type 3, the segmentation bit S, and the frame's length
//!   in bytes from the format field to the FCS, flags excluded.
//! * **No byte stuffing.** 0x7E occurs inside frames (ciphered ones almost always), so the
//!   [`Splitter`] finds a frame's end from the format field's length and checks that a flag
//!   follows; it never scans for the closing flag. Two frames may share one flag.
//! * **Addresses** are extended: 7 bits a byte shifted left, bit 0 set on the last byte. The
//!   client's is one byte (its SAP); the server's is the upper (logical device) address
//!   alone (one byte), upper and lower (physical) address one byte each, or two bytes each.
//! * **HCS and FCS** are CRC-16/X.25 over the header and the whole frame, sent low byte first.
//!   The HCS is present only when the frame carries information.

use super::axdr::Reader;

pub const FLAG: u8 = 0x7E;
/// The longest frame a length field can describe (11 bits).
pub const MAX_FRAME_LEN: usize = 0x7FF;

/// CRC-16/X.25 (reflected 0x1021, init and final XOR 0xFFFF) as HDLC transmits it.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An HDLC address: a client SAP, or a server's logical and physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    pub upper: u16,
    pub lower: Option<u16>,
}

impl Address {
    pub fn client(sap: u8) -> Self {
        Address {
            upper: u16::from(sap),
            lower: None,
        }
    }

    pub fn server(logical: u16, physical: Option<u16>) -> Self {
        Address {
            upper: logical,
            lower: physical,
        }
    }

    /// Whether the address fits HDLC's forms: 7 bits each in one-byte parts, 14 in two-byte.
    pub fn is_valid(&self) -> bool {
        self.upper <= 0x3FFF && self.lower.is_none_or(|l| l <= 0x3FFF)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let one = self.upper < 0x80 && self.lower.is_none_or(|l| l < 0x80);
        match self.lower {
            None if self.upper < 0x80 => out.push(((self.upper as u8) << 1) | 1),
            None => {
                // Only a four-byte form carries a two-byte upper address; the lower part is
                // then the "all stations" 0x3FFF.
                push14(out, self.upper, false);
                push14(out, 0x3FFF, true);
            }
            Some(l) if one => {
                out.push((self.upper as u8) << 1);
                out.push(((l as u8) << 1) | 1);
            }
            Some(l) => {
                push14(out, self.upper, false);
                push14(out, l, true);
            }
        }
    }

    /// Reads an address from the front of `r`: bytes up to the one with bit 0 set.
    fn decode(r: &mut Reader<'_>) -> Result<Address, FrameError> {
        let mut parts = [0u16; 4];
        let mut n = 0;
        loop {
            let b = r
                .u8()
                .map_err(|_| FrameError::Malformed("address cut off"))?;
            if n == 4 {
                return Err(FrameError::Malformed("address longer than 4 bytes"));
            }
            parts[n] = u16::from(b >> 1);
            n += 1;
            if b & 1 == 1 {
                break;
            }
        }
        Ok(match n {
            1 => Address::server(parts[0], None),
            2 => Address::server(parts[0], Some(parts[1])),
            4 => Address::server((parts[0] << 7) | parts[1], Some((parts[2] << 7) | parts[3])),
            _ => return Err(FrameError::Malformed("3-byte address")),
        })
    }
}

fn push14(out: &mut Vec<u8>, v: u16, last: bool) {
    out.push((((v >> 7) as u8) & 0x7F) << 1);
    out.push((((v as u8) & 0x7F) << 1) | u8::from(last));
}

/// The control field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Information: send and receive sequence numbers (mod 8), poll/final.
    I {
        ns: u8,
        nr: u8,
        pf: bool,
    },
    /// Receive ready.
    Rr {
        nr: u8,
        pf: bool,
    },
    /// Receive not ready.
    Rnr {
        nr: u8,
        pf: bool,
    },
    Snrm,
    Disc,
    Ua,
    Dm,
    Frmr,
    Ui {
        pf: bool,
    },
}

impl Control {
    pub fn encode(self) -> u8 {
        let pf = |p: bool| if p { 0x10 } else { 0 };
        match self {
            Control::I { ns, nr, pf: p } => ((nr & 7) << 5) | pf(p) | ((ns & 7) << 1),
            Control::Rr { nr, pf: p } => ((nr & 7) << 5) | pf(p) | 0x01,
            Control::Rnr { nr, pf: p } => ((nr & 7) << 5) | pf(p) | 0x05,
            // Commands are sent with the poll bit, as the standard's examples have them.
            Control::Snrm => 0x93,
            Control::Disc => 0x53,
            Control::Ua => 0x73,
            Control::Dm => 0x1F,
            Control::Frmr => 0x97,
            Control::Ui { pf: p } => 0x03 | pf(p),
        }
    }

    pub fn decode(b: u8) -> Option<Control> {
        let pf = b & 0x10 != 0;
        let nr = b >> 5;
        if b & 1 == 0 {
            return Some(Control::I {
                ns: (b >> 1) & 7,
                nr,
                pf,
            });
        }
        match b & 0x0F {
            0x01 => return Some(Control::Rr { nr, pf }),
            0x05 => return Some(Control::Rnr { nr, pf }),
            _ => {}
        }
        Some(match b & !0x10 {
            0x83 => Control::Snrm,
            0x43 => Control::Disc,
            0x63 => Control::Ua,
            0x0F => Control::Dm,
            0x87 => Control::Frmr,
            0x03 => Control::Ui { pf },
            _ => return None,
        })
    }
}

/// A decoded frame. `info` is the information field as sent (the LLC header included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub destination: Address,
    pub source: Address,
    pub control: Control,
    /// The S bit: more segments of this information follow.
    pub segmented: bool,
    pub info: Vec<u8>,
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&[0, 0]);
        self.destination.encode(&mut header);
        self.source.encode(&mut header);
        header.push(self.control.encode());
        let len = if self.info.is_empty() {
            header.len() + 2
        } else {
            header.len() + 2 + self.info.len() + 2
        };
        let format = 0xA000 | if self.segmented { 0x0800 } else { 0 } | (len as u16 & 0x7FF);
        header[0..2].copy_from_slice(&format.to_be_bytes());
        let mut out = Vec::with_capacity(len + 2);
        out.push(FLAG);
        out.extend_from_slice(&header);
        if !self.info.is_empty() {
            let hcs = crc16(&header);
            out.extend_from_slice(&hcs.to_le_bytes());
            out.extend_from_slice(&self.info);
        }
        let fcs = crc16(&out[1..]);
        out.extend_from_slice(&fcs.to_le_bytes());
        out.push(FLAG);
        out
    }

    /// Decodes the bytes between the flags (format field to FCS).
    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        if body.len() < 7 {
            return Err(FrameError::Malformed("shorter than a frame"));
        }
        let format = u16::from_be_bytes([body[0], body[1]]);
        if format & 0xF000 != 0xA000 {
            return Err(FrameError::Malformed("not frame format type 3"));
        }
        if usize::from(format & 0x7FF) != body.len() {
            return Err(FrameError::Malformed("length field disagrees"));
        }
        let (content, fcs) = body.split_at(body.len() - 2);
        let got = u16::from_le_bytes([fcs[0], fcs[1]]);
        let expected = crc16(content);
        if got != expected {
            return Err(FrameError::Fcs { expected, got });
        }
        let mut r = Reader::new(content);
        r.take(2).map_err(|_| FrameError::Malformed("cut off"))?;
        let destination = Address::decode(&mut r)?;
        let source = Address::decode(&mut r)?;
        let c = r
            .u8()
            .map_err(|_| FrameError::Malformed("no control field"))?;
        let control = Control::decode(c).ok_or(FrameError::UnknownControl(c))?;
        let header_end = r.pos();
        let info = if r.is_empty() {
            Vec::new()
        } else {
            if r.remaining() < 2 {
                return Err(FrameError::Malformed("HCS cut off"));
            }
            let hcs = u16::from_le_bytes(r.array().map_err(|_| FrameError::Malformed("HCS"))?);
            let expected = crc16(&content[..header_end]);
            if hcs != expected {
                return Err(FrameError::Hcs { expected, got: hcs });
            }
            r.rest().to_vec()
        };
        Ok(Frame {
            destination,
            source,
            control,
            segmented: format & 0x0800 != 0,
            info,
        })
    }
}

/// Why a frame was rejected. The splitter has already moved past it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header check sequence {got:#06x}, expected {expected:#06x}")]
    Hcs { expected: u16, got: u16 },
    #[error("frame check sequence {got:#06x}, expected {expected:#06x}")]
    Fcs { expected: u16, got: u16 },
    #[error("no closing flag where the frame's length says it ends")]
    NoClosingFlag,
    #[error("unknown control field {0:#04x}")]
    UnknownControl(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// The next I-frame of an information field sent in segments, as `(control, segmented,
/// info)`: the first segment of `outgoing`, segmented when more follow, numbered N(S) = `vs`,
/// N(R) = `vr`, poll/final set; `vs` moves on (mod 8). Both ends of a link send this way
/// (the client here, the simulated meter in `src/sim/dlms/`).
pub fn next_segment(
    outgoing: &mut std::collections::VecDeque<Vec<u8>>,
    vs: &mut u8,
    vr: u8,
) -> (Control, bool, Vec<u8>) {
    let info = outgoing.pop_front().unwrap_or_default();
    let control = Control::I {
        ns: *vs,
        nr: vr,
        pf: true,
    };
    *vs = (*vs + 1) & 7;
    (control, !outgoing.is_empty(), info)
}

/// Splits a byte stream into frames by their length field.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    skipped: usize,
}

impl Splitter {
    pub fn new() -> Self {
        Splitter::default()
    }

    /// Bytes dropped outside frames so far (noise, echoes of a broken frame).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Bytes held for a frame in progress.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame or rejected frame; `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            let Some(start) = self.buf.iter().position(|b| *b == FLAG) else {
                self.skipped += self.buf.len();
                self.buf.clear();
                return None;
            };
            if start > 0 {
                self.skipped += start;
                self.buf.drain(..start);
            }
            if self.buf.len() < 3 {
                return None;
            }
            if self.buf[1] & 0xF0 != 0xA0 {
                // A flag that opens no frame: a closing flag, or a flag doubled between frames.
                self.buf.drain(..1);
                continue;
            }
            let len = usize::from(u16::from_be_bytes([self.buf[1], self.buf[2]]) & 0x7FF);
            if len < 7 {
                self.skipped += 1;
                self.buf.drain(..1);
                return Some(Err(FrameError::Malformed("length below the minimum")));
            }
            if self.buf.len() < len + 2 {
                return None;
            }
            if self.buf[len + 1] != FLAG {
                // Not a frame after all (or one cut short): resynchronise on the next flag.
                self.skipped += 1;
                self.buf.drain(..1);
                return Some(Err(FrameError::NoClosingFlag));
            }
            let result = Frame::decode(&self.buf[1..=len]);
            if result.is_err() {
                // Move past the opening flag only: the "frame" may have been noise whose body
                // hides the real frame's start.
                self.skipped += 1;
                self.buf.drain(..1);
            } else {
                // Keep the closing flag: it may open the next frame.
                self.buf.drain(..=len);
            }
            return Some(result);
        }
    }
}

/// The HDLC parameters negotiated by SNRM/UA (IEC 62056-46, 6.4.4.4.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parameters {
    pub max_info_tx: u16,
    pub max_info_rx: u16,
    pub window_tx: u32,
    pub window_rx: u32,
}

impl Default for Parameters {
    /// The defaults the standard assumes when a parameter is not sent.
    fn default() -> Self {
        Parameters {
            max_info_tx: 128,
            max_info_rx: 128,
            window_tx: 1,
            window_rx: 1,
        }
    }
}

impl Parameters {
    /// The information field of a SNRM or UA: format 0x81, group 0x80, then the parameters.
    pub fn encode(&self) -> Vec<u8> {
        let mut group = Vec::new();
        let mut put = |id: u8, v: u32, width: usize| {
            group.push(id);
            group.push(width as u8);
            group.extend_from_slice(&v.to_be_bytes()[4 - width..]);
        };
        let w = |v: u16| if v > 0xFF { 2 } else { 1 };
        put(0x05, u32::from(self.max_info_tx), w(self.max_info_tx));
        put(0x06, u32::from(self.max_info_rx), w(self.max_info_rx));
        put(0x07, self.window_tx, 4);
        put(0x08, self.window_rx, 4);
        let mut out = vec![0x81, 0x80, group.len() as u8];
        out.extend_from_slice(&group);
        out
    }

    /// Parses a UA's (or SNRM's) information field; missing parameters keep their defaults,
    /// unknown ones are skipped.
    pub fn decode(info: &[u8]) -> Result<Parameters, FrameError> {
        let mut p = Parameters::default();
        if info.is_empty() {
            return Ok(p);
        }
        let bad = |_| FrameError::Malformed("negotiation parameters cut off");
        let mut r = Reader::new(info);
        if r.u8().map_err(bad)? != 0x81 || r.u8().map_err(bad)? != 0x80 {
            return Err(FrameError::Malformed("negotiation format or group id"));
        }
        let len = usize::from(r.u8().map_err(bad)?);
        let mut g = Reader::new(r.take(len).map_err(bad)?);
        while !g.is_empty() {
            let id = g.u8().map_err(bad)?;
            let n = usize::from(g.u8().map_err(bad)?);
            let v = g.take(n).map_err(bad)?;
            if n > 4 {
                return Err(FrameError::Malformed(
                    "negotiation parameter wider than 4 bytes",
                ));
            }
            let value = v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b));
            match id {
                0x05 => p.max_info_tx = value.min(u32::from(u16::MAX)) as u16,
                0x06 => p.max_info_rx = value.min(u32::from(u16::MAX)) as u16,
                0x07 => p.window_tx = value,
                0x08 => p.window_rx = value,
                _ => {}
            }
        }
        Ok(p)
    }
}

/// The LLC header before the APDU in the first segment: client to server.
pub const LLC_REQUEST: [u8; 3] = [0xE6, 0xE6, 0x00];
/// Server to client.
pub const LLC_RESPONSE: [u8; 3] = [0xE6, 0xE7, 0x00];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn crc_should_match_the_published_hcs() {
        // dlms-cosem (pwitab) tests: HCS of 03 3F is 5B EC on the wire.
        assert_eq!(crc16(&[0x03, 0x3F]).to_le_bytes(), [0x5B, 0xEC]);
    }

    #[test]
    fn snrm_should_match_published_bytes() {
        // Public client 16 to server logical 1, physical 17 (dlms-cosem tests).
        let f = Frame {
            destination: Address::server(1, Some(17)),
            source: Address::client(16),
            control: Control::Snrm,
            segmented: false,
            info: vec![],
        };
        assert_eq!(f.encode(), hex("7ea00802232193bd647e"));
    }

    #[test]
    fn ua_with_parameters_should_decode_and_re_encode() {
        let b = hex("7EA01F21022373E6C781801205019A06019A070400000001080400000001CCA27E");
        let mut s = Splitter::new();
        s.push(&b);
        let f = s.next_frame().unwrap().unwrap();
        assert_eq!(f.control, Control::Ua);
        assert_eq!(f.destination, Address::client(16));
        assert_eq!(f.source, Address::server(1, Some(17)));
        let p = Parameters::decode(&f.info).unwrap();
        assert_eq!(
            p,
            Parameters {
                max_info_tx: 0x9A,
                max_info_rx: 0x9A,
                window_tx: 1,
                window_rx: 1
            }
        );
        assert_eq!(f.encode(), b);
    }

    #[test]
    fn information_frame_should_match_published_bytes() {
        let total = hex(
            "7EA02C02232110AF9FE6E600601DA109060760857405080101BE10040E01000000065F1F0400001E1DFFFFC5E47E",
        );
        let f = Frame {
            destination: Address::server(1, Some(17)),
            source: Address::client(16),
            control: Control::I {
                ns: 0,
                nr: 0,
                pf: true,
            },
            segmented: false,
            info: total[9..total.len() - 3].to_vec(),
        };
        assert_eq!(f.encode(), total);
        let back = hex(
            "7EA0382102233034E7E6E7006129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F0400001E1D04C80007B86A7E",
        );
        let mut s = Splitter::new();
        s.push(&back);
        let f = s.next_frame().unwrap().unwrap();
        assert_eq!(
            f.control,
            Control::I {
                ns: 0,
                nr: 1,
                pf: true
            }
        );
        assert_eq!(&f.info[..3], &LLC_RESPONSE);
    }

    #[test]
    fn addresses_should_encode_in_each_form() {
        let enc = |a: Address| {
            let mut v = Vec::new();
            a.encode(&mut v);
            v
        };
        assert_eq!(enc(Address::client(1)), [0x03]);
        assert_eq!(enc(Address::client(16)), [0x21]);
        assert_eq!(enc(Address::server(1, Some(17))), [0x02, 0x23]);
        assert_eq!(enc(Address::server(1, None)), [0x03]);
        let four = enc(Address::server(1, Some(0x1234)));
        assert_eq!(four.len(), 4);
        let mut r = Reader::new(&four);
        assert_eq!(
            Address::decode(&mut r).unwrap(),
            Address::server(1, Some(0x1234))
        );
    }

    #[test]
    fn flag_bytes_inside_a_frame_should_not_end_it() {
        let f = Frame {
            destination: Address::client(16),
            source: Address::server(1, Some(17)),
            control: Control::I {
                ns: 3,
                nr: 4,
                pf: true,
            },
            segmented: true,
            info: vec![0x7E; 40],
        };
        let b = f.encode();
        let mut s = Splitter::new();
        for chunk in b.chunks(3) {
            s.push(chunk);
        }
        assert_eq!(s.next_frame(), Some(Ok(f)));
        assert_eq!(s.next_frame(), None);
    }

    #[test]
    fn bad_checksums_should_be_typed_and_the_next_frame_found() {
        let good = Frame {
            destination: Address::client(16),
            source: Address::server(1, None),
            control: Control::Rr { nr: 1, pf: true },
            segmented: false,
            info: vec![],
        }
        .encode();
        let mut info_frame = Frame {
            destination: Address::client(16),
            source: Address::server(1, None),
            control: Control::I {
                ns: 0,
                nr: 0,
                pf: true,
            },
            segmented: false,
            info: vec![1, 2, 3],
        }
        .encode();
        let mut bad_hcs = info_frame.clone();
        bad_hcs[6] ^= 0xFF;
        info_frame[9] ^= 0x01;
        let mut s = Splitter::new();
        s.push(b"noise");
        s.push(&bad_hcs);
        s.push(&info_frame);
        s.push(&good);
        assert!(matches!(s.next_frame(), Some(Err(FrameError::Fcs { .. }))));
        // The rest of the broken frames resynchronise to errors or skipped bytes, then the
        // good frame arrives.
        let mut got = None;
        while let Some(r) = s.next_frame() {
            if let Ok(f) = r {
                got = Some(f);
            }
        }
        assert_eq!(got.unwrap().control, Control::Rr { nr: 1, pf: true });
    }

    #[test]
    fn hcs_error_should_be_reported_as_such() {
        let mut b = Frame {
            destination: Address::client(16),
            source: Address::server(1, None),
            control: Control::I {
                ns: 0,
                nr: 0,
                pf: true,
            },
            segmented: false,
            info: vec![1, 2, 3],
        }
        .encode();
        // Corrupt the HCS and fix the FCS, as a sender with a broken HCS would.
        b[6] ^= 0xFF;
        let n = b.len();
        let fcs = crc16(&b[1..n - 3]);
        b[n - 3..n - 1].copy_from_slice(&fcs.to_le_bytes());
        assert!(matches!(
            Frame::decode(&b[1..n - 1]),
            Err(FrameError::Hcs { .. })
        ));
    }

    proptest! {
        #[test]
        fn frames_should_round_trip(info in proptest::collection::vec(any::<u8>(), 0..300),
                                    ns in 0u8..8, nr in 0u8..8, seg: bool, phys in proptest::option::of(0u16..0x3FFF)) {
            let f = Frame {
                destination: Address::client(0x10),
                source: Address::server(1, phys),
                control: Control::I { ns, nr, pf: true },
                segmented: seg,
                info,
            };
            let mut s = Splitter::new();
            s.push(&f.encode());
            prop_assert_eq!(s.next_frame(), Some(Ok(f)));
        }

        #[test]
        fn garbage_should_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut s = Splitter::new();
            s.push(&b);
            let mut n = 0;
            while s.next_frame().is_some() { n += 1; prop_assert!(n < 1000); }
        }

        #[test]
        fn bit_flips_should_be_rejected_or_skipped(info in proptest::collection::vec(any::<u8>(), 1..100),
                                                   i in any::<usize>(), bit in 0u8..8) {
            let f = Frame {
                destination: Address::client(0x10),
                source: Address::server(1, Some(17)),
                control: Control::I { ns: 1, nr: 2, pf: true },
                segmented: false,
                info,
            };
            let mut b = f.encode();
            let n = b.len();
            b[i % n] ^= 1 << bit;
            let mut s = Splitter::new();
            s.push(&b);
            while let Some(r) = s.next_frame() {
                // A single bit flip is always caught by the CRCs.
                if let Ok(g) = r { prop_assert_ne!(g, f.clone()); }
            }
        }
    }
}
