//! Metrics and health: Prometheus text exposition over HTTP (`GET /metrics`, `/healthz`,
//! `/readyz`) and/or in a file for node_exporter's textfile collector. Opt-in: without a
//! `[metrics]` section nothing here runs and nothing is counted.
//!
//! * [`Metrics`] — the counters the bus workers and the drain bump ([`BusMetrics`],
//!   [`DrainMetrics`]): atomics, and small maps for labelled series.
//! * [`render`] — the exposition, in the Prometheus text format 0.0.4: the counters, and
//!   gauges gathered at scrape time (buffer depth, broker state, process memory and CPU).
//! * [`http`] — a minimal HTTP/1.1 responder: three paths, bounded requests, a read timeout.
//! * [`Exporter`] — the long-lived task: the listener and/or the textfile writer.
//!
//! The counters live for the process, across reloads: a SIGHUP starts new bus workers and a
//! new drain, which find their bus's counters again by name, so a counter never goes back
//! (Prometheus reads a counter that decreases as a restart of the process).
//!
//! Why one process-wide registry and not a handle passed down: the counters outlive the
//! generations of tasks that [`crate::agent`] starts, and every hook is an `Option` that is
//! `None` when metrics are off (no cost). The only shared state is monotonic counters, which
//! nobody reads to make a decision.

pub mod http;
pub mod render;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bus::BusHandle;
use crate::clock::SharedClock;
use crate::drain::DrainStatus;
use crate::meter::Failure;
use crate::primitives::{HumanDuration, Problems};
use crate::reading::Cadence;
use crate::store::{Store, Stream};

/// `[metrics]`: at least one of `listen` and `textfile`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` for `GET /metrics`, `/healthz` and `/readyz`.
    pub listen: Option<String>,
    /// A `.prom` file rewritten atomically every `interval`.
    pub textfile: Option<PathBuf>,
    /// How often the textfile is rewritten.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Series per meter (readings, polls, last success): off by default, to bound the
    /// cardinality on gateways with a thousand meters.
    #[serde(default)]
    pub per_meter: bool,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl MetricsConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if self.listen.is_none() && self.textfile.is_none() {
            p.push(
                at.to_owned(),
                "set `listen = \"127.0.0.1:9464\"`, `textfile = \"/var/lib/prometheus/node-exporter/amr_edge.prom\"` or both",
            );
        }
        if let Some(l) = &self.listen {
            if l.parse::<SocketAddr>().is_err() {
                p.push(
                    format!("{at}.listen"),
                    format!("`{l}` is not an address and port such as `127.0.0.1:9464`"),
                );
            }
        }
        if let Some(t) = &self.textfile {
            if t.file_name().is_none() {
                p.push(format!("{at}.textfile"), "must name a file");
            }
        }
        if self.interval.0 < Duration::from_secs(1) || self.interval.0 > Duration::from_secs(3600) {
            p.push(format!("{at}.interval"), "must be between 1s and 1h");
        }
    }
}

static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The process's counters, if metrics are on (see the module doc).
pub fn global() -> Option<&'static Arc<Metrics>> {
    GLOBAL.get()
}

/// Turns counting on for the rest of the process; returns the counters.
pub fn install() -> &'static Arc<Metrics> {
    GLOBAL.get_or_init(|| Arc::new(Metrics::default()))
}

/// Every counter of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    buses: Mutex<Vec<Arc<BusMetrics>>>,
    pub drain: DrainMetrics,
    per_meter: AtomicBool,
}

impl Metrics {
    /// The counters of bus `name`, created on first use.
    pub fn bus(&self, name: &str) -> Arc<BusMetrics> {
        let mut buses = lock(&self.buses);
        if let Some(b) = buses.iter().find(|b| b.name == name) {
            return b.clone();
        }
        let b = Arc::new(BusMetrics {
            name: name.to_owned(),
            per_meter: AtomicBool::new(self.per_meter.load(Ordering::Relaxed)),
            ..BusMetrics::default()
        });
        buses.push(b.clone());
        b
    }

    /// Whether buses made from now on count per meter (set before the workers are made).
    pub fn set_per_meter(&self, on: bool) {
        self.per_meter.store(on, Ordering::Relaxed);
        for b in lock(&self.buses).iter() {
            b.per_meter.store(on, Ordering::Relaxed);
        }
    }

    pub fn buses(&self) -> Vec<Arc<BusMetrics>> {
        lock(&self.buses).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cadences in the order of the `[AtomicU64; 6]` arrays.
pub const CADENCES: [Cadence; 6] = [
    Cadence::Quarterly,
    Cadence::Hourly,
    Cadence::Daily,
    Cadence::Monthly,
    Cadence::Yearly,
    Cadence::OnDemand,
];

fn cadence_index(c: Cadence) -> usize {
    match c {
        Cadence::Quarterly => 0,
        Cadence::Hourly => 1,
        Cadence::Daily => 2,
        Cadence::Monthly => 3,
        Cadence::Yearly => 4,
        Cadence::OnDemand => 5,
    }
}

/// One bus's counters.
#[derive(Debug, Default)]
pub struct BusMetrics {
    pub name: String,
    /// Values the drivers read, by cadence.
    pub polled: [AtomicU64; 6],
    /// Readings the store has made durable, by cadence.
    pub buffered: [AtomicU64; 6],
    pub polls_ok: AtomicU64,
    pub polls_failed: AtomicU64,
    pub poll_seconds: Histogram,
    /// Failures and refusals, by event kind.
    pub failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Beat overruns, by cadence.
    pub overruns: [AtomicU64; 6],
    /// Rows read from meters' load profiles (profile-based reads and backfills).
    pub profile_rows: AtomicU64,
    per_meter: AtomicBool,
    pub meters: Mutex<BTreeMap<String, MeterCounters>>,
}

/// Per-meter series (`per_meter = true`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeterCounters {
    pub readings: u64,
    pub polls_ok: u64,
    pub polls_failed: u64,
    /// Unix seconds of the last poll that read the meter.
    pub last_ok_s: Option<i64>,
}

impl BusMetrics {
    fn per_meter(&self) -> bool {
        self.per_meter.load(Ordering::Relaxed)
    }

    /// A poll ended.
    pub fn poll(&self, end: &PollEnd<'_>) {
        let PollEnd {
            meter,
            cadence,
            values,
            took,
            failure,
            refused,
            at,
        } = *end;
        let i = cadence_index(cadence);
        self.polled[i].fetch_add(values as u64, Ordering::Relaxed);
        if failure.is_some() {
            self.polls_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.polls_ok.fetch_add(1, Ordering::Relaxed);
        }
        self.poll_seconds.observe(took);
        if failure.is_some() || !refused.is_empty() {
            let mut f = lock(&self.failures);
            for kind in failure.into_iter().chain(refused).map(|f| f.event_kind()) {
                *f.entry(kind.as_str()).or_default() += 1;
            }
        }
        if self.per_meter() {
            let mut meters = lock(&self.meters);
            let m = match meters.get_mut(meter) {
                Some(m) => m,
                None => meters.entry(meter.to_owned()).or_default(),
            };
            m.readings += values as u64;
            if failure.is_some() {
                m.polls_failed += 1;
            } else {
                m.polls_ok += 1;
                m.last_ok_s = Some(at.as_second());
            }
        }
    }

    /// Readings of `cadence` made durable.
    pub fn buffered(&self, cadence: Cadence, n: usize) {
        self.buffered[cadence_index(cadence)].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Rows of a meter's load profile read and handed to the store.
    pub fn backfill_rows(&self, n: u64) {
        self.profile_rows.fetch_add(n, Ordering::Relaxed);
    }

    pub fn overrun(&self, cadence: Cadence) {
        self.overruns[cadence_index(cadence)].fetch_add(1, Ordering::Relaxed);
    }
}

/// How a poll ended, for [`BusMetrics::poll`].
#[derive(Clone, Copy, Debug)]
pub struct PollEnd<'a> {
    pub meter: &'a str,
    pub cadence: Cadence,
    /// Values read; none if the poll failed.
    pub values: usize,
    pub took: Duration,
    pub failure: Option<&'a Failure>,
    /// What the meter refused (the rest of the read is good).
    pub refused: &'a [Failure],
    pub at: Timestamp,
}

/// How a message the drain published ended, in the order of [`DrainMetrics::messages`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Acked = 0,
    Nacked = 1,
    Returned = 2,
    Lost = 3,
}

impl Delivery {
    pub const ALL: [Delivery; 4] = [
        Delivery::Acked,
        Delivery::Nacked,
        Delivery::Returned,
        Delivery::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Acked => "acked",
            Delivery::Nacked => "nacked",
            Delivery::Returned => "returned",
            Delivery::Lost => "lost",
        }
    }
}

/// The drain's counters.
#[derive(Debug, Default)]
pub struct DrainMetrics {
    /// Readings the broker confirmed.
    pub readings_delivered: AtomicU64,
    pub events_delivered: AtomicU64,
    /// Messages by stream (readings, events) and outcome.
    pub messages: [[AtomicU64; 4]; 2],
    /// From publish to the broker's confirmation.
    pub confirm_seconds: Histogram,
    /// Sessions with the broker started.
    pub connects: AtomicU64,
}

impl DrainMetrics {
    /// A message of `records` records on `stream` ended as `how` after `took`.
    pub fn message(&self, stream: Stream, records: usize, how: Delivery, took: Duration) {
        let s = match stream {
            Stream::Readings => 0,
            Stream::Events => 1,
        };
        self.messages[s][how as usize].fetch_add(1, Ordering::Relaxed);
        if how == Delivery::Acked {
            self.confirm_seconds.observe(took);
            let c = match stream {
                Stream::Readings => &self.readings_delivered,
                Stream::Events => &self.events_delivered,
            };
            c.fetch_add(records as u64, Ordering::Relaxed);
        }
    }

    pub fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Bucket bounds in seconds: from a fast Modbus TCP exchange to a slow IEC 62056-21 readout
/// at 300 Bd, and a broker's confirmation over a cellular link.
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram over [`BUCKETS`]; the sum kept in microseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is above every bound.
    counts: [AtomicU64; 13],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Cumulative counts per bound (the last is `+Inf`, the total) and the sum in seconds.
    pub fn snapshot(&self) -> ([u64; 13], f64) {
        let mut out = [0; 13];
        let mut total = 0;
        for (o, c) in out.iter_mut().zip(&self.counts) {
            total += c.load(Ordering::Relaxed);
            *o = total;
        }
        (out, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// What the exporter reads at each scrape besides the counters.
#[derive(Clone)]
pub struct View {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    pub drain: watch::Receiver<DrainStatus>,
    pub buses: Vec<BusHandle>,
    pub clock: SharedClock,
    pub started_at: Timestamp,
    /// Meters configured.
    pub meters: usize,
}

/// Why the exporter cannot start: the operator must fix the config or free the port.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("metrics.textfile {path}: the directory {dir} does not exist")]
    NoDirectory { path: String, dir: String },
}

/// The long-lived task: serves HTTP and/or rewrites the textfile.
pub struct Exporter {
    config: MetricsConfig,
    listener: Option<std::net::TcpListener>,
    view: View,
}

impl Exporter {
    /// Binds the listener now, so a port in use fails the start with a clear error.
    pub fn new(config: &MetricsConfig, view: View) -> Result<Exporter, MetricsError> {
        let listener = match &config.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| MetricsError::Listen {
                        addr: addr.clone(),
                        source,
                    })?;
                Some(l)
            }
            None => None,
        };
        if let Some(path) = &config.textfile {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                return Err(MetricsError::NoDirectory {
                    path: path.display().to_string(),
                    dir: dir.display().to_string(),
                });
            }
        }
        Ok(Exporter {
            config: config.clone(),
            listener,
            view,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let Exporter {
            config,
            listener,
            view,
        } = self;
        let view = Arc::new(view);
        let serve = async {
            let Some(l) = listener else {
                return std::future::pending().await;
            };
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => http::serve(l, view.clone(), shutdown.clone()).await,
                Err(e) => tracing::error!(error = %e, "Metrics listener unusable"),
            }
            std::future::pending::<()>().await
        };
        let write = async {
            let Some(path) = &config.textfile else {
                return std::future::pending().await;
            };
            textfile(path, config.interval.0, &view).await
        };
        tokio::select! {
            () = serve => {}
            () = write => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// How long a health check waits for a bus worker or the store.
const PROBE_WITHIN: Duration = Duration::from_secs(5);

/// `/healthz`: the process and its tasks run — every bus worker answers, the store's thread
/// pool answers, the drain task is there. `(live, body)`.
pub async fn health(view: &View) -> (bool, String) {
    if view.drain.has_changed().is_err() {
        return (false, "not live: the drain task has stopped\n".to_owned());
    }
    match crate::watchdog::probe(&view.buses, &view.store, PROBE_WITHIN).await {
        Ok(()) => (true, "live\n".to_owned()),
        Err(e) => (false, format!("not live: {e}\n")),
    }
}

/// `/readyz`: the store is open and reads, every bus worker has started and answers. The
/// broker is reported but not required: offline is a normal state for a gateway.
/// `(ready, body)`.
pub async fn ready(view: &View) -> (bool, String) {
    let mut ok = true;
    let mut body = String::new();
    let s = view.store.clone();
    match tokio::time::timeout(PROBE_WITHIN, tokio::task::spawn_blocking(move || s.stats())).await {
        Ok(Ok(Ok(st))) => body.push_str(&format!(
            "store: open, {} readings buffered\n",
            st.readings()
        )),
        Ok(Ok(Err(e))) => {
            ok = false;
            body.push_str(&format!("store: {e}\n"));
        }
        Ok(Err(e)) => {
            ok = false;
            body.push_str(&format!("store: {e}\n"));
        }
        Err(_) => {
            ok = false;
            body.push_str(&format!("store: no answer within {PROBE_WITHIN:?}\n"));
        }
    }
    let answers = futures_util::future::join_all(
        view.buses
            .iter()
            .map(|b| async move { (b, tokio::time::timeout(PROBE_WITHIN, b.inspect()).await) }),
    )
    .await;
    for (bus, answer) in answers {
        match answer {
            Ok(Some(_)) => body.push_str(&format!("bus {}: started\n", bus.name)),
            Ok(None) => {
                ok = false;
                body.push_str(&format!("bus {}: stopped\n", bus.name));
            }
            Err(_) => {
                ok = false;
                body.push_str(&format!(
                    "bus {}: no answer within {PROBE_WITHIN:?}\n",
                    bus.name
                ));
            }
        }
    }
    let d = view.drain.borrow().clone();
    match (d.connected, &d.last_error) {
        (true, _) => body.push_str("broker: connected\n"),
        (false, Some(e)) => body.push_str(&format!("broker: not connected ({e})\n")),
        (false, None) => body.push_str("broker: not connected\n"),
    }
    body.insert_str(0, if ok { "ready\n" } else { "not ready\n" });
    (ok, body)
}

/// Rewrites `path` every `every`, atomically (a reader sees the old file or the new one,
/// whole). A failure is logged once until it changes; the next interval tries again.
async fn textfile(path: &std::path::Path, every: Duration, view: &Arc<View>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let text = render::scrape(view).await;
        let p = path.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            crate::store::disk::write_atomically(&p, text.as_bytes())
        })
        .await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("writer task failed: {e}")),
        };
        if error != last_error {
            match &error {
                Some(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot write the metrics textfile")
                }
                None if last_error.is_some() => {
                    tracing::info!(path = %path.display(), "Metrics textfile written again")
                }
                None => {}
            }
            last_error = error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_should_count_cumulatively_with_inf_last() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(60));
        let (c, sum) = h.snapshot();
        assert_eq!(c[0], 1);
        assert_eq!(c[6], 2); // ≤ 0.5 s
        assert_eq!(c[11], 2); // ≤ 30 s
        assert_eq!(c[12], 3);
        assert!((sum - 60.303).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn bus_counters_should_be_found_again_by_name() {
        let m = Metrics::default();
        m.bus("lan").buffered(Cadence::Daily, 3);
        m.bus("lan").buffered(Cadence::Daily, 2);
        assert_eq!(m.buses().len(), 1);
        assert_eq!(m.bus("lan").buffered[2].load(Ordering::Relaxed), 5);
    }

    #[test]
    fn per_meter_counters_should_exist_only_when_asked_for() {
        let m = Metrics::default();
        let off = m.bus("a");
        off.poll(&crate::metrics::PollEnd {
            meter: "m1",
            cadence: Cadence::Daily,
            values: 4,
            took: Duration::from_millis(20),
            failure: None,
            refused: &[],
            at: Timestamp::UNIX_EPOCH,
        });
        assert!(lock(&off.meters).is_empty());
        m.set_per_meter(true);
        let t = Failure::Timeout(Duration::from_secs(1));
        off.poll(&crate::metrics::PollEnd {
            meter: "m1",
            cadence: Cadence::Daily,
            values: 0,
            took: Duration::from_secs(1),
            failure: Some(&t),
            refused: &[],
            at: Timestamp::UNIX_EPOCH,
        });
        let meters = lock(&off.meters);
        assert_eq!(meters["m1"].polls_failed, 1);
        assert_eq!(lock(&off.failures)["meter_not_answering"], 1);
    }

    #[test]
    fn config_should_need_a_listener_or_a_textfile() {
        let c: MetricsConfig = toml::from_str("").unwrap();
        let mut p = Problems::default();
        c.validate("metrics", &mut p);
        assert_eq!(p.0.len(), 1);
        let c: MetricsConfig = toml::from_str("listen = \"localhost\"").unwrap();
        let mut p = Problems::default();
        c.validate("metrics", &mut p);
        assert_eq!(p.0[0].key, "metrics.listen");
    }
}
