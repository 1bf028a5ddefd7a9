//! The bus worker against simulated Modbus meters on loopback TCP and the in-memory store.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::sync::{Notify, oneshot};
use tokio_modbus::ExceptionCode;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::ManualClock;
use crate::meter::modbus::profile::Profiles;
use crate::reading::{Cadence, Decimal, EventKind, SystemEvent};
use crate::sim::modbus::{Fault, Meters, Unit, spawn_tcp};
use crate::store::{MemoryStore, Record, Store};

struct Bench {
    meters: Meters,
    handle: BusHandle,
    store: Arc<MemoryStore>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A TCP bus with one simulated SDM630 per unit id, meter ids `m{unit}`.
async fn bench(units: &[u8], concurrency: usize) -> Bench {
    let profiles = Profiles::built_in();
    let meters = Meters::new();
    for u in units {
        meters.insert(
            *u,
            Unit::new(profiles.get("eastron-sdm630").unwrap().clone()),
        );
    }
    let addr = spawn_tcp(meters.clone()).await.unwrap();
    let bus: BusConfig = toml::from_str(&format!(
        "name = \"lan\"\ntimeout = \"300ms\"\nretries = 1\ntcp = {{ host = \"{}\", port = {}, concurrency = {concurrency} }}",
        addr.ip(),
        addr.port()
    ))
    .unwrap();
    let configs: Vec<MeterConfig> = units
        .iter()
        .map(|u| {
            toml::from_str(&format!(
                "id = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\nreads = {{ quarterly = [\"1-0:1.8.0\", \"1-0:32.7.0\"], daily = \"all\" }}"
            ))
            .unwrap()
        })
        .collect();
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new("2026-11-21T10:15:02Z".parse().unwrap());
    let tz = TimeZone::get("Europe/Stockholm").unwrap();
    let (bus, resolved) = resolve(&bus, &configs, &profiles, &tz).unwrap();
    let (worker, handle) = BusWorker::new(
        bus,
        resolved,
        store.clone(),
        Arc::new(Notify::new()),
        clock,
        tz,
        64,
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Bench {
        meters,
        handle,
        store,
        shutdown,
        task,
    }
}

fn scheduled(meter: &str, cadence: Cadence, boundary: &str) -> PollRequest {
    let mut r = PollRequest::new(meter, cadence);
    r.boundary = Some(boundary.parse().unwrap());
    r
}

async fn ask(handle: &BusHandle, mut req: PollRequest) -> PollReport {
    let (tx, rx) = oneshot::channel();
    req.reply = Some(tx);
    handle.poll(req).await.unwrap();
    rx.await.unwrap()
}

fn events(store: &MemoryStore) -> Vec<SystemEvent> {
    store
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Event(e) => Some(e),
            Record::Reading(_) => None,
        })
        .collect()
}

impl Bench {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn a_scheduled_poll_should_store_exact_values_stamped_with_the_boundary_and_mark_it() {
    let b = bench(&[1], 1).await;
    let report = ask(
        &b.handle,
        scheduled("m1", Cadence::Quarterly, "2026-11-21T10:15:00Z"),
    )
    .await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.stored);
    let values: Vec<(String, String, String)> = report
        .readings
        .iter()
        .map(|r| (r.series.to_string(), r.value.to_string(), r.unit.clone()))
        .collect();
    assert_eq!(
        values,
        [
            ("1-0-32-7-0-255".into(), "230.1".into(), "V".into()),
            ("1-0-1-8-0-255".into(), "11000.125".into(), "kWh".into()),
        ]
    );
    let r = &report.readings[0];
    assert_eq!(r.timestamp.rfc3339(), "2026-11-21T11:15:00+01:00");
    assert_eq!(r.read_at.rfc3339(), "2026-11-21T11:15:02+01:00");
    assert_eq!(r.cadence, Cadence::Quarterly);
    assert_eq!(
        b.store.boundary("m1", Cadence::Quarterly).unwrap(),
        Some(
            "2026-11-21T10:15:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_millisecond()
        )
    );
    assert_eq!(b.store.records().len(), 2);
    b.stop().await;
}

#[tokio::test]
async fn a_meter_that_never_answers_should_give_an_event_and_not_stop_the_others() {
    let b = bench(&[1, 2], 1).await;
    b.meters.set_fault(1, Fault::Silent);
    let dead = ask(
        &b.handle,
        scheduled("m1", Cadence::Daily, "2026-11-21T00:00:00Z"),
    )
    .await;
    let alive = ask(
        &b.handle,
        scheduled("m2", Cadence::Daily, "2026-11-21T00:00:00Z"),
    )
    .await;
    assert!(dead.readings.is_empty());
    assert!(
        dead.errors[0].to_string().contains("no answer"),
        "{:?}",
        dead.errors
    );
    assert_eq!(alive.readings.len(), 17);
    let ev = events(&b.store);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::MeterNotAnswering);
    assert_eq!(ev[0].meter.as_deref(), Some("m1"));
    assert_eq!(ev[0].bus.as_deref(), Some("lan"));
    // No mark for the failed read: it was not done.
    assert_eq!(b.store.boundary("m1", Cadence::Daily).unwrap(), None);
    assert!(b.store.boundary("m2", Cadence::Daily).unwrap().is_some());
    b.stop().await;
}

#[tokio::test]
async fn an_exception_should_be_reported_by_name() {
    let b = bench(&[1], 1).await;
    b.meters
        .set_fault(1, Fault::Exception(ExceptionCode::IllegalDataAddress));
    let r = ask(
        &b.handle,
        scheduled("m1", Cadence::Quarterly, "2026-11-21T10:15:00Z"),
    )
    .await;
    assert!(r.readings.is_empty());
    let ev = events(&b.store);
    assert_eq!(ev[0].kind, EventKind::ExceptionResponse);
    assert!(
        ev[0].message.contains("illegal data address"),
        "{}",
        ev[0].message
    );
    assert!(
        ev[0]
            .details
            .contains(&("exception_code".into(), "2".into()))
    );
    b.stop().await;
}

#[tokio::test]
async fn on_demand_polls_should_be_served_before_queued_scheduled_ones() {
    let b = bench(&[1, 2, 3, 4, 5], 1).await;
    // m1 keeps the bus busy while the others queue up.
    b.meters.set_fault(1, Fault::Delay(150));
    let mut replies = Vec::new();
    for (m, c) in [
        ("m1", Cadence::Quarterly),
        ("m2", Cadence::Quarterly),
        ("m3", Cadence::Quarterly),
        ("m4", Cadence::Daily),
    ] {
        let (tx, rx) = oneshot::channel();
        let mut req = scheduled(m, c, "2026-11-21T00:00:00Z");
        req.reply = Some(tx);
        b.handle.poll(req).await.unwrap();
        replies.push(rx);
    }
    let (tx, rx) = oneshot::channel();
    let mut req = PollRequest::new("m5", Cadence::OnDemand);
    req.reply = Some(tx);
    b.handle.poll(req).await.unwrap();
    replies.push(rx);
    for r in replies {
        r.await.unwrap();
    }
    let order: Vec<String> = b
        .store
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Reading(r) => Some(r.meter),
            Record::Event(_) => None,
        })
        .fold(Vec::new(), |mut v, m| {
            if v.last() != Some(&m) {
                v.push(m);
            }
            v
        });
    // The frame in flight finishes first; then on-demand, then daily before quarterly.
    assert_eq!(order, ["m1", "m5", "m4", "m2", "m3"]);
    b.stop().await;
}

#[tokio::test]
async fn a_poll_still_queued_at_the_next_boundary_should_raise_an_overrun_not_a_duplicate() {
    let b = bench(&[1, 2], 1).await;
    b.meters.set_fault(1, Fault::Delay(200));
    let (tx, busy) = oneshot::channel();
    let mut first = scheduled("m1", Cadence::Quarterly, "2026-11-21T10:00:00Z");
    first.reply = Some(tx);
    b.handle.poll(first).await.unwrap();
    b.handle
        .poll(scheduled("m2", Cadence::Quarterly, "2026-11-21T10:00:00Z"))
        .await
        .unwrap();
    let (tx, rx) = oneshot::channel();
    let mut again = scheduled("m2", Cadence::Quarterly, "2026-11-21T10:15:00Z");
    again.reply = Some(tx);
    b.handle.poll(again).await.unwrap();
    busy.await.unwrap();
    // The newer request did not queue: its reply channel was dropped, and the queued read
    // moved to the newer boundary.
    assert!(rx.await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let readings: Vec<_> = b
        .store
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Reading(r) if r.meter == "m2" => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(readings.len(), 2, "one read of m2, not two");
    assert_eq!(readings[0].timestamp.rfc3339(), "2026-11-21T11:15:00+01:00");
    let ev = events(&b.store);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Overrun);
    assert!(
        ev[0]
            .details
            .iter()
            .any(|(k, v)| k == "skipped_boundary" && v.starts_with("2026-11-21T11:00:00"))
    );
    b.stop().await;
}

#[tokio::test]
async fn a_meter_failing_three_times_should_be_backed_off_for_scheduled_but_not_on_demand_polls() {
    let b = bench(&[1], 1).await;
    b.meters.set_fault(1, Fault::Silent);
    for i in 0..3 {
        ask(
            &b.handle,
            scheduled(
                "m1",
                Cadence::Quarterly,
                &format!("2026-11-21T10:{:02}:00Z", i * 15),
            ),
        )
        .await;
    }
    let before = b.meters.requests();
    // Skipped: no request reaches the bus.
    let (tx, rx) = oneshot::channel();
    let mut req = scheduled("m1", Cadence::Quarterly, "2026-11-21T10:45:00Z");
    req.reply = Some(tx);
    b.handle.poll(req).await.unwrap();
    assert!(rx.await.is_err(), "a skipped poll has no report");
    assert_eq!(b.meters.requests(), before);
    let snap = b.handle.inspect().await.unwrap();
    assert_eq!(snap.meters[0].consecutive_failures, 3);
    assert!(snap.meters[0].backoff_until.is_some());
    // An operator's request is still tried, and a success ends the backoff.
    b.meters.set_fault(1, Fault::None);
    let r = ask(&b.handle, PollRequest::new("m1", Cadence::OnDemand)).await;
    assert_eq!(r.readings.len(), 17);
    let snap = b.handle.inspect().await.unwrap();
    assert_eq!(snap.meters[0].consecutive_failures, 0);
    b.stop().await;
}

#[tokio::test]
async fn on_demand_series_should_limit_what_is_read() {
    let b = bench(&[1], 1).await;
    let mut req = PollRequest::new("m1", Cadence::OnDemand);
    req.series = Some(vec!["1-0:2.8.0".parse().unwrap()]);
    let r = ask(&b.handle, req).await;
    assert_eq!(r.readings.len(), 1);
    assert_eq!(r.readings[0].value, Decimal::parse("12000.125").unwrap());
    assert_eq!(
        r.readings[0].timestamp, r.readings[0].read_at,
        "on demand: stamped when read"
    );
    b.stop().await;
}

#[tokio::test]
async fn cancel_should_drop_queued_on_demand_polls_only() {
    let b = bench(&[1, 2], 1).await;
    b.meters.set_fault(1, Fault::Delay(200));
    b.handle
        .poll(PollRequest::new("m1", Cadence::OnDemand))
        .await
        .unwrap();
    let mut req = PollRequest::new("m2", Cadence::OnDemand);
    req.request_id = Some("req-7".into());
    b.handle.poll(req).await.unwrap();
    let cancelled = b.handle.cancel("req-7").await;
    assert_eq!(cancelled.len(), 1);
    assert!(b.handle.cancel("req-7").await.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn shutdown_should_finish_the_poll_in_hand() {
    let b = bench(&[1], 1).await;
    b.meters.set_fault(1, Fault::Delay(200));
    let (tx, rx) = oneshot::channel();
    let mut req = PollRequest::new("m1", Cadence::OnDemand);
    req.reply = Some(tx);
    b.handle.poll(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.shutdown.cancel();
    let report = rx.await.unwrap();
    assert!(report.stored);
    b.task.await.unwrap();
}

#[tokio::test]
async fn readings_the_store_cannot_take_should_wait_in_memory_and_be_stored_later_in_order() {
    let b = bench(&[1], 1).await;
    b.store.fail_writes(true);
    let first = ask(
        &b.handle,
        scheduled("m1", Cadence::Quarterly, "2026-11-21T10:00:00Z"),
    )
    .await;
    let second = ask(
        &b.handle,
        scheduled("m1", Cadence::Quarterly, "2026-11-21T10:15:00Z"),
    )
    .await;
    assert!(!first.stored && !second.stored, "not durable yet");
    assert_eq!(first.readings.len(), 2, "but read");
    assert!(b.store.records().is_empty());
    // The disk has room again: the next poll stores what waited first, then its own.
    b.store.fail_writes(false);
    let third = ask(
        &b.handle,
        scheduled("m1", Cadence::Quarterly, "2026-11-21T10:30:00Z"),
    )
    .await;
    assert!(third.stored);
    let stamps: Vec<String> = b
        .store
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Reading(r) => Some(r.timestamp.rfc3339()),
            Record::Event(_) => None,
        })
        .collect();
    assert_eq!(
        stamps,
        [
            "2026-11-21T11:00:00+01:00",
            "2026-11-21T11:00:00+01:00",
            "2026-11-21T11:15:00+01:00",
            "2026-11-21T11:15:00+01:00",
            "2026-11-21T11:30:00+01:00",
            "2026-11-21T11:30:00+01:00"
        ]
    );
    assert_eq!(
        b.store.boundary("m1", Cadence::Quarterly).unwrap(),
        Some(
            "2026-11-21T10:30:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_millisecond()
        )
    );
    b.stop().await;
}
