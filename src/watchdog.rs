//! systemd integration: readiness, stopping and the watchdog (`sd_notify`).
//!
//! The unit (`packaging/amr-edge.service`) is `Type=notify` with `WatchdogSec=`. The agent
//! says `READY=1` once its first generation is running and `STOPPING=1` when it begins to shut
//! down. While it runs, it sends `WATCHDOG=1` every half watchdog interval, but only after a
//! liveness [`probe`] has passed:
//!
//! * every bus worker answers [`BusHandle::inspect`] (its loop still turns: a worker stuck in
//!   a blocking call, or one that died, does not),
//! * the store answers [`Store::stats`] from a blocking thread (the disk is not hung),
//! * no task of the running generation has panicked ([`reap_panics`]): with unwinding, tokio
//!   catches a panic and the rest of the agent goes on, so without this check a dead drain or
//!   status server would go unnoticed until the next restart.
//!
//! A failed probe is logged and the ping skipped, so systemd restarts a wedged or crippled
//! agent (`WatchdogSignal=`, then `Restart=always`), instead of the watchdog being fed by a
//! timer that keeps ticking while the real work has stopped.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset: the demo, a shell) every notification is a no-op,
//! and without `WatchdogSec=` (`WATCHDOG_USEC` unset) [`Watchdog::from_env`] is `None`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use sd_notify::NotifyState;
use tokio::task::JoinSet;

use crate::bus::BusHandle;
use crate::store::Store;

/// How long the probe waits for a bus worker or the store before it calls the agent wedged.
/// Both answer in milliseconds when healthy; the bound is for a slow SD card under load.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The systemd watchdog of this process, if the unit has `WatchdogSec=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    timeout: Duration,
}

impl Watchdog {
    /// The watchdog systemd set up for this process (`WATCHDOG_USEC`, and `WATCHDOG_PID` if
    /// set must be ours); `None` without one.
    pub fn from_env() -> Option<Watchdog> {
        sd_notify::watchdog_enabled()
            .filter(|t| !t.is_zero())
            .map(|timeout| Watchdog { timeout })
    }

    /// The watchdog timeout: systemd restarts the agent if no ping arrives within it. Ping at
    /// least twice per interval.
    pub fn interval(&self) -> Duration {
        self.timeout
    }

    /// How long a probe may wait: short enough that a probe and its ping fit well within
    /// half an interval.
    pub fn probe_timeout(&self) -> Duration {
        PROBE_TIMEOUT.min(self.timeout / 4)
    }

    /// `WATCHDOG=1`: the agent is alive. Call only after a passed [`probe`].
    pub fn ping(&self) {
        notify(&[NotifyState::Watchdog]);
    }

    /// `READY=1`: start-up is complete (`Type=notify`). A no-op outside systemd; needs no
    /// watchdog, hence no `self`.
    pub fn ready() {
        notify(&[NotifyState::Ready]);
    }

    /// `STOPPING=1`: the agent is shutting down (systemd then waits up to `TimeoutStopSec=`).
    pub fn stopping() {
        notify(&[NotifyState::Stopping]);
    }
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "Cannot notify systemd");
    }
}

/// Why the agent does not count as alive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("bus worker `{bus}` did not answer within {within:?}")]
    BusSilent { bus: String, within: Duration },
    #[error("bus worker `{bus}` has stopped")]
    BusGone { bus: String },
    #[error("the store did not answer within {within:?}")]
    StoreSilent { within: Duration },
    #[error("the store probe panicked")]
    StorePanicked,
    #[error("a task of the agent panicked: {0}")]
    TaskPanicked(String),
}

/// Checks that every bus worker and the store answer within `within`. The buses are asked at
/// once, so the probe takes at most about `within`. A store that answers with an error (a
/// full disk) counts as alive: a restart would not help, and the agent handles it itself.
pub async fn probe(
    buses: &[BusHandle],
    store: &Arc<dyn Store>,
    within: Duration,
) -> Result<(), ProbeFailure> {
    let answers = join_all(
        buses
            .iter()
            .map(|bus| async move { (bus, tokio::time::timeout(within, bus.inspect()).await) }),
    )
    .await;
    for (bus, answer) in answers {
        match answer {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ProbeFailure::BusGone {
                    bus: bus.name.clone(),
                });
            }
            Err(_elapsed) => {
                return Err(ProbeFailure::BusSilent {
                    bus: bus.name.clone(),
                    within,
                });
            }
        }
    }
    let s = store.clone();
    match tokio::time::timeout(within, tokio::task::spawn_blocking(move || s.stats())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(ProbeFailure::StorePanicked),
        Err(_elapsed) => Err(ProbeFailure::StoreSilent { within }),
    }
}

/// Takes the tasks of `tasks` that have finished without waiting, and describes the first
/// that panicked. A task that returned normally is not a failure (the status server returns
/// when it cannot open its socket, by design).
pub fn reap_panics(tasks: &mut JoinSet<()>) -> Option<String> {
    let mut panicked = None;
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done {
            if e.is_panic() {
                tracing::error!(error = %e, "A task of the agent panicked");
                panicked.get_or_insert_with(|| e.to_string());
            }
        }
    }
    panicked
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc;

    use tokio::sync::Notify;

    use super::*;
    use crate::bus::{BusConfig, BusWorker};
    use crate::clock::SystemClock;
    use crate::meter::modbus::profile::Profiles;
    use crate::reading::Cadence;
    use crate::store::{
        Append, Appended, Entry, EntryId, MemoryStore, MeterState, Stats, StoreError, Stream,
    };

    const WITHIN: Duration = Duration::from_millis(300);

    fn bus(name: &str, store: Arc<dyn Store>) -> (BusWorker, BusHandle) {
        let config: BusConfig = toml::from_str(&format!(
            "name = \"{name}\"\ntcp = {{ host = \"127.0.0.1\", port = 1 }}"
        ))
        .expect("bus config");
        let (bus, meters) = crate::bus::resolve(
            &config,
            &[],
            &Profiles::built_in(),
            &jiff::tz::TimeZone::UTC,
        )
        .expect("resolves");
        BusWorker::new(
            bus,
            meters,
            store,
            Arc::new(Notify::new()),
            Arc::new(SystemClock),
            jiff::tz::TimeZone::UTC,
            4,
        )
    }

    /// A store whose `stats` blocks until the test lets it go: a hung disk.
    struct HungStore {
        inner: MemoryStore,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl Store for HungStore {
        fn append(&self, batch: Append) -> Result<Appended, StoreError> {
            self.inner.append(batch)
        }
        fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
            self.inner.take(stream, max)
        }
        fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
            self.inner.ack(ids)
        }
        fn nack(&self, ids: &[EntryId]) {
            self.inner.nack(ids)
        }
        fn stats(&self) -> Result<Stats, StoreError> {
            let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            let _ = gate.recv_timeout(Duration::from_secs(10));
            self.inner.stats()
        }
        fn boundary(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError> {
            self.inner.boundary(meter, cadence)
        }
        fn meters(&self) -> Result<Vec<MeterState>, StoreError> {
            self.inner.meters()
        }
        fn profile_mark(
            &self,
            meter: &str,
            profile: &crate::reading::Obis,
        ) -> Result<Option<i64>, StoreError> {
            self.inner.profile_mark(meter, profile)
        }
        fn profiles(&self) -> Result<Vec<crate::store::ProfileState>, StoreError> {
            self.inner.profiles()
        }
        fn maintain(&self) -> Result<u64, StoreError> {
            self.inner.maintain()
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn first_time(&self, key: &str) -> Result<bool, StoreError> {
            self.inner.first_time(key)
        }
    }

    impl crate::store::CommandLog for HungStore {
        fn accept_command(
            &self,
            record: &crate::store::CommandRecord,
        ) -> Result<Option<crate::store::CommandRecord>, StoreError> {
            self.inner.accept_command(record)
        }
        fn finish_command(&self, request_id: &str, outcome: &str) -> Result<(), StoreError> {
            self.inner.finish_command(request_id, outcome)
        }
        fn forget_command(&self, request_id: &str) -> Result<(), StoreError> {
            self.inner.forget_command(request_id)
        }
        fn unfinished_commands(
            &self,
            now_ms: i64,
        ) -> Result<Vec<crate::store::CommandRecord>, StoreError> {
            self.inner.unfinished_commands(now_ms)
        }
    }

    #[tokio::test]
    async fn running_buses_and_store_should_pass() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (w1, h1) = bus("rs485-1", store.clone());
        let (w2, h2) = bus("lan", store.clone());
        let t1 = tokio::spawn(w1.run(shutdown.clone()));
        let t2 = tokio::spawn(w2.run(shutdown.clone()));
        assert_eq!(probe(&[h1, h2], &store, WITHIN).await, Ok(()));
        shutdown.cancel();
        let _ = tokio::join!(t1, t2);
    }

    #[tokio::test]
    async fn no_buses_should_still_probe_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        assert_eq!(probe(&[], &store, WITHIN).await, Ok(()));
    }

    #[tokio::test]
    async fn bus_worker_that_does_not_turn_should_fail_the_probe() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (w1, h1) = bus("rs485-1", store.clone());
        let t1 = tokio::spawn(w1.run(shutdown.clone()));
        // Created but never run: its inbox takes the request, nobody answers.
        let (_stuck, h2) = bus("rs485-2", store.clone());
        assert_eq!(
            probe(&[h1, h2], &store, WITHIN).await,
            Err(ProbeFailure::BusSilent {
                bus: "rs485-2".into(),
                within: WITHIN
            })
        );
        shutdown.cancel();
        let _ = t1.await;
    }

    #[tokio::test]
    async fn bus_worker_that_died_should_fail_the_probe() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (worker, handle) = bus("rs485-1", store.clone());
        drop(worker);
        assert_eq!(
            probe(&[handle], &store, WITHIN).await,
            Err(ProbeFailure::BusGone {
                bus: "rs485-1".into()
            })
        );
    }

    #[tokio::test]
    async fn hung_store_should_fail_the_probe() {
        let (release, gate) = mpsc::channel();
        let store: Arc<dyn Store> = Arc::new(HungStore {
            inner: MemoryStore::new(),
            gate: Mutex::new(gate),
        });
        assert_eq!(
            probe(&[], &store, WITHIN).await,
            Err(ProbeFailure::StoreSilent { within: WITHIN })
        );
        // Let the blocked thread go, so the runtime can shut down.
        let _ = release.send(());
    }

    #[tokio::test]
    async fn panicked_task_should_be_reaped_and_reported_once() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async {});
        tasks.spawn(async { panic!("drain exploded") });
        tasks.spawn(std::future::pending::<()>());
        let mut reports = Vec::new();
        for _ in 0..1000 {
            reports.extend(reap_panics(&mut tasks));
            if tasks.len() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(tasks.len(), 1, "the pending task stays");
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].contains("drain exploded"), "{}", reports[0]);
        assert_eq!(reap_panics(&mut tasks), None);
    }

    #[tokio::test]
    async fn tasks_that_return_normally_should_not_count() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async {});
        while !tasks.is_empty() {
            assert_eq!(reap_panics(&mut tasks), None);
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn probe_timeout_should_fit_short_watchdogs() {
        let w = Watchdog {
            timeout: Duration::from_secs(90),
        };
        assert_eq!(w.probe_timeout(), PROBE_TIMEOUT);
        let w = Watchdog {
            timeout: Duration::from_secs(8),
        };
        assert_eq!(w.probe_timeout(), Duration::from_secs(2));
    }
}
