//! The physical side of a bus: serial ports (with RS-485 direction control) and TCP
//! connections, opened lazily and reopened after a failure.
//!
//! A serial bus may carry meters of several protocols together (Modbus RTU, IEC 62056-21, and
//! any driver that speaks bytes over the port). They frame characters differently (the bus's
//! settings, 8N1 typically, against 7E1 starting at 300 Bd), so the slot holds the port one way
//! at a time: inside the Modbus client, or raw in a [`Framing`] a driver asks for
//! ([`Slot::port`]), reconfigured in place when the next driver asks for another. The Modbus
//! client owns the port while it exists; asking for the raw port closes it, and the other way
//! round (the port is opened exclusively). A TCP slot holds one connection: inside the Modbus
//! client, or raw ([`Slot::tcp`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use tokio::net::TcpStream;
use tokio_modbus::client::Context;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use crate::meter::Failure;
use crate::meter::modbus::wire::{SharedWire, Tap};
use crate::primitives::HumanDuration;

/// A bus's physical link, resolved from `[[bus]]`: exactly one of `serial` and `tcp`.
#[derive(Debug, Clone)]
pub enum Link {
    Serial(SerialConfig),
    Tcp(TcpConfig),
}

impl Link {
    pub fn is_serial(&self) -> bool {
        matches!(self, Link::Serial(_))
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Serial(s) => write!(
                f,
                "serial {} {} {}{}{}{}",
                s.device.display(),
                s.baud,
                s.data_bits,
                match s.parity {
                    Parity::None => "N",
                    Parity::Even => "E",
                    Parity::Odd => "O",
                },
                s.stop_bits,
                if s.rs485.enabled {
                    ", RS-485 direction by the driver"
                } else {
                    ""
                }
            ),
            Link::Tcp(t) => write!(f, "tcp {}:{}, {} at once", t.host, t.port, t.concurrency),
        }
    }
}

/// `serial = { device = "/dev/ttyAMA0", baud = 9600, parity = "none", rs485 = true }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub device: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// RS-485 direction control by the UART driver (`TIOCSRS485`): `true`, or a table.
    #[serde(default)]
    pub rs485: Rs485Config,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// RS-485 settings of `struct serial_rs485`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rs485Config {
    pub enabled: bool,
    /// RTS level while sending (driver enable active high on most transceivers).
    pub rts_on_send: bool,
    pub rts_after_send: bool,
    pub delay_before_send: HumanDuration,
    pub delay_after_send: HumanDuration,
    pub rx_during_tx: bool,
}

impl Default for Rs485Config {
    fn default() -> Self {
        Rs485Config {
            enabled: false,
            rts_on_send: true,
            rts_after_send: false,
            delay_before_send: HumanDuration(Duration::ZERO),
            delay_after_send: HumanDuration(Duration::ZERO),
            rx_during_tx: false,
        }
    }
}

impl<'de> Deserialize<'de> for Rs485Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            #[serde(default = "yes")]
            rts_on_send: bool,
            #[serde(default)]
            rts_after_send: bool,
            delay_before_send: Option<HumanDuration>,
            delay_after_send: Option<HumanDuration>,
            #[serde(default)]
            rx_during_tx: bool,
        }
        fn yes() -> bool {
            true
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Table(Table),
        }
        let zero = HumanDuration(Duration::ZERO);
        Ok(match Raw::deserialize(d)? {
            Raw::Flag(enabled) => Rs485Config {
                enabled,
                ..Rs485Config::default()
            },
            Raw::Table(t) => Rs485Config {
                enabled: true,
                rts_on_send: t.rts_on_send,
                rts_after_send: t.rts_after_send,
                delay_before_send: t.delay_before_send.unwrap_or(zero),
                delay_after_send: t.delay_after_send.unwrap_or(zero),
                rx_during_tx: t.rx_during_tx,
            },
        })
    }
}

/// `tcp = { host = "10.0.0.20", port = 502, concurrency = 4 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Requests in flight at once (one connection each).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_port() -> u16 {
    502
}
fn default_concurrency() -> usize {
    1
}

/// How characters are framed on a serial line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl Framing {
    /// IEC 62056-21's sign-on: 300 Bd, 7E1 (a session then changes the rate only).
    pub const IEC_SIGN_ON: Framing = Framing {
        baud: 300,
        parity: Parity::Even,
        data_bits: 7,
        stop_bits: 1,
    };
}

impl SerialConfig {
    /// The bus's own framing, as configured.
    pub fn framing(&self) -> Framing {
        Framing {
            baud: self.baud,
            parity: self.parity,
            data_bits: self.data_bits,
            stop_bits: self.stop_bits,
        }
    }
}

/// One unit of a bus's capacity: the serial port, or one TCP connection of `concurrency`.
pub enum Slot {
    Serial {
        config: SerialConfig,
        modbus: Option<(Context, SharedWire)>,
        /// The port held raw by a driver, opened in some framing; a driver may have changed
        /// the rate since (IEC 62056-21's baud switch), so it is set again on every ask.
        raw: Option<SerialStream>,
        pace: Pacing,
    },
    Tcp {
        addr: String,
        connect_timeout: Duration,
        modbus: Option<(Context, SharedWire)>,
        raw: Option<TcpStream>,
        pace: Pacing,
    },
}

/// The timing knobs of the read in hand ([`crate::meter::Timing`]), and when the last read on
/// the slot ended. The one place they are applied: [`Slot::begin`] before a read, the
/// connection's opening for `connect_delay`, and the Modbus tap between requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pacing {
    pub turnaround: Duration,
    pub connect_delay: Duration,
    pub inter_request: Duration,
    last_end: Option<tokio::time::Instant>,
}

impl Slot {
    /// The slots of a link: one for a serial bus (one frame at a time), `concurrency` for
    /// TCP. `timeout` is the bus's per-request timeout (connects get at least 3 s).
    pub fn for_link(link: &Link, timeout: Duration) -> Vec<Slot> {
        match link {
            Link::Serial(s) => vec![Slot::Serial {
                config: s.clone(),
                modbus: None,
                raw: None,
                pace: Pacing::default(),
            }],
            Link::Tcp(t) => (0..t.concurrency.max(1))
                .map(|_| Slot::Tcp {
                    addr: format!("{}:{}", t.host, t.port),
                    connect_timeout: timeout.max(Duration::from_secs(3)),
                    modbus: None,
                    raw: None,
                    pace: Pacing::default(),
                })
                .collect(),
        }
    }

    /// Before a read with `timing`: takes its pauses, and waits out the `turnaround` since
    /// the last read on this slot ended. Between the requests of the read, the Modbus tap
    /// keeps them; other drivers' reads are one exchange, or pace themselves by protocol.
    pub async fn begin(&mut self, timing: &crate::meter::Timing) {
        let (Slot::Serial { modbus, pace, .. } | Slot::Tcp { modbus, pace, .. }) = self;
        pace.turnaround = timing.turnaround;
        pace.connect_delay = timing.connect_delay;
        pace.inter_request = timing.inter_request;
        let wait_until = pace.last_end.map(|t| t + timing.turnaround);
        if let Some((_, wire)) = modbus {
            let mut w = wire.lock().unwrap_or_else(|p| p.into_inner());
            w.pace = crate::meter::modbus::wire::Pace {
                turnaround: timing.turnaround,
                inter_request: timing.inter_request,
                first: true,
            };
        }
        if let Some(t) = wait_until {
            if timing.turnaround > Duration::ZERO {
                tokio::time::sleep_until(t).await;
            }
        }
    }

    /// After a read: the turnaround of the next one counts from now.
    pub fn end(&mut self) {
        let (Slot::Serial { pace, .. } | Slot::Tcp { pace, .. }) = self;
        pace.last_end = Some(tokio::time::Instant::now());
    }

    pub fn is_serial(&self) -> bool {
        matches!(self, Slot::Serial { .. })
    }

    /// A Modbus client on this link, connecting or opening the port if needed.
    pub async fn modbus(&mut self) -> Result<(&mut Context, &SharedWire), Failure> {
        match self {
            Slot::Serial {
                config,
                modbus,
                raw,
                pace,
            } => {
                if modbus.is_none() {
                    // One owner: the raw port is let go of first.
                    *raw = None;
                    let port = open_serial(config, config.framing())?;
                    let wire = pace.wire();
                    let ctx = tokio_modbus::client::rtu::attach(Tap::new(port, wire.clone()));
                    *modbus = Some((ctx, wire));
                }
                client(modbus, "port closed")
            }
            Slot::Tcp {
                addr,
                connect_timeout,
                modbus,
                raw,
                pace,
            } => {
                if modbus.is_none() {
                    *raw = None;
                    let stream = connect(addr, *connect_timeout, pace.connect_delay).await?;
                    let wire = pace.wire();
                    let ctx = tokio_modbus::client::tcp::attach(Tap::new(stream, wire.clone()));
                    *modbus = Some((ctx, wire));
                }
                client(modbus, "not connected")
            }
        }
    }

    /// The serial port, raw, in `framing`: opened if needed, reconfigured if it was left in
    /// another framing. Closes the Modbus client that held it, if any; stays open for the
    /// next meter. A TCP slot has no port.
    pub fn port(&mut self, framing: Framing) -> Result<&mut SerialStream, Failure> {
        match self {
            Slot::Serial {
                config,
                modbus,
                raw,
                ..
            } => {
                match raw {
                    Some(port) => set_framing(port, framing).map_err(|e| {
                        Failure::Link(format!("cannot set {}: {e}", config.device.display()))
                    })?,
                    None => {
                        *modbus = None;
                        *raw = Some(open_serial(config, framing)?);
                    }
                }
                raw.as_mut()
                    .ok_or_else(|| Failure::Link("port closed".into()))
            }
            Slot::Tcp { addr, .. } => Err(Failure::Link(format!(
                "this protocol needs a serial port; {addr} is a TCP link"
            ))),
        }
    }

    /// The TCP connection, raw: connected if needed. Closes the Modbus client that held it, if
    /// any. A serial slot has none.
    pub async fn tcp(&mut self) -> Result<&mut TcpStream, Failure> {
        match self {
            Slot::Tcp {
                addr,
                connect_timeout,
                modbus,
                raw,
                pace,
            } => {
                if raw.is_none() {
                    *modbus = None;
                    *raw = Some(connect(addr, *connect_timeout, pace.connect_delay).await?);
                }
                raw.as_mut()
                    .ok_or_else(|| Failure::Link("not connected".into()))
            }
            Slot::Serial { config, .. } => Err(Failure::Link(format!(
                "this protocol needs a TCP link; {} is a serial port",
                config.device.display()
            ))),
        }
    }

    /// Forgets the connection after a failure: the next poll reopens it. A TCP connection
    /// that timed out may still deliver the late answer, which would then be taken for the
    /// answer to the next request.
    pub fn reset(&mut self) {
        match self {
            Slot::Serial { modbus, raw, .. } => {
                *modbus = None;
                *raw = None;
            }
            Slot::Tcp { modbus, raw, .. } => {
                *modbus = None;
                *raw = None;
            }
        }
    }
}

impl Pacing {
    /// A tap for a new Modbus client, keeping the read's pauses. A new connection has no
    /// last answer: its first request waits only for `connect_delay`.
    fn wire(&self) -> SharedWire {
        let wire = SharedWire::default();
        {
            let mut w = wire.lock().unwrap_or_else(|p| p.into_inner());
            w.pace = crate::meter::modbus::wire::Pace {
                turnaround: self.turnaround,
                inter_request: self.inter_request,
                first: true,
            };
        }
        wire
    }
}

/// Connects to `addr` within `within`, then waits `delay` before handing the connection out:
/// some meters and Modbus gateways drop a request that comes right after the connection
/// opens.
async fn connect(addr: &str, within: Duration, delay: Duration) -> Result<TcpStream, Failure> {
    let stream = match tokio::time::timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(Failure::Link(format!("cannot connect to {addr}: {e}"))),
        Err(_) => {
            return Err(Failure::Link(format!(
                "cannot connect to {addr}: no answer within {within:?}"
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    if delay > Duration::ZERO {
        tokio::time::sleep(delay).await;
    }
    Ok(stream)
}

fn set_framing(port: &mut SerialStream, f: Framing) -> tokio_serial::Result<()> {
    use tokio_serial::SerialPort;
    port.set_baud_rate(f.baud)?;
    port.set_parity(parity(f.parity))?;
    port.set_data_bits(data_bits(f.data_bits))?;
    port.set_stop_bits(stop_bits(f.stop_bits))
}

fn parity(p: Parity) -> tokio_serial::Parity {
    match p {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    }
}

fn data_bits(n: u8) -> tokio_serial::DataBits {
    match n {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    }
}

fn stop_bits(n: u8) -> tokio_serial::StopBits {
    if n == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    }
}

/// The open Modbus client of a slot.
fn client<'a>(
    modbus: &'a mut Option<(Context, SharedWire)>,
    closed: &str,
) -> Result<(&'a mut Context, &'a SharedWire), Failure> {
    let (ctx, wire) = modbus
        .as_mut()
        .ok_or_else(|| Failure::Link(closed.into()))?;
    Ok((ctx, wire))
}

/// Opens a serial port in the given framing, with RS-485 direction control if configured.
pub fn open_serial(config: &SerialConfig, framing: Framing) -> Result<SerialStream, Failure> {
    let device = config.device.to_string_lossy().into_owned();
    let builder = tokio_serial::new(&device, framing.baud)
        .parity(parity(framing.parity))
        .data_bits(data_bits(framing.data_bits))
        .stop_bits(stop_bits(framing.stop_bits))
        .flow_control(tokio_serial::FlowControl::None);
    let port = builder
        .open_native_async()
        .map_err(|e| Failure::Link(format!("cannot open {device}: {e}")))?;
    if config.rs485.enabled {
        set_rs485(&port, &config.rs485, &config.device)?;
    }
    Ok(port)
}

/// `struct serial_rs485` from `<linux/serial.h>`.
#[cfg(target_os = "linux")]
#[repr(C)]
struct SerialRs485 {
    flags: u32,
    delay_rts_before_send: u32,
    delay_rts_after_send: u32,
    padding: [u32; 5],
}

/// Puts the UART in RS-485 mode so the kernel driver switches the transceiver's direction
/// (RTS as driver-enable) around each frame. Without it a half-duplex transceiver either
/// never transmits or never hears the answer.
#[cfg(target_os = "linux")]
fn set_rs485(port: &SerialStream, cfg: &Rs485Config, device: &Path) -> Result<(), Failure> {
    use std::os::fd::AsRawFd;
    const ENABLED: u32 = 1 << 0;
    const RTS_ON_SEND: u32 = 1 << 1;
    const RTS_AFTER_SEND: u32 = 1 << 2;
    const RX_DURING_TX: u32 = 1 << 4;
    let mut flags = ENABLED;
    if cfg.rts_on_send {
        flags |= RTS_ON_SEND;
    }
    if cfg.rts_after_send {
        flags |= RTS_AFTER_SEND;
    }
    if cfg.rx_during_tx {
        flags |= RX_DURING_TX;
    }
    let conf = SerialRs485 {
        flags,
        delay_rts_before_send: cfg.delay_before_send.0.as_millis() as u32,
        delay_rts_after_send: cfg.delay_after_send.0.as_millis() as u32,
        padding: [0; 5],
    };
    // SAFETY: TIOCSRS485 reads a `struct serial_rs485` that outlives the call.
    let rc = unsafe { libc::ioctl(port.as_raw_fd(), libc::TIOCSRS485 as _, &conf) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::Link(format!(
            "cannot switch {} to RS-485 mode (TIOCSRS485): {e}; if the adapter switches direction by itself (most USB-RS485 dongles), set rs485 = false",
            device.display()
        )));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_rs485(_: &SerialStream, _: &Rs485Config, device: &Path) -> Result<(), Failure> {
    Err(Failure::Link(format!(
        "RS-485 mode for {} is only supported on Linux",
        device.display()
    )))
}
