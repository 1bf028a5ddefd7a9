//! Simulated IEC 62056-21 meters on one serial line: a pseudo-terminal for the demo and the
//! tests, or any byte stream.
//!
//! Each [`SimMeter`] answers the sign-on addressed to it (or the plain `/?!`), sends its
//! identification at 300 Bd, honours the rate the agent picks in its option select, and sends
//! its readout with a correct BCC at that rate. Several meters can share one line, as on an
//! RS-485 bus; only the addressed one answers.
//!
//! The simulated meter checks the rate of the agent's UART — a pty pair shares one termios, so
//! the master sees what the agent set on the slave — whenever it transmits. If the agent is at
//! another rate, the agent receives what a real UART would make of it: line noise (one NUL per
//! character when it listens too fast, one DEL per character-time when too slow; a simplified
//! but faithful picture, since a real UART never produces a frame start that way). So an agent
//! that does not switch in time cannot pass.
//!
//! In programming mode (`ACK 0 Z 1`) a meter sends its `P0` operand, checks a `P1` password
//! if it has one ([`SimMeter::password`]), answers `R5` `P.01(from;to)` from its load profile
//! ([`SimProfile`]) and ends at the break.
//!
//! Faults ([`Fault`]) switch on misbehaviour per meter. With [`SimBus::set_wire_time`], the
//! meter also takes the real time of the line: it considers a message received only when its
//! last character would have arrived at the current rate, and sends at the pace of the rate
//! (10 bits per character). A pty does not throttle by itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::meter::iec62056_21::codec::{self, ACK, Decoder, Frame, Identification, NAK};
use crate::meter::iec62056_21::dataset::{self, DataSet, DataValue};
use crate::meter::iec62056_21::mapping::profile_status;
use crate::meter::iec62056_21::profile::{self, Block, Channel, Profile, Season};
use crate::meter::iec62056_21::transport::escape;

pub use super::pty::SimPty;

/// How a simulated meter misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Never answers.
    Silent,
    /// Answers the sign-on with line noise instead of its identification.
    Garbage,
    /// Sends its readout with a wrong block check character.
    BadBcc,
    /// Sends its first answer to each load profile request with a wrong block check character,
    /// and the block right when asked again (`NAK`).
    BadBccOnce,
    /// Stops halfway through its readout.
    Truncated,
    /// Answers an option select that asks for another rate than 300 Bd with `NAK`.
    RefusesBaudSwitch,
    /// Acknowledges the switch but keeps sending at 300 Bd.
    KeepsBaud,
}

/// The meter's clock, for its time (0.9.1) and date (0.9.2) registers.
#[derive(Clone, Debug)]
pub enum Clock {
    /// Always this wall-clock time.
    Fixed(DateTime),
    /// The current time in this zone.
    Live(TimeZone),
}

/// One simulated meter.
#[derive(Clone, Debug)]
pub struct SimMeter {
    /// The address it answers (`/?address!`); every meter also answers the plain `/?!`.
    pub address: Option<String>,
    pub identification: Identification,
    /// How long it takes to answer (tr).
    pub reaction: Duration,
    /// Its data sets, in readout order; the clock's go after the first.
    pub sets: Vec<DataSet>,
    pub clock: Option<Clock>,
    /// kWh per second added to the energy registers (`1.8.x`, `2.8.x`): a busy meter in fast
    /// forward, for the demo.
    pub energy_rate: f64,
    pub fault: Fault,
    /// The P1 password programming mode wants before `R5`; `None`: none.
    pub password: Option<String>,
    /// Its load profile (`P.01`); `None`: it answers `R5` with `(ERROR)`.
    pub profile: Option<SimProfile>,
}

/// A simulated meter's load profile: rows every `period_min` minutes from `start` to `end`
/// (the end of each interval), of two channels, import and export power (`1.5.0`, `2.5.0`,
/// kW), made up from the row's number alone so tests can know them: row `k` (0 at `start`)
/// imports `0.100 + (37 k mod 400) / 1000` kW and exports `(11 k mod 50) / 1000` kW.
///
/// Times are the meter's local time in `tz`, with the season digit of summer or normal time.
/// A new block starts where the status or season changes or rows are missing: an `outage`
/// (no rows close strictly inside it; the first one after has the power-failure status).
#[derive(Clone, Debug)]
pub struct SimProfile {
    pub tz: TimeZone,
    /// The first row's time; the profile holds nothing before it.
    pub start: Timestamp,
    /// The last row's time at the latest; `None`: up to now.
    pub end: Option<Timestamp>,
    pub period_min: u32,
    /// `(from, to)`: the supply failed; no row closes in `from < t < to`.
    pub outage: Option<(Timestamp, Timestamp)>,
}

impl SimProfile {
    /// A quarter-hour profile in `tz` from `start` to `end`.
    pub fn quarter_hours(tz: TimeZone, start: Timestamp, end: Option<Timestamp>) -> Self {
        SimProfile {
            tz,
            start,
            end,
            period_min: 15,
            outage: None,
        }
    }

    /// The values of row `k`: import and export power, kW with three decimals.
    pub fn values(k: i64) -> [String; 2] {
        let import = 100 + (37 * k).rem_euclid(400);
        let export = (11 * k).rem_euclid(50);
        [
            format!("{}.{:03}", import / 1000, import % 1000),
            format!("{}.{:03}", export / 1000, export % 1000),
        ]
    }

    /// The rows closed in `from ..= to`, in blocks.
    pub fn rows(&self, from: Timestamp, to: Timestamp, now: Timestamp) -> Profile {
        let period = i64::from(self.period_min.max(1)) * 60;
        let end = self.end.unwrap_or(now).min(to);
        let first = (from.as_second() - self.start.as_second())
            .max(0)
            .div_euclid(period);
        let mut blocks: Vec<Block> = Vec::new();
        let mut last: Option<(Timestamp, u32, Season)> = None;
        let mut k = first;
        loop {
            let Ok(t) = Timestamp::from_second(self.start.as_second() + k * period) else {
                break;
            };
            if t > end {
                break;
            }
            k += 1;
            if t < from {
                continue;
            }
            let status = match self.outage {
                Some((a, b)) if t > a && t < b => continue,
                Some((_, b)) if t >= b && t.as_second() < b.as_second() + period => {
                    profile_status::POWER_FAILED
                }
                _ => 0,
            };
            let season = if self.tz.to_offset_info(t).dst().is_dst() {
                Season::Summer
            } else {
                Season::Normal
            };
            let follows = last.is_some_and(|(lt, ls, lz)| {
                lt.as_second() + period == t.as_second() && ls == status && lz == season
            });
            if !follows {
                blocks.push(Block {
                    start: t.to_zoned(self.tz.clone()).datetime(),
                    season,
                    status,
                    period_min: self.period_min,
                    channels: vec![
                        Channel {
                            id: "1.5.0".into(),
                            unit: "kW".into(),
                        },
                        Channel {
                            id: "2.5.0".into(),
                            unit: "kW".into(),
                        },
                    ],
                    rows: Vec::new(),
                });
            }
            if let Some(b) = blocks.last_mut() {
                b.rows.push(SimProfile::values(k - 1).to_vec());
            }
            last = Some((t, status, season));
        }
        Profile { blocks }
    }

    /// The answer to `R5` with `data` (`P.01(from;to)`, local times): the rows from the first
    /// instant `from` names to the last `to` names (both, in an autumn fold).
    pub fn answer(&self, data: &str, now: Timestamp) -> String {
        let range = profile::parse_request(data).and_then(|(number, from, to)| {
            let from = self.tz.to_ambiguous_timestamp(from).earlier().ok()?;
            let to = self.tz.to_ambiguous_timestamp(to).later().ok()?;
            (number == 1).then_some((from, to))
        });
        match range {
            Some((from, to)) => profile::write(&self.rows(from, to, now)),
            None => "(ERROR)\r\n".into(),
        }
    }
}

impl SimMeter {
    /// A meter with `identification`, no data and the reaction time it announces.
    pub fn new(address: Option<&str>, identification: Identification) -> Self {
        SimMeter {
            address: address.map(str::to_owned),
            reaction: identification.reaction_time(),
            identification,
            sets: Vec::new(),
            clock: None,
            energy_rate: 0.0,
            fault: Fault::None,
            password: None,
            profile: None,
        }
    }

    /// A Landis+Gyr-like three-phase meter (`/LGZ5\2ZMD3104407.B24`, offering 9600 Bd and
    /// HDLC), with serial number `serial` and its usual billing registers.
    pub fn landis_gyr(address: Option<&str>, serial: &str) -> Self {
        let mut m = SimMeter::new(
            address,
            Identification {
                manufacturer: "LGZ".into(),
                baud_code: b'5',
                enhanced: Some(b'2'),
                ident: "ZMD3104407.B24".into(),
            },
        );
        m.sets = vec![
            set(Some("F.F"), "00000000", None),
            set(Some("0.0.0"), serial, None),
            set(Some("C.1.0"), serial, None),
            set(Some("1.8.0"), "001234.567", Some("kWh")),
            set(Some("1.8.1"), "000800.123", Some("kWh")),
            set(Some("1.8.2"), "000434.444", Some("kWh")),
            set(Some("2.8.0"), "000012.345", Some("kWh")),
            DataSet {
                address: Some("1.6.0".into()),
                values: vec![
                    DataValue {
                        value: "02.345".into(),
                        unit: Some("kW".into()),
                    },
                    DataValue {
                        value: "2603201415".into(),
                        unit: None,
                    },
                ],
            },
            set(Some("C.7.0"), "0003", None),
            set(Some("32.7.0"), "231.2", Some("V")),
        ];
        m
    }

    /// The readout's text at `now`, `elapsed` seconds after the simulation started.
    pub fn readout_text(&self, now: Timestamp, elapsed: f64) -> String {
        let mut sets = self.sets.clone();
        if self.energy_rate != 0.0 {
            for s in &mut sets {
                let energy = s
                    .address
                    .as_deref()
                    .is_some_and(|a| a.starts_with("1.8.") || a.starts_with("2.8."));
                if let (true, Some(v)) = (energy, s.values.first_mut()) {
                    v.value = advance(&v.value, self.energy_rate * elapsed);
                }
            }
        }
        if let Some(clock) = &self.clock {
            let dt = match clock {
                Clock::Fixed(dt) => *dt,
                Clock::Live(tz) => now.to_zoned(tz.clone()).datetime(),
            };
            let at = sets.len().min(1);
            sets.insert(
                at,
                set(Some("0.9.2"), &dt.strftime("%y%m%d").to_string(), None),
            );
            sets.insert(
                at,
                set(Some("0.9.1"), &dt.strftime("%H%M%S").to_string(), None),
            );
        }
        dataset::write_readout(&sets)
    }
}

/// A data set with one value.
pub fn set(address: Option<&str>, value: &str, unit: Option<&str>) -> DataSet {
    DataSet {
        address: address.map(str::to_owned),
        values: vec![DataValue {
            value: value.to_owned(),
            unit: unit.map(str::to_owned),
        }],
    }
}

/// `value + delta`, keeping the width and decimals of `value` (`001234.567`).
fn advance(value: &str, delta: f64) -> String {
    let Ok(v) = value.parse::<f64>() else {
        return value.to_owned();
    };
    let decimals = value.split_once('.').map_or(0, |(_, f)| f.len());
    format!("{:0width$.decimals$}", v + delta, width = value.len())
}

#[derive(Default)]
struct BusState {
    meters: Vec<SimMeter>,
    wire_time: bool,
    readouts: u64,
    requests: u64,
    profile_reads: u64,
}

/// The simulated meters on one line. Shared: tests change faults while it runs.
#[derive(Clone, Default)]
pub struct SimBus {
    state: Arc<Mutex<BusState>>,
    started: Option<std::time::Instant>,
}

impl SimBus {
    pub fn new() -> Self {
        SimBus {
            state: Arc::default(),
            started: Some(std::time::Instant::now()),
        }
    }

    pub fn add(&self, meter: SimMeter) {
        self.lock().meters.push(meter);
    }

    /// Sets the fault of the meter with `address`.
    pub fn set_fault(&self, address: &str, fault: Fault) {
        for m in &mut self.lock().meters {
            if m.address.as_deref() == Some(address) {
                m.fault = fault;
            }
        }
    }

    /// Whether the meters take the real time of the line at its rate.
    pub fn set_wire_time(&self, on: bool) {
        self.lock().wire_time = on;
    }

    /// Readouts sent so far.
    pub fn readouts(&self) -> u64 {
        self.lock().readouts
    }

    /// Load profile answers (`R5`) sent so far.
    pub fn profile_reads(&self) -> u64 {
        self.lock().profile_reads
    }

    /// Sets the P1 password of the meter with `address` (`None`: it wants none).
    pub fn set_password(&self, address: &str, password: Option<&str>) {
        for m in &mut self.lock().meters {
            if m.address.as_deref() == Some(address) {
                m.password = password.map(str::to_owned);
            }
        }
    }

    /// Sign-on requests heard so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn elapsed(&self) -> f64 {
        self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }
}

/// Opens a pseudo-terminal pair and serves `bus` on its master until the [`SimPty`] is dropped.
pub fn spawn_pty(bus: SimBus) -> std::io::Result<SimPty> {
    super::pty::spawn("sim-iec", move |master, peer| serve(master, peer, bus))
}

/// How long a simulated meter waits for the next character of a message before it drops
/// the message. Shorter than the standard's 1500 ms so that the noise of a Modbus poll that
/// timed out (1 s) does not hide the next sign-on.
const INTER_CHARACTER_TIMEOUT: Duration = Duration::from_millis(500);

/// Where the line's conversation is.
enum Talk {
    Idle,
    /// Identified; waiting for the option select.
    Identified(usize),
    /// In programming mode; `authorized` once the password was given (or none is wanted).
    Programming {
        meter: usize,
        authorized: bool,
    },
}

/// Serves `bus` on `io` until it fails. `peer_baud` tells the rate of the agent's UART, if
/// known.
pub async fn serve<S>(mut io: S, peer_baud: impl Fn() -> Option<u32> + Send, bus: SimBus)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut decoder = Decoder::default();
    let mut buf = [0u8; 512];
    let mut talk = Talk::Idle;
    // The meters' rate (they all listen at 300 Bd until one is switched).
    let mut baud = 300u32;
    let mut frame_start = Instant::now();
    let mut last_byte = Instant::now();
    // The last answer in programming mode, sent again on a NAK.
    let mut last_answer: Vec<u8> = Vec::new();
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // No one has the slave open (EIO): wait for the agent to open it.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Ok(n) => n,
        };
        tracing::trace!(bytes = %escape(&buf[..n]), "Simulated IEC meter received");
        // Like a real meter, give up on a message whose characters stopped coming: what a
        // Modbus master on the same line sent looks like the start of a block, and must not
        // swallow the next sign-on.
        if decoder.in_frame() && last_byte.elapsed() > INTER_CHARACTER_TIMEOUT {
            decoder.reset();
        }
        last_byte = Instant::now();
        if !decoder.in_frame() {
            frame_start = Instant::now();
        }
        let frames = decoder.feed(&buf[..n]);
        for frame in frames {
            let Ok(frame) = frame else { continue };
            let wire = bus.lock().wire_time;
            if wire {
                // The last character arrives this long after the first one.
                let len = frame_len(&frame);
                tokio::time::sleep_until(frame_start + codec::wire_time(len, baud)).await;
            }
            talk = match (talk, frame) {
                (_, Frame::Request { address }) => {
                    baud = 300;
                    on_request(&mut io, &peer_baud, &bus, &address).await
                }
                (
                    Talk::Identified(i),
                    Frame::OptionSelect {
                        baud: code, mode, ..
                    },
                ) => {
                    baud = on_option_select(&mut io, &peer_baud, &bus, i, code, mode).await;
                    if mode == b'1' {
                        let authorized = bus
                            .lock()
                            .meters
                            .get(i)
                            .is_some_and(|m| m.password.is_none());
                        Talk::Programming {
                            meter: i,
                            authorized,
                        }
                    } else {
                        Talk::Idle
                    }
                }
                (
                    Talk::Programming { meter, authorized },
                    Frame::Command {
                        command,
                        kind,
                        data,
                        ..
                    },
                ) if command != b'B' => {
                    let next = on_programming(
                        &mut io,
                        &peer_baud,
                        &bus,
                        (meter, authorized),
                        (command, kind, data.as_deref().unwrap_or("")),
                        baud,
                        &mut last_answer,
                    )
                    .await;
                    match next {
                        Some(authorized) => Talk::Programming { meter, authorized },
                        None => {
                            baud = 300;
                            Talk::Idle
                        }
                    }
                }
                (Talk::Programming { meter, authorized }, Frame::Nak) => {
                    // The agent asks for the last block again (it arrived corrupted).
                    let (reaction, wire) = {
                        let st = bus.lock();
                        let reaction = st.meters.get(meter).map_or(Duration::ZERO, |m| m.reaction);
                        (reaction, st.wire_time)
                    };
                    tokio::time::sleep(reaction).await;
                    let _ = send(&mut io, &peer_baud, &last_answer, baud, wire).await;
                    Talk::Programming { meter, authorized }
                }
                (_, Frame::Command { command: b'B', .. }) => {
                    baud = 300;
                    Talk::Idle
                }
                (t, _) => t,
            };
            frame_start = Instant::now();
        }
    }
}

/// The bytes a frame took on the wire.
fn frame_len(frame: &Frame) -> usize {
    match frame {
        Frame::Request { address } => 5 + address.len(),
        Frame::OptionSelect { .. } => 6,
        Frame::Identification(id) => codec::identification(id).len(),
        Frame::Ack | Frame::Nak => 1,
        Frame::Data { text, .. } => text.len() + 3,
        Frame::Command { data, .. } => 5 + data.as_ref().map_or(0, |d| d.len() + 1),
    }
}

async fn on_request<S>(
    io: &mut S,
    peer_baud: &(impl Fn() -> Option<u32> + Send),
    bus: &SimBus,
    address: &str,
) -> Talk
where
    S: AsyncWrite + Unpin + Send,
{
    let (answering, wire): (Vec<(usize, SimMeter)>, bool) = {
        let mut st = bus.lock();
        st.requests += 1;
        let answering = st
            .meters
            .iter()
            .enumerate()
            .filter(|(_, m)| address.is_empty() || m.address.as_deref() == Some(address))
            .filter(|(_, m)| m.fault != Fault::Silent)
            .map(|(i, m)| (i, m.clone()))
            .collect();
        (answering, st.wire_time)
    };
    let [(i, meter)] = answering.as_slice() else {
        if answering.len() > 1 {
            // A plain request on a bus: every meter answers at once and the line is a mess.
            tokio::time::sleep(answering[0].1.reaction).await;
            let noise = vec![0x7Fu8; 24];
            let _ = send(io, peer_baud, &noise, 300, wire).await;
        }
        return Talk::Idle;
    };
    tokio::time::sleep(meter.reaction).await;
    if meter.fault == Fault::Garbage {
        let noise: Vec<u8> = b"\x00#*%&\x7f\x00)(=?\r\n\x00~~\x00".to_vec();
        let _ = send(io, peer_baud, &noise, 300, wire).await;
        return Talk::Idle;
    }
    let ident = codec::identification(&meter.identification);
    let _ = send(io, peer_baud, &ident, 300, wire).await;
    Talk::Identified(*i)
}

/// Answers an option select; returns the rate the meters listen at afterwards.
async fn on_option_select<S>(
    io: &mut S,
    peer_baud: &(impl Fn() -> Option<u32> + Send),
    bus: &SimBus,
    meter: usize,
    code: u8,
    mode: u8,
) -> u32
where
    S: AsyncWrite + Unpin + Send,
{
    let Some(m) = bus.lock().meters.get(meter).cloned() else {
        return 300;
    };
    let wire = bus.lock().wire_time;
    let offered = codec::baud_of_code(m.identification.baud_code).unwrap_or(300);
    let asked = codec::baud_of_code(code);
    let rate = match asked {
        Some(r) if r <= offered => r,
        // A rate it does not offer: refuse.
        _ => {
            tokio::time::sleep(m.reaction).await;
            let _ = send(io, peer_baud, &[NAK], 300, wire).await;
            return 300;
        }
    };
    if m.fault == Fault::RefusesBaudSwitch && rate != 300 {
        tokio::time::sleep(m.reaction).await;
        let _ = send(io, peer_baud, &[NAK], 300, wire).await;
        return 300;
    }
    let rate = if m.fault == Fault::KeepsBaud {
        300
    } else {
        rate
    };
    tokio::time::sleep(m.reaction).await;
    if mode == b'1' {
        // Programming mode: the operand of the password command, then wait for commands.
        let operand = format!("({})", m.address.as_deref().unwrap_or("00000000"));
        let message = codec::command(b'P', b'0', Some(operand.as_bytes()));
        let _ = send(io, peer_baud, &message, rate, wire).await;
        return rate;
    }
    let text = m.readout_text(Timestamp::now(), bus.elapsed());
    let message = faulted(codec::data_message(text.as_bytes()), m.fault);
    let _ = send(io, peer_baud, &message, rate, wire).await;
    bus.lock().readouts += 1;
    // It stays at the rate of its readout until the break (or the next sign-on).
    rate
}

/// A data message as the fault makes it.
fn faulted(mut message: Vec<u8>, fault: Fault) -> Vec<u8> {
    match fault {
        Fault::BadBcc => {
            if let Some(b) = message.last_mut() {
                *b ^= 0x01;
            }
        }
        Fault::Truncated => message.truncate(message.len() / 2),
        _ => {}
    }
    message
}

/// Answers a command in programming mode at `rate`: `P1` (the password) and `R5` (the load
/// profile). Returns whether the agent is authorized now, or `None` when the meter broke
/// off the session (`R5` without the password it wants).
async fn on_programming<S>(
    io: &mut S,
    peer_baud: &(impl Fn() -> Option<u32> + Send),
    bus: &SimBus,
    (meter, authorized): (usize, bool),
    (command, kind, data): (u8, u8, &str),
    rate: u32,
    last_answer: &mut Vec<u8>,
) -> Option<bool>
where
    S: AsyncWrite + Unpin + Send,
{
    let m = bus.lock().meters.get(meter).cloned()?;
    let wire = bus.lock().wire_time;
    tokio::time::sleep(m.reaction).await;
    match (command, kind) {
        (b'P', b'1') => {
            let given = data.strip_prefix('(').and_then(|d| d.strip_suffix(')'));
            let ok = m.password.is_none() || given == m.password.as_deref();
            let _ = send(io, peer_baud, &[if ok { ACK } else { NAK }], rate, wire).await;
            Some(ok || authorized)
        }
        (b'R', b'5') if !authorized => {
            let _ = send(io, peer_baud, &codec::break_message(), rate, wire).await;
            None
        }
        (b'R', b'5') => {
            let text = match &m.profile {
                Some(p) => p.answer(data, Timestamp::now()),
                None => "(ERROR)\r\n".into(),
            };
            let message = faulted(codec::data_message(text.as_bytes()), m.fault);
            if m.fault == Fault::BadBccOnce {
                let mut bad = message.clone();
                if let Some(b) = bad.last_mut() {
                    *b ^= 0x01;
                }
                let _ = send(io, peer_baud, &bad, rate, wire).await;
            } else {
                let _ = send(io, peer_baud, &message, rate, wire).await;
            }
            *last_answer = message;
            bus.lock().profile_reads += 1;
            Some(authorized)
        }
        _ => {
            let _ = send(io, peer_baud, &[NAK], rate, wire).await;
            Some(authorized)
        }
    }
}

/// Sends `bytes` at `rate`, as the agent's UART at `peer_baud()` would receive them; at the
/// pace of the line if `wire`.
async fn send<S>(
    io: &mut S,
    peer_baud: &(impl Fn() -> Option<u32> + Send),
    bytes: &[u8],
    rate: u32,
    wire: bool,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin + Send,
{
    let heard = match peer_baud() {
        Some(agent) if agent != rate => garble(bytes, rate, agent),
        _ => bytes.to_vec(),
    };
    tracing::trace!(rate, peer = ?peer_baud(), bytes = %escape(&heard), "Simulated IEC meter sends");
    // No flush: on a serial stream it is `tcdrain`, which blocks the thread (here until the
    // agent has read everything) and would stall the runtime both sides share in tests.
    if !wire {
        return io.write_all(&heard).await;
    }
    // At the pace of the line: chunks of 16 characters, each when its last would arrive.
    let start = Instant::now();
    let per_heard = if heard.is_empty() {
        Duration::ZERO
    } else {
        codec::wire_time(bytes.len(), rate) / heard.len() as u32
    };
    for (i, chunk) in heard.chunks(16).enumerate() {
        let sent = i * 16 + chunk.len();
        tokio::time::sleep_until(start + per_heard * sent as u32).await;
        io.write_all(chunk).await?;
    }
    Ok(())
}

/// What a UART at `agent` Bd makes of `bytes` sent at `rate` Bd.
fn garble(bytes: &[u8], rate: u32, agent: u32) -> Vec<u8> {
    if agent > rate {
        // Each long start bit reads as a NUL (with a framing error the driver passes on).
        vec![0x00; bytes.len()]
    } else {
        // Several characters pass within one of the agent's: one DEL per character-time.
        let per = (rate / agent.max(1)).max(1) as usize;
        vec![0x7F; bytes.len().div_ceil(per)]
    }
}

/// A readout of about `size` bytes, as a meter with a load of registers sends it: tariffs,
/// stored billing periods, instantaneous values. For the benchmarks.
pub fn large_readout(size: usize) -> Vec<DataSet> {
    let mut sets = vec![
        set(Some("F.F"), "00000000", None),
        set(Some("0.0.0"), "61234567", None),
        set(Some("0.9.1"), "123456", None),
        set(Some("0.9.2"), "260321", None),
    ];
    let mut len: usize = sets.iter().map(|s| set_len(s) + 2).sum();
    let quantities = [1u8, 2, 3, 4, 5, 6, 7, 8, 15, 16];
    let mut n = 0usize;
    while len < size.saturating_sub(3) {
        let c = quantities[n % quantities.len()];
        let tariff = (n / quantities.len()) % 5;
        let period = n / (quantities.len() * 5);
        let address = if period == 0 {
            format!("{c}.8.{tariff}")
        } else {
            format!("{c}.8.{tariff}*{period:02}")
        };
        let unit = if matches!(c, 3..=8) { "kvarh" } else { "kWh" };
        let value = format!("{:010.3}", (n as f64) * 123.457 + 0.125);
        let s = set(Some(&address), &value, Some(unit));
        len += set_len(&s) + 2;
        sets.push(s);
        n += 1;
    }
    sets
}

fn set_len(s: &DataSet) -> usize {
    let mut t = String::new();
    dataset::write_set(s, &mut t);
    t.len()
}
