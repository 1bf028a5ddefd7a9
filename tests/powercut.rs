//! Power cuts, with the real binary, on a filesystem that forgets what was not fsynced
//! (`tests/powercut/`: a FUSE model of the page cache; what it models is in its README).
//!
//! First the model is proved on a program known to be right: SQLite in WAL mode keeps every
//! committed transaction across cuts with `synchronous=FULL`, and loses some with
//! `synchronous=OFF`. Then the agent polls simulated meters, each on its own bus (their
//! appends share group commits), with its data directory on the mount, with the broker away and with it up, and the power is cut at random moments and
//! right after the agent reports an append. Every reading the agent reported as buffered (its
//! structured `Buffered` event) must reach a stock Celery worker.
//!
//! `AMR_EDGE_LONG=1` makes the agent suite 50 cuts instead of 8; `-- --nocapture` prints the
//! counts.

mod common;
#[path = "powercut/fs.rs"]
mod fs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use amr_edge::clock::SystemClock;
use amr_edge::reading::Cadence;
use amr_edge::store::{SledStore, Store, StoreConfig};
use common::agent::{AgentProc, Buffered, buffered_events, cli, config, sdm630s};
use common::celery::Celery;
use common::mqtt::Centre;
use common::proxy::{Mode, Proxy};
use common::rabbit::scratch_queue;
use common::unique;
use fs::PowerCutFs;
use serde_json::Value;

fn long() -> bool {
    std::env::var_os("AMR_EDGE_LONG").is_some()
}

fn python() -> PathBuf {
    common::celery::venv().join("bin/python")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/powercut")
        .join(name)
}

/// fsync of a directory: what makes the names in it durable.
fn fsync_dir(dir: &Path) {
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

// ---- The model, proved on SQLite ------------------------------------------------------------

struct SqliteProof {
    committed: usize,
    lost: usize,
    /// `PRAGMA integrity_check` after each remount, where it was not "ok".
    damaged: Vec<String>,
}

fn sqlite_count(db: &Path) -> Result<(BTreeSet<u64>, String), String> {
    let out = Command::new(python())
        .arg(script("sqlite_txns.py"))
        .arg("count")
        .arg(db)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    Ok((ids, v["integrity"].as_str().unwrap_or("").to_owned()))
}

/// `cuts` times: a writer commits transactions with `PRAGMA synchronous=sync` and prints each
/// id once COMMIT has returned; the power is cut at a random moment; after the remount, every
/// id that was durable before or committed since must be there.
fn sqlite_through_cuts(sync: &str, cuts: usize) -> SqliteProof {
    let mut fs = PowerCutFs::mount();
    let db = fs.path().join("t.db");
    let setup = Command::new(python())
        .arg(script("sqlite_txns.py"))
        .arg("setup")
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "sqlite setup: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let mut durable = BTreeSet::new();
    let mut proof = SqliteProof {
        committed: 0,
        lost: 0,
        damaged: Vec::new(),
    };
    for cut in 0..cuts {
        let mut writer = Command::new(python())
            .arg(script("sqlite_txns.py"))
            .arg("write")
            .arg(&db)
            .arg(sync)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = writer.stdout.take().unwrap();
        let (tx, rx) = channel();
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(id) = line.trim().parse::<u64>() {
                    if ids.is_empty() {
                        let _ = tx.send(());
                    }
                    ids.push(id);
                }
            }
            ids
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the SQLite writer committed nothing in 30 s");
        std::thread::sleep(Duration::from_millis(200 + fastrand::u64(..800)));
        fs.cut();
        let _ = writer.kill();
        let _ = writer.wait();
        let committed: Vec<u64> = reader.join().unwrap();
        proof.committed += committed.len();
        fs.remount();
        let (present, integrity) = sqlite_count(&db).unwrap_or_else(|e| {
            proof
                .damaged
                .push(format!("cut {cut}: cannot read the database: {e}"));
            (BTreeSet::new(), String::new())
        });
        if !integrity.is_empty() && integrity != "ok" {
            proof.damaged.push(format!("cut {cut}: {integrity}"));
        }
        let expected: BTreeSet<u64> = durable.iter().copied().chain(committed).collect();
        proof.lost += expected.difference(&present).count();
        durable = present;
    }
    proof
}

#[test]
fn the_model_should_keep_sqlite_full_sync_commits_and_lose_unsynced_ones() {
    let cuts = 5;
    let full = sqlite_through_cuts("FULL", cuts);
    let off = sqlite_through_cuts("OFF", cuts);
    println!(
        "model proof, SQLite WAL: synchronous=FULL {cuts} cuts, {} transactions committed, {} lost; synchronous=OFF {cuts} cuts, {} committed, {} lost",
        full.committed, full.lost, off.committed, off.lost
    );
    assert!(
        full.committed >= 50,
        "the FULL writer committed {} transactions",
        full.committed
    );
    assert_eq!(
        full.lost, 0,
        "synchronous=FULL lost committed transactions: the model drops something fsync made durable"
    );
    assert!(
        full.damaged.is_empty(),
        "synchronous=FULL: {:?}",
        full.damaged
    );
    assert!(
        off.lost > 0,
        "synchronous=OFF lost nothing of {} commits: the model keeps what was never fsynced",
        off.committed
    );
}

// ---- The agent under power cuts --------------------------------------------------------------

const METERS: u8 = 3;
const PREFIX: &str = "amr-test/gateways";

/// Reads every meter every second, each on its own TCP bus (to the same simulator): the
/// three polls of a boundary end together and are appended concurrently, from three buses,
/// so the store's group commit merges them into one batch and one fsync, and the cuts land
/// on groups.
fn polling_on_buses(sim: std::net::SocketAddr, units: u8) -> String {
    let mut s = "\n[beat]\nevery = \"1s\"\n".to_owned();
    for u in 1..=units {
        s.push_str(&format!(
            "\n[[bus]]\nname = \"lan{u}\"\ntimeout = \"2s\"\ntcp = {{ host = \"{}\", port = {} }}\n\n[[meter]]\nid = \"m{u}\"\nbus = \"lan{u}\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n",
            sim.ip(),
            sim.port()
        ));
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    /// At a random moment.
    Random,
    /// Within milliseconds of the agent reporting an append: the window that matters.
    AfterAppend,
}

struct Cut {
    n: usize,
    when: When,
    broker_up: bool,
    at: jiff::Timestamp,
    dropped: Value,
}

impl Cut {
    fn describe(&self) -> String {
        format!(
            "cut #{} ({}, broker {})",
            self.n,
            match self.when {
                When::Random => "at a random moment",
                When::AfterAppend => "right after an append",
            },
            if self.broker_up { "up" } else { "away" }
        )
    }
}

/// Waits for the agent's next `Buffered` event after byte `from` of its log.
async fn next_append(agent: &AgentProc, from: usize, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let log = agent.log();
        if !buffered_events(log.get(from..).unwrap_or("")).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// The boundary each meter's durable store says was read last, or why it could not be opened.
fn boundary_marks(data_dir: &Path) -> Result<Vec<(String, i64)>, String> {
    let opened = std::panic::catch_unwind(|| {
        SledStore::open(
            data_dir,
            &StoreConfig::default(),
            std::sync::Arc::new(SystemClock),
        )
    });
    let store = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("opening it panicked".into()),
    };
    let mut marks = Vec::new();
    for u in 1..=METERS {
        let meter = format!("m{u}");
        if let Some(ms) = store
            .boundary(&meter, Cadence::Quarterly)
            .map_err(|e| e.to_string())?
        {
            marks.push((meter, ms));
        }
    }
    Ok(marks)
}

fn ms_of(r: &Value, field: &str) -> i64 {
    r[field]
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map_or(i64::MIN, |t| t.as_millisecond())
}

/// "gw-5..gw-21 (17 readings, reported 12 ms before cut #3 (right after an append, broker
/// away))" for each report that lost readings.
fn describe_lost(
    lost: &BTreeSet<String>,
    events: &[(Buffered, usize)],
    gw: &str,
    cuts: &[Cut],
) -> Vec<String> {
    let mut out = Vec::new();
    for (b, life) in events {
        let ids: Vec<String> = b.ids(gw).filter(|i| lost.contains(i)).collect();
        if ids.is_empty() {
            continue;
        }
        let when = match cuts.iter().find(|c| c.at >= b.at) {
            Some(c) => format!(
                "{} ms before {}",
                (c.at - b.at).total(jiff::Unit::Millisecond).unwrap_or(0.0) as i64,
                c.describe()
            ),
            None => "after the last cut".into(),
        };
        out.push(format!(
            "{}..{} ({} of the {} readings reported at {} by start #{life}, {when})",
            ids[0],
            ids[ids.len() - 1],
            ids.len(),
            b.readings,
            b.at
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_should_lose_nothing_the_agent_reported_buffered() {
    let cuts = if long() { 50 } else { 8 };
    let began = Instant::now();
    let (queue, _queues) = scratch_queue("amr.powercut");
    let events_queue = format!("{queue}.events");
    let celery = Celery::start(
        &[&queue, &events_queue],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let proxy = Proxy::start("127.0.0.1:5672", Mode::Up).await;
    let meters = sdm630s(METERS).await;
    let mut fs = PowerCutFs::mount();
    // The data directory is the test's to create (durably); what is inside is the agent's.
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    fsync_dir(fs.path());
    // Config and log stay off the mount: they are the test's record, not the gateway's disk.
    let home = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let amqp = "readings_per_message = 20\nmax_unconfirmed = 8\ndeclare_queues = true";
    // A window wider than the default, so the concurrent appends of a boundary share one.
    let store = "\n[store]\ncache = \"256KiB\"\ngroup_commit = \"20ms\"\n";
    let mqtt = format!(
        "\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopic_prefix = \"{PREFIX}\"\nmax_backoff = \"1s\"\nkeep_alive = \"5s\"\n"
    );
    let cfg = config(&data, &gw, &proxy.amqp_url(), &queue, amqp) + store + &mqtt;
    let centre = Centre::connect(1883, PREFIX, &gw).await;
    let mut agent = AgentProc::start_json(
        home.path(),
        &(cfg.clone() + &polling_on_buses(meters, METERS)),
    );
    let mut failed_starts = Vec::new();
    let mut starts = 1;
    if let Err(e) = agent.try_wait_running(Duration::from_secs(30)).await {
        failed_starts.push(format!("start #1: {e}"));
    }
    let mut done = Vec::new();
    let mut marks: Vec<(usize, String, i64)> = Vec::new();
    let mut unopenable = Vec::new();
    for n in 1..=cuts {
        // Broker away (buffering only) and up (draining, acknowledgements in flight), each
        // with a cut at a random moment and one right after an append.
        let (when, broker_up) = match n % 4 {
            1 => (When::Random, true),
            2 => (When::AfterAppend, false),
            3 => (When::AfterAppend, true),
            _ => (When::Random, false),
        };
        proxy.set_mode(if broker_up { Mode::Up } else { Mode::Down });
        if !broker_up {
            proxy.cut();
        }
        let run = 1000 + fastrand::u64(..2500);
        let poll_at = fastrand::u64(..run);
        tokio::time::sleep(Duration::from_millis(poll_at)).await;
        // An on-demand read from the centre: its `done` reply is a report of readings too.
        centre
            .send(format!(r#"{{"request_id":"pc-{n}","command":"poll"}}"#))
            .await;
        tokio::time::sleep(Duration::from_millis(run - poll_at)).await;
        if when == When::AfterAppend {
            let from = agent.log_len();
            next_append(&agent, from, Duration::from_secs(10)).await;
        }
        let dropped = fs.cut();
        let at = jiff::Timestamp::now();
        agent.kill9();
        fs.remount();
        match boundary_marks(&data) {
            Ok(m) => marks.extend(m.into_iter().map(|(meter, ms)| (n, meter, ms))),
            Err(e) => unopenable.push(format!("after cut #{n}: {e}")),
        }
        done.push(Cut {
            n,
            when,
            broker_up,
            at,
            dropped,
        });
        agent.restart();
        starts += 1;
        if let Err(e) = agent.try_wait_running(Duration::from_secs(30)).await {
            failed_starts.push(format!("start #{starts} (after cut #{n}): {e}"));
            if !agent.is_running() {
                agent.kill9();
                agent.restart();
                starts += 1;
            }
        }
    }
    // The power stays on: let it run a little, stop it cleanly, and let it only drain.
    proxy.set_mode(Mode::Up);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = agent.sigterm();
    std::fs::write(&agent.config_path, &cfg).unwrap();
    agent.restart();
    starts += 1;
    if let Err(e) = agent.try_wait_running(Duration::from_secs(30)).await {
        failed_starts.push(format!("start #{starts} (drain only): {e}"));
    }
    let config_path = agent.config_path.to_str().unwrap().to_owned();
    let drained = common::eventually(Duration::from_secs(120), "the store to drain", || async {
        let out = cli(&["status", "--json", "--config", &config_path]);
        let s: Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["buffer"]["readings"] == 0 && s["buffer"]["events"] == 0).then_some(())
    });
    drained.await;

    // What the agent reported as buffered, by start, from its structured log.
    let log = agent.log();
    let mut reports: Vec<(Buffered, usize)> = Vec::new();
    let start_offsets: Vec<usize> = log.match_indices("Agent running").map(|(i, _)| i).collect();
    for b in buffered_events(&log) {
        let life = start_offsets.iter().filter(|&&o| o < b.log_offset).count();
        reports.push((b, life));
    }
    let buffered: BTreeSet<String> = reports.iter().flat_map(|(b, _)| b.ids(&gw)).collect();
    // Everything the Celery worker has run; the last tasks may still be on their way.
    let all_arrived = || {
        let have: BTreeSet<String> = celery
            .readings()
            .iter()
            .filter_map(|r| r["reading_id"].as_str().map(str::to_owned))
            .collect();
        buffered.iter().all(|b| have.contains(b))
    };
    let wait = Instant::now();
    while !all_arrived() && wait.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = celery.readings();
    let have: BTreeSet<String> = got
        .iter()
        .filter_map(|r| r["reading_id"].as_str().map(str::to_owned))
        .collect();
    let lost: BTreeSet<String> = buffered.difference(&have).cloned().collect();

    // Duplicates only as copies: one id, one content; one reading of a boundary, one id.
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    let mut ids_of: HashMap<(String, String, String), BTreeSet<&str>> = HashMap::new();
    let mut conflicts = Vec::new();
    for r in &got {
        let id = r["reading_id"].as_str().unwrap();
        if let Some(prev) = by_id.insert(id, r) {
            if prev != r {
                conflicts.push(format!("{id} arrived with two contents: {prev} and {r}"));
            }
        }
        // An on-demand read is not a boundary: its timestamp is its read time, which can fall
        // on the very second the beat reads (a long run found one).
        if r["cadence"] == "on_demand" {
            continue;
        }
        ids_of
            .entry((
                r["meter"].to_string(),
                r["series"].to_string(),
                r["timestamp"].to_string(),
            ))
            .or_default()
            .insert(id);
    }
    // Which start reported each id, and when, to tell a re-read after a cut from one within
    // a run.
    let reported_by: HashMap<String, (usize, jiff::Timestamp)> = reports
        .iter()
        .flat_map(|(b, life)| b.ids(&gw).map(move |id| (id, (*life, b.at))))
        .collect();
    let read_twice: Vec<String> = ids_of
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(k, ids)| {
            let each: Vec<String> = ids
                .iter()
                .map(|id| {
                    let r = by_id[id];
                    let by = reported_by
                        .get(*id)
                        .map_or("not reported".to_owned(), |(life, at)| {
                            format!("reported by start #{life} at {at}")
                        });
                    format!(
                        "{id} ({}, flags {}, read_at {}, {by})",
                        r["cadence"], r["flags"], r["read_at"]
                    )
                })
                .collect();
            format!("{k:?}: {}", each.join("; "))
        })
        .collect();
    // No boundary marked read without its readings.
    let delivered_boundaries: BTreeSet<(String, i64)> = got
        .iter()
        .map(|r| {
            (
                r["meter"].as_str().unwrap_or("").to_owned(),
                ms_of(r, "timestamp"),
            )
        })
        .collect();
    let empty_marks: Vec<String> = marks
        .iter()
        .filter(|(_, m, ms)| !delivered_boundaries.contains(&(m.clone(), *ms)))
        .map(|(n, m, ms)| {
            format!("{m} boundary {ms} (marked read in the durable store after cut #{n})")
        })
        .collect();
    // Every value an on-demand `done` reply gave the centre was delivered as a reading.
    let dones: Vec<Value> = centre
        .replies()
        .into_iter()
        .filter(|r| r["status"] == "done")
        .collect();
    let mut on_demand_values = 0;
    let mut lost_on_demand = Vec::new();
    for d in &dones {
        for r in d["results"].as_array().into_iter().flatten() {
            for v in r["values"].as_array().into_iter().flatten() {
                on_demand_values += 1;
                let found = got.iter().any(|g| {
                    g["cadence"] == "on_demand"
                        && g["meter"] == r["meter"]
                        && g["series"] == v["series"]
                        && g["value"] == v["value"]
                        && ms_of(g, "timestamp") == ms_of(v, "timestamp")
                });
                if !found {
                    lost_on_demand.push(format!(
                        "{} {} {} = {} (request {})",
                        r["meter"], v["series"], v["timestamp"], v["value"], d["request_id"]
                    ));
                }
            }
        }
    }
    // A store set aside, or damage reported.
    let corruption: Vec<Value> = celery
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "store_corruption")
        .collect();
    let set_aside: Vec<String> = std::fs::read_dir(&data)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("store.damaged-"))
                .collect()
        })
        .unwrap_or_default();
    let dropped: BTreeMap<usize, String> = done
        .iter()
        .map(|c| (c.n, c.dropped["dropped"].to_string()))
        .collect();

    println!(
        "power cuts: {cuts} cuts; {} readings reported buffered, {} delivered, {} lost, {} failed starts, {} duplicate copies (same ids), {} stores set aside, {} store_corruption events; on demand: {} done replies, {on_demand_values} values, {} not delivered; {:.0} s",
        buffered.len(),
        buffered.intersection(&have).count(),
        lost.len(),
        failed_starts.len(),
        got.len() - by_id.len(),
        set_aside.len(),
        corruption.len(),
        dones.len(),
        lost_on_demand.len(),
        began.elapsed().as_secs_f64()
    );
    let fs_stats = fs.stats();
    println!(
        "dropped at each cut: {dropped:?}; fsyncs of files / directories on the last mount: {} / {}",
        fs_stats["fsync"], fs_stats["fsyncdir"]
    );

    assert!(
        stopped.success(),
        "the agent exited with {stopped} on SIGTERM"
    );
    assert!(
        failed_starts.is_empty(),
        "the agent did not start every time:\n{}",
        failed_starts.join("\n\n")
    );
    assert!(
        unopenable.is_empty(),
        "the durable store could not be opened: {unopenable:?}"
    );
    assert!(
        set_aside.is_empty() && !log.contains("moved aside") && corruption.is_empty(),
        "a store was set aside or reported damaged after a power cut: {set_aside:?}, {corruption:?}"
    );
    assert!(
        buffered.len() > 100,
        "only {} readings reported buffered",
        buffered.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} readings the agent reported as buffered never reached the worker:\n{}",
        lost.len(),
        buffered.len(),
        {
            let lines = describe_lost(&lost, &reports, &gw, &done);
            let more = lines.len().saturating_sub(60);
            let mut shown = lines.into_iter().take(60).collect::<Vec<_>>().join("\n");
            if more > 0 {
                shown.push_str(&format!("\n… and {more} more reports"));
            }
            shown
        }
    );
    assert!(
        lost_on_demand.is_empty(),
        "{} of {on_demand_values} values in `done` replies never reached the worker as readings:\n{}",
        lost_on_demand.len(),
        lost_on_demand.join("\n")
    );
    assert!(conflicts.is_empty(), "{}", conflicts.join("\n"));
    assert!(
        read_twice.is_empty(),
        "boundaries read twice (one reading under several ids):\n{}",
        read_twice.join("\n")
    );
    assert!(
        empty_marks.is_empty(),
        "boundaries marked read whose readings never arrived:\n{}",
        empty_marks.join("\n")
    );
    assert!(agent.sigterm().success());
    drop(agent);
    drop(fs);
}
