//! The thin I/O layer: runs a [`Read`] or a [`Scan`] over any byte stream
//! (`AsyncRead + AsyncWrite`: a serial port behind an M-Bus level converter, a pty, a TCP
//! socket to a serial server) with real time. The state machines decide everything; this
//! only writes, waits and reads.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::master::{Expect, Read, ReadError, ReadOut, Step};
use super::scan::{Scan, ScanReport, ScanStep};

/// Reads one meter. The outer error is the stream failing (the port is gone); the inner
/// one is the meter's.
pub async fn read<S>(io: &mut S, mut read: Read) -> io::Result<Result<ReadOut, ReadError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut step = read.start();
    loop {
        match step {
            Step::Done(result) => return Ok(result),
            Step::Send {
                bytes,
                pause,
                expect,
            } => {
                step = match exchange(io, &bytes, pause, expect, |b| read.received(b)).await? {
                    Some(next) => next,
                    None => read.silence(),
                };
            }
        }
    }
}

/// Scans a segment.
pub async fn scan<S>(io: &mut S, mut scan: Scan) -> io::Result<ScanReport>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut step = scan.start();
    loop {
        match step {
            ScanStep::Done(report) => return Ok(report),
            ScanStep::Send {
                bytes,
                pause,
                expect,
            } => {
                step = match exchange(io, &bytes, pause, expect, |b| scan.received(b)).await? {
                    Some(next) => next,
                    None => scan.silence(),
                };
            }
        }
    }
}

/// Pauses, writes `bytes`, and feeds what arrives to `on_bytes` until it returns a step
/// (`Some`) or the line stays quiet: no first byte within the window, or no next byte within
/// the gap (`None`).
async fn exchange<S, T>(
    io: &mut S,
    bytes: &[u8],
    pause: std::time::Duration,
    expect: Expect,
    mut on_bytes: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Option<T>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    tracing::trace!(bytes = %hex::encode(bytes), "M-Bus send");
    io.write_all(bytes).await?;
    io.flush().await?;
    let mut deadline = Instant::now() + expect.window;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_elapsed) => return Ok(None),
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the M-Bus line closed",
                ));
            }
            Ok(Ok(n)) => {
                tracing::trace!(bytes = %hex::encode(&buf[..n]), "M-Bus received");
                if let Some(step) = on_bytes(&buf[..n]) {
                    return Ok(Some(step));
                }
                deadline = Instant::now() + expect.gap;
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::meter::mbus::master::{ReadConfig, Stage};
    use crate::meter::mbus::scan::{Mode, ScanConfig};
    use crate::meter::mbus::{SecondaryMask, Timing};
    use crate::sim::mbus::{REACTION, Segment, serve};

    fn segment() -> (tokio::io::DuplexStream, Arc<Mutex<Segment>>) {
        let (ours, theirs) = tokio::io::duplex(4096);
        let seg = Arc::new(Mutex::new(Segment::demo()));
        tokio::spawn(serve(theirs, seg.clone(), REACTION));
        (ours, seg)
    }

    #[tokio::test(start_paused = true)]
    async fn read_over_a_stream_should_get_every_telegram() {
        let (mut io, _seg) = segment();
        let out = read(&mut io, Read::new(ReadConfig::primary(3, 2400)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.frames.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_should_time_out_after_each_answer_window() {
        let (mut io, _seg) = segment();
        let config = ReadConfig::primary(42, 2400);
        let start = Instant::now();
        let r = read(&mut io, Read::new(config)).await.unwrap();
        assert_eq!(
            r,
            Err(ReadError::NoAnswer {
                stage: Stage::Reset,
                tries: 3
            })
        );
        // Three windows (5 bytes on the wire + 330 bit times + 50 ms) and two idle pauses.
        let t = Timing::new(2400);
        let window = crate::meter::mbus::link::wire_time(5, 2400) + t.answer_window();
        let expected = window * 3 + t.idle() * 2;
        let took = start.elapsed();
        assert!(
            took >= expected && took < expected + std::time::Duration::from_millis(5),
            "{took:?} vs {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scan_over_a_stream_should_find_the_segment() {
        let (mut io, _seg) = segment();
        let report = scan(
            &mut io,
            Scan::new(ScanConfig {
                mode: Mode::Secondary {
                    start: SecondaryMask::ANY,
                },
                timing: Timing::new(2400),
                retries: 0,
            }),
        )
        .await
        .unwrap();
        assert_eq!(report.meters.len(), 3);
    }
}
