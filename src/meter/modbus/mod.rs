//! Modbus meters (RTU on a serial bus, TCP on the LAN), on tokio-modbus.
//!
//! The sans-IO parts are the register map ([`profile`]), the request plan ([`plan`]) and the
//! wire diagnosis ([`wire`]); [`read`] is the thin I/O layer that runs a plan on a
//! tokio-modbus context, each call under a timeout (tokio-modbus has none of its own).

pub mod plan;
pub mod profile;
pub mod wire;

use std::time::Duration;

use serde::Deserialize;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::{Failure, Selection};
use crate::config::Problems;
use crate::reading::{Decimal, Obis};
use plan::{MAX_REGISTERS, Request};
use profile::{Function, Profile, Register};
use wire::{RtuDiagnosis, SharedWire};

/// `modbus = { unit = 1, profile = "eastron-sdm630" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusMeterConfig {
    /// Unit (slave) id: 1-247 on a serial bus; on TCP also 0 or 255 for devices that ignore it.
    pub unit: u8,
    /// A built-in profile or one from `modbus_profiles`.
    pub profile: String,
    /// Overrides the profile's `max_gap`: 0 for a meter that answers unmapped registers with
    /// an exception.
    pub max_gap: Option<u16>,
    /// Registers per request, for devices that cannot take the protocol's 125.
    pub max_registers: Option<u16>,
}

impl ModbusMeterConfig {
    pub fn validate(&self, at: &str, serial: bool, profiles: &profile::Profiles, p: &mut Problems) {
        if serial && !(1..=247).contains(&self.unit) {
            p.push(
                format!("{at}.unit"),
                format!("{} is not a unit id for a serial bus (1-247)", self.unit),
            );
        }
        if profiles.get(&self.profile).is_none() {
            p.push(
                format!("{at}.profile"),
                format!(
                    "no profile `{}` (known: {})",
                    self.profile,
                    profiles.names().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if let Some(m) = self.max_registers {
            if !(1..=MAX_REGISTERS).contains(&m) {
                p.push(format!("{at}.max_registers"), "must be between 1 and 125");
            }
        }
    }
}

/// What to read for one selection: the registers and the requests that cover them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    pub registers: Vec<Register>,
    pub requests: Vec<Request>,
}

impl ReadPlan {
    pub fn new(profile: &Profile, config: &ModbusMeterConfig, selection: &Selection) -> Self {
        let registers: Vec<Register> = profile
            .registers
            .iter()
            .filter(|r| selection.wants(&r.series))
            .cloned()
            .collect();
        let refs: Vec<&Register> = registers.iter().collect();
        let requests = plan::plan(
            &refs,
            config.max_gap.unwrap_or(profile.max_gap),
            config.max_registers.unwrap_or(MAX_REGISTERS),
        );
        ReadPlan {
            registers,
            requests,
        }
    }

    /// Series of the selection that the profile does not have.
    pub fn missing(profile: &Profile, selection: &Selection) -> Vec<Obis> {
        match selection {
            Selection::All => Vec::new(),
            Selection::Series(s) => s
                .iter()
                .filter(|o| profile.register(o).is_none())
                .copied()
                .collect(),
        }
    }
}

/// What a read produced: values for what could be read, and why the rest could not.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub values: Vec<(Register, Decimal)>,
    /// A failure that ended the read (the meter or the link is not answering properly).
    pub failure: Option<Failure>,
    /// Requests the meter refused with an exception (a wrong profile, a register it lacks):
    /// the rest of the read is still good.
    pub refused: Vec<Failure>,
    /// The client can no longer be used: the bus worker must reopen the link.
    pub reset_link: bool,
}

/// The name the Modbus specification gives an exception code.
pub fn exception_name(code: ExceptionCode) -> &'static str {
    match code {
        ExceptionCode::IllegalFunction => "illegal function",
        ExceptionCode::IllegalDataAddress => "illegal data address",
        ExceptionCode::IllegalDataValue => "illegal data value",
        ExceptionCode::ServerDeviceFailure => "server device failure",
        ExceptionCode::Acknowledge => "acknowledge",
        ExceptionCode::ServerDeviceBusy => "server device busy",
        ExceptionCode::MemoryParityError => "memory parity error",
        ExceptionCode::GatewayPathUnavailable => "gateway path unavailable",
        ExceptionCode::GatewayTargetDevice => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

fn last_answer(wire: &SharedWire) -> Vec<u8> {
    wire.lock()
        .map(|w| w.last_answer.clone())
        .unwrap_or_default()
}

/// What the bytes that came back after a request say about its failure; `None` if nothing
/// came back.
fn diagnose(rtu: bool, unit: u8, function: u8, answer: &[u8]) -> Option<Failure> {
    if answer.is_empty() {
        return None;
    }
    if !rtu {
        return Some(Failure::Malformed(format!(
            "{} bytes and no complete frame",
            answer.len()
        )));
    }
    Some(match wire::diagnose_rtu(unit, function, answer) {
        RtuDiagnosis::Silence => return None,
        RtuDiagnosis::BadCrc { expected, got } => {
            Failure::Checksum(format!("CRC {got:#06x}, expected {expected:#06x}"))
        }
        RtuDiagnosis::OtherUnit(u) => Failure::WrongDevice {
            expected: unit.to_string(),
            got: u.to_string(),
        },
        RtuDiagnosis::Garbage(n) => {
            Failure::Malformed(format!("{n} bytes that are not a Modbus frame"))
        }
    })
}

/// The unit id that answered, from tokio-modbus' header-mismatch message
/// (`expected/request = Header { slave_id: 1 }, actual/response = Header { slave_id: 2 }`),
/// if it differs from the one asked.
fn answering_unit(message: &str) -> Option<String> {
    let ids: Vec<&str> = ["slave_id: ", "unit_id: "]
        .iter()
        .flat_map(|key| message.match_indices(key).map(move |(i, _)| i + key.len()))
        .map(|start| {
            let rest = &message[start..];
            &rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())]
        })
        .collect();
    match ids.as_slice() {
        [asked, answered] if asked != answered => Some((*answered).to_owned()),
        _ => None,
    }
}

/// Runs `plan` against unit `unit` on `ctx`. `wire` is the tap on the context's transport;
/// `rtu` says whether its bytes are RTU frames (for diagnosing failures).
pub async fn read(
    ctx: &mut Context,
    wire: &SharedWire,
    rtu: bool,
    unit: u8,
    plan: &ReadPlan,
    timeout: Duration,
    retries: u32,
) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    ctx.set_slave(Slave(unit));
    'requests: for req in &plan.requests {
        let mut attempt = 0;
        let words = loop {
            attempt += 1;
            if let Ok(mut w) = wire.lock() {
                w.last_answer.clear();
            }
            let call = async {
                match req.function {
                    Function::Input => ctx.read_input_registers(req.start, req.count).await,
                    Function::Holding => ctx.read_holding_registers(req.start, req.count).await,
                }
            };
            let failure = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(Ok(words))) if words.len() == usize::from(req.count) => break words,
                Ok(Ok(Ok(words))) => Failure::Malformed(format!(
                    "asked for {} registers at {}, got {}",
                    req.count,
                    req.start,
                    words.len()
                )),
                Ok(Ok(Err(code))) => {
                    out.refused.push(Failure::Exception {
                        code: u8::from(code),
                        name: exception_name(code),
                        detail: format!(
                            "function {:02}, registers {}..{}",
                            req.function.code(),
                            req.start,
                            req.end()
                        ),
                    });
                    continue 'requests;
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => match &e {
                    tokio_modbus::ProtocolError::HeaderMismatch { message, .. } => {
                        match answering_unit(message) {
                            Some(got) => Failure::WrongDevice {
                                expected: unit.to_string(),
                                got,
                            },
                            None => Failure::Malformed(message.clone()),
                        }
                    }
                    other => Failure::Malformed(other.to_string()),
                },
                Ok(Err(tokio_modbus::Error::Transport(e))) => {
                    // tokio-modbus' frame stream is finished after any transport error: no
                    // retry on this client; the bus worker reopens the link (and retries).
                    // Bytes that came back say what went wrong (garbage, a bad CRC); none
                    // means the link itself is gone.
                    out.reset_link = true;
                    out.failure = Some(
                        diagnose(rtu, unit, req.function.code(), &last_answer(wire))
                            .unwrap_or_else(|| {
                                if e.kind() == std::io::ErrorKind::InvalidData {
                                    Failure::Malformed(e.to_string())
                                } else {
                                    Failure::Link(e.to_string())
                                }
                            }),
                    );
                    break 'requests;
                }
                Err(_elapsed) => diagnose(rtu, unit, req.function.code(), &last_answer(wire))
                    .unwrap_or(Failure::Timeout(timeout)),
            };
            if attempt > retries {
                out.failure = Some(failure);
                break 'requests;
            }
            tracing::debug!(unit, attempt, error = %failure, "Modbus request failed, retrying");
        };
        for &i in &req.registers {
            let r = &plan.registers[i];
            let offset = usize::from(r.address - req.start);
            match r.decode(&words[offset..]) {
                Ok(v) => out.values.push((r.clone(), v)),
                Err(e) => out.refused.push(Failure::Malformed(format!(
                    "register {} ({}): {e}",
                    r.address, r.series
                ))),
            }
        }
    }
    out
}
