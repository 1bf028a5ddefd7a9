//! What the rest of the agent sends a bus worker and gets back: poll requests and their
//! reports, cancel and inspect, and the [`Router`] that finds the bus of a meter.

use std::collections::HashMap;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::meter::Failure;
use crate::reading::{Cadence, Flags, Obis, Reading};

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
    /// A profile read in progress (a backfill, or the next chunk of a long read); `None`:
    /// what the meter's `reads` say for the cadence.
    pub rows: Option<Box<super::rows::RowsJob>>,
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
            rows: None,
        }
    }
}

/// What a poll did, for whoever asked.
#[derive(Debug, Clone)]
pub struct PollReport {
    pub meter: String,
    pub cadence: Cadence,
    pub readings: Vec<Reading>,
    /// Why the poll failed or did not run, and what the meter refused (the rest was read).
    pub errors: Vec<PollError>,
    /// Whether the readings are in the store (durable).
    pub stored: bool,
    /// A profile read's rows (its readings are not repeated in `readings`).
    pub rows: Option<super::rows::RowsTally>,
}

/// Why a poll did not (fully) happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The meter or its link failed, or the meter refused part of the read.
    #[error(transparent)]
    Meter(#[from] Failure),
    #[error("unknown meter")]
    UnknownMeter,
    /// Queued when the agent began to stop; a scheduled read is read late after the restart.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The store could not be asked or written (a profile read's high-water mark).
    #[error("store: {0}")]
    Store(String),
    /// A `cancel` dropped the rest of it.
    #[error("cancelled")]
    Cancelled,
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
    pub boundary: Option<Timestamp>,
    pub request_id: Option<String>,
}

impl From<&PollRequest> for PollInfo {
    fn from(r: &PollRequest) -> Self {
        PollInfo {
            meter: r.meter.clone(),
            cadence: r.cadence,
            boundary: r.boundary,
            request_id: r.request_id.clone(),
        }
    }
}

/// A meter's health as its bus worker sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeterHealth {
    pub meter: String,
    pub health: Health,
    pub consecutive_failures: u32,
    pub last_ok: Option<Timestamp>,
    pub last_error: Option<Failure>,
    /// Until when scheduled polls are skipped.
    pub backoff_until: Option<Timestamp>,
    /// Data sets the last read could not map to a series (IEC 62056-21 readouts).
    pub unmapped: usize,
}

/// How a meter is doing, from what was last heard of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not read since the agent (or this bus) started.
    #[default]
    NeverRead,
    /// The last read succeeded.
    Ok,
    /// The last read failed.
    Failing,
}

impl Health {
    /// From the last successful read and the last failure (Unix ms), as the store keeps them.
    pub fn from_last(read_ms: Option<i64>, failed_ms: Option<i64>) -> Health {
        match (read_ms, failed_ms) {
            (None, None) => Health::NeverRead,
            (Some(r), Some(f)) if f > r => Health::Failing,
            (None, Some(_)) => Health::Failing,
            _ => Health::Ok,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::NeverRead => "never read",
            Health::Ok => "ok",
            Health::Failing => "failing",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
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
    pub(super) tx: mpsc::Sender<BusCommand>,
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
    // The request comes back in the error, unboxed, so that the caller can answer it.
    #[allow(clippy::result_large_err)]
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
    // The request comes back in the error, unboxed, so that the caller can answer it.
    #[allow(clippy::result_large_err)]
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
