//! Simulated M-Bus slaves on one segment: a heat meter, a water meter and an electricity
//! meter whose answer takes three telegrams (DIF `1F`), with primary and secondary
//! addressing, the FCB rule and collisions. [`Segment`] is sans-IO (a request in, the bytes
//! on the wire out); [`serve`] runs it on a byte stream, [`spawn_pty`] on a pseudo-terminal
//! and [`spawn_tcp`] on a loopback socket (what pyserial's `socket://` opens).
//!
//! **Collisions.** When several slaves answer one request, what the master hears is their
//! bytes laid over each other: on M-Bus a slave signals by drawing current, so overlapping
//! answers read as the bitwise OR of their bytes. Identical answers (`E5` from each) overlay
//! into one clean answer, as on a real bus; different telegrams garble.
//!
//! **The line's time.** A pty or a socket carries bytes as fast as they are written; with
//! [`Segment::wire_baud`] set, [`serve`] answers as a segment at that rate would: a request is
//! heard once its last character would have arrived (11 bits a character, 8E1), and the answer
//! goes out at the pace of the line.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::meter::mbus::Identity;
use crate::meter::mbus::SecondaryMask;
use crate::meter::mbus::app::manufacturer_code;
use crate::meter::mbus::link::{self, Frame, Split};

/// What a slave does wrong, for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Never answers.
    Silent,
    /// Loses this many answers to REQ_UD2 (a lost answer: the master must repeat with the
    /// same FCB).
    LoseAnswers(u32),
    /// Sends its RSP_UD with a wrong checksum this many times.
    BadChecksum(u32),
    /// Always says "more records follow".
    EndlessTelegrams,
    /// Answers a selection of another id as if it were the selected one (a broken slave).
    AnswersAnySelection,
}

/// One slave.
#[derive(Clone, Debug)]
pub struct Slave {
    pub primary: u8,
    pub identity: Identity,
    /// The records of each telegram (after the header); every telegram but the last ends in
    /// DIF `1F`.
    pub telegrams: Vec<Vec<u8>>,
    pub fault: Fault,
    selected: bool,
    last_fcb: Option<bool>,
    index: usize,
    /// After an application reset: the next new request starts at the first telegram.
    restart: bool,
    access: u8,
    /// REQ_UD2s answered (for tests).
    pub requests: u32,
}

impl Slave {
    pub fn new(primary: u8, id: &str, manufacturer: &[u8; 3], version: u8, medium: u8) -> Self {
        let m = SecondaryMask::parse(id).unwrap_or(SecondaryMask::ANY);
        let mut bytes = m.to_bytes();
        for b in &mut bytes[..4] {
            if *b == 0xFF {
                *b = 0;
            }
        }
        Slave {
            primary,
            identity: Identity {
                id: [bytes[0], bytes[1], bytes[2], bytes[3]],
                manufacturer: manufacturer_code(*manufacturer),
                version,
                medium,
            },
            telegrams: Vec::new(),
            fault: Fault::None,
            selected: false,
            last_fcb: None,
            index: 0,
            restart: false,
            access: 0,
            requests: 0,
        }
    }

    /// A heat meter (medium 04): energy, volume, power, flow, flow and return temperature,
    /// the meter's clock, and last year's billing value (storage 1) with its date.
    pub fn heat(primary: u8, id: &str) -> Self {
        let mut s = Slave::new(primary, id, b"KAM", 0x1B, 0x04);
        s.telegrams = vec![
            [
                rec(&[0x0C, 0x06], &[0x67, 0x45, 0x23, 0x01]), // 1234567 kWh
                rec(&[0x0C, 0x14], &[0x21, 0x43, 0x65, 0x00]), // 654321 × 0.01 m3
                rec(&[0x0B, 0x2D], &[0x15, 0x02, 0x00]),       // 215 × 100 W
                rec(&[0x0B, 0x3B], &[0x30, 0x01, 0x00]),       // 130 l/h
                rec(&[0x0A, 0x5A], &[0x52, 0x07]),             // 75.2 °C
                rec(&[0x0A, 0x5E], &[0x18, 0x04]),             // 41.8 °C
                rec(&[0x04, 0x6D], &[0x1A, 0x0E, 0x41, 0x3C]), // 2026-12-01 14:26
                rec(&[0x4C, 0x06], &[0x00, 0x00, 0x20, 0x01]), // storage 1: 01200000 kWh
                rec(&[0x42, 0x6C], &[0x3F, 0x3C]),             // storage 1: 2025-12-31
            ]
            .concat(),
        ];
        s
    }

    /// A water meter (medium 07): volume in litres, flow, a negative BCD temperature (for
    /// the decoder's sake) and an error-flags record with no OBIS code.
    pub fn water(primary: u8, id: &str) -> Self {
        let mut s = Slave::new(primary, id, b"SEN", 0x68, 0x07);
        s.telegrams = vec![
            [
                rec(&[0x0C, 0x13], &[0x89, 0x67, 0x45, 0x00]), // 456789 l
                rec(&[0x0B, 0x3B], &[0x12, 0x00, 0x00]),       // 12 l/h
                rec(&[0x0A, 0x65], &[0x25, 0xF0]),             // -2.5 °C external
                rec(&[0x01, 0xFD, 0x17], &[0x00]),             // error flags
            ]
            .concat(),
        ];
        s
    }

    /// An electricity meter (medium 02) whose answer takes three telegrams.
    pub fn electricity(primary: u8, id: &str) -> Self {
        let mut s = Slave::new(primary, id, b"ABB", 0x20, 0x02);
        s.telegrams = vec![
            [
                rec(&[0x0E, 0x04], &[0x25, 0x19, 0x46, 0x02, 0x00, 0x00]), // 2461925 × 10 Wh
                rec(&[0x8E, 0x10, 0x04], &[0x10, 0x32, 0x54, 0x01, 0x00, 0x00]), // tariff 1
                vec![0x1F],
            ]
            .concat(),
            [
                rec(&[0x04, 0xA9, 0xFF, 0x01], &[0x10, 0x27, 0x00, 0x00]), // L1 power, mfr VIFE
                rec(&[0x02, 0xFD, 0x48], &[0xF8, 0x08]),                   // 229.6 V
                rec(&[0x02, 0xFD, 0x59], &[0xB0, 0x04]),                   // 12.00 A
                vec![0x1F],
            ]
            .concat(),
            [
                rec(&[0x04, 0x2B], &[0xC4, 0x09, 0x00, 0x00]), // 2500 W
                rec(&[0x0D, 0xFD, 0x0E], &[0x04, b'1', b'.', b'2', b'V']), // firmware "V2.1"
                vec![0x0F, 0x01, 0x02],
            ]
            .concat(),
        ];
        s
    }

    fn matches(&self, mask: &SecondaryMask) -> bool {
        mask.matches(&self.identity) || self.fault == Fault::AnswersAnySelection
    }

    fn reset_link(&mut self) {
        self.last_fcb = None;
        self.index = 0;
    }

    /// A REQ_UD2. With FCV clear the FCB means nothing: the slave sends its current
    /// telegram again and does not move on.
    fn answer_request(&mut self, fcb: bool, fcv: bool) -> Option<Vec<u8>> {
        if self.telegrams.is_empty() {
            return None;
        }
        let fcb = if fcv {
            fcb
        } else {
            self.last_fcb.unwrap_or(fcb)
        };
        let repeat = self.last_fcb == Some(fcb);
        if !repeat && self.last_fcb.is_some() && !self.restart {
            self.index = if self.fault == Fault::EndlessTelegrams {
                // Cycle through the telegrams that say "more" (all but the last).
                (self.index + 1) % (self.telegrams.len() - 1).max(1)
            } else if self.index + 1 < self.telegrams.len() {
                self.index + 1
            } else {
                0
            };
        }
        if !repeat {
            self.restart = false;
        }
        self.last_fcb = Some(fcb);
        self.requests += 1;
        if !repeat {
            self.access = self.access.wrapping_add(1);
        }
        match &mut self.fault {
            Fault::LoseAnswers(n) if *n > 0 => {
                *n -= 1;
                return None;
            }
            _ => {}
        }
        let mut frame = self.rsp_ud(self.index);
        if let Fault::BadChecksum(n) = &mut self.fault {
            if *n > 0 {
                *n -= 1;
                let cs = frame.len() - 2;
                frame[cs] ^= 0x55;
            }
        }
        Some(frame)
    }

    /// The RSP_UD of telegram `i`.
    pub fn rsp_ud(&self, i: usize) -> Vec<u8> {
        let id = self.identity;
        let m = id.manufacturer.to_le_bytes();
        let mut data = vec![
            id.id[0],
            id.id[1],
            id.id[2],
            id.id[3],
            m[0],
            m[1],
            id.version,
            id.medium,
            self.access,
            0x00,
            0x00,
            0x00,
        ];
        let mut records = self.telegrams[i % self.telegrams.len()].clone();
        if self.fault == Fault::EndlessTelegrams && records.last() != Some(&0x1F) {
            records.push(0x1F);
        }
        data.extend_from_slice(&records);
        link::long(link::C_RSP_UD, self.primary, 0x72, &data)
    }
}

/// DIB and VIB, then data.
fn rec(dib_vib: &[u8], data: &[u8]) -> Vec<u8> {
    [dib_vib, data].concat()
}

/// Slaves on one segment.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    pub slaves: Vec<Slave>,
    /// Requests seen (frames from the master).
    pub requests: u32,
    /// Take the line's time at this rate ([`serve`]); `None`: as fast as the stream goes.
    pub wire_baud: Option<u32>,
}

impl Segment {
    pub fn new(slaves: Vec<Slave>) -> Self {
        Segment {
            slaves,
            requests: 0,
            wire_baud: None,
        }
    }

    /// The demo segment: heat meter at primary 1, water meter at 2, electricity meter at 3.
    pub fn demo() -> Self {
        Segment::new(vec![
            Slave::heat(1, "12345678"),
            Slave::water(2, "23456789"),
            Slave::electricity(3, "34567890"),
        ])
    }

    /// A segment of `n` heat meters with distinct secondary ids sharing primary address 0
    /// (factory default), for the secondary search.
    pub fn many(n: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < n {
            ids.insert(rng.u32(0..100_000_000));
        }
        Segment::new(
            ids.into_iter()
                .map(|id| Slave::heat(0, &format!("{id:08}")))
                .collect(),
        )
    }

    /// Handles one complete frame from the master; returns what the bus carries back (the
    /// overlay of every answer), or nothing.
    pub fn handle(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let frame = link::parse(request).ok()?;
        self.requests += 1;
        let mut answers: Vec<Vec<u8>> = Vec::new();
        let addressed = |s: &Slave, a: u8| match a {
            link::ADDR_NETWORK => s.selected,
            link::ADDR_BROADCAST_REPLY | link::ADDR_BROADCAST => true,
            a => s.primary == a,
        };
        match frame {
            Frame::Short { control, address } if control == link::C_SND_NKE => {
                for s in self.slaves.iter_mut().filter(|s| addressed(s, address)) {
                    if address == link::ADDR_NETWORK {
                        s.selected = false;
                    }
                    s.reset_link();
                    if s.fault != Fault::Silent && address != link::ADDR_BROADCAST {
                        answers.push(vec![link::ACK]);
                    }
                }
            }
            Frame::Short { control, address } if control & 0xCF == link::C_REQ_UD2 & 0xCF => {
                let fcb = control & link::FCB != 0;
                let fcv = control & link::FCV != 0;
                for s in self.slaves.iter_mut().filter(|s| addressed(s, address)) {
                    if s.fault == Fault::Silent || address == link::ADDR_BROADCAST {
                        continue;
                    }
                    if let Some(a) = s.answer_request(fcb, fcv) {
                        answers.push(a);
                    }
                }
            }
            Frame::Long {
                control,
                address,
                ci,
                data,
            } if control & 0xCF == link::C_SND_UD & 0xCF => match ci {
                link::CI_SELECT if address == link::ADDR_NETWORK && data.len() == 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(data);
                    let mask = SecondaryMask::from_bytes(b);
                    for s in &mut self.slaves {
                        s.selected = s.matches(&mask);
                        if s.selected {
                            s.reset_link();
                            if s.fault != Fault::Silent {
                                answers.push(vec![link::ACK]);
                            }
                        }
                    }
                }
                link::CI_APP_RESET => {
                    for s in self.slaves.iter_mut().filter(|s| addressed(s, address)) {
                        s.index = 0;
                        s.restart = true;
                        s.last_fcb = Some(control & link::FCB != 0);
                        if s.fault != Fault::Silent {
                            answers.push(vec![link::ACK]);
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
        overlay(&answers)
    }
}

/// What the master hears when all of `answers` go at once: their bytes ORed.
pub fn overlay(answers: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for a in answers {
        for (i, b) in a.iter().enumerate() {
            match out.get_mut(i) {
                Some(o) => *o |= b,
                None => out.push(*b),
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A segment shared between the runner and the test.
pub type Shared = Arc<Mutex<Segment>>;

/// Serves `segment` on `io` until the stream ends: splits what the master sends into frames
/// (dropping garbage), answers each after the slaves' reaction time (at least 11 bit times;
/// `reaction`).
pub async fn serve<S>(mut io: S, segment: Shared, reaction: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rx: Vec<u8> = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) => return,
            Err(_) => {
                // A pty with no one on the other side (EIO): wait for the master to open it.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Ok(n) => n,
        };
        rx.extend_from_slice(&buf[..n]);
        loop {
            match link::split(&rx) {
                Split::Incomplete { .. } => break,
                Split::Invalid { skip, .. } => {
                    rx.drain(..skip);
                }
                Split::Frame(len) => {
                    let frame: Vec<u8> = rx.drain(..len).collect();
                    let (answer, baud) = match segment.lock() {
                        Ok(mut s) => (s.handle(&frame), s.wire_baud),
                        Err(_) => return,
                    };
                    if let Some(a) = answer {
                        let heard = baud.map_or(Duration::ZERO, |b| char_time(frame.len(), b));
                        tokio::time::sleep(heard + reaction).await;
                        if send(&mut io, &a, baud).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// `chars` characters of 11 bits (start, 8 data, parity, stop) at `baud`.
fn char_time(chars: usize, baud: u32) -> Duration {
    link::bit_time(11 * chars as u64, baud)
}

/// Writes `bytes`, at the pace of a line at `baud` if given: 8 characters at a time, each
/// chunk when its last character would have arrived, so the master hears the answer start
/// within its window and no gap inside it longer than a few character times.
async fn send<S>(io: &mut S, bytes: &[u8], baud: Option<u32>) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let Some(baud) = baud else {
        io.write_all(bytes).await?;
        return io.flush().await;
    };
    let start = tokio::time::Instant::now();
    let mut sent = 0;
    for chunk in bytes.chunks(8) {
        sent += chunk.len();
        tokio::time::sleep_until(start + char_time(sent, baud)).await;
        io.write_all(chunk).await?;
        io.flush().await?;
    }
    Ok(())
}

/// A simulator on a thread of its own; stops when dropped.
pub struct SimHandle {
    path: Option<PathBuf>,
    addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimHandle {
    /// The pty's slave side, to open as a serial device.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    /// The TCP address (`socket://127.0.0.1:port` for pyserial).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.addr
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

enum Opened {
    Pty(PathBuf),
    Tcp(std::net::SocketAddr),
}

fn spawn_thread<F, Fut>(name: &str, open: F) -> std::io::Result<SimHandle>
where
    F: FnOnce(
            tokio::sync::oneshot::Receiver<()>,
            std::sync::mpsc::Sender<std::io::Result<Opened>>,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(open(stop_rx, tx)),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    let opened = rx
        .recv()
        .map_err(|_| std::io::Error::other("the simulator thread ended before it opened"))??;
    let (path, addr) = match opened {
        Opened::Pty(p) => (Some(p), None),
        Opened::Tcp(a) => (None, Some(a)),
    };
    Ok(SimHandle {
        path,
        addr,
        stop: Some(stop_tx),
    })
}

/// The slaves' default reaction time: a little more than the standard's 11 bit times at
/// 2400 Bd.
pub const REACTION: Duration = Duration::from_millis(5);

/// Serves `segment` on a pseudo-terminal pair until the handle is dropped.
pub fn spawn_pty(segment: Shared) -> std::io::Result<SimHandle> {
    spawn_thread("sim-mbus-pty", move |stop, tx| async move {
        use tokio_serial::SerialPort;
        let (master, slave) = match tokio_serial::SerialStream::pair() {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::from(e)));
                return;
            }
        };
        let Some(path) = slave.name().map(PathBuf::from) else {
            let _ = tx.send(Err(std::io::Error::other("the pty slave has no name")));
            return;
        };
        drop(slave);
        let _ = tx.send(Ok(Opened::Pty(path)));
        tokio::select! {
            () = serve(master, segment, REACTION) => {}
            _ = stop => {}
        }
    })
}

/// Serves `segment` on a loopback TCP port, one connection at a time (an M-Bus segment has
/// one master), until the handle is dropped.
pub fn spawn_tcp(segment: Shared) -> std::io::Result<SimHandle> {
    spawn_thread("sim-mbus-tcp", move |stop, tx| async move {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        match listener.local_addr() {
            Ok(a) => {
                let _ = tx.send(Ok(Opened::Tcp(a)));
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
        let accept = async {
            while let Ok((conn, _)) = listener.accept().await {
                let _ = conn.set_nodelay(true);
                serve(conn, segment.clone(), REACTION).await;
            }
        };
        tokio::select! {
            () = accept => {}
            _ = stop => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::mbus::Timing;
    use crate::meter::mbus::app;

    #[test]
    fn every_simulated_telegram_should_decode() {
        let seg = Segment::demo();
        for s in &seg.slaves {
            for i in 0..s.telegrams.len() {
                let f = s.rsp_ud(i);
                let t = app::decode(&f).unwrap();
                assert!(t.records().count() >= 2);
                assert_eq!(t.more_follows, i + 1 < s.telegrams.len());
            }
        }
    }

    #[test]
    fn two_answers_at_once_should_garble() {
        let mut seg = Segment::new(vec![
            Slave::heat(5, "11111111"),
            Slave::water(5, "22222222"),
        ]);
        assert_eq!(seg.handle(&link::snd_nke(5)), Some(vec![link::ACK]));
        let a = seg.handle(&link::req_ud2(5, true)).unwrap();
        assert!(!matches!(link::split(&a), Split::Frame(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_segment_at_a_wire_rate_should_answer_as_late_as_the_line_would() {
        let mut seg = Segment::demo();
        seg.wire_baud = Some(2400);
        let (mut master, slave) = tokio::io::duplex(1024);
        tokio::spawn(serve(slave, Arc::new(Mutex::new(seg)), REACTION));
        let char_ms = |n: usize| Duration::from_micros(n as u64 * 11_000_000 / 2400);

        let start = tokio::time::Instant::now();
        master.write_all(&link::snd_nke(1)).await.unwrap();
        let mut ack = [0u8; 1];
        master.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [link::ACK]);
        // Heard after its 5 characters, answered after the reaction and the ACK's own one.
        let took = start.elapsed();
        let want = char_ms(5) + REACTION + char_ms(1);
        assert!(
            took >= want && took < want + Duration::from_millis(3),
            "{took:?}"
        );

        let start = tokio::time::Instant::now();
        master.write_all(&link::req_ud2(1, true)).await.unwrap();
        let len = Segment::demo().slaves[0].rsp_ud(0).len();
        let mut first = [0u8; 1];
        master.read_exact(&mut first).await.unwrap();
        // Its first characters come well within the master's answer window (330 bit times
        // + 50 ms), not after the whole telegram's time.
        assert!(
            start.elapsed() < Timing::new(2400).answer_window(),
            "{:?}",
            start.elapsed()
        );
        let mut rest = vec![0u8; len - 1];
        master.read_exact(&mut rest).await.unwrap();
        let took = start.elapsed();
        let want = char_ms(5) + REACTION + char_ms(len);
        assert!(
            took >= want && took < want + Duration::from_millis(3),
            "{took:?}"
        );
    }

    #[test]
    fn a_repeated_fcb_should_get_the_same_telegram_again() {
        let mut seg = Segment::demo();
        seg.handle(&link::snd_nke(3));
        let t1 = seg.handle(&link::req_ud2(3, true)).unwrap();
        let again = seg.handle(&link::req_ud2(3, true)).unwrap();
        assert_eq!(t1, again);
        let t2 = seg.handle(&link::req_ud2(3, false)).unwrap();
        assert_ne!(t1, t2);
    }
}
