//! A tap on the wire: counts the bytes a transport carries and keeps what the meter sent in
//! answer to the last request, so a failure can be told apart after the fact (silence,
//! garbage, a bad CRC, another unit answering).
//!
//! tokio-modbus' RTU decoder resynchronises on a bad CRC by dropping bytes and waiting, so a
//! corrupted answer surfaces as a timeout; [`diagnose_rtu`] looks at the bytes to say which.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Counters and the bytes received since the last request.
#[derive(Debug, Default, Clone)]
pub struct WireStats {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub requests: u64,
    /// Received since the last write (the answer in progress).
    pub last_answer: Vec<u8>,
    /// When the last byte came in: the end of the last answer, once a request is due.
    pub last_in: Option<Instant>,
    /// Pauses before the next request (see [`crate::meter::Timing`]): `first` is the first of
    /// a read, counted from the end of the last answer, the others at least `between`.
    pub pace: Pace,
}

/// The pauses the tap keeps before requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pace {
    pub turnaround: Duration,
    pub inter_request: Duration,
    /// The next request is the first of a read.
    pub first: bool,
}

impl WireStats {
    /// Until when the next request must wait, if at all.
    fn next_request_at(&self) -> Option<Instant> {
        let gap = if self.pace.first {
            self.pace.turnaround
        } else {
            self.pace.turnaround.max(self.pace.inter_request)
        };
        let at = self.last_in? + gap;
        (gap > Duration::ZERO && at > Instant::now()).then_some(at)
    }
}

pub type SharedWire = Arc<Mutex<WireStats>>;

/// Wraps a transport and records its traffic in a [`SharedWire`].
#[derive(Debug)]
pub struct Tap<T> {
    inner: T,
    wire: SharedWire,
    writing: bool,
}

impl<T> Tap<T> {
    pub fn new(inner: T, wire: SharedWire) -> Self {
        Tap {
            inner,
            wire,
            writing: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// Waits out the pause the timing knobs ask for before the next request on this tap (see
/// [`crate::meter::Timing`]). Called before a request's timeout starts, so a pause never
/// counts against the meter.
pub async fn pace(wire: &SharedWire) {
    let at = lock(wire).next_request_at();
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn lock(w: &SharedWire) -> std::sync::MutexGuard<'_, WireStats> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.writing = false;
                let mut w = lock(&self.wire);
                w.bytes_in += new.len() as u64;
                w.last_in = Some(Instant::now());
                // Bounded: an answer is at most 256 bytes; keep a little more for diagnosis.
                if w.last_answer.len() < 1024 {
                    w.last_answer.extend_from_slice(new);
                }
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let starting = !self.writing;
            self.writing = true;
            let mut w = lock(&self.wire);
            w.pace.first = false;
            w.bytes_out += *n as u64;
            if starting {
                w.requests += 1;
                w.last_answer.clear();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the bytes received after an RTU request say about a failed exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtuDiagnosis {
    /// Nothing came back.
    Silence,
    /// A frame of the expected shape whose CRC does not match.
    BadCrc { expected: u16, got: u16 },
    /// A well-formed frame from another unit.
    OtherUnit(u8),
    /// Bytes that are not a frame.
    Garbage(usize),
}

/// CRC-16/MODBUS.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Classifies the `answer` to a read request (`unit`, `function`) that failed.
pub fn diagnose_rtu(unit: u8, function: u8, answer: &[u8]) -> RtuDiagnosis {
    if answer.is_empty() {
        return RtuDiagnosis::Silence;
    }
    // Expected shapes: unit fn n data[n] crc(2), or unit fn|0x80 code crc(2).
    let len = match answer.get(1) {
        Some(f) if *f == function => answer.get(2).map(|n| 3 + usize::from(*n) + 2),
        Some(f) if *f == function | 0x80 => Some(5),
        _ => None,
    };
    match len {
        Some(len) if answer.len() >= len => {
            let got = u16::from_le_bytes([answer[len - 2], answer[len - 1]]);
            let expected = crc16(&answer[..len - 2]);
            if got != expected {
                RtuDiagnosis::BadCrc { expected, got }
            } else if answer[0] != unit {
                RtuDiagnosis::OtherUnit(answer[0])
            } else {
                RtuDiagnosis::Garbage(answer.len())
            }
        }
        _ => RtuDiagnosis::Garbage(answer.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v.extend_from_slice(&crc16(bytes).to_le_bytes());
        v
    }

    #[test]
    fn crc16_should_match_the_reference_vector() {
        // Read 2 holding registers at 0 from unit 1: "01 03 00 00 00 02 C4 0B".
        assert_eq!(
            crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]).to_le_bytes(),
            [0xC4, 0x0B]
        );
    }

    #[test]
    fn answers_should_be_classified() {
        assert_eq!(diagnose_rtu(1, 4, &[]), RtuDiagnosis::Silence);
        let good = frame(&[1, 4, 2, 0x12, 0x34]);
        let mut bad = good.clone();
        bad[4] ^= 0xff;
        assert!(matches!(
            diagnose_rtu(1, 4, &bad),
            RtuDiagnosis::BadCrc { .. }
        ));
        assert_eq!(diagnose_rtu(2, 4, &good), RtuDiagnosis::OtherUnit(1));
        assert_eq!(
            diagnose_rtu(1, 4, b"hello world"),
            RtuDiagnosis::Garbage(11)
        );
        assert!(matches!(
            diagnose_rtu(1, 4, &[1, 4, 200, 1, 2]),
            RtuDiagnosis::Garbage(5)
        ));
    }
}
