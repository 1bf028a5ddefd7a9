//! No interval ever lost (issue #14), end to end: the real binary reads the load profile of
//! the Gurux-based DLMS peer (tests/dlms/meter.py, an independent implementation) at the
//! quarter-hour beat, buffers every row and drains it to the real RabbitMQ (a stock Celery
//! worker where a test says so); MQTT `backfill` orders over the real Mosquitto.
//!
//! The agent runs under libfaketime at a fixed date, started a few seconds before a
//! quarter-hour boundary (a meter never read gets no catch-up read: its first read is the next
//! boundary). The peer's clock is moved with `--clock-offset` to the agent's, a few seconds
//! ahead, so that the row of a boundary exists when the agent asks for it. The values are
//! what tests/dlms/load_profile.py computes for each row's time.
//!
//! `AMR_EDGE_LONG=1`: the kill -9 test is killed 20 times (as the issue says) in a 22-day
//! read instead of 4 times in a 6-day one.

mod common;
#[path = "dlms/peer.rs"]
mod dlms_peer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use amr_edge::reading::{Decimal, Stamp};
use common::agent::{AgentProc, buffered_ids, config};
use common::celery::Celery;
use common::mqtt::Centre;
use common::rabbit::{Rabbit, scratch_queue};
use common::{AMQP_URL, eventually, unique};
use dlms_peer::DlmsMeter;
use jiff::Timestamp;
use serde_json::Value;

/// The agent's first boundary: 2026-11-21T10:15:00Z.
const BOUNDARY: i64 = 1_795_256_100;
/// How long before a boundary the agent is started: it must be running when the boundary
/// comes, on a loaded test machine too (a meter never read gets no catch-up read).
const LEAD: i64 = 10;
/// How far the peer's clock is ahead of the agent's.
const AHEAD: f64 = 3.0;
const QUARTER: i64 = 900;
const METER: &str = "e450";
const PROFILE: &str = "1-0:99.1.0";
const TASK: &str = "test.commits.meter_readings";
const EVENTS_TASK: &str = "test.commits.meter_system_events";
const PREFIX: &str = "amr-test/gateways";

/// The tests of this file one at a time: each starts an agent 10 s before the same faked
/// boundary and a Gurux peer, and on a loaded machine (the suite beside an ARM build) two at
/// once once left one waiting in vain for its first rows.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(second).unwrap()
}

/// The meter's clock deviation (DLMS: UTC - local, minutes): Central European Time, as the
/// gateway's zone in November.
const DEVIATION: i32 = -60;

/// A row's timestamp as the agent writes it: the meter's time with the meter's offset.
fn stamp(second: i64) -> String {
    Stamp {
        ms: second * 1000,
        offset: -DEVIATION * 60,
    }
    .rfc3339()
}

/// The quarter-hours in `after < t <= up_to`.
fn quarter_hours(after: i64, up_to: i64) -> Vec<i64> {
    let first = after - after.rem_euclid(QUARTER) + QUARTER;
    (first..=up_to).step_by(QUARTER as usize).collect()
}

/// The peer serving 1 meter on the wrapper, its clock at `clock` (plus [`AHEAD`]) when it
/// starts, its profile `days` long, with more meter.py `args`.
fn peer_at(clock: i64, days: u32, args: &[&str]) -> DlmsMeter {
    let real = Timestamp::now().as_millisecond() as f64 / 1000.0;
    let offset = format!("--clock-offset={:.3}", clock as f64 + AHEAD - real);
    let days = days.to_string();
    let deviation = format!("--clock-deviation={DEVIATION}");
    let mut all = vec![
        "--wrapper",
        "--port",
        "0",
        &offset,
        &deviation,
        "--profile-days",
        &days,
    ];
    all.extend(args);
    DlmsMeter::start(&all)
}

/// The rows the agent says it buffered (its `Profile rows buffered` events).
fn rows_buffered(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v.get("fields").cloned().unwrap_or(v))
        .filter(|f| f["message"] == "Profile rows buffered")
        .filter_map(|f| f["rows"].as_u64())
        .sum()
}

/// `[amqp]` additions, more sections, and the bus with the peer's meter on it (more `dlms`
/// settings in `dlms_extra`), read quarterly from its load profile, `history` back when it
/// has no high-water mark.
fn meter_config(
    peer: &DlmsMeter,
    history: &str,
    amqp_extra: &str,
    sections: &str,
    dlms_extra: &str,
) -> String {
    format!(
        r#"{amqp_extra}
{sections}

[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}
timeout = "5s"

[[meter]]
id = "{METER}"
bus = "lan"
dlms = {{ client = 16, logical = 1{dlms_extra} }}
reads = {{ quarterly = {{ profile = "{PROFILE}" }} }}
history = "{history}"
"#,
        port = peer.port()
    )
}

/// What a row's value is at the centre: (series, timestamp, value, unit).
type RowValue = (String, String, String, String);

fn row_value(r: &Value) -> RowValue {
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    (s("series"), s("timestamp"), s("value"), s("unit"))
}

/// What load_profile.py says the rows at `times` hold, sorted.
fn expected(times: &[i64]) -> Vec<RowValue> {
    let p = dlms_peer::load_profile(times, 17);
    let mut out = Vec::new();
    for (t, import, export) in p.rows {
        for (series, raw, scaler) in [
            ("1-0-1-8-0-255", import, p.import_scaler),
            ("1-0-2-8-0-255", export, p.export_scaler),
        ] {
            let value = Decimal::from_scaled(i128::from(raw), scaler).unwrap();
            out.push((
                series.to_owned(),
                stamp(t),
                value.as_str().to_owned(),
                "Wh".to_owned(),
            ));
        }
    }
    out.sort();
    out
}

fn sorted_values<'a>(readings: impl IntoIterator<Item = &'a Value>) -> Vec<RowValue> {
    let mut v: Vec<RowValue> = readings.into_iter().map(row_value).collect();
    v.sort();
    v
}

fn has_flag(r: &Value, flag: &str) -> bool {
    r["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == flag))
}

/// Waits until RabbitMQ holds no ready message in `queue` (the worker has taken them all).
async fn queue_drained(queue: &str) {
    let rabbit = Rabbit::connect().await;
    eventually(Duration::from_secs(30), "the queue to drain", || async {
        (rabbit.count(queue).await == 0).then_some(())
    })
    .await;
}

/// Takes the readings arriving in `queue` into `got` until `done(got)`; panics after
/// `timeout` saying `what` it waited for, with the agent's log.
async fn take_until(
    rabbit: &Rabbit,
    queue: &str,
    got: &mut Vec<Value>,
    (timeout, what, agent): (Duration, &str, &AgentProc),
    done: impl Fn(&[Value]) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        for m in rabbit.take_all(queue).await {
            got.extend(m.items("readings"));
        }
        if done(got) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; the agent's log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every reading id arrived once, and no row (series, timestamp) under two ids.
fn assert_each_once(got: &[Value]) {
    let mut ids = BTreeSet::new();
    let mut rows = BTreeSet::new();
    for r in got {
        let id = r["reading_id"].as_str().unwrap();
        assert!(ids.insert(id), "{id} arrived twice: {r}");
        let (series, timestamp, _, _) = row_value(r);
        assert!(
            rows.insert((series.clone(), timestamp.clone())),
            "the row {timestamp} {series} arrived twice: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_meter_should_deliver_its_12_rows_of_history_once_with_meter_times_and_values() {
    let _serial = SERIAL.lock().await;
    let (queue, _queues) = scratch_queue("amr.backfill");
    let events = format!("{queue}.events");
    let celery = Celery::start(&[&queue, &events], TASK, EVENTS_TASK).await;
    let peer = peer_at(BOUNDARY - LEAD, 2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &meter_config(
            &peer,
            "3h",
            &format!("task = \"{TASK}\"\nevents_task = \"{EVENTS_TASK}\""),
            "",
            "",
        ),
    );
    let mut agent = AgentProc::start_json_at(dir.path(), &cfg, at(BOUNDARY - LEAD));
    let times = quarter_hours(BOUNDARY - 3 * 3600, BOUNDARY);
    assert_eq!(times.len(), 12);
    let want = expected(&times);
    celery
        .wait_readings(want.len(), Duration::from_secs(90))
        .await;
    assert!(agent.sigterm().success(), "{}", agent.log());
    queue_drained(&queue).await;
    let got = celery.readings();
    assert_each_once(&got);
    assert_eq!(sorted_values(&got), want, "{}", agent.log());
    for r in &got {
        assert_eq!(r["meter"], METER, "{r}");
        assert_eq!(r["cadence"], "quarterly", "{r}");
        // (and `clock_unsynced` where the test machine's kernel clock is not synchronised)
        assert!(has_flag(r, "from_profile"), "{r}");
        assert!(!has_flag(r, "backfill") && !has_flag(r, "clock_off"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_five_hours_down_every_missed_row_should_arrive_once() {
    let _serial = SERIAL.lock().await;
    let (queue, _queues) = scratch_queue("amr.backfill");
    let events = format!("{queue}.events");
    let celery = Celery::start(&[&queue, &events], TASK, EVENTS_TASK).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let amqp = format!("task = \"{TASK}\"\nevents_task = \"{EVENTS_TASK}\"");
    // Before: the agent and the meter at 10:15 on the first day.
    let peer = peer_at(BOUNDARY - LEAD, 2, &[]);
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &meter_config(&peer, "3h", &amqp, "", ""),
    );
    let mut agent = AgentProc::start_json_at(dir.path(), &cfg, at(BOUNDARY - LEAD));
    let before = quarter_hours(BOUNDARY - 3 * 3600, BOUNDARY);
    celery
        .wait_readings(2 * before.len(), Duration::from_secs(90))
        .await;
    assert!(agent.sigterm().success(), "{}", agent.log());
    queue_drained(&queue).await;
    let first: BTreeSet<String> = celery
        .readings()
        .iter()
        .map(|r| r["reading_id"].as_str().unwrap().to_owned())
        .collect();
    drop(peer);
    // Five hours on, for the meter (its profile kept running) and the agent alike.
    let later = BOUNDARY + 5 * 3600;
    let peer = peer_at(later - LEAD, 2, &[]);
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &meter_config(&peer, "3h", &amqp, "", ""),
    );
    std::fs::write(&agent.config_path, cfg).unwrap();
    agent.fake_time(Some(at(later - LEAD)));
    agent.restart();
    let missed = quarter_hours(BOUNDARY, later);
    assert_eq!(missed.len(), 20);
    let all: Vec<i64> = before.iter().chain(&missed).copied().collect();
    let want = expected(&all);
    celery
        .wait_readings(want.len(), Duration::from_secs(90))
        .await;
    assert!(agent.sigterm().success(), "{}", agent.log());
    queue_drained(&queue).await;
    let got = celery.readings();
    assert_each_once(&got);
    assert_eq!(sorted_values(&got), want, "{}", agent.log());
    // The missed rows came after the restart, under new reading ids.
    let after: Vec<&Value> = got
        .iter()
        .filter(|r| !first.contains(r["reading_id"].as_str().unwrap()))
        .collect();
    assert_eq!(sorted_values(after), expected(&missed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_again_and_again_in_a_chunked_read_should_lose_no_row_and_duplicate_none() {
    let _serial = SERIAL.lock().await;
    let long = std::env::var_os("AMR_EDGE_LONG").is_some();
    // A slow meter: a day-long chunk takes about a second (association, header, the buffer in
    // blocks, release). Each start is killed at a random moment within a second after its
    // first chunk is buffered: in an association, a block transfer, an append or between
    // chunks. At most two chunks a start: the history outlasts the kills.
    let (kills, days): (i64, u32) = if long { (20, 42) } else { (6, 14) };
    let (queue, _queues) = scratch_queue("amr.backfill");
    // The meter's clock is at the end of the test throughout, so that its rows are all there;
    // the agent's check of the meter's clock (`clock_limit`) is widened to match.
    let end = BOUNDARY + kills * QUARTER;
    let peer = peer_at(end + 60, days + 1, &["--reply-delay", "0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &meter_config(
            &peer,
            &format!("{days}d"),
            "declare_queues = true",
            "",
            ", clock_limit = \"12h\"",
        ),
    );
    let mut agent = AgentProc::start_json_at(dir.path(), &cfg, at(BOUNDARY - LEAD));
    let rabbit = Rabbit::connect().await;
    let mut got: Vec<Value> = Vec::new();
    let mut since = 0;
    let mut at_last_kill = (0, 0);
    for k in 1..=kills {
        let start = std::time::Instant::now();
        while !agent.log()[since..].contains("Profile rows buffered") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "start {k}: no chunk of profile rows buffered in 60 s; the log since:\n{}",
                &agent.log()[since..]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1000))).await;
        agent.kill9();
        // The rows the read had to cover then: the history, and one per start since.
        let range = u64::from(days) * 96 + k as u64 - 1;
        at_last_kill = (rows_buffered(&agent.log()), range);
        for m in rabbit.take_all(&queue).await {
            got.extend(m.items("readings"));
        }
        // Just after the next boundary: its catch-up read starts at once, from the mark.
        agent.fake_time(Some(at(BOUNDARY + k * QUARTER + 1)));
        since = agent.log_len();
        agent.restart();
    }
    // Every kill fell inside the read: the last one too.
    assert!(
        at_last_kill.0 < at_last_kill.1,
        "the read was over before the last kill: {at_last_kill:?}"
    );
    let times = quarter_hours(BOUNDARY - i64::from(days) * 86_400, end);
    let want = expected(&times);
    let wanted: BTreeSet<(String, String)> = want
        .iter()
        .map(|(s, t, _, _)| (s.clone(), t.clone()))
        .collect();
    take_until(
        &rabbit,
        &queue,
        &mut got,
        (
            Duration::from_secs(180),
            "every row of the range at the broker",
            &agent,
        ),
        |got| {
            let have: BTreeSet<(String, String)> = got
                .iter()
                .map(|r| {
                    let (s, t, _, _) = row_value(r);
                    (s, t)
                })
                .collect();
            wanted.is_subset(&have)
        },
    )
    .await;
    assert!(agent.sigterm().success(), "{}", agent.log());
    // What was buffered but not yet sent went out before the exit; take the rest.
    got.extend(
        rabbit
            .take_all(&queue)
            .await
            .iter()
            .flat_map(|m| m.items("readings")),
    );
    let log = agent.log();
    // Every reading the agent said was durable arrived.
    let ids: BTreeSet<String> = got
        .iter()
        .map(|r| r["reading_id"].as_str().unwrap().to_owned())
        .collect();
    let buffered = buffered_ids(&log, &gw);
    let lost: Vec<&String> = buffered.difference(&ids).collect();
    assert!(lost.is_empty(), "buffered but never delivered: {lost:?}");
    // A copy of a reading is the same reading: same id, same content.
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for r in &got {
        let id = r["reading_id"].as_str().unwrap();
        if let Some(prev) = by_id.insert(id, r) {
            assert_eq!(prev, r, "two different readings under {id}");
        }
    }
    // Each row of the range under one reading id, with the meter's values: none read twice.
    let mut ids_of_row: BTreeMap<(String, String), BTreeSet<&str>> = BTreeMap::new();
    for r in by_id.values() {
        let (s, t, _, _) = row_value(r);
        ids_of_row
            .entry((s, t))
            .or_default()
            .insert(r["reading_id"].as_str().unwrap());
    }
    let twice: Vec<_> = ids_of_row.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "rows read twice: {twice:?}");
    let mut distinct = sorted_values(by_id.values().copied());
    distinct.dedup();
    assert_eq!(distinct, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_should_deliver_rows_again_flagged_and_counted_and_bad_ranges_be_rejected() {
    let _serial = SERIAL.lock().await;
    let (queue, _queues) = scratch_queue("amr.backfill");
    let peer = peer_at(BOUNDARY - LEAD, 2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let mqtt = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopic_prefix = \"{PREFIX}\"\nmax_backfill = \"2d\"\n"
    );
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &meter_config(&peer, "3h", "declare_queues = true", &mqtt, ""),
    );
    let centre = Centre::connect(1883, PREFIX, &gw).await;
    let mut agent = AgentProc::start_json_at(dir.path(), &cfg, at(BOUNDARY - LEAD));
    centre.state("online", 0, Duration::from_secs(30)).await;
    let rabbit = Rabbit::connect().await;
    let delivered = quarter_hours(BOUNDARY - 3 * 3600, BOUNDARY);
    let mut got: Vec<Value> = Vec::new();
    take_until(
        &rabbit,
        &queue,
        &mut got,
        (
            Duration::from_secs(90),
            "the first read's rows at the broker",
            &agent,
        ),
        |got| got.len() >= 2 * delivered.len(),
    )
    .await;
    let first = got.len();
    // Eight rows already delivered, asked for again: `from` and `to` are rows, both in.
    let again = &delivered[3..=10];
    let (from, to) = (at(again[0]).to_string(), at(again[7]).to_string());
    centre
        .send(
            serde_json::json!({"request_id": "bf", "command": "backfill", "meters": [METER],
                "profile": PROFILE, "from": from, "to": to})
            .to_string(),
        )
        .await;
    centre
        .reply("bf", "accepted", Duration::from_secs(10))
        .await;
    let done = centre.reply("bf", "done", Duration::from_secs(60)).await;
    let m = &done["results"][0];
    assert_eq!(m["meter"], METER, "{done}");
    assert_eq!(m["ok"], true, "{done}");
    assert_eq!(m["rows"], 8, "{done}");
    assert_eq!(m["readings"], 16, "{done}");
    assert_eq!(m["first"], stamp(again[0]).as_str(), "{done}");
    assert_eq!(m["last"], stamp(again[7]).as_str(), "{done}");
    assert!(m.get("gaps").is_none(), "{done}");
    let backfilled = |got: &[Value]| -> Vec<Value> {
        got.iter()
            .filter(|r| has_flag(r, "backfill"))
            .cloned()
            .collect()
    };
    take_until(
        &rabbit,
        &queue,
        &mut got,
        (
            Duration::from_secs(30),
            "the backfilled readings at the broker",
            &agent,
        ),
        |got| backfilled(got).len() >= 16,
    )
    .await;
    // A range that begins a day and more before the meter's profile (two days to the first
    // boundary): the first chunk finds nothing, the second rows only from the profile's
    // first on. The gaps reported run from `from` to the row before that one.
    let profile_first = BOUNDARY - 2 * 86_400 + QUARTER;
    let early = quarter_hours(profile_first - QUARTER, profile_first + 7 * QUARTER);
    let gap_from = at(BOUNDARY - 3 * 86_400 - 6 * 3600).to_string();
    let gap_to = at(early[7]).to_string();
    centre
        .send(
            serde_json::json!({"request_id": "bf-gap", "command": "backfill", "meters": [METER],
                "profile": PROFILE, "from": gap_from, "to": gap_to})
            .to_string(),
        )
        .await;
    let gap_done = centre
        .reply("bf-gap", "done", Duration::from_secs(60))
        .await;
    let g = &gap_done["results"][0];
    assert_eq!(g["rows"], 8, "{gap_done}");
    assert_eq!(g["first"], stamp(early[0]).as_str(), "{gap_done}");
    let gaps = g["gaps"].as_array().expect("gaps");
    assert_eq!(
        gaps[0][0],
        stamp(BOUNDARY - 3 * 86_400 - 6 * 3600).as_str(),
        "{gap_done}"
    );
    assert_eq!(
        gaps[gaps.len() - 1][1],
        stamp(profile_first - QUARTER).as_str(),
        "{gap_done}"
    );
    let backfill_readings = m["readings"].as_u64().unwrap() + g["readings"].as_u64().unwrap();
    take_until(
        &rabbit,
        &queue,
        &mut got,
        (
            Duration::from_secs(30),
            "the second backfill's readings at the broker",
            &agent,
        ),
        |got| backfilled(got).len() as u64 >= backfill_readings,
    )
    .await;
    // Bad ranges: malformed, backwards, longer than max_backfill.
    let bad = [
        ("bad-time", "yesterday".to_owned(), to.clone(), "RFC 3339"),
        ("backwards", to.clone(), from.clone(), "before"),
        (
            "too-long",
            at(BOUNDARY - 3 * 86_400).to_string(),
            to.clone(),
            "max_backfill",
        ),
    ];
    for (id, from, to, why) in &bad {
        centre
            .send(
                serde_json::json!({"request_id": id, "command": "backfill", "meters": [METER],
                    "profile": PROFILE, "from": from, "to": to})
                .to_string(),
            )
            .await;
        let r = centre.reply(id, "rejected", Duration::from_secs(10)).await;
        assert!(r["reason"].as_str().unwrap().contains(why), "{id}: {r}");
    }
    assert!(agent.sigterm().success(), "{}", agent.log());
    got.extend(
        rabbit
            .take_all(&queue)
            .await
            .iter()
            .flat_map(|m| m.items("readings")),
    );
    let rb = backfilled(&got);
    // Exactly what the `done`s counted, the meter's values, under new reading ids.
    assert_eq!(rb.len() as u64, backfill_readings, "{rb:#?}");
    assert_each_once(&rb);
    let both: Vec<i64> = early.iter().chain(again).copied().collect();
    assert_eq!(sorted_values(&rb), expected(&both));
    assert_eq!(
        sorted_values(got[..first].iter().filter(|r| {
            let (_, t, _, _) = row_value(r);
            again.iter().any(|a| stamp(*a) == t)
        })),
        expected(again)
    );
    let old: BTreeSet<&str> = got[..first]
        .iter()
        .map(|r| r["reading_id"].as_str().unwrap())
        .collect();
    for r in &rb {
        assert!(has_flag(r, "from_profile"), "{r}");
        assert!(!old.contains(r["reading_id"].as_str().unwrap()), "{r}");
    }
    // Nothing but the 12 rows and the backfill came: the rejected ones read nothing.
    assert_eq!(got.len(), first + rb.len());
}
