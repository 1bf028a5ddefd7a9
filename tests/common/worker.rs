//! One bus worker of a resolved config, in-process, over a sled store in a temporary
//! directory: the driver tests' way to poll meters on a simulated bus (a pty, loopback TCP)
//! without the whole agent.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use amr_edge::bus::{BusHandle, BusWorker, PollReport, PollRequest};
use amr_edge::clock::SystemClock;
use amr_edge::config::Config;
use amr_edge::reading::{Cadence, Reading, SystemEvent};
use amr_edge::store::{Record, SledStore, Store, StoreConfig, Stream};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

pub struct BusUnderTest {
    pub store: Arc<SledStore>,
    pub handle: BusHandle,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
    _keep: Box<dyn Any + Send>,
}

impl BusUnderTest {
    /// Runs the worker of `config`'s first bus, its store in `dir/store`; `keep` (the
    /// simulator's handle, its pty) lives as long as the worker.
    pub fn start(config: &Config, dir: tempfile::TempDir, keep: impl Any + Send) -> BusUnderTest {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_test_writer()
            .try_init();
        let clock = Arc::new(SystemClock);
        let store = Arc::new(
            SledStore::open(
                &dir.path().join("store"),
                &StoreConfig::default(),
                clock.clone(),
            )
            .expect("store"),
        );
        let bus = config.buses[0].clone();
        let meters = config.meters_on(&bus.name).cloned().collect();
        let (worker, handle) = BusWorker::new(
            bus,
            meters,
            store.clone(),
            Arc::new(Notify::new()),
            clock,
            config.gateway.tz.clone(),
            16,
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(worker.run(shutdown.clone()));
        BusUnderTest {
            store,
            handle,
            shutdown,
            _dir: dir,
            _keep: Box::new(keep),
        }
    }

    /// Polls `meter` for `cadence` (at a fixed boundary unless on demand) and waits for the
    /// report.
    pub async fn poll(&self, meter: &str, cadence: Cadence) -> PollReport {
        let (tx, rx) = oneshot::channel();
        let mut req = PollRequest::new(meter, cadence);
        req.reply = Some(tx);
        if cadence != Cadence::OnDemand {
            req.boundary = Some(jiff::Timestamp::from_second(1_774_047_600).expect("ts"));
        }
        self.handle.poll(req).await.expect("queued");
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("poll finished in time")
            .expect("report")
    }

    /// Readings and events stored since the last call.
    pub fn taken(&self) -> (Vec<Reading>, Vec<SystemEvent>) {
        let mut readings = Vec::new();
        let mut events = Vec::new();
        for stream in [Stream::Readings, Stream::Events] {
            for e in self.store.take(stream, 10_000).expect("take") {
                match e.record {
                    Record::Reading(r) => readings.push(r),
                    Record::Event(ev) => events.push(ev),
                }
            }
        }
        (readings, events)
    }
}
