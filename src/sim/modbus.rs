//! A Modbus server (tokio-modbus' own) that answers like a set of meters: one register bank
//! per unit id, filled from a profile, with energy counters that advance with time.
//!
//! Faults can be switched on per unit, for the fault-handling tests: silence, an exception, a
//! slow answer, and the two timing faults of real meters that the bus's timing knobs are for:
//! a meter that needs a pause after the connection opens ([`Fault::SlowConnect`]), and one
//! that needs a pause between the end of its answer and the next request
//! ([`Fault::Turnaround`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::meter::modbus::profile::{Function, Profile};
use crate::reading::Obis;

/// How a simulated unit misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Never answers.
    Silent,
    /// Answers every read with this exception.
    Exception(ExceptionCode),
    /// Answers, but only after this many milliseconds (a slow meter, a long line).
    Delay(u64),
    /// A TCP connection whose first request comes sooner than this many milliseconds after it
    /// opened is never answered (the meter's network side accepts before its application is
    /// ready, and the session is dead). Cured by the bus's `connect_delay`.
    SlowConnect(u64),
    /// A request that comes sooner than this many milliseconds after the unit's last answer
    /// is ignored (a meter still busy, an RS-485 converter still turning round). Cured by
    /// `turnaround` or `inter_request`.
    Turnaround(u64),
}

/// One simulated meter.
#[derive(Clone, Debug)]
pub struct Unit {
    pub profile: Profile,
    /// Fixed values per series; series not listed get a plausible value.
    pub values: HashMap<Obis, f64>,
    /// kWh added per second to the `*.8.*` energy registers (a busy meter in fast forward).
    pub energy_rate: f64,
    pub fault: Fault,
    /// Whether unmapped registers answer zero (Eastron) or an exception (most others).
    pub gaps_readable: bool,
}

impl Unit {
    pub fn new(profile: Profile) -> Self {
        let gaps_readable = profile.max_gap > 0;
        Unit {
            profile,
            values: HashMap::new(),
            energy_rate: 0.0,
            fault: Fault::None,
            gaps_readable,
        }
    }

    /// The value of `series` at `elapsed` seconds.
    pub fn value(&self, series: &Obis, elapsed: f64) -> f64 {
        let base = self
            .values
            .get(series)
            .copied()
            .unwrap_or_else(|| default_value(series));
        if series.0[3] == 8 {
            base + self.energy_rate * elapsed
        } else {
            base
        }
    }

    /// What the meter answers to a read of `count` registers at `addr`, `elapsed` seconds
    /// after it started.
    pub fn read(
        &self,
        function: Function,
        addr: u16,
        count: u16,
        elapsed: f64,
    ) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > 125 || u32::from(addr) + u32::from(count) > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let bank = self.bank(function, elapsed);
        (addr..addr + count)
            .map(|a| match bank.get(&a) {
                Some(w) => Ok(*w),
                None if self.gaps_readable => Ok(0),
                None => Err(ExceptionCode::IllegalDataAddress),
            })
            .collect()
    }

    fn bank(&self, function: Function, elapsed: f64) -> BTreeMap<u16, u16> {
        let mut bank = BTreeMap::new();
        for r in self
            .profile
            .registers
            .iter()
            .filter(|r| r.function == function)
        {
            for (i, w) in r
                .encode(self.value(&r.series, elapsed))
                .into_iter()
                .enumerate()
            {
                bank.insert(r.address + i as u16, w);
            }
        }
        bank
    }
}

/// Plausible readings: 230 V, 5 A, 1.15 kW, 50 Hz, energy counters in the thousands.
fn default_value(series: &Obis) -> f64 {
    match series.0[2..4] {
        [32 | 52 | 72, 7] => 230.1,
        [31 | 51 | 71, 7] => 5.25,
        [14, 7] => 50.0,
        [_, 7] => 1150.5,
        [c, 8] => 10_000.0 + f64::from(c) * 1000.0 + 0.125,
        _ => 1.0,
    }
}

/// The simulated meters on one server, by unit id. Shared, so tests can change faults and
/// values while it runs.
#[derive(Clone, Default)]
pub struct Meters {
    units: Arc<Mutex<HashMap<u8, Unit>>>,
    started: Option<Instant>,
    requests: Arc<std::sync::atomic::AtomicU64>,
    /// When each unit last answered ([`Fault::Turnaround`]).
    answered: Arc<Mutex<HashMap<u8, Instant>>>,
}

impl Meters {
    pub fn new() -> Self {
        Meters {
            started: Some(Instant::now()),
            ..Meters::default()
        }
    }

    pub fn insert(&self, unit: u8, meter: Unit) {
        self.lock().insert(unit, meter);
    }

    pub fn set_fault(&self, unit: u8, fault: Fault) {
        if let Some(u) = self.lock().get_mut(&unit) {
            u.fault = fault;
        }
    }

    /// Read requests answered or refused so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u8, Unit>> {
        self.units.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, req: SlaveRequest<'_>) -> Result<Option<Response>, ExceptionCode> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let units = self.lock();
        let Some(unit) = units.get(&req.slave) else {
            // Nobody with that address on the bus: silence, as on RS-485.
            return Ok(None);
        };
        match unit.fault {
            Fault::None | Fault::Delay(_) | Fault::SlowConnect(_) => {}
            Fault::Silent => return Ok(None),
            Fault::Exception(e) => return Err(e),
            Fault::Turnaround(ms) => {
                let last = lock_map(&self.answered).get(&req.slave).copied();
                if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(ms)) {
                    return Ok(None);
                }
            }
        }
        let elapsed = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let (function, addr, count) = match req.request {
            Request::ReadInputRegisters(a, c) => (Function::Input, a, c),
            Request::ReadHoldingRegisters(a, c) => (Function::Holding, a, c),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        let words = unit.read(function, addr, count, elapsed)?;
        lock_map(&self.answered).insert(req.slave, Instant::now());
        Ok(Some(match function {
            Function::Input => Response::ReadInputRegisters(words),
            Function::Holding => Response::ReadHoldingRegisters(words),
        }))
    }
}

impl Service for Meters {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Exception>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let delay = match self.lock().get(&req.slave).map(|u| u.fault) {
            Some(Fault::Delay(ms)) => ms,
            _ => 0,
        };
        let answer = self.answer(req);
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            answer
        })
    }
}

fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The meters as one TCP connection sees them: when it opened, and whether its first request
/// came too early for a [`Fault::SlowConnect`] unit.
#[derive(Clone)]
struct Connection {
    meters: Meters,
    opened: Instant,
    /// Requests seen, and whether the connection is dead.
    state: Arc<Mutex<(u64, bool)>>,
}

impl Service for Connection {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Exception>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let slow = match self.meters.lock().get(&req.slave).map(|u| u.fault) {
            Some(Fault::SlowConnect(ms)) => Some(std::time::Duration::from_millis(ms)),
            _ => None,
        };
        let dead = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.0 += 1;
            if s.0 == 1 && slow.is_some_and(|ms| self.opened.elapsed() < ms) {
                s.1 = true;
            }
            s.1
        };
        if dead {
            self.meters
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Box::pin(async { Ok(None) });
        }
        self.meters.call(req)
    }
}

/// Serves `meters` over Modbus TCP on `listener` until the task is dropped.
pub async fn serve_tcp(listener: TcpListener, meters: Meters) {
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let on_connected = |stream, _addr: SocketAddr| {
        let conn = Connection {
            meters: meters.clone(),
            opened: Instant::now(),
            state: Arc::default(),
        };
        async move { Ok(Some((conn, stream))) }
    };
    let on_error = |e| tracing::debug!(error = %e, "Simulated meter connection ended");
    if let Err(e) = server.serve(&on_connected, on_error).await {
        tracing::warn!(error = %e, "Simulated Modbus TCP server stopped");
    }
}

/// Binds a loopback port and serves `meters` on it; returns the address.
pub async fn spawn_tcp(meters: Meters) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_tcp(listener, meters));
    Ok(addr)
}

/// Serves `meters` over Modbus RTU on a serial port (one end of a pty pair in tests).
pub async fn serve_rtu(port: tokio_serial::SerialStream, meters: Meters) {
    let server = tokio_modbus::server::rtu::Server::new(port);
    if let Err(e) = server.serve_forever(meters).await {
        tracing::debug!(error = %e, "Simulated Modbus RTU server stopped");
    }
}
