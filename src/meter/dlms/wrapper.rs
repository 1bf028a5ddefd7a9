//! The IEC 62056-47 TCP wrapper: an 8-byte header before each APDU, sans-IO.
//!
//! ```text
//! version 0x0001 (2) | source wPort (2) | destination wPort (2) | length (2) | APDU
//! ```
//!
//! The wPorts are the client's and the server's SAPs (the public client is 16, a management
//! logical device 1). TCP carries a stream, so the [`Splitter`] reassembles APDUs from partial
//! reads and resynchronises past bytes that cannot start a header.

pub const VERSION: u16 = 0x0001;
pub const HEADER_LEN: usize = 8;

/// One wrapped APDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrapped {
    pub source: u16,
    pub destination: u16,
    pub apdu: Vec<u8>,
}

pub fn encode(source: u16, destination: u16, apdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + apdu.len());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&source.to_be_bytes());
    out.extend_from_slice(&destination.to_be_bytes());
    out.extend_from_slice(&(apdu.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(apdu);
    out
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WrapperError {
    #[error("wrapper version {0:#06x}, expected 0x0001")]
    Version(u16),
    #[error("APDU of {len} bytes is longer than the {limit} accepted")]
    TooLong { len: usize, limit: usize },
}

/// Reassembles wrapped APDUs from a byte stream.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    max_apdu: usize,
    skipped: usize,
}

impl Splitter {
    /// `max_apdu`: the longest APDU accepted (the negotiated max PDU size plus ciphering).
    pub fn new(max_apdu: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            max_apdu,
            skipped: 0,
        }
    }

    pub fn skipped(&self) -> usize {
        self.skipped
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next APDU, a header that cannot be right (the splitter then skips a byte and looks
    /// for the next header), or `None` until more bytes arrive.
    pub fn next_apdu(&mut self) -> Option<Result<Wrapped, WrapperError>> {
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let version = u16::from_be_bytes([self.buf[0], self.buf[1]]);
        if version != VERSION {
            // Skip to the next byte that may start a version field.
            let next = self.buf[1..]
                .windows(2)
                .position(|w| w == [0x00, 0x01])
                .map(|p| p + 1)
                .unwrap_or(self.buf.len() - 1);
            self.skipped += next;
            self.buf.drain(..next);
            return Some(Err(WrapperError::Version(version)));
        }
        let len = usize::from(u16::from_be_bytes([self.buf[6], self.buf[7]]));
        if len > self.max_apdu {
            self.skipped += 1;
            self.buf.drain(..1);
            return Some(Err(WrapperError::TooLong {
                len,
                limit: self.max_apdu,
            }));
        }
        if self.buf.len() < HEADER_LEN + len {
            return None;
        }
        let w = Wrapped {
            source: u16::from_be_bytes([self.buf[2], self.buf[3]]),
            destination: u16::from_be_bytes([self.buf[4], self.buf[5]]),
            apdu: self.buf[HEADER_LEN..HEADER_LEN + len].to_vec(),
        };
        self.buf.drain(..HEADER_LEN + len);
        Some(Ok(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_should_carry_version_ports_and_length() {
        assert_eq!(
            encode(16, 1, &[0xC0, 0x01]),
            [0, 1, 0, 16, 0, 1, 0, 2, 0xC0, 0x01]
        );
    }

    #[test]
    fn partial_input_should_wait_then_yield() {
        let b = encode(1, 16, &[1, 2, 3, 4, 5]);
        let mut s = Splitter::new(1024);
        for (i, byte) in b.iter().enumerate() {
            s.push(&[*byte]);
            let got = s.next_apdu();
            if i + 1 < b.len() {
                assert_eq!(got, None);
            } else {
                assert_eq!(got.unwrap().unwrap().apdu, [1, 2, 3, 4, 5]);
            }
        }
    }

    #[test]
    fn garbage_before_a_header_should_be_skipped() {
        let mut s = Splitter::new(1024);
        s.push(&[0xFF, 0x13, 0x37]);
        s.push(&encode(1, 16, &[9]));
        let mut apdus = vec![];
        while let Some(r) = s.next_apdu() {
            if let Ok(w) = r {
                apdus.push(w);
            }
        }
        assert_eq!(
            apdus,
            [Wrapped {
                source: 1,
                destination: 16,
                apdu: vec![9]
            }]
        );
    }

    proptest! {
        #[test]
        fn wrapped_apdus_should_round_trip_in_any_chunks(apdus in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..5), chunk in 1usize..20) {
            let mut stream = Vec::new();
            for a in &apdus { stream.extend(encode(1, 16, a)); }
            let mut s = Splitter::new(1024);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                s.push(c);
                while let Some(r) = s.next_apdu() { got.push(r.unwrap().apdu); }
            }
            prop_assert_eq!(got, apdus);
        }

        #[test]
        fn garbage_should_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut s = Splitter::new(64);
            s.push(&b);
            let mut n = 0;
            while s.next_apdu().is_some() { n += 1; prop_assert!(n < 1000); }
        }
    }
}
