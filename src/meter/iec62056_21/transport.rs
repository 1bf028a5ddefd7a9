//! The thin I/O layer: runs a [`Session`] on a [`Line`] — a serial port, or an in-memory fake
//! in tests — with real time.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::{ClearBuffer, SerialPort, SerialStream};

use super::session::{Action, Limits, Readout, Session, SessionError, Silence};

/// A serial line in 7E1 framing whose rate can change while it is open.
pub trait Line: Send {
    /// Sets the UART's rate; the framing stays as opened.
    fn set_baud(&mut self, baud: u32) -> io::Result<()>;
    /// Drops everything received and not yet read.
    fn discard_input(&mut self) -> io::Result<()>;
    /// Writes `bytes` and returns once they have left the UART, not merely the process: the
    /// baud switch depends on it.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what has arrived, waiting for at least one byte. Cancel-safe.
    fn recv(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

impl Line for SerialStream {
    fn set_baud(&mut self, baud: u32) -> io::Result<()> {
        self.set_baud_rate(baud).map_err(io::Error::from)
    }

    fn discard_input(&mut self) -> io::Result<()> {
        self.clear(ClearBuffer::Input).map_err(io::Error::from)
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        drain(self).await
    }

    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
}

/// Waits until the UART has sent everything written (`tcdrain`). `tcdrain` blocks — 200 ms for
/// an option select at 300 Bd — so it runs on a blocking thread, on a duplicate of the
/// descriptor: if this future is dropped, the port may close while the call is still running.
#[cfg(unix)]
async fn drain(port: &mut SerialStream) -> io::Result<()> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `port`, which is borrowed, hence open, for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) }.try_clone_to_owned()?;
    tokio::task::spawn_blocking(move || {
        // SAFETY: `fd` is an open descriptor owned by this closure for the whole call.
        let rc = unsafe { libc::tcdrain(fd.as_raw_fd()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(not(unix))]
async fn drain(port: &mut SerialStream) -> io::Result<()> {
    port.flush().await
}

/// Runs `session` on `line` to its end. The outer error is the line failing (the port is
/// gone); the inner one is the meter's.
pub async fn run<L: Line>(
    line: &mut L,
    mut session: Session,
) -> io::Result<Result<Readout, SessionError>> {
    let mut action = session.start();
    loop {
        action = match action {
            Action::SetBaud {
                baud,
                discard_input,
            } => {
                line.set_baud(baud)?;
                if discard_input {
                    line.discard_input()?;
                }
                tracing::trace!(baud, "IEC line rate set");
                session.completed()
            }
            Action::Send(bytes) => {
                tracing::trace!(bytes = %escape_sent(&bytes), "IEC send");
                line.send(&bytes).await?;
                session.completed()
            }
            Action::Sleep(d) => {
                tokio::time::sleep(d).await;
                session.completed()
            }
            Action::Receive(limits) => receive(line, &mut session, limits).await?,
            Action::Finish(result) => return Ok(result),
        };
    }
}

/// Feeds what arrives to the session until it has what it waited for, or a limit passes.
async fn receive<L: Line>(
    line: &mut L,
    session: &mut Session,
    limits: Limits,
) -> io::Result<Action> {
    let mut buf = [0u8; 512];
    let start = Instant::now();
    let end = start + limits.total;
    let mut started = false;
    tracing::trace!(?limits, "IEC receive");
    loop {
        let wait = if started { limits.gap } else { limits.first };
        let deadline = (Instant::now() + wait).min(end);
        match tokio::time::timeout_at(deadline, line.recv(&mut buf)).await {
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the serial line closed",
                ));
            }
            Ok(Ok(n)) => {
                started = true;
                tracing::trace!(bytes = %escape(&buf[..n]), "IEC received");
                if let Some(action) = session.received(&buf[..n]) {
                    return Ok(action);
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => {
                let silence = if Instant::now() >= end {
                    Silence::Total
                } else if started {
                    Silence::Gap
                } else {
                    Silence::First
                };
                tracing::trace!(?silence, waited = ?start.elapsed(), "IEC receive timed out");
                return Ok(session.silence(silence));
            }
        }
    }
}

/// Bytes for a log line: printable ASCII as is, the rest as `<xx>`.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            0x20..=0x7E => s.push(char::from(b)),
            b'\r' => s.push_str("<CR>"),
            b'\n' => s.push_str("<LF>"),
            _ => s.push_str(&format!("<{b:02x}>")),
        }
    }
    s
}

/// What the agent sends, for a log line: [`escape`], but the password of a `P1` command is
/// never written out.
pub fn escape_sent(bytes: &[u8]) -> String {
    use super::codec::{ETX, SOH, STX};
    match bytes {
        [SOH, b'P', b'1', ..] => escape(&[SOH, b'P', b'1', STX, b'(', b'*', b'*', b'*', b')', ETX]),
        _ => escape(bytes),
    }
}

/// The answer timeout to use: the bus's, but never below what the standard lets a meter take
/// (tr max), plus one character at 300 Bd for the first byte to arrive.
pub fn answer_timeout(bus_timeout: Duration) -> Duration {
    bus_timeout.max(super::session::TR_MAX) + super::codec::wire_time(1, 300)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::iec62056_21::codec;

    #[test]
    fn a_password_sent_should_never_reach_the_log() {
        let p1 = codec::command(b'P', b'1', Some(b"(s3cret)"));
        let logged = escape_sent(&p1);
        assert!(!logged.contains("s3cret"), "{logged}");
        assert_eq!(logged, "<01>P1<02>(***)<03>");
        assert_eq!(
            escape_sent(&codec::break_message()),
            escape(&codec::break_message())
        );
    }
}
