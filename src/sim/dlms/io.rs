//! The thin I/O around the links: loopback TCP, a serial port or pty, mode E.

#[allow(unused_imports)]
use super::*;
use crate::sim::pty::spawn as spawn_pty;

// ---------------------------------------------------------------------------------------------
// I/O
// ---------------------------------------------------------------------------------------------

/// Serves the wrapper on every connection `listener` accepts, until the task is dropped.
pub async fn serve_wrapper(listener: TcpListener, meter: Meter) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let meter = meter.clone();
        tokio::spawn(async move {
            let mut server = WrapperServer::new(meter);
            let mut stream = stream;
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let out = server.received(&buf[..n]);
                        if !out.is_empty() && stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Binds 127.0.0.1 on a free port and serves the wrapper there; returns the address.
pub async fn spawn_wrapper(meter: Meter) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_wrapper(listener, meter));
    Ok(addr)
}

/// Serves HDLC for `meters` on `io` until it fails.
pub async fn serve_hdlc<S>(mut io: S, meters: Vec<Meter>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = HdlcServer::new(meters);
    let mut buf = vec![0u8; 2048];
    loop {
        match io.read(&mut buf).await {
            Ok(0) => {
                // A pty master reads 0 while no one holds the slave open.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                server.reset();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => return,
            Ok(n) => {
                let out = server.received(&buf[..n]);
                if !out.is_empty() && io.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The mode E front end of an optical port (IEC 62056-21 annex E), then HDLC: a sign-on
/// `/?!` at 300 Bd is answered with an identification offering HDLC (`\2`) at 9600 Bd;
/// `ACK 2 Z 2` switches the meter to HDLC at rate Z until the client's DISC (or 5 s of
/// silence) brings it back to waiting for a sign-on. `peer_baud` reads the rate the client's
/// end of the line is set to, where it can be known (a pty): bytes sent at a rate the meter is
/// not listening at are lost, as on a real line.
pub async fn serve_mode_e<S>(mut io: S, peer_baud: impl Fn() -> Option<u32>, meter: Meter)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use crate::meter::iec62056_21::codec::{self, Identification};
    const IDLE: Duration = Duration::from_secs(5);
    let ident = codec::identification(&Identification {
        manufacturer: "AMR".into(),
        baud_code: b'5',
        enhanced: Some(b'2'),
        ident: "SIMDLMS".into(),
    });
    let heard_at = |baud: u32| peer_baud().is_none_or(|b| b == baud);
    let mut server = HdlcServer::new(vec![meter]);
    let mut line: Vec<u8> = Vec::new();
    // None: waiting for a sign-on; Some(None): identified; Some(Some(rate)): HDLC at rate.
    let mut mode: Option<Option<u32>> = None;
    let mut buf = vec![0u8; 2048];
    loop {
        let n = match tokio::time::timeout(IDLE, io.read(&mut buf)).await {
            Err(_) => {
                mode = None;
                line.clear();
                server.reset();
                continue;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Ok(Ok(n)) => n,
        };
        match mode {
            Some(Some(rate)) => {
                if !heard_at(rate) {
                    continue;
                }
                let was = server.connected();
                let out = server.received(&buf[..n]);
                if !out.is_empty() && io.write_all(&out).await.is_err() {
                    return;
                }
                if was && !server.connected() {
                    // DISC answered: back to the optical sign-on.
                    mode = None;
                    server.reset();
                }
            }
            _ => {
                // The acknowledgement is sent at 300 Bd, but the client may have switched its
                // end to the new rate by the time these bytes are read here (a pty has no
                // wire): once identified, take it whatever the rate reads now.
                if !heard_at(300) && mode != Some(None) {
                    continue;
                }
                line.extend_from_slice(&buf[..n]);
                while let Some(end) = line.iter().position(|b| *b == b'\n') {
                    let mut msg: Vec<u8> = line.drain(..=end).collect();
                    // Noise before a sign-on: a meter starts listening at the `/`.
                    if let Some(start) = msg.windows(2).position(|w| w == b"/?") {
                        msg.drain(..start);
                    }
                    if msg.starts_with(b"/?") && msg.ends_with(b"!\r\n") {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if io.write_all(&ident).await.is_err() {
                            return;
                        }
                        mode = Some(None);
                    } else if mode == Some(None)
                        && msg.len() == 6
                        && msg[0] == codec::ACK
                        && msg[1] == b'2'
                        && msg[3] == b'2'
                    {
                        mode = codec::baud_of_code(msg[2]).map(Some);
                        server.reset();
                        // HDLC may follow in the same read.
                        let rest = std::mem::take(&mut line);
                        let out = server.received(&rest);
                        if !out.is_empty() && io.write_all(&out).await.is_err() {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// A simulated DLMS line on a pty; stops when dropped.
pub type DlmsPty = crate::sim::pty::SimPty;

/// Serves `meters` over HDLC on a new pty (an RS-485 segment), in a thread of its own.
pub fn spawn_hdlc_pty(meters: Vec<Meter>) -> std::io::Result<DlmsPty> {
    spawn_pty("sim-dlms-hdlc", move |master, _baud| {
        serve_hdlc(master, meters)
    })
}

/// Serves one meter behind an optical probe (mode E, then HDLC) on a new pty.
pub fn spawn_mode_e_pty(meter: Meter) -> std::io::Result<DlmsPty> {
    spawn_pty("sim-dlms-mode-e", move |master, baud| {
        serve_mode_e(master, baud, meter)
    })
}
