//! Modbus meters (RTU on a serial bus, TCP on the LAN), on tokio-modbus.
//!
//! The sans-IO parts are the register map ([`profile`]), the request plan ([`plan`]) and the
//! wire diagnosis ([`wire`]); [`read`] is the thin I/O layer that runs a plan on a
//! tokio-modbus context, each call under a timeout (tokio-modbus has none of its own).

pub mod plan;
pub mod profile;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::link::{Link, Slot};
use super::{Failure, Outcome, Reads, Request as Poll, Resolver, Selection, Timing, Value};
use crate::primitives::Problems;
use crate::reading::{Cadence, Decimal, Obis};
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
    /// Checks the section against the bus's link and the profiles, and builds the read plan
    /// of every cadence the meter is read at (shared through `r` with every meter read the
    /// same way).
    pub fn resolve(
        &self,
        at: &str,
        link: &Link,
        reads: &Reads,
        r: &mut Resolver<'_>,
        p: &mut Problems,
    ) -> Option<ModbusMeter> {
        let before = p.0.len();
        if link.is_serial() && !(1..=247).contains(&self.unit) {
            p.push(
                format!("{at}.unit"),
                format!("{} is not a unit id for a serial bus (1-247)", self.unit),
            );
        }
        if let Some(m) = self.max_registers {
            if !(1..=MAX_REGISTERS).contains(&m) {
                p.push(format!("{at}.max_registers"), "must be between 1 and 125");
            }
        }
        let Some(profile) = r.profiles.get(&self.profile) else {
            p.push(
                format!("{at}.profile"),
                format!(
                    "no profile `{}` (known: {})",
                    self.profile,
                    r.profiles.names().collect::<Vec<_>>().join(", ")
                ),
            );
            return None;
        };
        let at_meter = at.strip_suffix(".modbus").unwrap_or(at);
        for c in reads.cadences() {
            if let Some(sel) = reads.get(c) {
                let missing = ReadPlan::missing(profile, sel);
                if !missing.is_empty() {
                    p.push(
                        format!("{at_meter}.reads.{c}"),
                        format!(
                            "profile `{}` has no register for {}",
                            self.profile,
                            missing
                                .iter()
                                .map(|o| o.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
        }
        if p.0.len() != before {
            return None;
        }
        let max_gap = self.max_gap.unwrap_or(profile.max_gap);
        let max_registers = self.max_registers.unwrap_or(MAX_REGISTERS);
        let profile = r
            .plans
            .profiles
            .entry(self.profile.clone())
            .or_insert_with(|| Arc::new(profile.clone()))
            .clone();
        let mut plans = HashMap::new();
        let mut plan = |sel: &Selection| {
            r.plans
                .plans
                .entry((self.profile.clone(), max_gap, max_registers, sel.clone()))
                .or_insert_with(|| Arc::new(ReadPlan::new(&profile, max_gap, max_registers, sel)))
                .clone()
        };
        for c in reads.cadences() {
            if let Some(sel) = reads.get(c) {
                plans.insert(c, plan(sel));
            }
        }
        plans.insert(Cadence::OnDemand, plan(&Selection::All));
        Some(ModbusMeter {
            unit: self.unit,
            profile,
            max_gap,
            max_registers,
            plans,
        })
    }
}

/// Profiles and read plans shared by the meters of a config.
#[derive(Default)]
pub struct PlanCache {
    profiles: HashMap<String, Arc<Profile>>,
    plans: HashMap<(String, u16, u16, Selection), Arc<ReadPlan>>,
}

/// A Modbus meter, resolved.
#[derive(Debug)]
pub struct ModbusMeter {
    pub unit: u8,
    pub profile: Arc<Profile>,
    pub max_gap: u16,
    pub max_registers: u16,
    /// Per scheduled cadence, and `OnDemand` for everything.
    pub plans: HashMap<Cadence, Arc<ReadPlan>>,
}

impl ModbusMeter {
    /// The plan for `request`: the precomputed one of its cadence, or one for the series it
    /// names.
    pub fn plan(&self, request: &Poll<'_>) -> Arc<ReadPlan> {
        match request.series {
            Some(series) => Arc::new(ReadPlan::new(
                &self.profile,
                self.max_gap,
                self.max_registers,
                &Selection::Series(series.to_vec()),
            )),
            None => self
                .plans
                .get(&request.cadence)
                .or_else(|| self.plans.get(&Cadence::OnDemand))
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Reads the meter on the bus's link. A garbled answer leaves tokio-modbus's client
    /// unusable: the link is reopened and the read tried again, as often as the bus allows
    /// retries.
    pub async fn read(
        &self,
        slot: &mut Slot,
        meter: &str,
        request: &Poll<'_>,
        timing: &Timing,
    ) -> Outcome {
        let plan = self.plan(request);
        let rtu = slot.is_serial();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = match slot.modbus().await {
                Ok((client, wire)) => {
                    read(
                        client,
                        wire,
                        rtu,
                        self.unit,
                        &plan,
                        timing.timeout,
                        timing.retries,
                    )
                    .await
                }
                Err(f) => RegisterRead {
                    failure: Some(f),
                    ..Default::default()
                },
            };
            let garbled = out.reset_link && !matches!(out.failure, Some(Failure::Link(_)) | None);
            if garbled && attempt <= timing.retries {
                tracing::debug!(
                    meter,
                    attempt,
                    "Garbled answer, reopening the link to retry"
                );
                slot.reset();
                continue;
            }
            // Drop the connection after a failure that may leave it out of step: a port that
            // is gone, or on TCP any garbled or late answer (it could be taken for the next
            // one). A serial line resynchronises by itself (tokio-modbus clears its buffer
            // per request).
            let reopen = out.reset_link
                || match &out.failure {
                    Some(Failure::Link(_)) => true,
                    None | Some(Failure::Exception { .. } | Failure::Refused(_)) => false,
                    Some(_) => !rtu,
                };
            return Outcome {
                values: out
                    .values
                    .into_iter()
                    .map(|(r, v)| Value {
                        series: r.series,
                        value: v,
                        unit: r.unit,
                        meter_time: None,
                    })
                    .collect(),
                failure: out.failure,
                refused: out.refused,
                reopen,
                unmapped: 0,
            };
        }
    }
}

/// What to read for one selection: the registers and the requests that cover them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadPlan {
    pub registers: Vec<Register>,
    pub requests: Vec<Request>,
}

impl ReadPlan {
    /// `max_gap`: unused registers a request may read through; `max_count`: registers per
    /// request.
    pub fn new(profile: &Profile, max_gap: u16, max_count: u16, selection: &Selection) -> Self {
        let registers: Vec<Register> = profile
            .registers
            .iter()
            .filter(|r| selection.wants(&r.series))
            .cloned()
            .collect();
        let refs: Vec<&Register> = registers.iter().collect();
        let requests = plan::plan(&refs, max_gap, max_count);
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
pub struct RegisterRead {
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
) -> RegisterRead {
    let mut out = RegisterRead::default();
    ctx.set_slave(Slave(unit));
    'requests: for req in &plan.requests {
        let mut attempt = 0;
        let words = loop {
            attempt += 1;
            wire::pace(wire).await;
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
