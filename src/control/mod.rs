//! Central control over MQTT: on-demand polls, inspect, ping, cancel; a retained status.
//!
//! Topics, under `{topic_prefix}/{gateway}/`:
//!
//! * `commands` — subscribed at QoS 1 on a persistent session (fixed client id, clean
//!   session off), so commands sent while the uplink is down arrive when it is back. The
//!   subscription is renewed on every connection the broker did not keep a session for.
//! * `replies` — QoS 1: `accepted` at once, then `done` (with per-meter results for a poll),
//!   or `rejected` with a reason. Every reply carries the command's `request_id`.
//! * `status` — retained: `online` (version, start, buffer depth, last drain) on connect and
//!   every `status_interval`; `offline` as the last will, and on a clean stop.
//!
//! A command is acknowledged to the broker (manual acks) only once it is accepted: recorded
//! in the store and its polls queued. Dying before that, the broker delivers it again;
//! arriving twice (same `request_id`, across restarts too), it runs once.
//!
//! The MQTT event loop has its own task and is never blocked by our publishes: they go
//! through rumqttc's bounded request channel from other tasks; status updates that find it
//! full are dropped (the next one comes), replies wait. Reconnection uses
//! [`crate::backoff`], since rumqttc itself retries in a tight loop.

pub mod command;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, Publish, QoS, Transport};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::beat::BeatConfig;
use crate::bus::{PollReport, PollRequest, RouteError, Router};
use crate::clock::SharedClock;
use crate::drain::DrainStatus;
use crate::primitives::{ByteSize, HumanDuration, Problems, read_secret_file};
use crate::reading::{Cadence, Stamp};
use crate::status::StatusReport;
use crate::store::Store;
use command::{Command, Rejection, Request, Rules};

/// The largest MQTT packet read at all; commands over `max_payload` are rejected with a
/// reply, commands over this cannot be read (and the broker keeps redelivering them).
const HARD_PACKET_LIMIT: usize = 4 << 20;

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Fixed, so the broker keeps the session: `amr-edge-{gateway}` by default.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// The password, in a file readable by the agent only.
    pub password_file: Option<PathBuf>,
    /// PEM CA for `mqtts://` to a private CA (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that authenticate gateways by certificate.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// When set, only commands signed with this key run (see [`command`]).
    pub hmac_key_file: Option<PathBuf>,
    #[serde(default = "default_window")]
    pub signature_window: HumanDuration,
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    #[serde(default = "default_status_interval")]
    pub status_interval: HumanDuration,
    /// Commands waiting to be handled; more are rejected as busy.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How long a poll's `done` waits for slow meters before reporting them as timed out.
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout: HumanDuration,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

fn default_prefix() -> String {
    "utilitarian/gateways".into()
}
fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_payload() -> ByteSize {
    ByteSize(16 << 10)
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_status_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_pending() -> usize {
    16
}
fn default_poll_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// Host, port and whether TLS, from `mqtt.url`.
fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err("must start with mqtt:// or mqtts://".into());
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err("put credentials in `username` and `password_file`, not in the URL".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err("no host".into());
    }
    Ok((host.to_owned(), port, tls))
}

impl MqttConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if let Err(e) = parse_url(&self.url) {
            p.push(format!("{at}.url"), format!("`{}` {e}", self.url));
        }
        if self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            p.push(
                format!("{at}.topic_prefix"),
                "must not contain wildcards (+, #) or end with /",
            );
        }
        if self.password_file.is_some() && self.username.is_none() {
            p.push(format!("{at}.password_file"), "needs `username` too");
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            p.push(
                format!("{at}.client_cert_file"),
                "set both `client_cert_file` and `client_key_file`, or neither",
            );
        }
        if !(1..=1024).contains(&self.max_pending) {
            p.push(format!("{at}.max_pending"), "must be 1-1024");
        }
        if self.max_payload.0 < 256 || self.max_payload.0 > 1 << 20 {
            p.push(format!("{at}.max_payload"), "must be between 256B and 1MiB");
        }
        if self.keep_alive.0 < Duration::from_secs(5) {
            p.push(format!("{at}.keep_alive"), "must be at least 5s");
        }
    }

    pub fn topics(&self, gateway: &str) -> Topics {
        let base = format!("{}/{gateway}", self.topic_prefix);
        Topics {
            commands: format!("{base}/commands"),
            replies: format!("{base}/replies"),
            status: format!("{base}/status"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Topics {
    pub commands: String,
    pub replies: String,
    pub status: String,
}

/// Why the control cannot start (the config passed validation, but a file did not).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The long-lived MQTT control task.
pub struct Control {
    config: MqttConfig,
    gateway: String,
    topics: Topics,
    options: MqttOptions,
    key: Option<Vec<u8>>,
    handler: Arc<Handler>,
}

/// Everything a command needs; shared by the command task and the waiters it spawns.
struct Handler {
    router: Router,
    store: Arc<dyn Store>,
    drain: watch::Receiver<DrainStatus>,
    clock: SharedClock,
    tz: TimeZone,
    beat: BeatConfig,
    meters: Vec<String>,
    known: HashSet<String>,
    gateway: String,
    started_at: Timestamp,
    topics: Topics,
    poll_timeout: Duration,
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: MqttConfig,
        gateway: &str,
        router: Router,
        store: Arc<dyn Store>,
        drain: watch::Receiver<DrainStatus>,
        clock: SharedClock,
        tz: TimeZone,
        beat: BeatConfig,
        meters: Vec<String>,
        started_at: Timestamp,
    ) -> Result<Control, ControlError> {
        let (host, port, tls) = parse_url(&config.url).map_err(ControlError::Tls)?;
        let topics = config.topics(gateway);
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("amr-edge-{gateway}"));
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_clean_session(false)
            .set_keep_alive(config.keep_alive.0)
            .set_manual_acks(true)
            // rumqttc drops the connection on a packet over its limit, and the broker would
            // deliver that command again on every reconnect: keep the hard limit well above
            // `max_payload`, which rejects oversized commands politely.
            .set_max_packet_size(HARD_PACKET_LIMIT, 256 << 10)
            .set_last_will(LastWill::new(
                &topics.status,
                offline_doc(gateway, "connection lost", None).to_string(),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &config.username {
            let password = match &config.password_file {
                Some(path) => read_secret_file(path)
                    .map_err(|source| ControlError::File {
                        what: "mqtt.password_file",
                        path: path.clone(),
                        source,
                    })?
                    .expose()
                    .to_owned(),
                None => String::new(),
            };
            options.set_credentials(user.clone(), password);
        }
        if tls {
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(&config)?)),
            ));
        }
        let key = match &config.hmac_key_file {
            Some(path) => Some(
                read_secret_file(path)
                    .map_err(|source| ControlError::File {
                        what: "mqtt.hmac_key_file",
                        path: path.clone(),
                        source,
                    })?
                    .expose()
                    .as_bytes()
                    .to_vec(),
            ),
            None => None,
        };
        let known = meters.iter().cloned().collect();
        let handler = Arc::new(Handler {
            router,
            store,
            drain,
            clock,
            tz,
            beat,
            meters,
            known,
            gateway: gateway.to_owned(),
            started_at,
            topics: topics.clone(),
            poll_timeout: config.poll_timeout.0,
        });
        Ok(Control {
            config,
            gateway: gateway.to_owned(),
            topics,
            options,
            key,
            handler,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 256);
        let (commands, inbox) = mpsc::channel::<Publish>(self.config.max_pending);
        // Commands turned away (a flood) are answered by their own task, so that answering
        // never holds up the event loop; past this many, they are only acknowledged.
        let (turned_away, busy_inbox) = mpsc::channel::<Publish>(256);
        let status_now = Arc::new(Notify::new());
        let tasks = CancellationToken::new();
        let rules_key = self.key.clone();
        let max_payload = self.config.max_payload.0 as usize;
        let window = self.config.signature_window.0.as_secs() as i64;
        tokio::spawn(self.handler.clone().commands(
            client.clone(),
            inbox,
            rules_key,
            max_payload,
            window,
            tasks.clone(),
        ));
        tokio::spawn(
            self.handler
                .clone()
                .turn_away(client.clone(), busy_inbox, tasks.clone()),
        );
        tokio::spawn(self.handler.clone().status(
            client.clone(),
            self.config.status_interval.0,
            status_now.clone(),
            tasks.clone(),
        ));
        let mut backoff = Backoff::new(Duration::from_secs(1), self.config.max_backoff.0);
        let mut last_error: Option<String> = None;
        loop {
            let event = tokio::select! {
                e = eventloop.poll() => e,
                () = shutdown.cancelled() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    last_error = None;
                    tracing::info!(
                        session_present = ack.session_present,
                        "Connected to the MQTT broker"
                    );
                    // Renew the subscription whenever the broker kept no session for us.
                    // (try_: this task must never wait on the channel it drains.)
                    if !ack.session_present {
                        if let Err(e) =
                            client.try_subscribe(&self.topics.commands, QoS::AtLeastOnce)
                        {
                            tracing::warn!(error = %e, "Could not subscribe to commands");
                        }
                    }
                    status_now.notify_one();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    tracing::debug!(topic = %self.topics.commands, "Subscribed to commands");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic != self.topics.commands {
                        let _ = client.try_ack(&p);
                        continue;
                    }
                    if let Err(mpsc::error::TrySendError::Full(p)) = commands.try_send(p) {
                        // A flood: the extra commands are answered `busy` and acknowledged, so
                        // they are not redelivered.
                        if let Err(mpsc::error::TrySendError::Full(p)) = turned_away.try_send(p) {
                            let _ = client.try_ack(&p);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // A TLS refusal is described without the timestamps rustls puts in some
                    // of its messages, so it is logged once, not on every retry.
                    let refusal = crate::tls::rejection(&e);
                    let msg = match &refusal {
                        Some(why) => format!("TLS: {why}"),
                        None => e.to_string(),
                    };
                    let delay = backoff.next_delay();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        if refusal.is_some() {
                            tracing::error!(error = %msg, retry_in = ?delay, "TLS with the MQTT broker failed (see mqtt.ca_file, client_cert_file); commands are not received until this is fixed");
                        } else if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)) {
                            tracing::error!(error = %msg, retry_in = ?delay, "The MQTT broker refuses this gateway; commands are not received until this is fixed");
                        } else {
                            tracing::warn!(error = %msg, retry_in = ?delay, "MQTT broker not available; polling and buffering go on");
                        }
                        last_error = Some(msg);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        tasks.cancel();
        // A clean stop: say so (retained), disconnect, and let the event loop send both.
        let doc = offline_doc(&self.gateway, "shutdown", Some(self.handler.clock.now()));
        let _ = client.try_publish(&self.topics.status, QoS::AtLeastOnce, true, doc.to_string());
        let _ = client.try_disconnect();
        let flush = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), flush).await;
    }
}

/// Trust roots and client identity for `mqtts://`.
fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, ControlError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| ControlError::File {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(ca) => {
            let pem = file("mqtt.ca_file", ca)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ControlError::Tls(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ControlError::Tls(format!("{}: {e}", ca.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&file("mqtt.client_cert_file", cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| ControlError::Tls(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_slice(&file("mqtt.client_key_file", key)?)
                .map_err(|e| ControlError::Tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ControlError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn request_id_of(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(payload)
        .ok()?
        .get("request_id")?
        .as_str()
        .map(str::to_owned)
}

fn rejected(request_id: Option<&str>, reason: &str) -> Value {
    json!({"request_id": request_id, "status": "rejected", "reason": reason})
}

fn offline_doc(gateway: &str, reason: &str, at: Option<Timestamp>) -> Value {
    json!({
        "state": "offline",
        "gateway": gateway,
        "version": env!("CARGO_PKG_VERSION"),
        "reason": reason,
        "at": at.map(|t| t.to_string()),
    })
}

impl Handler {
    /// Takes commands one at a time, in arrival order.
    async fn commands(
        self: Arc<Self>,
        client: AsyncClient,
        mut inbox: mpsc::Receiver<Publish>,
        key: Option<Vec<u8>>,
        max_payload: usize,
        window_s: i64,
        stop: CancellationToken,
    ) {
        loop {
            let publish = tokio::select! {
                p = inbox.recv() => match p { Some(p) => p, None => return },
                () = stop.cancelled() => return,
            };
            let rules = Rules {
                max_payload,
                meters: &self.known,
                key: key.as_deref(),
                now_s: self.clock.now().as_second(),
                window_s,
            };
            let reply = match command::parse(&publish.payload, &rules) {
                Err(Rejection { request_id, reason }) => {
                    tracing::warn!(request_id = ?request_id, reason = %reason, "Command rejected");
                    Some(rejected(request_id.as_deref(), &reason))
                }
                Ok(req) => self.accept(&client, req).await,
            };
            if let Some(reply) = reply {
                self.reply(&client, reply).await;
            }
            // Accepted (or answered): only now may the broker forget it.
            if let Err(e) = client.ack(&publish).await {
                tracing::warn!(error = %e, "Could not acknowledge a command");
            }
        }
    }

    /// Answers `busy` to the commands a flood brought beyond `max_pending`.
    async fn turn_away(
        self: Arc<Self>,
        client: AsyncClient,
        mut inbox: mpsc::Receiver<Publish>,
        stop: CancellationToken,
    ) {
        loop {
            let p = tokio::select! {
                p = inbox.recv() => match p { Some(p) => p, None => return },
                () = stop.cancelled() => return,
            };
            let id = request_id_of(&p.payload);
            tracing::warn!(request_id = ?id, "Command rejected: too many pending");
            let reply = rejected(
                id.as_deref(),
                "busy: too many commands pending, try again later",
            );
            self.reply(&client, reply).await;
            let _ = client.ack(&p).await;
        }
    }

    async fn reply(&self, client: &AsyncClient, reply: Value) {
        if let Err(e) = client
            .publish(
                &self.topics.replies,
                QoS::AtLeastOnce,
                false,
                reply.to_string(),
            )
            .await
        {
            tracing::warn!(error = %e, "Could not queue a reply");
        }
    }

    /// Runs a valid command; returns its immediate reply.
    async fn accept(self: &Arc<Self>, client: &AsyncClient, req: Request) -> Option<Value> {
        let Request {
            request_id,
            command,
        } = req;
        let store = self.store.clone();
        let id = request_id.clone();
        match tokio::task::spawn_blocking(move || store.first_time(&id)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tracing::info!(request_id = %request_id, "Duplicate command not run again");
                return Some(rejected(
                    Some(&request_id),
                    "duplicate request_id: this command was already accepted",
                ));
            }
            _ => {
                return Some(rejected(
                    Some(&request_id),
                    "the gateway cannot record commands now (store unavailable); try again",
                ));
            }
        }
        tracing::info!(request_id = %request_id, command = command.name(), "Command accepted");
        match command {
            Command::Ping => Some(json!({
                "request_id": request_id,
                "status": "done",
                "command": "ping",
                "result": {
                    "pong": true,
                    "gateway": self.gateway,
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_s": self.clock.now().as_second() - self.started_at.as_second(),
                },
            })),
            Command::Inspect => Some(json!({
                "request_id": request_id,
                "status": "done",
                "command": "inspect",
                "result": self.inspect().await,
            })),
            Command::Cancel { target } => {
                let mut n = 0;
                for bus in self.router.buses() {
                    n += bus.cancel(&target).await.len();
                }
                Some(json!({
                    "request_id": request_id,
                    "status": "done",
                    "command": "cancel",
                    "result": {"target": target, "cancelled": n},
                }))
            }
            Command::Poll { meters, series } => {
                let targets = meters.unwrap_or_else(|| self.meters.clone());
                let mut waits = Vec::new();
                let mut busy = Vec::new();
                for m in targets {
                    let (tx, rx) = oneshot::channel();
                    let mut req = PollRequest::new(m.clone(), Cadence::OnDemand);
                    req.request_id = Some(request_id.clone());
                    req.series = series.clone();
                    req.reply = Some(tx);
                    match self.router.try_poll(req) {
                        Ok(()) => waits.push((m, rx)),
                        Err(RouteError::Busy(_)) => busy.push(m),
                        Err(RouteError::UnknownMeter(_)) => busy.push(m),
                    }
                }
                if waits.is_empty() {
                    return Some(rejected(
                        Some(&request_id),
                        "busy: the bus queues are full, try again later",
                    ));
                }
                let accepted = json!({
                    "request_id": request_id,
                    "status": "accepted",
                    "command": "poll",
                    "meters": waits.iter().map(|(m, _)| m).collect::<Vec<_>>(),
                });
                self.reply(client, accepted).await;
                let this = self.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let done = this.finish_poll(&request_id, waits, busy).await;
                    this.reply(&client, done).await;
                });
                None
            }
        }
    }

    /// Waits for every meter of a poll and builds its `done`.
    async fn finish_poll(
        &self,
        request_id: &str,
        waits: Vec<(String, oneshot::Receiver<PollReport>)>,
        busy: Vec<String>,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + self.poll_timeout;
        let mut results = Vec::new();
        for (meter, rx) in waits {
            let r = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(report)) => meter_result(&report),
                Ok(Err(_)) => json!({"meter": meter, "ok": false, "error": "cancelled"}),
                Err(_) => {
                    json!({"meter": meter, "ok": false, "error": format!("no result within {}", humantime::format_duration(self.poll_timeout))})
                }
            };
            results.push(r);
        }
        for meter in busy {
            results.push(
                json!({"meter": meter, "ok": false, "error": "not queued: the bus queue is full"}),
            );
        }
        json!({
            "request_id": request_id,
            "status": "done",
            "command": "poll",
            "results": results,
        })
    }

    async fn inspect(&self) -> Value {
        let mut buses = Vec::new();
        for bus in self.router.buses() {
            if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(5), bus.inspect()).await {
                buses.push(s);
            }
        }
        let store = self.store.clone();
        let (stats, meter_states) = tokio::task::spawn_blocking(move || {
            (
                store.stats().unwrap_or_default(),
                store.meters().unwrap_or_default(),
            )
        })
        .await
        .unwrap_or_default();
        let drain = self.drain.borrow().clone();
        let report = StatusReport::build(
            &self.gateway,
            &stats,
            &meter_states,
            &self.meters,
            Some(&drain),
            self.clock.now_ms(),
        );
        let next: serde_json::Map<String, Value> =
            crate::beat::next_fires(&self.beat, &self.tz, self.clock.now())
                .into_iter()
                .map(|(c, _, fire)| {
                    (
                        c.to_string(),
                        json!(Stamp::in_zone(fire, &self.tz).rfc3339()),
                    )
                })
                .collect();
        json!({
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": self.started_at.to_string(),
            "buses": buses,
            "next_reads": next,
            "store": report.buffer,
            "drain": report.drain,
            "meters": report.meters,
        })
    }

    /// Publishes the retained `online` status now and then.
    async fn status(
        self: Arc<Self>,
        client: AsyncClient,
        every: Duration,
        now: Arc<Notify>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = now.notified() => {}
                () = stop.cancelled() => return,
            }
            let store = self.store.clone();
            let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || store.stats()).await else {
                continue;
            };
            let drain = self.drain.borrow().clone();
            let doc = json!({
                "state": "online",
                "gateway": self.gateway,
                "version": env!("CARGO_PKG_VERSION"),
                "started_at": self.started_at.to_string(),
                "at": self.clock.now().to_string(),
                "buffer": {
                    "readings": stats.readings(),
                    "events": stats.events.count,
                    "bytes": stats.bytes(),
                    "oldest_unsent": stats.oldest_ms.and_then(|m| Timestamp::from_millisecond(m).ok()).map(|t| t.to_string()),
                    "evictions": stats.evicted,
                },
                "last_drain": stats.last_drain_ms.and_then(|m| Timestamp::from_millisecond(m).ok()).map(|t| t.to_string()),
                "broker_connected": drain.connected,
            });
            // Never wait here: a full channel means we are offline; the next tick will do.
            let _ =
                client.try_publish(&self.topics.status, QoS::AtLeastOnce, true, doc.to_string());
        }
    }
}

fn meter_result(report: &PollReport) -> Value {
    let values: Vec<Value> = report
        .readings
        .iter()
        .map(|r| {
            json!({
                "series": r.series.to_string(),
                "value": r.value.as_str(),
                "unit": r.unit,
                "timestamp": r.timestamp.rfc3339(),
            })
        })
        .collect();
    let mut v = json!({
        "meter": report.meter,
        "ok": report.errors.is_empty(),
        "values": values,
        "stored": report.stored,
    });
    if !report.errors.is_empty() {
        let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        v["error"] = json!(errors.join("; "));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_should_give_host_port_and_tls() {
        assert_eq!(
            parse_url("mqtt://broker").unwrap(),
            ("broker".into(), 1883, false)
        );
        assert_eq!(
            parse_url("mqtts://broker.example:8884/").unwrap(),
            ("broker.example".into(), 8884, true)
        );
        assert!(parse_url("tcp://broker").is_err());
        assert!(
            parse_url("mqtt://user:pw@broker")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(parse_url("mqtt://broker:x").is_err());
    }

    #[test]
    fn topics_should_live_under_prefix_and_gateway() {
        let c: MqttConfig = toml::from_str("url = \"mqtt://b\"").unwrap();
        let t = c.topics("gw-1");
        assert_eq!(t.commands, "utilitarian/gateways/gw-1/commands");
        assert_eq!(t.replies, "utilitarian/gateways/gw-1/replies");
        assert_eq!(t.status, "utilitarian/gateways/gw-1/status");
    }
}
