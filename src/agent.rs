//! Wiring: the store, the drain, one worker per bus, the beat, the status socket; one
//! shutdown signal for all of them.
//!
//! The store is opened once and outlives everything else. The rest runs as a *generation*:
//! SIGHUP loads the config again and, if it is valid, stops the generation (each task
//! finishes what it has in hand) and starts a new one on the same store, so a reload never
//! loses buffered data. SIGTERM and SIGINT stop the generation the same way, flush the store
//! and return.
//!
//! Remote configuration goes the same way: the loop owns the [`Keeper`]
//! ([`crate::control::remote`]), which control asks through a channel. A `configure` it
//! accepts is written and then reloaded exactly like SIGHUP; a window that closes without a
//! `confirm` — or a new config that does not even start — is reverted and reloaded the same
//! way. On start, the keeper settles a window a crash left open before the first generation
//! runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusWorker, Router};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::control::remote::{ConfigRequest, Keeper, RemoteLink};
use crate::drain::{AmqpPublisher, Drain, DrainSettings, DrainStatus};
use crate::lock::DirLock;
use crate::status::{SOCKET, StatusServer};
use crate::store::{SledStore, Store};
use crate::watchdog::{self, Watchdog};

/// Whether the beat runs.
#[derive(Clone, Copy, Debug)]
pub enum BeatMode {
    /// As the config says: wall-clock boundaries, or `beat.every`.
    Schedule,
    /// No beat: meters are read on demand only (tests).
    Off,
}

/// What `run` and `demo` differ in.
pub struct Options {
    pub beat: BeatMode,
    /// Where SIGHUP reloads the config from; `None`: reload is not possible (demo).
    pub config_path: Option<PathBuf>,
    /// How often to log a one-line summary of the buffer and the drain.
    pub summary_every: Duration,
    /// Stop by itself after this long (demo `--for`).
    pub stop_after: Option<Duration>,
}

/// One generation of the agent's tasks, running on a store that outlives it.
pub struct Running {
    token: CancellationToken,
    tasks: JoinSet<()>,
    /// What the drain reports.
    pub drain: watch::Receiver<DrainStatus>,
    /// Where polls go: one handle per bus (also the watchdog's liveness probe).
    pub router: Router,
    /// A task of this generation panicked: the watchdog is not fed again (see [`watchdog`]).
    panicked: Option<String>,
}

pub async fn run(mut config: Config, options: Options) -> anyhow::Result<()> {
    // First of all: a stop that comes while the store is still opening must be a clean stop,
    // not the default action of the signal.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let data_dir = config.gateway.data_dir.clone();
    let _lock = DirLock::acquire(&data_dir)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let store: Arc<dyn Store> = Arc::new(open_store(&data_dir, &config, clock.clone())?);
    let started_at = clock.now();
    let stats = store.stats()?;
    tracing::info!(
        gateway = %config.gateway.id,
        data_dir = %data_dir.display(),
        buffered = stats.readings(),
        events = stats.events.count,
        version = env!("CARGO_PKG_VERSION"),
        "Agent starting"
    );
    let root = CancellationToken::new();
    let stop_after = async {
        match options.stop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop_after);

    let (config_tx, mut config_rx) = mpsc::channel::<ConfigRequest>(4);
    let mut keeper = match &options.config_path {
        None => None,
        Some(path) => match Keeper::open(path, config.clone(), clock.clone(), &*store) {
            Ok((k, to_run)) => {
                config = to_run;
                Some(k)
            }
            Err(e) => {
                tracing::error!(error = %e, "Remote configuration is unavailable: its state cannot be read or settled");
                None
            }
        },
    };
    let mut launcher = Launcher {
        options: &options,
        store: store.clone(),
        clock: clock.clone(),
        started_at,
        root: &root,
        requests: config_tx,
    };
    let mut generation = launcher.launch(&mut config, &mut keeper)?;
    Watchdog::ready();
    tracing::info!(
        buses = config.buses.len(),
        meters = config.meters.len(),
        "Agent running"
    );
    let watchdog = Watchdog::from_env();
    // Ping twice per watchdog interval (never a zero period, which `interval` rejects); without
    // a watchdog the branch below is disabled.
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| {
            (w.interval() / 2).max(Duration::from_millis(1))
        }));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary = tokio::time::interval(options.summary_every);
    summary.tick().await;
    loop {
        let deadline = keeper.as_ref().and_then(Keeper::deadline);
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            () = &mut stop_after => { tracing::info!("Demo time is up: shutting down"); break; }
            _ = hup.recv() => {
                let Some(path) = &options.config_path else {
                    tracing::warn!("SIGHUP: nothing to reload");
                    continue;
                };
                let loaded = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|text| Config::from_toml(&text, path).map(|c| (text, c)).map_err(|e| e.to_string()));
                match loaded {
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: the new config is invalid; keeping the running one");
                    }
                    Ok((_, new)) if new.gateway.data_dir != config.gateway.data_dir => {
                        tracing::error!("SIGHUP: gateway.data_dir cannot change while running; restart the agent to move the store");
                    }
                    Ok((text, new)) => {
                        tracing::info!(path = %path.display(), "SIGHUP: reloading the config");
                        generation.stop().await;
                        if let Some(k) = keeper.as_mut() {
                            k.reloaded(text);
                        }
                        config = new;
                        generation = launcher.launch(&mut config, &mut keeper)?;
                    }
                }
            }
            Some(request) = config_rx.recv() => {
                let Some(k) = keeper.as_mut() else { continue };
                match request {
                    ConfigRequest::Get { reply } => {
                        let on = config.mqtt.as_ref().is_some_and(|m| m.remote_config);
                        let _ = reply.send(k.describe(on));
                    }
                    ConfigRequest::Confirm { target, reply } => {
                        let _ = reply.send(k.confirm(&target));
                    }
                    // Control stopped waiting (it is stopping): leave it; the next start
                    // answers it.
                    ConfigRequest::Configure { reply, .. } if reply.is_closed() => {}
                    ConfigRequest::Configure { request_id, config: text, base, confirm_within, reply } => {
                        match k.configure(&request_id, &text, &base, confirm_within, &config, &*store) {
                            Err(rejected) => {
                                let _ = reply.send(Err(rejected));
                            }
                            Ok(new) => {
                                let _ = reply.send(Ok(crate::control::remote::sha256_hex(text.as_bytes())));
                                tracing::info!(request_id = %request_id, "Remote configuration: reloading");
                                generation.stop().await;
                                config = new;
                                generation = launcher.launch(&mut config, &mut keeper)?;
                            }
                        }
                    }
                }
            }
            () = sleep_until(deadline) => {
                let Some(k) = keeper.as_mut() else { continue };
                let id = k.pending().unwrap_or_default().to_owned();
                tracing::warn!(request_id = %id, "Remote configuration not confirmed in time: going back to the previous one");
                generation.stop().await;
                let reason = k.expiry_reason();
                match k.revert(&reason, &*store) {
                    Ok(previous) => config = previous,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot go back to the previous configuration; keeping the remote one");
                        k.give_up(&e.to_string());
                    }
                }
                generation = launcher.launch(&mut config, &mut keeper)?;
            }
            _ = summary.tick() => log_summary(&store, &generation.drain).await,
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let Some(w) = watchdog else { continue };
                if generation.panicked.is_none() {
                    generation.panicked = watchdog::reap_panics(&mut generation.tasks);
                }
                let alive = match &generation.panicked {
                    Some(why) => Err(watchdog::ProbeFailure::TaskPanicked(why.clone())),
                    None => watchdog::probe(generation.router.buses(), &store, w.probe_timeout()).await,
                };
                match alive {
                    Ok(()) => w.ping(),
                    Err(e) => tracing::warn!(error = %e, "Liveness probe failed; not feeding the systemd watchdog"),
                }
            }
        }
    }
    Watchdog::stopping();
    generation.stop().await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.flush()).await??;
    let stats = store.stats()?;
    tracing::info!(
        buffered = stats.readings(),
        events = stats.events.count,
        "Store flushed, agent stopped"
    );
    Ok(())
}

/// Opens the store; one that sled cannot open at all (damaged beyond what its recovery
/// handles) is moved aside, whole, and a new one started — an agent that refuses to start
/// would restart forever and read nothing. The old files stay for an expert to look at.
fn open_store(
    data_dir: &std::path::Path,
    config: &Config,
    clock: SharedClock,
) -> anyhow::Result<SledStore> {
    let attempt = |clock: SharedClock| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            SledStore::open(data_dir, &config.store, clock)
        }))
    };
    match attempt(clock.clone()) {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(crate::store::StoreError::Locked(reason))) => {
            anyhow::bail!("the store in {} is in use: {reason}", data_dir.display())
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "opening it panicked".to_owned(),
            };
            let aside = data_dir.join(format!(
                "store.damaged-{}",
                jiff::Timestamp::now().as_second()
            ));
            crate::store::disk::rename_durably(&data_dir.join("store"), &aside)
                .with_context(|| format!("the store cannot be opened ({why}) nor moved aside"))?;
            tracing::error!(error = %why, moved_to = %aside.display(), "The store cannot be opened: moved aside, starting an empty one");
            let store = SledStore::open(data_dir, &config.store, clock.clone())
                .with_context(|| format!("opening a new store in {}", data_dir.display()))?;
            let event = crate::reading::SystemEvent::new(
                crate::reading::EventKind::StoreCorruption,
                crate::reading::Stamp::in_zone(clock.now(), &jiff::tz::TimeZone::UTC),
                format!("The store could not be opened ({why}); it was moved to {} and a new one started: what it held was not delivered from here", aside.display()),
            )
            .detail("moved_to", aside.display());
            store.append(crate::store::Append {
                events: vec![event],
                ..Default::default()
            })?;
            Ok(store)
        }
    }
}

/// Waits until `at`; forever if `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts generations for the main loop, with the link to the config keeper.
struct Launcher<'a> {
    options: &'a Options,
    store: Arc<dyn Store>,
    clock: SharedClock,
    started_at: Timestamp,
    root: &'a CancellationToken,
    requests: mpsc::Sender<ConfigRequest>,
}

impl Launcher<'_> {
    /// Starts a generation on `config`. A remote config waiting for its confirm that does not
    /// start (a file it names is missing, TLS setup fails) is reverted at once, and the
    /// previous config started instead.
    fn launch(
        &mut self,
        config: &mut Config,
        keeper: &mut Option<Keeper>,
    ) -> anyhow::Result<Running> {
        loop {
            let remote = keeper.as_mut().map(|k| RemoteLink {
                requests: self.requests.clone(),
                notices: k.take_notices(),
            });
            let started = start_with(
                config,
                self.options,
                self.store.clone(),
                self.clock.clone(),
                self.started_at,
                self.root,
                remote,
            );
            match (started, keeper.as_mut()) {
                (Ok(g), _) => return Ok(g),
                (Err(e), Some(k)) if k.pending().is_some() => {
                    tracing::error!(error = %format!("{e:#}"), "The remote configuration does not start: going back to the previous one");
                    *config = k.revert(&format!("it did not start: {e:#}"), &*self.store)?;
                }
                (Err(e), _) => return Err(e),
            }
        }
    }
}

/// Starts everything but the store: the drain, a worker per bus, the beat, the status
/// socket and the store's maintenance, as children of `root`.
pub fn start(
    config: &Config,
    options: &Options,
    store: Arc<dyn Store>,
    clock: SharedClock,
    started_at: Timestamp,
    root: &CancellationToken,
) -> anyhow::Result<Running> {
    start_with(config, options, store, clock, started_at, root, None)
}

/// [`start`], with control linked to the config keeper (`get_config`, `configure`,
/// `confirm`) when there is one.
pub fn start_with(
    config: &Config,
    options: &Options,
    store: Arc<dyn Store>,
    clock: SharedClock,
    started_at: Timestamp,
    root: &CancellationToken,
    remote: Option<RemoteLink>,
) -> anyhow::Result<Running> {
    let token = root.child_token();
    let mut tasks = JoinSet::new();
    let wake = Arc::new(Notify::new());
    let tz = config.gateway.tz.clone();
    // Before the drain and the workers: they take their counters when they are made.
    if let Some(m) = &config.metrics {
        crate::metrics::install().set_per_meter(m.per_meter);
    }

    let publisher = AmqpPublisher::new(
        config.amqp.clone(),
        format!("amr-edge {}", config.gateway.id),
    );
    let (drain, drain_status) = Drain::new(
        DrainSettings::new(&config.gateway.id, &config.amqp),
        store.clone(),
        publisher,
        wake.clone(),
    );
    tasks.spawn(drain.run(token.clone()));

    let mut router = Router::default();
    for bus in &config.buses {
        let meters: Vec<_> = config.meters_on(&bus.name).cloned().collect();
        let ids: Vec<String> = meters.iter().map(|m| m.id.clone()).collect();
        let (worker, handle) = BusWorker::new(
            bus.clone(),
            meters,
            store.clone(),
            wake.clone(),
            clock.clone(),
            tz.clone(),
            // Room for every meter at every cadence plus on-demand bursts.
            (ids.len() * 8).max(64),
        );
        tasks.spawn(worker.run(token.clone()));
        router.add_bus(handle, ids);
    }

    match options.beat {
        BeatMode::Schedule if config.beat.every.is_some() => {
            let interval = config.beat.every.map_or(Duration::from_secs(5), |e| e.0);
            tasks.spawn(crate::beat::every(
                router.clone(),
                interval,
                clock.clone(),
                token.clone(),
            ));
        }
        BeatMode::Schedule => {
            let beat = crate::beat::Beat::new(
                config.beat.clone(),
                &config.meters,
                router.clone(),
                store.clone(),
                clock.clone(),
                tz.clone(),
            );
            tasks.spawn(beat.run(token.clone()));
        }
        BeatMode::Off => {}
    }

    if let Some(mqtt) = &config.mqtt {
        let control = crate::control::Control::new(
            mqtt.clone(),
            &config.gateway.id,
            router.clone(),
            store.clone(),
            drain_status.clone(),
            clock.clone(),
            tz.clone(),
            config.beat.clone(),
            config.meter_ids(),
            started_at,
            remote,
        )?;
        tasks.spawn(control.run(token.clone()));
    }

    tasks.spawn(
        StatusServer {
            path: config.gateway.data_dir.join(SOCKET),
            gateway: config.gateway.id.clone(),
            meters: config.meter_ids(),
            store: store.clone(),
            drain: drain_status.clone(),
            started_at,
        }
        .run(token.clone()),
    );

    if let Some(m) = &config.metrics {
        let view = crate::metrics::View {
            metrics: crate::metrics::install().clone(),
            store: store.clone(),
            drain: drain_status.clone(),
            buses: router.buses().to_vec(),
            clock: clock.clone(),
            started_at,
            meters: config.meters.len(),
        };
        tasks.spawn(crate::metrics::Exporter::new(m, view)?.run(token.clone()));
    }

    let maint_store = store.clone();
    let maint_token = token.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = maint_token.cancelled() => return,
            }
            let s = maint_store.clone();
            match tokio::task::spawn_blocking(move || s.maintain()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::warn!(evicted = n, "Evicted records older than store.max_age")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "Store maintenance failed"),
                Err(e) => tracing::error!(error = %e, "Store maintenance panicked"),
            }
        }
    });

    Ok(Running {
        token,
        tasks,
        drain: drain_status,
        router,
        panicked: None,
    })
}

impl Running {
    /// Stops every task; each finishes what it has in hand. A task stuck past the deadline
    /// (a serial read with long timeouts) is abandoned; what it had not stored is not marked
    /// read, so it is read again after the restart.
    pub async fn stop(self) {
        stop(self).await
    }
}

async fn stop(mut g: Running) {
    g.token.cancel();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = g.tasks.join_next() => match next {
                None => break,
                Some(Err(e)) if e.is_panic() => tracing::error!(error = %e, "A task panicked"),
                Some(_) => {}
            },
            () = &mut deadline => {
                tracing::warn!(remaining = g.tasks.len(), "Tasks did not stop within 30s; abandoning them");
                g.tasks.abort_all();
                break;
            }
        }
    }
}

async fn log_summary(store: &Arc<dyn Store>, drain: &watch::Receiver<DrainStatus>) {
    let s = store.clone();
    let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || s.stats()).await else {
        return;
    };
    let d = drain.borrow().clone();
    tracing::info!(
        buffered = stats.readings(),
        events = stats.events.count,
        bytes = stats.bytes(),
        evicted = stats.evicted,
        delivered = d.records,
        broker = if d.connected {
            "connected"
        } else {
            "not connected"
        },
        "Status"
    );
}
