//! The drain against the real RabbitMQ and a real Celery worker: nothing buffered is lost,
//! whatever the broker and the link do.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use amr_edge::clock::SystemClock;
use amr_edge::drain::{AmqpConfig, AmqpPublisher, Drain, DrainSettings};
use amr_edge::store::{Append, SledStore, Store, StoreConfig};
use common::agent::{AgentProc, config};
use common::celery::Celery;
use common::proxy::{Mode, Proxy};
use common::rabbit::{Rabbit, scratch_queue};
use common::{
    AMQP_URL, assert_in_order_per_meter, eventually, expected_json, readings, seed, unique,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Collects everything that arrives in `queue` until `n` distinct reading ids are in, and
/// returns every copy received (duplicates included), in arrival order.
async fn collect(
    rabbit: &Rabbit,
    queue: &str,
    n: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    collect_more(rabbit, queue, Vec::new(), n, timeout).await
}

/// Like [`collect`], counting the copies already in `all` towards the `n` distinct ids.
async fn collect_more(
    rabbit: &Rabbit,
    queue: &str,
    mut all: Vec<serde_json::Value>,
    n: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let mut ids: HashSet<String> = all
        .iter()
        .map(|r| r["reading_id"].as_str().unwrap().to_owned())
        .collect();
    let start = std::time::Instant::now();
    while ids.len() < n {
        for m in rabbit.take_all(queue).await {
            for r in m.items("readings") {
                ids.insert(r["reading_id"].as_str().unwrap().to_owned());
                all.push(r);
            }
        }
        assert!(
            start.elapsed() < timeout,
            "only {} of {n} readings arrived within {timeout:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all
}

/// Waits until at least one more message arrives and adds its readings to `got`.
async fn take_some(rabbit: &Rabbit, queue: &str, got: &mut Vec<serde_json::Value>) {
    let start = std::time::Instant::now();
    loop {
        // A few messages, not all there are: on a loaded machine, taking all could take until
        // the drain has finished, and the cuts would no longer land in its middle.
        let m = rabbit.take_up_to(queue, 20).await;
        if !m.is_empty() {
            got.extend(m.into_iter().flat_map(|m| m.items("readings")));
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing delivered within 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every copy is one of the seeded readings, byte for byte, and every seeded reading came.
fn assert_all_delivered(
    gateway: &str,
    seqs: &[u64],
    seeded: &[amr_edge::reading::Reading],
    got: &[serde_json::Value],
) {
    let want: HashMap<String, serde_json::Value> = seqs
        .iter()
        .zip(seeded)
        .map(|(s, r)| (format!("{gateway}-{s}"), expected_json(gateway, *s, r)))
        .collect();
    let mut seen = HashSet::new();
    for r in got {
        let id = r["reading_id"].as_str().unwrap();
        assert_eq!(
            Some(r),
            want.get(id),
            "a delivered copy differs from what was buffered"
        );
        seen.insert(id.to_owned());
    }
    assert_eq!(
        seen.len(),
        want.len(),
        "not every buffered reading was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_readings_should_reach_a_celery_worker_exactly_and_in_order_per_meter() {
    let (queue, _queues) = scratch_queue("amr.readings");
    let events = format!("{queue}.events");
    let task = "test.commits.meter_readings";
    let celery = Celery::start(&[&queue, &events], task, "test.commits.meter_system_events").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let seeded = readings(1000, 4);
    let seqs = seed(dir.path(), &seeded);
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &format!(
            "task = \"{task}\"\nevents_task = \"test.commits.meter_system_events\"\nreadings_per_message = 37"
        ),
    );
    let mut agent = AgentProc::start(dir.path(), &cfg);
    let got = celery.wait_readings(1000, Duration::from_secs(90)).await;
    assert_all_delivered(&gw, &seqs, &seeded, &got);
    assert_eq!(got.len(), 1000, "no duplicates on a clean run");
    // Per meter, the worker saw the readings in the order they were taken.
    assert_in_order_per_meter(&got);
    // 1000 readings at 37 per message: 28 tasks, each with a distinct deterministic id.
    let tasks: HashSet<String> = celery
        .records()
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tasks.len(), 28);
    assert!(agent.sigterm().success(), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_should_be_celery_v2_tasks_persistent_and_correlated() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.format");
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let seqs = seed(dir.path(), &readings(3, 1));
    let mut agent = AgentProc::start(dir.path(), &config(dir.path(), &gw, AMQP_URL, &queue, ""));
    let msgs = eventually(Duration::from_secs(30), "the message", || async {
        let m = rabbit.take_all(&queue).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let m = &msgs[0];
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.delivery_mode, Some(2));
    let h = |k: &str| m.headers.inner().get(k).cloned();
    let id = match h("id") {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("id header: {other:?}"),
    };
    assert_eq!(m.correlation_id.as_deref(), Some(id.as_str()));
    for k in [
        "lang",
        "task",
        "root_id",
        "parent_id",
        "group",
        "retries",
        "eta",
        "expires",
        "timelimit",
        "argsrepr",
        "kwargsrepr",
        "origin",
    ] {
        assert!(h(k).is_some(), "header {k} missing");
    }
    assert_eq!(m.body[0], serde_json::json!([]));
    assert_eq!(m.body[1]["gateway"], gw.as_str());
    assert_eq!(m.items("readings").len(), seqs.len());
    assert_eq!(
        m.body[2],
        serde_json::json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null})
    );
    agent.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_should_get_everything_once_it_comes_up() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.down");
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let proxy = Proxy::start("127.0.0.1:5672", Mode::Down).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let seeded = readings(500, 3);
    let seqs = seed(dir.path(), &seeded);
    let agent = AgentProc::start(
        dir.path(),
        &config(dir.path(), &gw, &proxy.amqp_url(), &queue, ""),
    );
    agent
        .wait_log("Broker not available", 1, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rabbit.count(&queue).await, 0);
    proxy.set_mode(Mode::Up);
    let got = collect(&rabbit, &queue, 500, Duration::from_secs(60)).await;
    assert_all_delivered(&gw, &seqs, &seeded, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_drain_should_lose_nothing_and_duplicate_only_with_the_same_ids() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.cut");
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let proxy = Proxy::start("127.0.0.1:5672", Mode::Up).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let n = 20_000;
    let seeded = readings(n, 10);
    let seqs = seed(dir.path(), &seeded);
    // Small messages and a slow pace, so the cuts land in the middle of the drain.
    let agent = AgentProc::start(
        dir.path(),
        &config(
            dir.path(),
            &gw,
            &proxy.amqp_url(),
            &queue,
            "readings_per_message = 10\nrate_limit = \"400/s\"",
        ),
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        take_some(&rabbit, &queue, &mut got).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut();
    }
    let before = agent.log().matches("Connected to the broker").count();
    assert!(before >= 1);
    let got = collect_more(&rabbit, &queue, got, n, Duration::from_secs(120)).await;
    assert_all_delivered(&gw, &seqs, &seeded, &got);
    assert!(
        agent.log().matches("Connected to the broker").count() >= 2,
        "the agent should have reconnected after the cuts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_should_keep_readings_buffered_with_a_clear_error() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.missing");
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let seeded = readings(50, 2);
    let seqs = seed(dir.path(), &seeded);
    let agent = AgentProc::start(dir.path(), &config(dir.path(), &gw, AMQP_URL, &queue, ""));
    agent
        .wait_log(
            &format!("queue `{queue}` does not exist on the broker"),
            1,
            Duration::from_secs(20),
        )
        .await;
    assert!(
        agent.log().contains("ERROR"),
        "an operator must act: logged as an error"
    );
    // Still buffered, as `status` reports while the agent runs.
    let out = common::agent::cli(&[
        "status",
        "--json",
        "--config",
        agent.config_path.to_str().unwrap(),
    ]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["buffer"]["readings"], 50, "{status}");
    assert_eq!(status["agent_pid"], agent.pid());
    // The operator fixes it: everything arrives.
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let got = collect(&rabbit, &queue, 50, Duration::from_secs(30)).await;
    assert_all_delivered(&gw, &seqs, &seeded, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_draining_should_deliver_every_buffered_reading_after_restart() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.kill");
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let n = 20_000;
    let seeded = readings(n, 10);
    let seqs = seed(dir.path(), &seeded);
    let mut agent = AgentProc::start(
        dir.path(),
        &config(
            dir.path(),
            &gw,
            AMQP_URL,
            &queue,
            "readings_per_message = 10\nrate_limit = \"500/s\"",
        ),
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        take_some(&rabbit, &queue, &mut got).await;
        agent.kill9();
        agent.restart();
    }
    let got = collect_more(&rabbit, &queue, got, n, Duration::from_secs(120)).await;
    assert_all_delivered(&gw, &seqs, &seeded, &got);
    assert!(agent.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_should_stay_in_the_store_until_the_queue_is_back() {
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.unroutable");
    let events = format!("{queue}.events");
    rabbit.declare(&queue).await;
    rabbit.declare(&events).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock)).unwrap(),
    );
    let mut amqp = AmqpConfig::for_url(AMQP_URL);
    amqp.queue = queue.clone();
    amqp.events_queue = events.clone();
    amqp.max_backoff = amr_edge::primitives::HumanDuration(Duration::from_secs(1));
    let wake = Arc::new(Notify::new());
    let (drain, status) = Drain::new(
        DrainSettings::new("gw-unroutable", &amqp),
        store.clone(),
        AmqpPublisher::new(amqp, "test".into()),
        wake.clone(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drain.run(shutdown.clone()));
    let append = |n| {
        let a = Append {
            readings: readings(n, 1),
            ..Append::default()
        };
        store.append(a).unwrap();
        wake.notify_one();
    };
    append(5);
    collect(&rabbit, &queue, 5, Duration::from_secs(20)).await;
    // The queue disappears under the running drain: publishes come back unroutable.
    rabbit.delete(&queue).await;
    append(7);
    let mut rx = status.clone();
    eventually(
        Duration::from_secs(20),
        "the drain to report the failure",
        || {
            let e = rx.borrow_and_update().last_error.clone();
            async move { e.filter(|e| e.contains("NO_ROUTE") || e.contains("does not exist")) }
        },
    )
    .await;
    assert_eq!(
        store.stats().unwrap().readings(),
        7,
        "returned readings stay buffered"
    );
    rabbit.declare(&queue).await;
    collect(&rabbit, &queue, 7, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "the store to empty", || async {
        (store.stats().unwrap().readings() == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_us_should_be_an_error_and_readings_should_stay() {
    for (what, url, says) in [
        (
            "wrong password",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
            "ACCESS_REFUSED",
        ),
        (
            "missing vhost",
            "amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
            "vhost",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let gw = unique("gw");
        seed(dir.path(), &readings(20, 2));
        let agent = AgentProc::start(dir.path(), &config(dir.path(), &gw, url, &unique("q"), ""));
        agent
            .wait_log(
                "Broker refuses delivery, readings stay buffered",
                1,
                Duration::from_secs(20),
            )
            .await;
        let log = agent.log();
        assert!(log.contains(says), "{what}: the reason is named:\n{log}");
        assert!(
            !log.contains("not-the-password"),
            "{what}: credentials never logged"
        );
        let out = common::agent::cli(&[
            "status",
            "--json",
            "--config",
            agent.config_path.to_str().unwrap(),
        ]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["buffer"]["readings"], 20, "{what}");
        assert!(
            status["drain"]["last_error"]
                .as_str()
                .unwrap()
                .contains(says),
            "{status}"
        );
    }
}
