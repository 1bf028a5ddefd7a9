//! Control's orchestration against the fake broker, a stand-in bus worker and the in-memory
//! store, on paused time.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Topics;
use super::fake::FakeMqtt;
use super::handler::{Context, Handler};
use super::link::Delivery;
use super::remote::ConfigRequest;
use super::session::{Gate, Session};
use super::tasks::{Panics, Tasks};
use crate::beat::BeatConfig;
use crate::bus::{BusCommand, BusHandle, BusSnapshot, PollReport, PollRequest, Router};
use crate::clock::ManualClock;
use crate::drain::DrainStatus;
use crate::reading::{Cadence, Obis, Stamp};
use crate::store::tests::reading;
use crate::store::{CommandLog, MemoryStore};

const AT_MS: i64 = 1_800_000_000_000;

/// One control session: what a start of the agent builds, on a store that outlives it.
struct Rig {
    mqtt: FakeMqtt,
    store: Arc<MemoryStore>,
    gate: Gate<FakeMqtt>,
    stop: CancellationToken,
    tasks: Tasks,
    panics: Panics,
    /// What the control asks of the bus (unless [`Rig::serve`] answers it).
    bus: Option<mpsc::Receiver<BusCommand>>,
    _drain: watch::Sender<DrainStatus>,
}

struct Setup {
    max_pending: usize,
    bus_queue: usize,
    poll_timeout: Duration,
    remote_config: bool,
    /// Where config commands go (a stand-in for the agent's keeper).
    config_requests: Option<mpsc::Sender<ConfigRequest>>,
    notices: Vec<Vec<u8>>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_pending: 16,
            bus_queue: 16,
            poll_timeout: Duration::from_secs(60),
            remote_config: false,
            config_requests: None,
            notices: Vec::new(),
        }
    }
}

fn start(store: Arc<MemoryStore>, setup: Setup) -> Rig {
    let (handle, bus) = BusHandle::channel("lan", setup.bus_queue);
    let mut router = Router::default();
    router.add_bus(handle, ["m1".to_owned(), "m2".to_owned()]);
    let (drain_tx, drain) = watch::channel(DrainStatus::default());
    let at = jiff::Timestamp::from_millisecond(AT_MS).unwrap();
    let cx = Arc::new(Context {
        router,
        store: store.clone(),
        drain,
        clock: ManualClock::new(at),
        tz: jiff::tz::TimeZone::UTC,
        beat: BeatConfig::default(),
        meters: vec!["m1".into(), "m2".into()],
        gateway: "gw-test".into(),
        started_at: at,
        topics: Topics {
            commands: "p/gw-test/commands".into(),
            replies: "p/gw-test/replies".into(),
            status: "p/gw-test/status".into(),
        },
        poll_timeout: setup.poll_timeout,
        max_backfill: Duration::from_secs(31 * 86_400),
        key: None,
        max_payload: 4096,
        signature_window: Duration::from_secs(300),
        remote_config: setup.remote_config,
        config_requests: setup.config_requests,
        notices: setup.notices,
    });
    let mqtt = FakeMqtt::default();
    let stop = CancellationToken::new();
    let (tasks, panics) = Tasks::new();
    let handler = Handler::new(cx, mqtt.clone(), tasks.clone(), stop.clone());
    let (session, gate) = Session::new(handler, setup.max_pending, Duration::from_secs(60));
    tasks.spawn("command", session.run(stop.clone()));
    Rig {
        mqtt,
        store,
        gate,
        stop,
        tasks,
        panics,
        bus: Some(bus),
        _drain: drain_tx,
    }
}

impl Rig {
    fn send(&self, pkid: u16, command: Value) {
        self.gate.offer(Delivery::new(pkid, command.to_string()));
    }

    /// The next poll the bus is asked for.
    async fn next_poll(&mut self) -> PollRequest {
        let bus = self.bus.as_mut().expect("the bus is served");
        loop {
            match tokio::time::timeout(Duration::from_secs(600), bus.recv()).await {
                Ok(Some(BusCommand::Poll(req))) => return req,
                Ok(Some(_)) => continue,
                _ => panic!("no poll reached the bus"),
            }
        }
    }

    /// A stand-in bus worker that reads every meter at once and answers inspect and cancel.
    fn serve(&mut self) {
        let mut bus = self.bus.take().expect("served once");
        tokio::spawn(async move {
            while let Some(cmd) = bus.recv().await {
                match cmd {
                    BusCommand::Poll(req) => answer(req),
                    BusCommand::Inspect(tx) => {
                        let _ = tx.send(BusSnapshot {
                            bus: "lan".into(),
                            ..BusSnapshot::default()
                        });
                    }
                    BusCommand::Cancel { reply, .. } => {
                        let _ = reply.send(Vec::new());
                    }
                }
            }
        });
    }

    /// Waits until `f` holds (paused time: simulated minutes cost nothing).
    async fn until(&self, what: &str, f: impl Fn(&Rig) -> bool) {
        for _ in 0..60_000 {
            if f(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}; replies: {:#?}", self.mqtt.on("/replies"));
    }

    fn statuses(&self, request_id: &str) -> Vec<Value> {
        self.mqtt
            .replies_to(request_id)
            .into_iter()
            .map(|r| r["status"].clone())
            .collect()
    }

    /// A stop (or a crash: nothing is written on the way out that a kill would not skip).
    async fn stop(self) -> Arc<MemoryStore> {
        self.stop.cancel();
        self.tasks.close().await;
        self.store
    }
}

fn answer(req: PollRequest) {
    let report = PollReport {
        meter: req.meter.clone(),
        cadence: Cadence::OnDemand,
        readings: vec![reading(&req.meter, Cadence::OnDemand, 11_000_125, AT_MS)],
        errors: Vec::new(),
        stored: true,
        rows: None,
    };
    if let Some(tx) = req.reply {
        let _ = tx.send(report);
    }
}

fn poll(id: &str, meters: &[&str]) -> Value {
    json!({"request_id": id, "command": "poll", "meters": meters})
}

#[tokio::test(start_paused = true)]
async fn a_poll_should_be_accepted_then_done_with_values_and_acked_once_recorded() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.send(7, poll("r1", &["m1", "m2"]));
    let first = rig.next_poll().await;
    assert_eq!(first.request_id.as_deref(), Some("r1"));
    rig.until("accepted and acked", |r| !r.mqtt.broker().acked.is_empty())
        .await;
    // Acknowledged only with the command on record.
    assert_eq!(rig.mqtt.broker().acked, [7]);
    assert_eq!(rig.store.unfinished_commands(AT_MS).unwrap().len(), 1);
    answer(first);
    let second = rig.next_poll().await;
    answer(second);
    rig.until("done", |r| r.statuses("r1").len() == 2).await;
    assert_eq!(rig.statuses("r1"), [json!("accepted"), json!("done")]);
    let done = &rig.mqtt.replies_to("r1")[1];
    assert_eq!(done["results"][0]["ok"], true);
    assert_eq!(done["results"][1]["values"][0]["value"], "11000.125");
    assert!(rig.store.unfinished_commands(AT_MS).unwrap().is_empty());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_accepted_poll_interrupted_by_a_restart_should_run_after_it_and_the_redelivery_not_be_refused()
 {
    // Before: the request id was recorded as "seen" and nothing else; after the restart the
    // redelivered command was refused as a duplicate and its polls never ran.
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.send(1, poll("r1", &["m1"]));
    let lost = rig.next_poll().await;
    rig.until("accepted", |r| r.statuses("r1") == [json!("accepted")])
        .await;
    // The agent dies with the poll queued: it never runs.
    drop(lost);
    let store = rig.stop().await;

    let mut rig = start(store, Setup::default());
    let again = rig.next_poll().await;
    assert_eq!(again.meter, "m1");
    assert_eq!(again.request_id.as_deref(), Some("r1"));
    // The broker delivers it again (it may not have seen the ack): still running, not refused.
    rig.send(1, poll("r1", &["m1"]));
    rig.until("the redelivery answered", |r| {
        !r.mqtt.broker().acked.is_empty()
    })
    .await;
    let dup = &rig.mqtt.replies_to("r1")[0];
    assert_eq!(dup["status"], "accepted");
    assert_eq!(dup["duplicate"], true);
    answer(again);
    rig.until("done", |r| r.statuses("r1").contains(&json!("done")))
        .await;
    let done = rig
        .mqtt
        .replies_to("r1")
        .into_iter()
        .find(|r| r["status"] == "done")
        .unwrap();
    assert_eq!(done["results"][0]["ok"], true);
    assert!(
        !rig.statuses("r1").contains(&json!("rejected")),
        "{:?}",
        rig.statuses("r1")
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_after_done_should_get_the_original_done_even_after_a_restart() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.serve();
    rig.send(1, poll("once", &["m1"]));
    rig.until("done", |r| r.statuses("once").len() == 2).await;
    let original = rig.mqtt.replies_to("once")[1].clone();
    let store = rig.stop().await;

    let mut rig = start(store, Setup::default());
    let mut bus = rig.bus.take().unwrap();
    rig.send(2, poll("once", &["m1"]));
    rig.until("answered", |r| !r.statuses("once").is_empty())
        .await;
    let mut again = rig.mqtt.replies_to("once")[0].clone();
    assert_eq!(again["duplicate"], true);
    again.as_object_mut().unwrap().remove("duplicate");
    assert_eq!(again, original, "the stored outcome, word for word");
    assert!(bus.try_recv().is_err(), "not run again");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_poll_that_cannot_be_queued_should_be_rejected_busy_and_may_come_again() {
    let mut rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            bus_queue: 1,
            ..Setup::default()
        },
    );
    rig.send(1, poll("a", &["m1"]));
    rig.until("a accepted", |r| !r.statuses("a").is_empty())
        .await;
    rig.send(2, poll("b", &["m1"]));
    rig.until("b answered", |r| !r.statuses("b").is_empty())
        .await;
    let b = &rig.mqtt.replies_to("b")[0];
    assert_eq!(b["status"], "rejected");
    assert!(b["reason"].as_str().unwrap().starts_with("busy"), "{b}");
    // Room again: the same request id runs.
    rig.serve();
    rig.send(3, poll("b", &["m1"]));
    rig.until("b done", |r| r.statuses("b").contains(&json!("done")))
        .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_flood_should_be_answered_busy_and_acked_and_nothing_dropped_silently() {
    let mut rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            max_pending: 2,
            ..Setup::default()
        },
    );
    rig.serve();
    // Offered back to back, as the I/O loop does: the command loop cannot keep up.
    for i in 0..10 {
        rig.send(i, json!({"request_id": format!("f{i}"), "command": "ping"}));
    }
    rig.until("every command answered", |r| {
        (0..10).all(|i| !r.statuses(&format!("f{i}")).is_empty())
    })
    .await;
    let busy = rig
        .mqtt
        .on("/replies")
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|s| s.starts_with("busy")))
        .count();
    assert!(busy >= 7, "{busy} turned away");
    let mut acked = rig.mqtt.broker().acked.clone();
    acked.sort_unstable();
    assert_eq!(acked, (0..10).collect::<Vec<u16>>());

    // No room even to say so: left for the broker to deliver again, not acked.
    rig.mqtt.broker().full = true;
    for i in 10..20 {
        rig.send(i, json!({"request_id": format!("g{i}"), "command": "ping"}));
    }
    rig.until("the queued ones answered", |r| {
        r.mqtt.broker().acked.len() >= 12
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.mqtt.broker().acked.len(), 12, "only those queued");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn malformed_commands_and_a_failing_store_should_be_rejected_and_still_acked() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.serve();
    rig.gate.offer(Delivery::new(1, "not json"));
    rig.send(2, json!({"request_id": "x", "command": "reboot"}));
    rig.store.fail_writes(true);
    rig.send(3, json!({"request_id": "y", "command": "ping"}));
    rig.until("three acks", |r| r.mqtt.broker().acked.len() == 3)
        .await;
    let replies = rig.mqtt.on("/replies");
    assert!(
        replies.iter().all(|r| r["status"] == "rejected"),
        "{replies:#?}"
    );
    assert!(replies[0]["reason"].as_str().unwrap().contains("not JSON"));
    assert!(
        replies[1]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown command")
    );
    assert!(
        replies[2]["reason"]
            .as_str()
            .unwrap()
            .contains("store unavailable")
    );
    // The store is back: the same id runs (nothing was recorded).
    rig.store.fail_writes(false);
    rig.send(4, json!({"request_id": "y", "command": "ping"}));
    rig.until("pong", |r| r.statuses("y").contains(&json!("done")))
        .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn ping_inspect_and_cancel_should_be_done_at_once() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.serve();
    rig.send(1, json!({"request_id": "p", "command": "ping"}));
    rig.send(2, json!({"request_id": "i", "command": "inspect"}));
    rig.send(
        3,
        json!({"request_id": "c", "command": "cancel", "target": "r9"}),
    );
    rig.until("three done", |r| {
        ["p", "i", "c"]
            .iter()
            .all(|id| r.statuses(id) == [json!("done")])
    })
    .await;
    let p = &rig.mqtt.replies_to("p")[0];
    assert_eq!(p["result"]["pong"], true);
    assert_eq!(p["result"]["gateway"], "gw-test");
    let i = &rig.mqtt.replies_to("i")[0];
    assert_eq!(i["result"]["buses"][0]["bus"], "lan");
    assert!(i["result"]["next_reads"]["quarterly"].is_string());
    assert_eq!(i["result"]["meters"][0]["meter"], "m1");
    let c = &rig.mqtt.replies_to("c")[0];
    assert_eq!(c["result"], json!({"target": "r9", "cancelled": 0}));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_or_silent_meter_should_be_reported_in_done() {
    let mut rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            poll_timeout: Duration::from_secs(30),
            ..Setup::default()
        },
    );
    rig.send(1, poll("r", &["m1", "m2"]));
    let m1 = rig.next_poll().await;
    let _m2 = rig.next_poll().await;
    drop(m1); // the bus dropped it: a cancel
    rig.until("done", |r| r.statuses("r").contains(&json!("done")))
        .await;
    let done = &rig.mqtt.replies_to("r")[1];
    assert_eq!(done["results"][0]["error"], "cancelled");
    assert_eq!(done["results"][1]["error"], "no result within 30s");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_session_should_subscribe_and_publish_online_retained() {
    let rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.gate.connected(false);
    rig.until("online", |r| {
        r.mqtt.on("/status").iter().any(|s| s["state"] == "online")
    })
    .await;
    assert_eq!(rig.mqtt.broker().subscribed, ["p/gw-test/commands"]);
    let (_, retained, doc) = rig.mqtt.broker().published.last().cloned().unwrap();
    assert!(retained);
    assert_eq!(doc["gateway"], "gw-test");
    assert!(doc["buffer"]["readings"].is_u64());
    // A kept session needs no new subscription.
    rig.gate.connected(true);
    let n = rig.mqtt.on("/status").len();
    rig.until("online again", |r| r.mqtt.on("/status").len() > n)
        .await;
    assert_eq!(rig.mqtt.broker().subscribed.len(), 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_should_wait_for_every_task_and_leave_running_polls_to_the_next_start() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.send(1, poll("r", &["m1"]));
    let _held = rig.next_poll().await;
    rig.until("accepted", |r| !r.statuses("r").is_empty()).await;
    assert!(
        rig.tasks.len() >= 3,
        "command, status and the poll's waiter"
    );
    let tasks = rig.tasks.clone();
    let mqtt = rig.mqtt.clone();
    let mut panics = std::mem::replace(&mut rig.panics, mpsc::channel(1).1);
    let store = rig.stop().await;
    assert_eq!(tasks.len(), 0);
    assert_eq!(mqtt.replies_to("r").len(), 1, "no done, not `cancelled`");
    assert_eq!(store.unfinished_commands(AT_MS).unwrap().len(), 1);
    assert!(panics.try_recv().is_err());
}

/// A stand-in for the agent's config keeper: answers every configure with `configure`, every
/// confirm with `confirm`, and counts the requests.
fn keeper(
    configure: Result<String, super::reply::Rejected>,
    confirm: Result<super::reply::Confirmed, String>,
) -> (
    mpsc::Sender<ConfigRequest>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let (tx, mut rx) = mpsc::channel(4);
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = asked.clone();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match req {
                ConfigRequest::Configure { reply, .. } => {
                    let _ = reply.send(configure.clone());
                }
                ConfigRequest::Confirm { reply, .. } => {
                    let _ = reply.send(confirm.clone());
                }
                ConfigRequest::Get { .. } => {}
            }
        }
    });
    (tx, asked)
}

fn configure(id: &str) -> Value {
    json!({"request_id": id, "command": "configure", "config": "[gateway]", "base": "abc", "confirm_within": "1m"})
}

#[tokio::test(start_paused = true)]
async fn a_configure_should_be_refused_unrecorded_while_remote_configuration_is_off() {
    let (tx, asked) = keeper(Ok("sha".into()), Err("unused".into()));
    let rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            config_requests: Some(tx),
            ..Setup::default()
        },
    );
    rig.send(3, configure("c1"));
    rig.until("rejected", |r| !r.statuses("c1").is_empty())
        .await;
    let r = &rig.mqtt.replies_to("c1")[0];
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("remote_config = true"),
        "{r}"
    );
    rig.until("acked", |r| r.mqtt.broker().acked == [3]).await;
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Not recorded: once allowed, the same request may come again.
    let store = rig.stop().await;
    assert!(store.unfinished_commands(AT_MS).unwrap().is_empty());
    assert!(
        store
            .accept_command(&crate::store::CommandRecord {
                request_id: "c1".into(),
                accepted_ms: AT_MS,
                command: "{}".into(),
                outcome: None,
            })
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn a_configure_the_keeper_took_should_be_accepted_and_left_to_the_keeper_to_finish() {
    let (tx, asked) = keeper(Ok("sha".into()), Err("unused".into()));
    let rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            remote_config: true,
            config_requests: Some(tx),
            notices: vec![br#"{"request_id":"c0","status":"reverted"}"#.to_vec()],
            ..Setup::default()
        },
    );
    // What the agent recorded for this generation goes out first.
    rig.until("notice", |r| r.statuses("c0") == [json!("reverted")])
        .await;
    rig.send(4, configure("c1"));
    rig.until("accepted", |r| !r.statuses("c1").is_empty())
        .await;
    assert_eq!(rig.statuses("c1"), [json!("accepted")]);
    rig.until("acked", |r| r.mqtt.broker().acked == [4]).await;
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // `applied` is the keeper's to record (and the next generation's to send).
    assert_eq!(rig.store.unfinished_commands(AT_MS).unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_configure_or_confirm_the_keeper_refused_should_be_rejected_and_stay_so() {
    let mut refusal = super::reply::Rejected::new(Some("c1"), "stale base");
    refusal.problems.push(super::reply::ConfigProblem {
        line: Some(3),
        column: Some(1),
        key: "gateway.id".into(),
        message: "bad".into(),
    });
    let (tx, _) = keeper(Err(refusal), Err("too late".into()));
    let rig = start(
        Arc::new(MemoryStore::new()),
        Setup {
            remote_config: true,
            config_requests: Some(tx),
            ..Setup::default()
        },
    );
    rig.send(5, configure("c1"));
    rig.send(
        6,
        json!({"request_id": "k1", "command": "confirm", "target": "c1"}),
    );
    rig.until("both rejected", |r| {
        r.statuses("c1") == [json!("rejected")] && r.statuses("k1") == [json!("rejected")]
    })
    .await;
    assert_eq!(
        rig.mqtt.replies_to("c1")[0]["problems"][0]["key"],
        "gateway.id"
    );
    assert_eq!(rig.mqtt.replies_to("k1")[0]["reason"], "too late");
    // A duplicate gets the same answer, not a second try.
    rig.send(7, configure("c1"));
    rig.until("duplicate", |r| r.statuses("c1").len() == 2)
        .await;
    let again = &rig.mqtt.replies_to("c1")[1];
    assert_eq!(
        (&again["status"], &again["duplicate"]),
        (&json!("rejected"), &json!(true))
    );
}

#[tokio::test(start_paused = true)]
async fn a_configure_interrupted_before_the_keeper_wrote_it_should_be_rejected_after_the_restart() {
    let store = Arc::new(MemoryStore::new());
    let command = super::command::Command::Configure {
        config: "[gateway]".into(),
        base: "abc".into(),
        confirm_within_ms: 60_000,
    };
    store
        .accept_command(&crate::store::CommandRecord {
            request_id: "c1".into(),
            accepted_ms: AT_MS,
            command: serde_json::to_string(&command).unwrap(),
            outcome: None,
        })
        .unwrap();
    let (tx, asked) = keeper(Ok("sha".into()), Err("unused".into()));
    let rig = start(
        store,
        Setup {
            remote_config: true,
            config_requests: Some(tx),
            ..Setup::default()
        },
    );
    rig.until("rejected", |r| !r.statuses("c1").is_empty())
        .await;
    let r = &rig.mqtt.replies_to("c1")[0];
    assert!(r["reason"].as_str().unwrap().contains("interrupted"), "{r}");
    // Never applied after the fact, and forgotten, so the redelivery runs afresh.
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(rig.store.unfinished_commands(AT_MS).unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_backfill_should_queue_range_reads_and_be_done_with_row_counts_and_first_and_last() {
    let mut rig = start(Arc::new(MemoryStore::new()), Setup::default());
    rig.send(
        3,
        json!({"request_id": "bf1", "command": "backfill", "meters": ["m1"], "profile": "1-0:99.1.0",
               "from": "2026-11-20T00:00:00Z", "to": "2026-11-21T00:00:00Z"}),
    );
    let mut req = rig.next_poll().await;
    let job = req.rows.as_ref().expect("a profile read");
    assert_eq!(
        job.backfill,
        Some((
            "2026-11-20T00:00:00Z".parse().unwrap(),
            "2026-11-21T00:00:00Z".parse().unwrap()
        ))
    );
    assert_eq!(job.profile, Obis([1, 0, 99, 1, 0, 255]));
    let stamp = |s: &str| Stamp::in_zone(s.parse().unwrap(), &jiff::tz::TimeZone::UTC);
    let tally = crate::bus::rows::RowsTally {
        rows: 97,
        readings: 194,
        chunks: 2,
        first: Some(stamp("2026-11-20T00:00:00Z")),
        last: Some(stamp("2026-11-21T00:00:00Z")),
        gaps: Vec::new(),
    };
    let _ = req.reply.take().unwrap().send(PollReport {
        meter: "m1".into(),
        cadence: Cadence::OnDemand,
        readings: Vec::new(),
        errors: Vec::new(),
        stored: true,
        rows: Some(tally),
    });
    rig.until("done", |r| r.statuses("bf1").len() == 2).await;
    let replies = rig.mqtt.replies_to("bf1");
    assert_eq!(replies[0]["command"], "backfill");
    let done = &replies[1];
    assert_eq!(done["status"], "done");
    let m = &done["results"][0];
    assert_eq!(
        (m["ok"].clone(), m["rows"].clone()),
        (json!(true), json!(97))
    );
    assert_eq!(m["first"], "2026-11-20T00:00:00+00:00");
    assert_eq!(m["last"], "2026-11-21T00:00:00+00:00");
    rig.send(
        4,
        json!({"request_id": "bf2", "command": "backfill", "meters": ["m1"], "profile": "1-0:99.1.0",
               "from": "2026-09-01T00:00:00Z", "to": "2026-11-21T00:00:00Z"}),
    );
    rig.until("rejected", |r| r.statuses("bf2") == [json!("rejected")])
        .await;
    assert!(
        rig.mqtt.replies_to("bf2")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_backfill")
    );
    rig.stop().await;
}
