//! Bus workers: one per configured bus, and the only owner of its port or connections.
//!
//! A worker takes poll requests from its inbox ([`BusHandle`]), queues them by priority
//! ([`queue`]), runs them on its link ([`link`]): one at a time on a serial bus (RS-485 is
//! half-duplex with a single master), up to `concurrency` at once on TCP. Each poll's readings,
//! its failure events and its boundary mark go to the store in one atomic append; then the
//! drain is woken and an on-demand requester gets its report.
//!
//! A meter that keeps failing is backed off: its scheduled polls are skipped until the backoff
//! expires, so a dead meter does not eat the bus. On-demand polls are always tried. Every
//! failure becomes a system event; none stops the worker or the other meters.

pub mod link;
pub mod queue;
pub mod spill;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Duration as HumanDuration, Problems};
use crate::meter::iec62056_21;
use crate::meter::modbus::profile::Profiles;
use crate::meter::modbus::{self, ReadPlan};
use crate::meter::{Failure, MeterConfig, Selection};
use crate::reading::{Cadence, EventKind, Flags, Obis, Reading, Stamp, SystemEvent};
use crate::store::{Append, Mark, Store, StoreError};
use link::Slot;
use queue::{PollQueue, Pushed};

/// `[[bus]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub name: String,
    pub serial: Option<SerialConfig>,
    pub tcp: Option<TcpConfig>,
    /// Per request.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Retries per request before the poll counts as failed.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest pause of a failing meter's scheduled polls.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
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

impl BusConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if self.name.is_empty() {
            p.push(format!("{at}.name"), "must not be empty");
        }
        match (&self.serial, &self.tcp) {
            (Some(_), Some(_)) => p.push(at.to_owned(), "set either `serial` or `tcp`, not both"),
            (None, None) => p.push(
                at.to_owned(),
                "no link: add `serial = { device = … }` or `tcp = { host = … }`",
            ),
            (Some(s), None) => {
                if ![
                    300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200,
                ]
                .contains(&s.baud)
                {
                    p.push(
                        format!("{at}.serial.baud"),
                        format!("{} is not a standard baud rate", s.baud),
                    );
                }
                if !(5..=8).contains(&s.data_bits) {
                    p.push(format!("{at}.serial.data_bits"), "must be 5-8");
                }
                if !(1..=2).contains(&s.stop_bits) {
                    p.push(format!("{at}.serial.stop_bits"), "must be 1 or 2");
                }
            }
            (None, Some(t)) => {
                if t.host.is_empty() {
                    p.push(format!("{at}.tcp.host"), "must not be empty");
                }
                if !(1..=256).contains(&t.concurrency) {
                    p.push(format!("{at}.tcp.concurrency"), "must be 1-256");
                }
            }
        }
        if self.timeout.0 < Duration::from_millis(10) || self.timeout.0 > Duration::from_secs(120) {
            p.push(format!("{at}.timeout"), "must be between 10ms and 2m");
        }
        if self.retries > 10 {
            p.push(format!("{at}.retries"), "must be at most 10");
        }
    }
}

/// A request to read one meter.
#[derive(Debug)]
pub struct PollRequest {
    pub meter: String,
    pub cadence: Cadence,
    /// The boundary a scheduled read is for; `None` for on-demand.
    pub boundary: Option<Timestamp>,
    pub flags: Flags,
    /// Only these series (on-demand); `None`: what the meter's `reads` say for the cadence.
    pub series: Option<Vec<Obis>>,
    /// The on-demand command's id, for `cancel` and the reply.
    pub request_id: Option<String>,
    pub reply: Option<oneshot::Sender<PollReport>>,
}

impl PollRequest {
    pub fn new(meter: impl Into<String>, cadence: Cadence) -> Self {
        PollRequest {
            meter: meter.into(),
            cadence,
            boundary: None,
            flags: Flags::empty(),
            series: None,
            request_id: None,
            reply: None,
        }
    }
}

/// What a poll did, for whoever asked.
#[derive(Debug, Clone)]
pub struct PollReport {
    pub meter: String,
    pub cadence: Cadence,
    pub readings: Vec<Reading>,
    /// Why the poll (or part of it) failed.
    pub errors: Vec<String>,
    /// Whether the readings are in the store (durable).
    pub stored: bool,
}

/// What `inspect` shows of a bus.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BusSnapshot {
    pub bus: String,
    pub active: Vec<PollInfo>,
    pub queued: Vec<PollInfo>,
    pub meters: Vec<MeterHealth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PollInfo {
    pub meter: String,
    pub cadence: Cadence,
    pub boundary: Option<String>,
    pub request_id: Option<String>,
}

impl From<&PollRequest> for PollInfo {
    fn from(r: &PollRequest) -> Self {
        PollInfo {
            meter: r.meter.clone(),
            cadence: r.cadence,
            boundary: r.boundary.map(|b| b.to_string()),
            request_id: r.request_id.clone(),
        }
    }
}

/// A meter's health as its bus worker sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeterHealth {
    pub meter: String,
    pub consecutive_failures: u32,
    pub last_ok: Option<String>,
    pub last_error: Option<String>,
    /// Until when scheduled polls are skipped.
    pub backoff_until: Option<String>,
}

pub enum BusCommand {
    Poll(PollRequest),
    /// Drop queued on-demand polls of a request; answers how many.
    Cancel {
        request_id: String,
        reply: oneshot::Sender<Vec<PollRequest>>,
    },
    Inspect(oneshot::Sender<BusSnapshot>),
}

/// Sends work to a bus worker. Cheap to clone.
#[derive(Clone)]
pub struct BusHandle {
    pub name: String,
    tx: mpsc::Sender<BusCommand>,
}

/// The inbox is full: the request is handed back.
#[derive(Debug)]
pub struct Busy(pub PollRequest);

impl BusHandle {
    /// A handle and the inbox it feeds, for a stand-in worker (tests of the beat and the
    /// control).
    pub fn channel(name: &str, size: usize) -> (BusHandle, mpsc::Receiver<BusCommand>) {
        let (tx, rx) = mpsc::channel(size.max(1));
        (
            BusHandle {
                name: name.to_owned(),
                tx,
            },
            rx,
        )
    }

    /// Queues a poll without waiting; a full inbox hands the request back.
    pub fn try_poll(&self, req: PollRequest) -> Result<(), Busy> {
        self.tx
            .try_send(BusCommand::Poll(req))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(BusCommand::Poll(r))
                | mpsc::error::TrySendError::Closed(BusCommand::Poll(r)) => Busy(r),
                _ => unreachable!("only polls are sent here"),
            })
    }

    /// Queues a poll, waiting for room in the inbox.
    pub async fn poll(&self, req: PollRequest) -> Result<(), Busy> {
        self.tx
            .send(BusCommand::Poll(req))
            .await
            .map_err(|e| match e.0 {
                BusCommand::Poll(r) => Busy(r),
                _ => unreachable!("only polls are sent here"),
            })
    }

    pub async fn cancel(&self, request_id: &str) -> Vec<PollRequest> {
        let (tx, rx) = oneshot::channel();
        let cmd = BusCommand::Cancel {
            request_id: request_id.to_owned(),
            reply: tx,
        };
        if self.tx.send(cmd).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub async fn inspect(&self) -> Option<BusSnapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(BusCommand::Inspect(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// How a meter is read: its protocol driver and precomputed plans.
enum Driver {
    Modbus {
        unit: u8,
        /// Per scheduled cadence, and `OnDemand` for everything. Shared by every meter of the
        /// bus with the same profile, settings and selection: 100 SDM630s hold one plan.
        plans: HashMap<Cadence, Arc<ReadPlan>>,
        profile: Arc<modbus::profile::Profile>,
        config: modbus::ModbusMeterConfig,
    },
    Iec,
}

struct MeterRuntime {
    config: MeterConfig,
    driver: Driver,
    health: MeterHealth,
    backoff_until: Option<Instant>,
}

/// Everything a running poll needs besides its link; shared by all polls of a worker.
struct PollContext {
    bus: String,
    timeout: Duration,
    retries: u32,
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    clock: SharedClock,
    tz: TimeZone,
    /// What the store could not take yet. The lock also serialises this bus's writes, so
    /// they reach the store in order.
    spill: tokio::sync::Mutex<spill::Spill>,
}

/// Readings kept in memory per bus while the store cannot write (about 10 MiB).
const SPILL_READINGS: usize = 100_000;

/// The long-lived task of one bus.
pub struct BusWorker {
    config: BusConfig,
    meters: HashMap<String, MeterRuntime>,
    inbox: mpsc::Receiver<BusCommand>,
    ctx: Arc<PollContext>,
}

/// What a finished poll tells the worker.
struct Done {
    slot: Slot,
    meter: String,
    info: PollInfo,
    ok: bool,
    error: Option<String>,
    link_failed: bool,
}

impl BusWorker {
    /// A worker for `bus` and its `meters`. `wake` is poked after every append.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bus: BusConfig,
        meters: Vec<MeterConfig>,
        profiles: &Profiles,
        store: Arc<dyn Store>,
        wake: Arc<Notify>,
        clock: SharedClock,
        tz: TimeZone,
        inbox_size: usize,
    ) -> (Self, BusHandle) {
        let (tx, rx) = mpsc::channel(inbox_size.max(1));
        let mut shared_profiles: HashMap<String, Arc<modbus::profile::Profile>> = HashMap::new();
        // Everything `ReadPlan::new` depends on: profile, the two overrides, the selection.
        type PlanKey = (String, Option<u16>, Option<u16>, Selection);
        let mut shared_plans: HashMap<PlanKey, Arc<ReadPlan>> = HashMap::new();
        let meters = meters
            .into_iter()
            .filter_map(|m| {
                let driver = match &m.modbus {
                    Some(mc) => {
                        // Validation guarantees the profile exists.
                        let profile = match shared_profiles.get(&mc.profile) {
                            Some(p) => p.clone(),
                            None => {
                                let p = Arc::new(profiles.get(&mc.profile)?.clone());
                                shared_profiles.insert(mc.profile.clone(), p.clone());
                                p
                            }
                        };
                        let mut plan = |sel: &Selection| {
                            let key = (
                                mc.profile.clone(),
                                mc.max_gap,
                                mc.max_registers,
                                sel.clone(),
                            );
                            shared_plans
                                .entry(key)
                                .or_insert_with(|| Arc::new(ReadPlan::new(&profile, mc, sel)))
                                .clone()
                        };
                        let mut plans = HashMap::new();
                        for c in m.reads.cadences() {
                            if let Some(sel) = m.reads.get(c) {
                                plans.insert(c, plan(sel));
                            }
                        }
                        plans.insert(Cadence::OnDemand, plan(&Selection::All));
                        Driver::Modbus {
                            unit: mc.unit,
                            plans,
                            profile,
                            config: mc.clone(),
                        }
                    }
                    None => Driver::Iec,
                };
                Some((
                    m.id.clone(),
                    MeterRuntime {
                        health: MeterHealth {
                            meter: m.id.clone(),
                            ..MeterHealth::default()
                        },
                        config: m,
                        driver,
                        backoff_until: None,
                    },
                ))
            })
            .collect();
        let ctx = Arc::new(PollContext {
            bus: bus.name.clone(),
            timeout: bus.timeout.0,
            retries: bus.retries,
            store,
            wake,
            clock,
            tz,
            spill: tokio::sync::Mutex::new(spill::Spill::new(SPILL_READINGS)),
        });
        let handle = BusHandle {
            name: bus.name.clone(),
            tx,
        };
        (
            BusWorker {
                config: bus,
                meters,
                inbox: rx,
                ctx,
            },
            handle,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut queue = PollQueue::default();
        let mut free = Slot::for_bus(&self.config);
        let mut active: FuturesUnordered<
            std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>,
        > = FuturesUnordered::new();
        let mut active_info: Vec<PollInfo> = Vec::new();
        let mut stopping = false;
        // Readings kept while the store could not write are retried now and then, not only
        // when the next poll ends.
        let mut spill_retry = tokio::time::interval(Duration::from_secs(5));
        spill_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Start what can start.
            while !stopping && !free.is_empty() {
                let Some(req) = queue.pop() else { break };
                let Some(meter) = self.meters.get(&req.meter) else {
                    reply_error(req, "unknown meter");
                    continue;
                };
                if req.cadence != Cadence::OnDemand
                    && meter.backoff_until.is_some_and(|t| Instant::now() < t)
                {
                    tracing::debug!(bus = %self.config.name, meter = %req.meter, cadence = %req.cadence, "Meter backed off, scheduled poll skipped");
                    continue;
                }
                let slot = free.pop().expect("checked non-empty");
                active_info.push(PollInfo::from(&req));
                active.push(Box::pin(run_poll(
                    self.ctx.clone(),
                    slot,
                    meter.plan_for(&req),
                    req,
                )));
            }
            if stopping && active.is_empty() {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    // Queued polls are not started. Scheduled ones were not marked read, so
                    // the beat reads them late after the restart; on-demand ones are told.
                    while let Some(req) = queue.pop() {
                        reply_error(req, "the agent is shutting down");
                    }
                }
                Some(done) = active.next() => {
                    let Done { mut slot, meter, info, ok, error, link_failed } = done;
                    if link_failed {
                        slot.reset();
                    }
                    free.push(slot);
                    if let Some(i) = active_info.iter().position(|a| a.meter == info.meter && a.cadence == info.cadence && a.request_id == info.request_id) {
                        active_info.remove(i);
                    }
                    let max = self.config.backoff_max.0;
                    if let Some(m) = self.meters.get_mut(&meter) {
                        m.record(ok, error, max, &self.ctx.clock);
                    }
                }
                _ = spill_retry.tick() => {
                    let ctx = self.ctx.clone();
                    let pending = ctx.spill.try_lock().is_ok_and(|s| !s.is_empty());
                    if pending {
                        tokio::spawn(async move {
                            let mut spill = ctx.spill.lock().await;
                            flush_spill(&ctx, &mut spill).await;
                        });
                    }
                }
                cmd = self.inbox.recv(), if !stopping => match cmd {
                    None => stopping = true,
                    Some(BusCommand::Poll(req)) => self.enqueue(&mut queue, req),
                    Some(BusCommand::Cancel { request_id, reply }) => {
                        let _ = reply.send(queue.cancel(&request_id));
                    }
                    Some(BusCommand::Inspect(reply)) => {
                        let _ = reply.send(BusSnapshot {
                            bus: self.config.name.clone(),
                            active: active_info.clone(),
                            queued: queue.iter().map(PollInfo::from).collect(),
                            meters: self.meters.values().map(|m| m.health.clone()).collect(),
                        });
                    }
                },
            }
        }
        let mut spill = self.ctx.spill.lock().await;
        if !flush_spill(&self.ctx, &mut spill).await {
            tracing::error!(bus = %self.config.name, readings = spill.readings(), "Stopping with readings the store could not take: they are lost");
        }
        tracing::debug!(bus = %self.config.name, "Bus worker stopped");
    }

    fn enqueue(&mut self, queue: &mut PollQueue, req: PollRequest) {
        if !self.meters.contains_key(&req.meter) {
            reply_error(req, "unknown meter");
            return;
        }
        let (meter, cadence, boundary) = (req.meter.clone(), req.cadence, req.boundary);
        if let Pushed::Overrun { skipped } = queue.push(req) {
            tracing::warn!(bus = %self.config.name, meter = %meter, cadence = %cadence, "Overrun: the previous read was still queued at the next boundary");
            let now = self.ctx.clock.now();
            let mut event = SystemEvent::new(
                EventKind::Overrun,
                Stamp::in_zone(now, &self.ctx.tz),
                format!(
                    "The {cadence} read of {meter} was still queued on bus {} at the next boundary; it reads the newer boundary instead",
                    self.config.name
                ),
            )
            .meter(meter)
            .bus(self.config.name.clone())
            .detail("cadence", cadence);
            if let Some(s) = skipped {
                event = event.detail("skipped_boundary", Stamp::in_zone(s, &self.ctx.tz));
            }
            if let Some(b) = boundary {
                event = event.detail("boundary", Stamp::in_zone(b, &self.ctx.tz));
            }
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                store_append(
                    &ctx,
                    Append {
                        events: vec![event],
                        ..Append::default()
                    },
                )
                .await
            });
        }
    }
}

impl MeterRuntime {
    /// What to read for `req`.
    fn plan_for(&self, req: &PollRequest) -> Plan {
        match &self.driver {
            Driver::Modbus {
                unit,
                plans,
                profile,
                config,
            } => {
                let plan = match &req.series {
                    Some(series) => Arc::new(ReadPlan::new(
                        profile,
                        config,
                        &Selection::Series(series.clone()),
                    )),
                    None => plans
                        .get(&req.cadence)
                        .or_else(|| plans.get(&Cadence::OnDemand))
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(ReadPlan {
                                registers: Vec::new(),
                                requests: Vec::new(),
                            })
                        }),
                };
                Plan::Modbus {
                    unit: *unit,
                    plan,
                    meter: self.config.clone(),
                }
            }
            Driver::Iec => Plan::Iec {
                meter: self.config.clone(),
                // A readout always brings every data set; the selection only filters.
                selection: match &req.series {
                    Some(series) => Selection::Series(series.clone()),
                    None => self
                        .config
                        .reads
                        .get(req.cadence)
                        .cloned()
                        .unwrap_or(Selection::All),
                },
            },
        }
    }

    fn record(&mut self, ok: bool, error: Option<String>, max: Duration, clock: &SharedClock) {
        let now = clock.now();
        if ok {
            self.health.consecutive_failures = 0;
            self.health.last_ok = Some(now.to_string());
            self.health.backoff_until = None;
            self.backoff_until = None;
        } else {
            self.health.consecutive_failures += 1;
            self.health.last_error = error;
            // Three strikes, then 1 min, 2 min, 4 min … up to `max`.
            let n = self.health.consecutive_failures;
            if n >= 3 {
                let pause = Duration::from_secs(60)
                    .saturating_mul(1u32 << (n - 3).min(16))
                    .min(max);
                self.backoff_until = Some(Instant::now() + pause);
                self.health.backoff_until = Some((now + pause).to_string());
            }
        }
    }
}

/// A poll's work, detached from the worker so it can run while the worker takes commands.
enum Plan {
    Modbus {
        unit: u8,
        plan: Arc<ReadPlan>,
        meter: MeterConfig,
    },
    Iec {
        meter: MeterConfig,
        selection: Selection,
    },
}

fn reply_error(req: PollRequest, why: &str) {
    if let Some(reply) = req.reply {
        let _ = reply.send(PollReport {
            meter: req.meter,
            cadence: req.cadence,
            readings: Vec::new(),
            errors: vec![why.to_owned()],
            stored: false,
        });
    }
}

/// One value a driver read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub series: Obis,
    pub value: crate::reading::Decimal,
    pub unit: String,
    /// The meter's own time for the value, where the protocol gives one.
    pub meter_time: Option<Stamp>,
}

/// Reads, stores and reports one poll.
async fn run_poll(ctx: Arc<PollContext>, mut slot: Slot, plan: Plan, req: PollRequest) -> Done {
    let info = PollInfo::from(&req);
    let mut reset_link = false;
    let (meter, values, failure, refused) = match plan {
        Plan::Modbus { unit, plan, meter } => {
            let rtu = slot.is_serial();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let out = match slot.modbus().await {
                    Ok((client, wire)) => {
                        modbus::read(client, wire, rtu, unit, &plan, ctx.timeout, ctx.retries).await
                    }
                    Err(f) => modbus::ReadOutcome {
                        failure: Some(f),
                        ..Default::default()
                    },
                };
                reset_link = out.reset_link;
                // A garbled answer leaves the client unusable: reopen the link and read
                // again, as many times as the bus allows retries.
                let garbled =
                    out.reset_link && !matches!(out.failure, Some(Failure::Link(_)) | None);
                if garbled && attempt <= ctx.retries {
                    tracing::debug!(bus = %ctx.bus, meter = %meter.id, attempt, "Garbled answer, reopening the link to retry");
                    slot.reset();
                    continue;
                }
                let values = out
                    .values
                    .into_iter()
                    .map(|(r, v)| Value {
                        series: r.series,
                        value: v,
                        unit: r.unit,
                        meter_time: None,
                    })
                    .collect();
                break (meter, values, out.failure, out.refused);
            }
        }
        Plan::Iec { meter, selection } => {
            let params = iec62056_21::ReadParams {
                selection: &selection,
                gateway_tz: &ctx.tz,
                timeout: ctx.timeout,
                retries: ctx.retries,
            };
            let out = iec62056_21::read(&mut slot, &meter, &params).await;
            (meter, out.values, out.failure, out.refused)
        }
    };
    // Drop the connection after a failure that may leave it out of step: a port that is
    // gone, or on TCP any garbled or late answer (it could be taken for the next one). A
    // serial line resynchronises by itself (tokio-modbus clears its buffer per request).
    let link_failed = reset_link
        || match &failure {
            Some(Failure::Link(_)) => true,
            None | Some(Failure::Exception { .. } | Failure::Refused(_)) => false,
            Some(_) => !slot.is_serial(),
        };
    let now = ctx.clock.now();
    let unsynced = ctx.clock.synchronized() == Some(false);
    let batch = assemble(
        &ctx,
        &meter,
        &req,
        values,
        failure.as_ref(),
        &refused,
        now,
        unsynced,
    );
    let errors: Vec<String> = failure
        .iter()
        .chain(refused.iter())
        .map(|f| f.to_string())
        .collect();
    for f in failure.iter().chain(refused.iter()) {
        tracing::warn!(bus = %ctx.bus, meter = %meter.id, cadence = %req.cadence, kind = %f.event_kind(), error = %f, "Poll failed");
    }
    let readings = batch.readings.clone();
    let n = readings.len();
    let stored = store_append(&ctx, batch).await;
    if stored {
        // One value in the log line, so an operator sees numbers, not just counts: the
        // import energy register where there is one.
        let sample = readings
            .iter()
            .find(|r| r.series.0[2..5] == [1, 8, 0])
            .or(readings.first())
            .map(|r| format!("{}={} {}", r.series, r.value, r.unit));
        tracing::info!(bus = %ctx.bus, meter = %meter.id, cadence = %req.cadence, readings = n, sample = sample.as_deref().unwrap_or("-"), "Polled and buffered");
    }
    let ok = failure.is_none();
    if let Some(reply) = req.reply {
        let _ = reply.send(PollReport {
            meter: meter.id.clone(),
            cadence: req.cadence,
            readings,
            errors: errors.clone(),
            stored,
        });
    }
    Done {
        slot,
        meter: meter.id,
        info,
        ok,
        error: errors.into_iter().next(),
        link_failed,
    }
}

/// Turns what a driver read into one atomic store write: the readings, an event per
/// failure, and — only if the read succeeded — the boundary mark.
#[allow(clippy::too_many_arguments)]
fn assemble(
    ctx: &PollContext,
    meter: &MeterConfig,
    req: &PollRequest,
    values: Vec<Value>,
    failure: Option<&Failure>,
    refused: &[Failure],
    now: Timestamp,
    unsynced: bool,
) -> Append {
    let read_at = Stamp::in_zone(now, &ctx.tz);
    let boundary = req.boundary.map(|b| Stamp::in_zone(b, &ctx.tz));
    let mut flags = req.flags;
    if unsynced {
        flags.insert(Flags::CLOCK_UNSYNCED);
    }
    // A transient failure means the read did not happen: no readings, no mark, so the beat
    // (after downtime) or the next boundary reads again. Refused requests (exceptions) are
    // permanent: keep what was read and mark the boundary done.
    let readings = if failure.is_some() {
        Vec::new()
    } else {
        values
            .into_iter()
            .map(|v| Reading {
                meter: meter.id.clone(),
                id_type: meter.id_type.clone(),
                series: v.series,
                value: v.value,
                unit: v.unit,
                timestamp: v.meter_time.or(boundary).unwrap_or(read_at),
                read_at,
                cadence: req.cadence,
                flags,
            })
            .collect()
    };
    let events = failure
        .into_iter()
        .chain(refused)
        .map(|f| {
            let mut e = SystemEvent::new(f.event_kind(), read_at, format!("{}: {f}", meter.id))
                .meter(meter.id.clone())
                .bus(ctx.bus.clone())
                .detail("cadence", req.cadence);
            if let Failure::Exception { code, name, .. } = f {
                e = e.detail("exception_code", code).detail("exception", name);
            }
            if let Some(id) = &req.request_id {
                e = e.detail("request_id", id);
            }
            e
        })
        .collect();
    let marks = match (failure, req.boundary) {
        (None, Some(b)) if req.cadence != Cadence::OnDemand => vec![Mark {
            meter: meter.id.clone(),
            cadence: req.cadence,
            boundary_ms: b.as_millisecond(),
        }],
        _ => Vec::new(),
    };
    Append {
        readings,
        events,
        marks,
    }
}

/// Writes a poll's batch to the store, behind anything the store could not take before.
/// If the store cannot write now (a full or failing disk), the batch waits in the bus's
/// spill and `false` is returned: not durable yet, but not lost either.
async fn store_append(ctx: &PollContext, batch: Append) -> bool {
    if batch.is_empty() {
        return true;
    }
    let mut spill = ctx.spill.lock().await;
    if !flush_spill(ctx, &mut spill).await {
        keep(ctx, &mut spill, batch);
        return false;
    }
    match append(ctx, batch.clone()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(bus = %ctx.bus, error = %e, readings = batch.readings.len(), "Store cannot write: keeping the readings in memory until it can");
            keep(ctx, &mut spill, batch);
            false
        }
    }
}

fn keep(ctx: &PollContext, spill: &mut spill::Spill, batch: Append) {
    let dropped = spill.push(batch);
    if dropped > 0 {
        tracing::error!(bus = %ctx.bus, dropped, kept = spill.readings(), "Readings lost: the store cannot write and the memory spill is full");
    }
}

/// Writes what the spill holds, oldest first; `true` once it is empty. Reports readings the
/// spill had to give up, once the store takes writes again.
async fn flush_spill(ctx: &PollContext, spill: &mut spill::Spill) -> bool {
    let had = spill.readings();
    while let Some(front) = spill.front() {
        if append(ctx, front.clone()).await.is_err() {
            return false;
        }
        spill.pop_front();
    }
    if had > 0 {
        tracing::info!(bus = %ctx.bus, readings = had, "The store takes writes again: kept readings stored");
    }
    let dropped = spill.take_dropped();
    if dropped > 0 {
        let now = Stamp::in_zone(ctx.clock.now(), &ctx.tz);
        let event = SystemEvent::new(
            EventKind::StoreError,
            now,
            format!("{dropped} readings were lost on bus {}: the store could not write and the memory spill was full", ctx.bus),
        )
        .bus(ctx.bus.clone())
        .detail("lost_readings", dropped);
        let _ = append(
            ctx,
            Append {
                events: vec![event],
                ..Append::default()
            },
        )
        .await;
    }
    true
}

async fn append(ctx: &PollContext, batch: Append) -> Result<(), StoreError> {
    let store = ctx.store.clone();
    let readings = batch.readings.len();
    match tokio::task::spawn_blocking(move || store.append(batch)).await {
        Ok(Ok(a)) => {
            if readings > 0 {
                // Which sequence numbers are now durable: the crash tests hold the agent to them.
                tracing::debug!(bus = %ctx.bus, first_seq = a.seqs[0], readings, "Buffered");
            }
            ctx.wake.notify_one();
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(StoreError::Unavailable(format!("store task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests;

/// Finds the bus of a meter. Cheap to clone; shared by the beat and the MQTT control.
#[derive(Clone, Default)]
pub struct Router {
    buses: Vec<BusHandle>,
    meters: HashMap<String, usize>,
    order: Vec<String>,
}

/// Why a poll could not be queued; the request is handed back.
#[derive(Debug)]
pub enum RouteError {
    UnknownMeter(PollRequest),
    Busy(PollRequest),
}

impl Router {
    pub fn add_bus(&mut self, handle: BusHandle, meters: impl IntoIterator<Item = String>) {
        let i = self.buses.len();
        self.buses.push(handle);
        for m in meters {
            self.order.push(m.clone());
            self.meters.insert(m, i);
        }
    }

    pub fn bus_of(&self, meter: &str) -> Option<&BusHandle> {
        self.meters.get(meter).map(|i| &self.buses[*i])
    }

    /// Queues without waiting: a full bus inbox hands the request back.
    pub fn try_poll(&self, req: PollRequest) -> Result<(), RouteError> {
        match self.bus_of(&req.meter) {
            None => Err(RouteError::UnknownMeter(req)),
            Some(bus) => bus.try_poll(req).map_err(|Busy(r)| RouteError::Busy(r)),
        }
    }

    /// Queues, waiting for room in the bus inbox.
    pub async fn poll(&self, req: PollRequest) -> Result<(), RouteError> {
        match self.bus_of(&req.meter) {
            None => Err(RouteError::UnknownMeter(req)),
            Some(bus) => bus.poll(req).await.map_err(|Busy(r)| RouteError::Busy(r)),
        }
    }

    pub fn buses(&self) -> &[BusHandle] {
        &self.buses
    }

    /// Every meter, in config order.
    pub fn meters(&self) -> &[String] {
        &self.order
    }
}
