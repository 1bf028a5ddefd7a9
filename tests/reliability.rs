//! Proof under fault and load, with the real binary: kill -9 in a loop, a broker outage, a
//! flaky uplink, a full disk and a damaged store. Nothing the store reported as buffered may
//! be lost. Set AMR_EDGE_LONG=1 for the long variants (more kills, longer chaos); run with
//! `-- --nocapture` to see the counts.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::agent::{AgentProc, buffered_ids, cli, config, polling, rss_kib, sdm630s};
use common::celery::Celery;
use common::mqtt::Centre;
use common::proxy::{Mode, Proxy};
use common::rabbit::{Rabbit, scratch_queue};
use common::{AMQP_URL, assert_in_order_per_meter, eventually, readings, seed, unique};
use serde_json::{Value, json};

fn long() -> bool {
    std::env::var_os("AMR_EDGE_LONG").is_some()
}

/// Stops the agent, then runs it with no meters, so that it only drains what it holds.
async fn drain_only(
    agent: &mut AgentProc,
    dir: &Path,
    gw: &str,
    amqp: &str,
    queue: &str,
    amqp_extra: &str,
) {
    agent.wait_running(Duration::from_secs(30)).await;
    let status = agent.sigterm();
    if !status.success() {
        let log = agent.log();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "the agent exited with {status} on SIGTERM:\n{}",
            tail.join("\n")
        );
    }
    std::fs::write(&agent.config_path, config(dir, gw, amqp, queue, amqp_extra)).unwrap();
    agent.restart();
    agent.wait_running(Duration::from_secs(30)).await;
}

/// Every copy of a reading is the same, and no (meter, series, timestamp) was buffered under
/// two ids: duplicates only ever carry the same reading id.
fn assert_consistent(got: &[Value]) -> (usize, usize) {
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    let mut ids_by_reading: HashMap<(String, String, String), BTreeSet<&str>> = HashMap::new();
    for r in got {
        let id = r["reading_id"].as_str().unwrap();
        if let Some(prev) = by_id.insert(id, r) {
            assert_eq!(prev, r, "two different readings under one id");
        }
        ids_by_reading
            .entry((
                r["meter"].to_string(),
                r["series"].to_string(),
                r["timestamp"].to_string(),
            ))
            .or_default()
            .insert(id);
    }
    for (reading, ids) in &ids_by_reading {
        assert_eq!(
            ids.len(),
            1,
            "{reading:?} buffered under several ids: {ids:?}"
        );
    }
    (by_id.len(), got.len() - by_id.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_loop_should_lose_nothing_the_store_called_buffered() {
    let kills = if long() { 500 } else { 50 };
    let (queue, _queues) = scratch_queue("amr.crash");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let meters = sdm630s(3).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let amqp = "readings_per_message = 20\nmax_unconfirmed = 8\ndeclare_queues = true";
    let mut agent = AgentProc::start_json(
        dir.path(),
        &(config(dir.path(), &gw, AMQP_URL, &queue, amqp) + &polling(meters, 3, 1)),
    );
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(..2200))).await;
        agent.kill9();
        agent.restart();
    }
    drain_only(&mut agent, dir.path(), &gw, AMQP_URL, &queue, amqp).await;
    let buffered = buffered_ids(&agent.log(), &gw);
    assert!(
        buffered.len() > 1000,
        "only {} readings buffered",
        buffered.len()
    );
    let got = eventually(
        Duration::from_secs(240),
        "every buffered reading at the Celery worker",
        || async {
            let r = celery.readings();
            let have: BTreeSet<&str> = r.iter().filter_map(|x| x["reading_id"].as_str()).collect();
            buffered
                .iter()
                .all(|b| have.contains(b.as_str()))
                .then_some(r)
        },
    )
    .await;
    let (distinct, duplicates) = assert_consistent(&got);
    println!(
        "crash loop: {kills} kills; {} readings reported buffered, {distinct} distinct delivered, {duplicates} duplicate copies (same ids)",
        buffered.len()
    );
    assert!(agent.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_should_deliver_everything_in_order_then_paced() {
    let (queue, _queues) = scratch_queue("amr.outage");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let proxy = Proxy::start("127.0.0.1:5672", Mode::Up).await;
    let meters = sdm630s(3).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let amqp = "readings_per_message = 5\nrate_limit = \"20/s\"\ndeclare_queues = true";
    let mut agent = AgentProc::start_json(
        dir.path(),
        &(config(dir.path(), &gw, &proxy.amqp_url(), &queue, amqp) + &polling(meters, 3, 1)),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The broker goes away for a while; polling goes on.
    proxy.set_mode(Mode::Down);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let up = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    proxy.set_mode(Mode::Up);
    tokio::time::sleep(Duration::from_secs(6)).await;
    drain_only(&mut agent, dir.path(), &gw, &proxy.amqp_url(), &queue, amqp).await;
    let buffered = buffered_ids(&agent.log(), &gw);
    let records = eventually(
        Duration::from_secs(120),
        "every buffered reading",
        || async {
            let have: BTreeSet<String> = celery
                .readings()
                .iter()
                .filter_map(|x| x["reading_id"].as_str().map(str::to_owned))
                .collect();
            buffered
                .iter()
                .all(|b| have.contains(b))
                .then(|| celery.records())
        },
    )
    .await;
    let got = celery.readings();
    assert_consistent(&got);
    // In order per meter, in the order the worker ran the tasks (the first time each came).
    let again = assert_in_order_per_meter(&got);
    // Paced after the outage: never more than 20 tasks in any one-second window.
    let times: Vec<f64> = records
        .iter()
        .filter(|r| r["kind"] == "readings")
        .map(|r| r["received_at"].as_f64().unwrap())
        .filter(|t| *t >= up)
        .collect();
    let busiest = times
        .iter()
        .map(|t| times.iter().filter(|u| **u >= *t && **u < t + 1.0).count())
        .max()
        .unwrap_or(0);
    assert!(
        times.len() > 60,
        "a backlog was delivered after the outage ({} tasks)",
        times.len()
    );
    assert!(
        busiest <= 21,
        "{busiest} tasks within one second, rate_limit is 20/s"
    );
    println!(
        "outage: {} readings buffered, {again} delivered again, {} tasks after the broker came back, at most {busiest} in any second",
        buffered.len(),
        times.len()
    );
    assert!(agent.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_uplink_should_lose_nothing_get_stuck_nowhere_and_not_grow() {
    let (queue, _queues) = scratch_queue("amr.flaky");
    let rabbit = Rabbit::connect().await;
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let amqp_proxy = Proxy::start("127.0.0.1:5672", Mode::Up).await;
    let mqtt_proxy = Proxy::start("127.0.0.1:1883", Mode::Up).await;
    let meters = sdm630s(5).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    // Heartbeats and confirmation timeouts short enough for a test to see recoveries.
    let url = format!("{}?heartbeat=5", amqp_proxy.amqp_url());
    let amqp = "readings_per_message = 10\nconfirm_timeout = \"5s\"";
    let mqtt = format!(
        "\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"amr-test/gateways\"\nkeep_alive = \"5s\"\nmax_backoff = \"1s\"\n",
        mqtt_proxy.port
    );
    let mut agent = AgentProc::start_json(
        dir.path(),
        &(config(dir.path(), &gw, &url, &queue, amqp) + &mqtt + &polling(meters, 5, 2)),
    );
    let centre = Centre::connect(1883, "amr-test/gateways", &gw).await;
    centre.state("online", 0, Duration::from_secs(20)).await;
    let mut rss = Vec::new();
    let chaos = Duration::from_secs(if long() { 600 } else { 40 });
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < chaos {
        match fastrand::u8(..7) {
            0 => amqp_proxy.cut(),
            1 => mqtt_proxy.cut(),
            2 => amqp_proxy.cut_mid_frame(),
            3 => mqtt_proxy.cut_mid_frame(),
            4 => {
                amqp_proxy.stall(true);
                mqtt_proxy.stall(true);
                tokio::time::sleep(Duration::from_secs(4)).await;
                amqp_proxy.stall(false);
                mqtt_proxy.stall(false);
            }
            5 => {
                amqp_proxy.set_mode(Mode::Down);
                amqp_proxy.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                amqp_proxy.set_mode(Mode::Up);
            }
            _ => {
                mqtt_proxy.set_mode(Mode::Down);
                mqtt_proxy.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                mqtt_proxy.set_mode(Mode::Up);
            }
        }
        pings += 1;
        centre
            .send(json!({"request_id": format!("chaos-{pings}"), "command": "ping"}).to_string())
            .await;
        if let Some(kib) = rss_kib(agent.pid()) {
            rss.push(kib);
        }
        tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(..1500))).await;
    }
    // The link is good again: control and delivery must both come back by themselves.
    centre
        .send(r#"{"request_id":"after-chaos","command":"ping"}"#)
        .await;
    centre
        .reply("after-chaos", "done", Duration::from_secs(60))
        .await;
    drain_only(&mut agent, dir.path(), &gw, &url, &queue, amqp).await;
    let buffered = buffered_ids(&agent.log(), &gw);
    let mut got = Vec::new();
    rabbit
        .collect_ids(&queue, &mut got, &buffered, Duration::from_secs(180))
        .await;
    let (distinct, duplicates) = assert_consistent(&got);
    // Memory: what the agent holds after the chaos is what it held early in it.
    let early = rss.iter().take(5).max().copied().unwrap_or(0);
    let late = rss.iter().rev().take(5).max().copied().unwrap_or(0);
    println!(
        "flaky link: {} readings buffered, {distinct} delivered, {duplicates} duplicate copies; RSS early {early} KiB, late {late} KiB; {} reconnections to the broker",
        buffered.len(),
        agent.log().matches("Connected to the broker").count()
    );
    assert!(
        late < early + 8 * 1024,
        "RSS grew from {early} KiB to {late} KiB"
    );
    assert!(agent.sigterm().success());
}

/// A small tmpfs the test mounts for the data directory (the test runs as root in CI).
struct TmpFs {
    dir: tempfile::TempDir,
}

impl TmpFs {
    fn mount(mib: u64) -> Option<TmpFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(TmpFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full (or `limit` bytes).
    fn fill(&self, name: &str, limit: u64) -> PathBuf {
        use std::io::Write;
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0;
        while written < limit && f.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for TmpFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_should_evict_in_order_report_it_keep_running_and_recover() {
    let Some(fs) = TmpFs::mount(24) else {
        // No mount here: the same story with a tiny max_bytes.
        return full_disk_by_max_bytes().await;
    };
    let meters = sdm630s(20).await;
    let data = fs.path().join("data");
    let gw = unique("gw");
    let (queue, _queues) = scratch_queue("amr.full");
    // The broker is unreachable: the store only grows. Another program has taken most of the
    // disk, so the store must size itself to what is left.
    let filler = fs.fill("filler", 20 << 20);
    let dead = "amqp://guest:guest@127.0.0.1:9/%2f";
    // The agent's config and log live elsewhere: only its data directory is on the small disk.
    let home = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(
        home.path(),
        &(config(&data, &gw, dead, &queue, "") + &polling(meters, 20, 4)),
    );
    agent
        .wait_log(
            "the buffer is full and the broker is out of reach",
            1,
            Duration::from_secs(150),
        )
        .await;
    assert!(agent.log().contains("less room than store.max_bytes"));
    // Then the disk fills up entirely. The store either keeps going by evicting into the
    // room it already has, or cannot write and the readings wait in memory; the agent keeps
    // polling either way.
    let filler2 = fs.fill("filler2", u64::MAX);
    let log_before = agent.log().len();
    let during = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(agent.is_running(), "{}", agent.log());
    let while_full = agent.log()[log_before..].to_owned();
    let polled = while_full.matches("Polled and").count();
    let spilled = while_full.contains("keeping the readings in memory");
    assert!(
        polled > 0 || spilled,
        "polling went on while the disk was full:\n{while_full}"
    );
    // Space comes back: everything kept is stored, and new readings are buffered as before.
    std::fs::remove_file(&filler2).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let recovered = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    if spilled {
        agent
            .wait_log("kept readings stored", 1, Duration::from_secs(60))
            .await;
    }
    // Deliver everything to look at it.
    let rabbit = Rabbit::connect().await;
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    drain_only(&mut agent, &data, &gw, AMQP_URL, &queue, "").await;
    let mut got = Vec::new();
    eventually(Duration::from_secs(120), "the store to drain", || async {
        let out = cli(&[
            "status",
            "--json",
            "--config",
            agent.config_path.to_str().unwrap(),
        ]);
        let s: Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["buffer"]["readings"] == 0 && s["buffer"]["events"] == 0).then_some(())
    })
    .await;
    for m in rabbit.take_all(&queue).await {
        got.extend(m.items("readings"));
    }
    let events: Vec<Value> = rabbit
        .take_all(&format!("{queue}.events"))
        .await
        .iter()
        .flat_map(|m| m.items("events"))
        .collect();
    let evictions: u64 = events
        .iter()
        .filter(|e| e["kind"] == "eviction")
        .map(|e| {
            e["details"]["count"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        evictions > 0,
        "evictions are reported as events: {events:#?}"
    );
    // The store works again after the disk had been full: readings taken since are delivered.
    let read_at = |r: &Value| {
        r["read_at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap()
    };
    let recovered = jiff::Timestamp::try_from(recovered).unwrap();
    let after = got.iter().filter(|r| read_at(r) > recovered).count();
    assert!(
        after > 0,
        "readings taken after the disk had room again were delivered"
    );
    // What was read while it was full: kept while there was room, evicted oldest first.
    let during = jiff::Timestamp::try_from(during).unwrap();
    let kept = got
        .iter()
        .filter(|r| read_at(r) >= during && read_at(r) <= recovered)
        .count();
    assert_consistent(&got);
    println!(
        "full disk: {} readings delivered, {evictions} evicted and reported, {kept} read while the disk was full (spilled to memory: {spilled})",
        got.len()
    );
    assert!(agent.sigterm().success());
}

/// Where no filesystem can be mounted: the cap is `max_bytes`, and the eviction order and its
/// reports are the same.
async fn full_disk_by_max_bytes() {
    let meters = sdm630s(10).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let dead = "amqp://guest:guest@127.0.0.1:9/%2f";
    let cfg = config(dir.path(), &gw, dead, "q", "")
        + "\n[store]\nmax_bytes = \"64KiB\"\n"
        + &polling(meters, 10, 2);
    let agent = AgentProc::start(dir.path(), &cfg);
    agent
        .wait_log(
            "the buffer is full and the broker is out of reach",
            1,
            Duration::from_secs(150),
        )
        .await;
    let out = cli(&[
        "status",
        "--json",
        "--config",
        agent.config_path.to_str().unwrap(),
    ]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["buffer"]["evictions"].as_u64().unwrap() > 0);
    assert!(s["buffer"]["bytes"].as_u64().unwrap() < 128 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_should_start_keep_what_it_can_and_say_so() {
    for damage in ["truncated", "scribbled", "empty", "unopenable"] {
        let dir = tempfile::tempdir().unwrap();
        let gw = unique("gw");
        let seeded = readings(5000, 5);
        let seqs = seed(dir.path(), &seeded);
        let db = dir.path().join("store/db");
        let bytes = std::fs::read(&db).unwrap();
        match damage {
            "truncated" => std::fs::write(&db, &bytes[..bytes.len() / 2]).unwrap(),
            "scribbled" => {
                let mut b = bytes.clone();
                let m = b.len() / 2;
                for x in &mut b[m..m + 4096] {
                    *x = 0xA5;
                }
                std::fs::write(&db, b).unwrap();
            }
            "empty" => std::fs::write(&db, b"").unwrap(),
            _ => {
                std::fs::remove_file(&db).unwrap();
                std::fs::create_dir(&db).unwrap();
            }
        }
        let (queue, _queues) = scratch_queue("amr.damaged");
        let rabbit = Rabbit::connect().await;
        rabbit.declare(&queue).await;
        rabbit.declare(&format!("{queue}.events")).await;
        let mut agent =
            AgentProc::start(dir.path(), &config(dir.path(), &gw, AMQP_URL, &queue, ""));
        agent
            .wait_log("Agent running", 1, Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            agent.is_running(),
            "{damage}: the agent must not crash-loop:\n{}",
            agent.log()
        );
        // What it delivers is what was buffered, nothing invented.
        let want: BTreeSet<String> = seqs.iter().map(|s| format!("{gw}-{s}")).collect();
        eventually(Duration::from_secs(60), "the store to drain", || async {
            let out = cli(&[
                "status",
                "--json",
                "--config",
                agent.config_path.to_str().unwrap(),
            ]);
            let s: Value = serde_json::from_slice(&out.stdout).ok()?;
            (s["buffer"]["readings"] == 0).then_some(())
        })
        .await;
        let got: Vec<Value> = rabbit
            .take_all(&queue)
            .await
            .iter()
            .flat_map(|m| m.items("readings"))
            .collect();
        assert!(
            got.iter()
                .all(|r| want.contains(r["reading_id"].as_str().unwrap())),
            "{damage}"
        );
        let events: Vec<Value> = rabbit
            .take_all(&format!("{queue}.events"))
            .await
            .iter()
            .flat_map(|m| m.items("events"))
            .collect();
        let log = agent.log();
        let reported = events.iter().any(|e| e["kind"] == "store_corruption");
        match damage {
            // sled's recovery keeps the log up to the damage; the rest is reported lost.
            "truncated" | "empty" => {
                assert!(
                    got.len() < seeded.len(),
                    "{damage}: {} delivered",
                    got.len()
                );
                assert!(
                    log.contains("lost records") && reported,
                    "{damage}: says so\n{log}"
                );
            }
            "scribbled" => assert!(!got.is_empty(), "{damage}: keeps what it can"),
            _ => {
                assert!(
                    log.contains("moved aside") && reported,
                    "{damage}: says so\n{log}"
                );
                assert!(std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("store.damaged-")
                }));
            }
        }
        println!(
            "damaged store ({damage}): {} of {} readings delivered, reported: {reported}",
            got.len(),
            seeded.len()
        );
        assert!(agent.sigterm().success());
    }
}
