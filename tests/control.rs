//! MQTT control against the real Mosquitto: on-demand polls answered and delivered, status
//! and last will, a broker that restarts, malformed commands, floods, duplicates, signatures,
//! and on-demand polls jumping the queue of a busy bus.

mod common;

use std::time::Duration;

use amr_edge::control::command::sign;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::modbus::{Fault, Meters, Unit, spawn_tcp};
use common::agent::{AgentProc, config};
use common::celery::Celery;
use common::mqtt::{Broker, Centre};
use common::rabbit::scratch_queue;
use common::{AMQP_URL, unique};
use serde_json::{Value, json};

const PREFIX: &str = "amr-test/gateways";

async fn meters(units: &[(u8, Fault)]) -> std::net::SocketAddr {
    let meters = Meters::new();
    let profile = Profiles::built_in().get("eastron-sdm630").unwrap().clone();
    for (u, fault) in units {
        let mut unit = Unit::new(profile.clone());
        unit.fault = *fault;
        meters.insert(*u, unit);
    }
    spawn_tcp(meters).await.unwrap()
}

/// `[mqtt]` on `port` plus a TCP bus with meters `m{unit}`.
fn control_config(port: u16, sim: std::net::SocketAddr, units: &[u8], mqtt_extra: &str) -> String {
    let mut s = format!(
        "declare_queues = true\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"{PREFIX}\"\nmax_backoff = \"2s\"\nkeep_alive = \"5s\"\n{mqtt_extra}\n\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"{}\", port = {} }}\n",
        sim.ip(),
        sim.port()
    );
    for u in units {
        s.push_str(&format!(
            "\n[[meter]]\nid = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
        ));
    }
    s
}

/// A running agent with MQTT control, its simulated meters and the centre's client, once
/// the agent says `online`.
/// Destructure it naming `_dir` (`..` alone drops it: the data dir would go while the agent
/// runs).
struct Gateway {
    gw: String,
    agent: AgentProc,
    centre: Centre,
    _dir: tempfile::TempDir,
}

/// Simulated meters `m{unit}` on one TCP bus, an agent draining to `queue` in `dir`, with
/// `[mqtt]` on the broker at `port` (plus `mqtt_extra`).
async fn gateway_in(
    dir: tempfile::TempDir,
    port: u16,
    units: &[(u8, Fault)],
    queue: &str,
    mqtt_extra: &str,
) -> Gateway {
    let sim = meters(units).await;
    let gw = unique("gw");
    let ids: Vec<u8> = units.iter().map(|(u, _)| *u).collect();
    let agent = AgentProc::start(
        dir.path(),
        &config(
            dir.path(),
            &gw,
            AMQP_URL,
            queue,
            &control_config(port, sim, &ids, mqtt_extra),
        ),
    );
    let centre = Centre::connect(port, PREFIX, &gw).await;
    centre.state("online", 0, Duration::from_secs(20)).await;
    Gateway {
        gw,
        agent,
        centre,
        _dir: dir,
    }
}

/// [`gateway_in`] with healthy meters, the shared Mosquitto and a queue nobody reads.
async fn gateway(units: &[u8], mqtt_extra: &str) -> Gateway {
    let units: Vec<(u8, Fault)> = units.iter().map(|u| (*u, Fault::None)).collect();
    let dir = tempfile::tempdir().unwrap();
    gateway_in(dir, 1883, &units, &unique("q"), mqtt_extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_poll_should_be_accepted_then_done_with_values_and_delivered() {
    let (queue, _queues) = scratch_queue("amr.ctl");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let g = gateway_in(
        tempfile::tempdir().unwrap(),
        1883,
        &[(1, Fault::None), (2, Fault::None)],
        &queue,
        "",
    )
    .await;
    let centre = &g.centre;
    centre
        .send(json!({"request_id": "r1", "command": "poll", "meters": ["m1", "m2"]}).to_string())
        .await;
    let accepted = centre
        .reply("r1", "accepted", Duration::from_secs(10))
        .await;
    assert_eq!(accepted["meters"], json!(["m1", "m2"]));
    let done = centre.reply("r1", "done", Duration::from_secs(30)).await;
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["ok"], true, "{r}");
        let values = r["values"].as_array().unwrap();
        assert_eq!(values.len(), 17);
        let energy = values
            .iter()
            .find(|v| v["series"] == "1-0-1-8-0-255")
            .unwrap();
        assert_eq!(energy["value"], "11000.125");
        assert_eq!(energy["unit"], "kWh");
    }
    // The accepted reply came before the done one.
    let order: Vec<Value> = centre
        .replies()
        .into_iter()
        .filter(|r| r["request_id"] == "r1")
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(order, [json!("accepted"), json!("done")]);
    // And the readings went the usual way, as on_demand reads.
    let got = celery.wait_readings(34, Duration::from_secs(60)).await;
    assert!(got.iter().all(|r| r["cadence"] == "on_demand"));
    assert_eq!(
        got.iter().filter(|r| r["meter"] == "m2").count(),
        17,
        "every value of m2 reached the centre"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_should_be_online_then_offline_on_a_clean_stop_and_on_kill_9() {
    let Gateway {
        gw,
        mut agent,
        centre,
        _dir,
    } = gateway(&[1], "").await;
    let online = centre
        .status()
        .into_iter()
        .find(|s| s["state"] == "online")
        .unwrap();
    assert_eq!(online["gateway"], gw.as_str());
    assert_eq!(online["version"], env!("CARGO_PKG_VERSION"));
    assert!(online["buffer"]["readings"].is_u64());
    // Count before acting: the answer can come before the action returns.
    let n = centre.status().len();
    assert!(agent.sigterm().success());
    let off = centre.state("offline", n, Duration::from_secs(10)).await;
    assert_eq!(off["reason"], "shutdown");

    let n = centre.status().len();
    agent.restart();
    centre.state("online", n, Duration::from_secs(20)).await;
    let n = centre.status().len();
    agent.kill9();
    let will = centre.state("offline", n, Duration::from_secs(20)).await;
    assert_eq!(will["reason"], "connection lost", "the last will");
    // Retained: whoever looks later sees it too.
    let late = Centre::connect(1883, PREFIX, &gw).await;
    let seen = late.state("offline", 0, Duration::from_secs(10)).await;
    assert_eq!(seen["reason"], "connection lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_should_work_again_after_the_broker_restarts_without_restarting_the_agent() {
    let mut broker = Broker::start();
    let Gateway {
        gw,
        agent,
        centre,
        _dir,
    } = gateway_in(
        tempfile::tempdir().unwrap(),
        broker.port,
        &[(1, Fault::None)],
        &unique("q"),
        "",
    )
    .await;
    centre.send(r#"{"request_id":"p1","command":"ping"}"#).await;
    centre.reply("p1", "done", Duration::from_secs(10)).await;
    drop(centre);

    // The broker goes away and comes back with no memory of the session.
    broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();
    let centre = Centre::connect(broker.port, PREFIX, &gw).await;
    centre.state("online", 0, Duration::from_secs(30)).await;
    centre
        .send(json!({"request_id": "p2", "command": "poll", "meters": ["m1"]}).to_string())
        .await;
    let done = centre.reply("p2", "done", Duration::from_secs(30)).await;
    assert_eq!(done["results"][0]["ok"], true);
    assert!(agent.log().matches("Connected to the MQTT broker").count() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_and_floods_should_be_rejected_and_the_agent_go_on() {
    let Gateway {
        mut agent,
        centre,
        _dir,
        ..
    } = gateway(&[1], "max_payload = \"1KiB\"\nmax_pending = 2").await;
    let corpus: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"hello".to_vec(), None, "not JSON"),
        (b"\xff\xfe\x00binary".to_vec(), None, "not JSON"),
        (b"".to_vec(), None, "not JSON"),
        (b"[]".to_vec(), None, "expected a JSON object"),
        (
            br#"{"command":"ping"}"#.to_vec(),
            None,
            "missing field `request_id`",
        ),
        (
            br#"{"request_id":"b1","command":42}"#.to_vec(),
            Some("b1"),
            "invalid type",
        ),
        (
            br#"{"request_id":"b2","command":"format_disk"}"#.to_vec(),
            Some("b2"),
            "unknown command",
        ),
        (
            br#"{"request_id":"b3","command":"poll","meters":["nope"]}"#.to_vec(),
            Some("b3"),
            "unknown meter `nope`",
        ),
        (
            br#"{"request_id":"b4","command":"poll","meters":[]}"#.to_vec(),
            Some("b4"),
            "`meters` is empty",
        ),
        (
            br#"{"request_id":"b5","command":"poll","series":["x"]}"#.to_vec(),
            Some("b5"),
            "not an OBIS code",
        ),
        (
            br#"{"request_id":"b6","command":"cancel"}"#.to_vec(),
            Some("b6"),
            "needs `target`",
        ),
        (
            br#"{"request_id":"b7","command":"ping","extra":1}"#.to_vec(),
            Some("b7"),
            "unknown field `extra`",
        ),
        (
            format!(
                r#"{{"request_id":"b8","command":"ping","pad":"{}"}}"#,
                "x".repeat(2000)
            )
            .into_bytes(),
            None,
            "over the limit",
        ),
    ];
    for (payload, _, _) in &corpus {
        centre.send(payload.clone()).await;
        // One at a time: this test is about the answers, the flood comes below.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    common::eventually(
        Duration::from_secs(20),
        "a rejection for every bad command",
        || async {
            (centre
                .replies()
                .iter()
                .filter(|r| r["status"] == "rejected")
                .count()
                >= corpus.len())
            .then_some(())
        },
    )
    .await;
    let rejected: Vec<Value> = centre
        .replies()
        .into_iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    for (payload, id, reason) in &corpus {
        let found = rejected.iter().any(|r| {
            r["reason"].as_str().unwrap_or("").contains(reason)
                && id.is_none_or(|id| r["request_id"] == id)
        });
        assert!(
            found,
            "{:?}: no rejection saying `{reason}` in {rejected:#?}",
            String::from_utf8_lossy(payload)
        );
    }

    // A flood: more commands than may wait; the extra ones are told, nothing is lost silently.
    for i in 0..60 {
        centre
            .send(json!({"request_id": format!("f{i}"), "command": "inspect"}).to_string())
            .await;
    }
    common::eventually(
        Duration::from_secs(30),
        "an answer to every command of the flood",
        || async {
            let answered = (0..60)
                .filter(|i| {
                    centre.replies().iter().any(|r| {
                        r["request_id"] == format!("f{i}")
                            && (r["status"] == "done" || r["status"] == "rejected")
                    })
                })
                .count();
            (answered == 60).then_some(())
        },
    )
    .await;
    let busy = centre
        .replies()
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|s| s.starts_with("busy")))
        .count();
    assert!(
        busy > 0,
        "some of the flood should have been turned away as busy"
    );

    // Still alive, still polling.
    assert!(agent.is_running());
    centre
        .send(json!({"request_id": "ok1", "command": "poll"}).to_string())
        .await;
    let done = centre.reply("ok1", "done", Duration::from_secs(30)).await;
    assert_eq!(done["results"][0]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_should_run_once_even_across_a_restart() {
    let Gateway {
        mut agent,
        centre,
        _dir,
        ..
    } = gateway(&[1], "").await;
    let cmd = json!({"request_id": "once", "command": "poll", "meters": ["m1"]}).to_string();
    centre.send(cmd.clone()).await;
    let original = centre.reply("once", "done", Duration::from_secs(20)).await;
    let runs = || {
        centre
            .replies()
            .iter()
            .filter(|r| r["request_id"] == "once" && r["status"] == "done")
            .map(|r| r.get("duplicate").is_some())
            .collect::<Vec<bool>>()
    };
    centre.send(cmd.clone()).await;
    common::eventually(Duration::from_secs(10), "the stored done again", || async {
        (runs() == [false, true]).then_some(())
    })
    .await;
    assert!(agent.sigterm().success());
    let n = centre.status().len();
    agent.restart();
    centre.state("online", n, Duration::from_secs(20)).await;
    centre.send(cmd).await;
    common::eventually(
        Duration::from_secs(10),
        "the stored done after a restart",
        || async { (runs() == [false, true, true]).then_some(()) },
    )
    .await;
    let mut last = centre
        .replies()
        .into_iter()
        .rfind(|r| r["request_id"] == "once")
        .unwrap();
    last.as_object_mut().unwrap().remove("duplicate");
    assert_eq!(last, original, "the original outcome, not a second run");
    assert!(
        centre.replies().iter().all(|r| r["status"] != "rejected"),
        "a duplicate is answered, not refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_accepted_before_a_kill_9_should_be_done_after_the_restart() {
    // A slow meter: the poll is accepted and still on the bus when the agent is killed.
    let dir = tempfile::tempdir().unwrap();
    let Gateway {
        mut agent,
        centre,
        _dir,
        ..
    } = gateway_in(dir, 1883, &[(1, Fault::Delay(600))], &unique("q"), "").await;
    let cmd = json!({"request_id": "k1", "command": "poll", "meters": ["m1"]}).to_string();
    centre.send(cmd.clone()).await;
    centre
        .reply("k1", "accepted", Duration::from_secs(10))
        .await;
    agent.kill9();
    assert!(
        !centre
            .replies()
            .iter()
            .any(|r| r["request_id"] == "k1" && r["status"] == "done"),
        "killed before the poll finished"
    );
    let n = centre.status().len();
    agent.restart();
    centre.state("online", n, Duration::from_secs(20)).await;
    let done = centre.reply("k1", "done", Duration::from_secs(60)).await;
    assert_eq!(done["results"][0]["ok"], true, "{done}");
    assert!(done.get("duplicate").is_none());
    // Sent again meanwhile or later: the same outcome, not a refusal.
    centre.send(cmd).await;
    common::eventually(
        Duration::from_secs(10),
        "an answer to the repeat",
        || async {
            centre
                .replies()
                .into_iter()
                .find(|r| r["request_id"] == "k1" && r["duplicate"] == true)
        },
    )
    .await;
    assert!(
        centre
            .replies()
            .iter()
            .all(|r| !(r["request_id"] == "k1" && r["status"] == "rejected"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_only_signed_commands_should_run() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac.key");
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let extra = format!("hmac_key_file = \"{}\"", key_file.display());
    let g = gateway_in(dir, 1883, &[(1, Fault::None)], &unique("q"), &extra).await;
    let centre = &g.centre;
    centre.send(r#"{"request_id":"u1","command":"ping"}"#).await;
    let r = centre
        .reply("u1", "rejected", Duration::from_secs(10))
        .await;
    assert!(r["reason"].as_str().unwrap().contains("unsigned"));
    let ts = jiff::Timestamp::now().as_second();
    let sig = sign(b"s3cret-key", "s1", "poll", ts, &["m1"], &[], "");
    centre
        .send(
            json!({"request_id": "s1", "command": "poll", "meters": ["m1"], "ts": ts, "sig": sig})
                .to_string(),
        )
        .await;
    let done = centre.reply("s1", "done", Duration::from_secs(20)).await;
    assert_eq!(done["results"][0]["ok"], true);
    let forged = json!({"request_id": "s2", "command": "poll", "meters": ["m1"], "ts": ts, "sig": sign(b"guess", "s2", "poll", ts, &["m1"], &[], "")});
    centre.send(forged.to_string()).await;
    let r = centre
        .reply("s2", "rejected", Duration::from_secs(10))
        .await;
    assert!(r["reason"].as_str().unwrap().contains("does not match"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_should_show_buses_next_reads_store_and_meters() {
    let g = gateway(&[1], "").await;
    let centre = &g.centre;
    centre
        .send(r#"{"request_id":"i1","command":"inspect"}"#)
        .await;
    let r = centre.reply("i1", "done", Duration::from_secs(10)).await;
    let result = &r["result"];
    assert_eq!(result["buses"][0]["bus"], "lan");
    assert!(result["next_reads"]["quarterly"].is_string());
    assert!(result["store"]["readings"].is_u64());
    assert_eq!(result["meters"][0]["meter"], "m1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_poll_should_be_answered_before_a_busy_bus_drains_its_scheduled_reads() {
    // Eight slow meters read every quarter-hour on one bus, one frame at a time.
    let units: Vec<(u8, Fault)> = (1..=9).map(|u| (u, Fault::Delay(300))).collect();
    let sim = meters(&units).await;
    let gw = unique("gw");
    let dir = tempfile::tempdir().unwrap();
    let mut extra = format!(
        "declare_queues = true\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopic_prefix = \"{PREFIX}\"\n\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"{}\", port = {} }}\n",
        sim.ip(),
        sim.port()
    );
    for u in 1..=9 {
        let reads = if u <= 8 {
            "reads = { quarterly = \"all\" }"
        } else {
            ""
        };
        extra.push_str(&format!(
            "\n[[meter]]\nid = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n{reads}\n"
        ));
    }
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        config(dir.path(), &gw, AMQP_URL, &unique("q"), &extra),
    )
    .unwrap();
    let centre = Centre::connect(1883, PREFIX, &gw).await;
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // 10:14:58 UTC: the quarter-hour comes two seconds after start.
    let mut agent = std::process::Command::new(common::agent::bin())
        .env("LD_PRELOAD", common::agent::libfaketime())
        .env("FAKETIME", "@2026-11-21 10:14:58")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("TZ", "UTC")
        .args(["--log", "info,amr_edge=debug", "run", "--config"])
        .arg(&cfg_path)
        .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap();
    centre.state("online", 0, Duration::from_secs(20)).await;
    // Wait until the scheduled reads are on the bus (two meters done), then ask.
    common::eventually(
        Duration::from_secs(20),
        "the scheduled reads to start",
        || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            (log.matches("cadence=quarterly readings=17").count() >= 2).then_some(())
        },
    )
    .await;
    centre
        .send(r#"{"request_id":"now","command":"poll","meters":["m9"]}"#)
        .await;
    centre.reply("now", "done", Duration::from_secs(20)).await;
    common::eventually(Duration::from_secs(30), "every scheduled read", || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        (log.matches("cadence=quarterly readings=17").count() == 8).then_some(())
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let polled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Polled and buffered"))
        .collect();
    let on_demand = polled
        .iter()
        .position(|l| l.contains("cadence=on_demand"))
        .unwrap();
    assert!(
        on_demand < polled.len() - 2,
        "the on-demand read should jump the queue, not wait for it: {polled:#?}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().unwrap().success());
}
