//! Running commands: parse and verify, record durably, queue the polls, reply, and say `done`
//! when the polls are answered. Talks to the broker only through [`Mqtt`], to the buses
//! through the [`Router`] and to the disk through the [`Store`], so all of it is tested
//! against fakes (`tests.rs`).
//!
//! A command's life, and what a crash at each step leaves (see the store's module doc):
//!
//! 1. parsed and verified, or `rejected` (then acknowledged to the broker: it is answered);
//! 2. recorded, *accepted* with its parsed command ([`CommandLog::accept_command`], fsynced).
//!    A record already there means a duplicate: it gets the stored `done` again, or, while
//!    the first one still runs, `accepted` marked `duplicate` — never a second run;
//! 3. its polls queued and `accepted` sent; then the delivery is acknowledged. A crash from
//!    here on: the next start finds the record unfinished and runs the command again, from
//!    its polls ([`Handler::resume`]), and the broker's redelivery, if any, is a duplicate;
//! 4. the polls answered (or timed out): the `done` reply is written into the record
//!    ([`CommandLog::finish_command`], fsynced), then sent.
//!
//! A poll still waiting when control stops leaves its record *accepted*: it is run after the
//! restart, not reported as cancelled.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::Topics;
use super::command::{self, Command, MAX_CONFIG_PAYLOAD, Rejection, Request, Rules};
use super::link::{Delivery, Mqtt};
use super::remote::ConfigRequest;
use super::reply::{
    Accepted, Buffer, Cancelled, Done, Inspection, MeterResult, Outcome, Pong, Rejected,
    RowsResult, State, Status, StatusDoc, Value, to_json,
};
use super::tasks::Tasks;
use crate::beat::BeatConfig;
use crate::bus::{PollReport, PollRequest, RouteError, Router};
use crate::clock::SharedClock;
use crate::drain::DrainStatus;
use crate::reading::{Cadence, Stamp};
use crate::status::StatusReport;
use crate::store::{CommandRecord, Store, StoreError};

/// Everything commands need from the rest of the agent.
pub struct Context {
    pub router: Router,
    pub store: Arc<dyn Store>,
    pub drain: watch::Receiver<DrainStatus>,
    pub clock: SharedClock,
    pub tz: TimeZone,
    pub beat: BeatConfig,
    /// Every configured meter, in config order ("all" for a poll without `meters`).
    pub meters: Vec<String>,
    pub gateway: String,
    pub started_at: Timestamp,
    pub topics: Topics,
    pub poll_timeout: Duration,
    /// `[mqtt] max_backfill`: the longest range a `backfill` may ask for.
    pub max_backfill: Duration,
    /// The HMAC key, when commands must be signed.
    pub key: Option<Vec<u8>>,
    pub max_payload: usize,
    pub signature_window: Duration,
    /// `[mqtt] remote_config` of the running config: whether `configure` may run.
    pub remote_config: bool,
    /// The agent's [`super::remote::Keeper`], where there is a config file to keep.
    pub config_requests: Option<mpsc::Sender<ConfigRequest>>,
    /// Replies to publish first (`applied`, `reverted`: recorded already).
    pub notices: Vec<Vec<u8>>,
}

/// Runs commands; cheap to clone (one clone per poll waiter).
#[derive(Clone)]
pub struct Handler<M: Mqtt> {
    cx: Arc<Context>,
    known: Arc<HashSet<String>>,
    mqtt: M,
    tasks: Tasks,
    stop: CancellationToken,
}

impl<M: Mqtt> Handler<M> {
    pub fn new(cx: Arc<Context>, mqtt: M, tasks: Tasks, stop: CancellationToken) -> Self {
        let known = Arc::new(cx.meters.iter().cloned().collect());
        Handler {
            cx,
            known,
            mqtt,
            tasks,
            stop,
        }
    }

    pub fn context(&self) -> &Context {
        &self.cx
    }

    pub fn mqtt(&self) -> &M {
        &self.mqtt
    }

    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// One delivered command, start to acknowledgement.
    pub async fn handle(&self, delivery: Delivery) {
        let rules = Rules {
            max_payload: self.cx.max_payload,
            max_config_payload: self.cx.remote_config.then_some(MAX_CONFIG_PAYLOAD),
            meters: &self.known,
            key: self.cx.key.as_deref(),
            now_s: self.cx.clock.now().as_second(),
            window_s: self.cx.signature_window.as_secs() as i64,
            max_backfill: self.cx.max_backfill,
        };
        match command::parse(&delivery.payload, &rules) {
            Err(Rejection { request_id, reason }) => {
                tracing::warn!(request_id = ?request_id, reason = %reason, "Command rejected");
                self.reply(&Rejected::new(request_id.as_deref(), reason))
                    .await;
            }
            Ok(req) => self.accept(req).await,
        }
        // Recorded (durably) or answered: only now may the broker forget it.
        if let Err(e) = self.mqtt.ack(&delivery).await {
            tracing::warn!(error = %e, "Could not acknowledge a command");
        }
    }

    async fn accept(&self, req: Request) {
        let Request {
            request_id,
            command,
        } = req;
        // Refused before it is recorded: the same request may come again once allowed.
        let refused = match &command {
            Command::Configure { .. } if !self.cx.remote_config => Some(
                "remote configuration is off on this gateway: a local operator must set `[mqtt] remote_config = true` in its config file",
            ),
            Command::Configure { .. } | Command::Confirm { .. } | Command::GetConfig
                if self.cx.config_requests.is_none() =>
            {
                Some(
                    "remote configuration is unavailable on this agent (it runs without a config file, as the demo does, or its remote-config state could not be read: see its log)",
                )
            }
            _ => None,
        };
        if let Some(why) = refused {
            tracing::warn!(request_id = %request_id, reason = why, "Command rejected");
            return self.reply(&Rejected::new(Some(&request_id), why)).await;
        }
        let record = CommandRecord {
            request_id: request_id.clone(),
            accepted_ms: self.cx.clock.now_ms(),
            command: serde_json::to_string(&command).unwrap_or_default(),
            outcome: None,
        };
        match self.blocking(move |s| s.accept_command(&record)).await {
            Ok(None) => {}
            Ok(Some(kept)) => return self.duplicate(kept).await,
            Err(e) => {
                tracing::warn!(request_id = %request_id, error = %e, "Command not recorded");
                let why = "the gateway cannot record commands now (store unavailable); try again";
                return self.reply(&Rejected::new(Some(&request_id), why)).await;
            }
        }
        tracing::info!(request_id = %request_id, command = command.name(), "Command accepted");
        self.run(request_id, command, true).await;
    }

    /// Finishes the commands a stop or crash interrupted (recorded, never done).
    pub async fn resume(&self) {
        let now = self.cx.clock.now_ms();
        let open = match self.blocking(move |s| s.unfinished_commands(now)).await {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the accepted commands: those a restart interrupted are not finished");
                return;
            }
        };
        for record in open {
            match serde_json::from_str::<Command>(&record.command) {
                Ok(Command::Configure { .. }) => {
                    // The keeper records every configure it wrote (applied or reverted): one
                    // still open was interrupted before, and nothing changed.
                    tracing::warn!(request_id = %record.request_id, "A configure interrupted by a restart before it was written: not applied");
                    let id = record.request_id.clone();
                    let _ = self.blocking(move |s| s.forget_command(&id)).await;
                    let why = "interrupted by a restart before it was applied; nothing changed: send it again";
                    self.reply(&Rejected::new(Some(&record.request_id), why))
                        .await;
                }
                Ok(command) => {
                    tracing::info!(request_id = %record.request_id, command = command.name(), "Finishing a command accepted before the restart");
                    self.run(record.request_id, command, false).await;
                }
                Err(e) => {
                    tracing::warn!(request_id = %record.request_id, error = %e, "An accepted command cannot be read back; dropped");
                    let id = record.request_id;
                    let _ = self.blocking(move |s| s.forget_command(&id)).await;
                }
            }
        }
    }

    /// The same `request_id` again: the original outcome, not a second run.
    async fn duplicate(&self, kept: CommandRecord) {
        tracing::info!(request_id = %kept.request_id, done = kept.outcome.is_some(), "Duplicate command not run again");
        match kept.outcome {
            Some(outcome) => {
                let mut again: serde_json::Value =
                    serde_json::from_str(&outcome).unwrap_or_default();
                if let Some(map) = again.as_object_mut() {
                    map.insert("duplicate".into(), true.into());
                }
                self.publish(to_json(&again)).await;
            }
            None => {
                let command = serde_json::from_str::<Command>(&kept.command).ok();
                let meters = match &command {
                    Some(Command::Poll { meters, .. }) => {
                        meters.clone().unwrap_or_else(|| self.cx.meters.clone())
                    }
                    Some(Command::Backfill { meters, .. }) => meters.clone(),
                    _ => Vec::new(),
                };
                let accepted_at = Timestamp::from_millisecond(kept.accepted_ms)
                    .ok()
                    .map(|t| t.to_string());
                self.reply(&Accepted {
                    request_id: kept.request_id,
                    status: Status::Accepted,
                    command: command.as_ref().map_or("unknown", Command::name),
                    meters,
                    duplicate: true,
                    accepted_at,
                })
                .await;
            }
        }
    }

    /// Runs a recorded command. `fresh`: just accepted (else resumed after a restart, when
    /// `accepted` was sent long ago and the centre waits for `done`).
    async fn run(&self, request_id: String, command: Command, fresh: bool) {
        let outcome = match command {
            Command::Ping => Outcome::Ping {
                result: Pong {
                    pong: true,
                    gateway: self.cx.gateway.clone(),
                    version: env!("CARGO_PKG_VERSION"),
                    uptime_s: self.cx.clock.now().as_second() - self.cx.started_at.as_second(),
                },
            },
            Command::Inspect => Outcome::Inspect {
                result: Box::new(self.inspect().await),
            },
            Command::Cancel { target } => {
                let mut cancelled = 0;
                for bus in self.cx.router.buses() {
                    cancelled += bus.cancel(&target).await.len();
                }
                Outcome::Cancel {
                    result: Cancelled { target, cancelled },
                }
            }
            Command::Poll { meters, series } => {
                return self.start_poll(request_id, meters, series, fresh).await;
            }
            Command::Backfill {
                meters,
                profile,
                from_ms,
                to_ms,
            } => {
                let range = (
                    Timestamp::from_millisecond(from_ms).unwrap_or(Timestamp::UNIX_EPOCH),
                    Timestamp::from_millisecond(to_ms).unwrap_or(Timestamp::UNIX_EPOCH),
                );
                let job = Backfill { profile, range };
                return self
                    .start(request_id, Some(meters), None, Some(job), fresh)
                    .await;
            }
            Command::GetConfig => match self.ask(|reply| ConfigRequest::Get { reply }).await {
                Some(doc) => Outcome::GetConfig {
                    result: Box::new(doc),
                },
                None => return,
            },
            Command::Confirm { target } => {
                match self
                    .ask(|reply| ConfigRequest::Confirm { target, reply })
                    .await
                {
                    Some(Ok(confirmed)) => Outcome::Confirm { result: confirmed },
                    Some(Err(why)) => {
                        return self
                            .finish_json(
                                &request_id,
                                to_json(&Rejected::new(Some(&request_id), why)),
                            )
                            .await;
                    }
                    None => return,
                }
            }
            Command::Configure {
                config,
                base,
                confirm_within_ms,
            } => {
                let id = request_id.clone();
                let answer = self
                    .ask(|reply| ConfigRequest::Configure {
                        request_id: id,
                        config,
                        base,
                        confirm_within: Duration::from_millis(confirm_within_ms),
                        reply,
                    })
                    .await;
                match answer {
                    // Written; the agent reloads now, and the new configuration's control
                    // says `applied`.
                    Some(Ok(sha256)) => {
                        tracing::info!(request_id = %request_id, sha256 = %sha256, "Configure accepted: reloading");
                        self.reply(&Accepted {
                            request_id,
                            status: Status::Accepted,
                            command: "configure",
                            meters: Vec::new(),
                            duplicate: false,
                            accepted_at: None,
                        })
                        .await;
                    }
                    Some(Err(rejected)) => {
                        tracing::warn!(request_id = %request_id, reason = %rejected.reason, "Configure rejected");
                        self.finish_json(&request_id, to_json(&rejected)).await;
                    }
                    None => {}
                }
                return;
            }
        };
        self.finish(Done::new(&request_id, outcome)).await;
    }

    /// Asks the agent's config keeper; `None` if control stops first or the keeper is gone
    /// (the command stays accepted: the next start settles it).
    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> ConfigRequest) -> Option<T> {
        let tx = self.cx.config_requests.as_ref()?;
        let (reply, rx) = oneshot::channel();
        tokio::select! {
            sent = tx.send(request(reply)) => sent.ok()?,
            () = self.stop.cancelled() => return None,
        }
        // The answer first: the main loop answers an accepted configure and stops this
        // generation right away, so both are often ready at once, and the answer must still
        // be given (`accepted`, the acknowledgement to the broker).
        tokio::select! {
            biased;
            answer = rx => answer.ok(),
            () = self.stop.cancelled() => None,
        }
    }

    /// Publishes the replies the agent recorded for this generation (`applied`, `reverted`).
    pub async fn announce(&self) {
        for notice in &self.cx.notices {
            self.publish(notice.clone()).await;
        }
    }

    async fn start_poll(
        &self,
        request_id: String,
        meters: Option<Vec<String>>,
        series: Option<Vec<crate::reading::Obis>>,
        fresh: bool,
    ) {
        self.start(request_id, meters, series, None, fresh).await
    }

    /// Queues a poll's (or a backfill's) reads of each meter, says `accepted`, and leaves a
    /// waiter to say `done`.
    async fn start(
        &self,
        request_id: String,
        meters: Option<Vec<String>>,
        series: Option<Vec<crate::reading::Obis>>,
        backfill: Option<Backfill>,
        fresh: bool,
    ) {
        let mut waits = Vec::new();
        let mut missed = Vec::new();
        let command = if backfill.is_some() {
            "backfill"
        } else {
            "poll"
        };
        for meter in meters.unwrap_or_else(|| self.cx.meters.clone()) {
            let (tx, rx) = oneshot::channel();
            let mut req = PollRequest::new(meter.clone(), Cadence::OnDemand);
            req.request_id = Some(request_id.clone());
            req.series = series.clone();
            req.reply = Some(tx);
            if let Some(b) = &backfill {
                let mut job = crate::bus::rows::RowsJob::new(b.profile);
                job.backfill = Some(b.range);
                req.rows = Some(Box::new(job));
            }
            match self.cx.router.try_poll(req) {
                Ok(()) => waits.push((meter, rx)),
                Err(RouteError::Busy(_)) => missed.push(MeterResult::failed(
                    &meter,
                    "not queued: the bus queue is full",
                )),
                // Only after a restart with another config.
                Err(RouteError::UnknownMeter(_)) => missed.push(MeterResult::failed(
                    &meter,
                    "not queued: no such meter in the configuration",
                )),
            }
        }
        if waits.is_empty() && fresh {
            // Nothing runs: forget it, so the centre may send it again as it is.
            let id = request_id.clone();
            if let Err(e) = self.blocking(move |s| s.forget_command(&id)).await {
                tracing::warn!(request_id = %request_id, error = %e, "Could not forget a command not run");
            }
            let why = "busy: the bus queues are full, try again later";
            return self.reply(&Rejected::new(Some(&request_id), why)).await;
        }
        if fresh {
            self.reply(&Accepted {
                request_id: request_id.clone(),
                status: Status::Accepted,
                command,
                meters: waits.iter().map(|(m, _)| m.clone()).collect(),
                duplicate: false,
                accepted_at: None,
            })
            .await;
        }
        let this = self.clone();
        // A backfill reads days of rows chunk by chunk, behind the scheduled reads: it may
        // take far longer than a poll.
        let timeout = if backfill.is_some() {
            self.cx.poll_timeout.max(BACKFILL_TIMEOUT)
        } else {
            self.cx.poll_timeout
        };
        self.tasks.spawn("poll waiter", async move {
            if let Some(results) = this.wait_poll(waits, missed, timeout).await {
                let outcome = if backfill.is_some() {
                    Outcome::Backfill { results }
                } else {
                    Outcome::Poll { results }
                };
                this.finish(Done::new(&request_id, outcome)).await;
            }
        });
    }

    /// Waits for every meter of a poll, at most `poll_timeout`; `None` if control stops
    /// first (the command stays accepted, to run after the restart).
    async fn wait_poll(
        &self,
        waits: Vec<(String, oneshot::Receiver<PollReport>)>,
        missed: Vec<MeterResult>,
        timeout: Duration,
    ) -> Option<Vec<MeterResult>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut results = Vec::new();
        for (meter, rx) in waits {
            let answer = tokio::select! {
                a = tokio::time::timeout_at(deadline, rx) => a,
                () = self.stop.cancelled() => return None,
            };
            results.push(match answer {
                Ok(Ok(report)) => meter_result(&report),
                // The bus dropped it: a `cancel`, or the bus stopping (and then so do we).
                Ok(Err(_)) if self.stop.is_cancelled() => return None,
                Ok(Err(_)) => MeterResult::failed(&meter, "cancelled"),
                Err(_) => MeterResult::failed(
                    &meter,
                    format!("no result within {}", humantime::format_duration(timeout)),
                ),
            });
        }
        results.extend(missed);
        Some(results)
    }

    /// Writes the `done` into the command's record, then sends it.
    async fn finish(&self, done: Done) {
        self.finish_json(&done.request_id, to_json(&done)).await
    }

    /// Writes a final reply into the command's record, then sends it.
    async fn finish_json(&self, request_id: &str, json: Vec<u8>) {
        let (id, text) = (
            request_id.to_owned(),
            String::from_utf8_lossy(&json).into_owned(),
        );
        if let Err(e) = self.blocking(move |s| s.finish_command(&id, &text)).await {
            // Sent anyway: the centre gets its answer; a restart would run it once more.
            tracing::warn!(request_id = %request_id, error = %e, "Could not record a command as done");
        }
        self.publish(json).await;
    }

    async fn reply(&self, reply: &impl serde::Serialize) {
        self.publish(to_json(reply)).await;
    }

    async fn publish(&self, json: Vec<u8>) {
        if let Err(e) = self
            .mqtt
            .publish(&self.cx.topics.replies, false, json)
            .await
        {
            tracing::warn!(error = %e, "Could not queue a reply");
        }
    }

    async fn inspect(&self) -> Inspection {
        let cx = &self.cx;
        let mut buses = Vec::new();
        for bus in cx.router.buses() {
            if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(5), bus.inspect()).await {
                buses.push(s);
            }
        }
        let (stats, meter_states, profiles) = self
            .blocking(|s| {
                Ok((
                    s.stats().unwrap_or_default(),
                    s.meters().unwrap_or_default(),
                    s.profiles().unwrap_or_default(),
                ))
            })
            .await
            .unwrap_or_default();
        let drain = cx.drain.borrow().clone();
        let report = StatusReport::build(
            &cx.gateway,
            &stats,
            &meter_states,
            &profiles,
            &cx.meters,
            Some(&drain),
            cx.clock.now_ms(),
        );
        let next_reads: BTreeMap<String, String> =
            crate::beat::next_fires(&cx.beat, &cx.tz, cx.clock.now())
                .into_iter()
                .map(|(c, _, fire)| (c.to_string(), Stamp::in_zone(fire, &cx.tz).rfc3339()))
                .collect();
        Inspection {
            gateway: cx.gateway.clone(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: cx.started_at.to_string(),
            buses,
            next_reads,
            store: report.buffer,
            drain: report.drain,
            meters: report.meters,
        }
    }

    /// The retained `online` document, or `None` if the store does not answer.
    pub async fn online(&self) -> Option<StatusDoc> {
        let stats = self.blocking(|s| s.stats()).await.ok()?;
        let ts = |ms: Option<i64>| {
            ms.and_then(|m| Timestamp::from_millisecond(m).ok())
                .map(|t| t.to_string())
        };
        Some(StatusDoc {
            state: State::Online,
            gateway: self.cx.gateway.clone(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: Some(self.cx.started_at.to_string()),
            at: Some(self.cx.clock.now().to_string()),
            reason: None,
            buffer: Some(Buffer {
                readings: stats.readings(),
                events: stats.events.count,
                bytes: stats.bytes(),
                oldest_unsent: ts(stats.oldest_ms),
                evictions: stats.evicted,
            }),
            last_drain: Some(ts(stats.last_drain_ms)),
            broker_connected: Some(self.cx.drain.borrow().connected),
        })
    }

    pub fn offline(&self, reason: &'static str) -> StatusDoc {
        StatusDoc::offline(
            &self.cx.gateway,
            reason,
            Some(self.cx.clock.now().to_string()),
        )
    }

    /// A store call on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.cx.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())))
    }
}

/// What a `backfill` reads of each meter.
struct Backfill {
    profile: crate::reading::Obis,
    range: (Timestamp, Timestamp),
}

/// The longest a `backfill`'s `done` waits for its meters (at least `poll_timeout`).
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(3600);

/// The one place that reads a [`PollReport`]'s values and errors.
fn meter_result(report: &PollReport) -> MeterResult {
    if let Some(t) = &report.rows {
        return MeterResult {
            meter: report.meter.clone(),
            ok: report.errors.is_empty(),
            values: None,
            stored: Some(report.stored),
            error: (!report.errors.is_empty()).then(|| {
                let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
                errors.join("; ")
            }),
            rows: Some(RowsResult {
                rows: t.rows,
                readings: t.readings,
                first: t.first.map(|s| s.rfc3339()),
                last: t.last.map(|s| s.rfc3339()),
                gaps: t
                    .gaps
                    .iter()
                    .map(|(a, b)| [a.rfc3339(), b.rfc3339()])
                    .collect(),
            }),
        };
    }
    let values = report
        .readings
        .iter()
        .map(|r| Value {
            series: r.series.to_string(),
            value: r.value.as_str().to_owned(),
            unit: r.unit.clone(),
            timestamp: r.timestamp.rfc3339(),
        })
        .collect();
    MeterResult {
        meter: report.meter.clone(),
        ok: report.errors.is_empty(),
        values: Some(values),
        stored: Some(report.stored),
        error: (!report.errors.is_empty()).then(|| {
            let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
            errors.join("; ")
        }),
        rows: None,
    }
}
