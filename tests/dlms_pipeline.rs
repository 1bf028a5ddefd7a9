//! A DLMS/COSEM meter through the whole pipeline: the Gurux-based peer (tests/dlms/meter.py,
//! an independent implementation) read over the wrapper with HLS-GMAC by the running agent
//! (`amr-edge run`, a separate process), its readings buffered, drained to the real RabbitMQ
//! and run by a stock Celery worker: every register's exact value and unit, and the extended
//! register's own capture time as its timestamp.

mod common;
#[path = "dlms/peer.rs"]
mod dlms_peer;

use std::time::Duration;

use amr_edge::meter::dlms::cosem::unit_name;
use amr_edge::reading::{Decimal, Stamp};
use common::agent::{AgentProc, config};
use common::celery::Celery;
use common::rabbit::scratch_queue;
use common::{AMQP_URL, unique};
use dlms_peer::DlmsMeter;

/// 2026-01-15T06:30:00Z: the capture time the peer gives 1-0:1.6.0.
const CAPTURE: i64 = 1_768_458_600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlms_readings_should_reach_a_celery_worker_with_exact_values_units_and_meter_time() {
    let (queue, _queues) = scratch_queue("amr.dlms");
    let events = format!("{queue}.events");
    let task = "test.commits.meter_readings";
    let celery = Celery::start(&[&queue, &events], task, "test.commits.meter_system_events").await;
    let capture = CAPTURE.to_string();
    let args = ["--capture-time", capture.as_str()];
    let mut peer_args = vec!["--wrapper", "--port", "0"];
    peer_args.extend(args);
    let peer = DlmsMeter::start(&peer_args);
    let dump = DlmsMeter::dump(&args);
    // (series, value, unit) of every register and the extended register.
    let mut want: Vec<(String, String, String)> = Vec::new();
    for o in dump["meters"][0]["objects"].as_array().unwrap() {
        let su = match o["class_id"].as_u64() {
            Some(3) | Some(4) => &o["attributes"]["3"]["value"],
            _ => continue,
        };
        let raw = o["attributes"]["2"]["value"].as_i64().unwrap();
        let scaler = su[0]["value"].as_i64().unwrap() as i32;
        let unit = unit_name(su[1]["value"].as_u64().unwrap() as u8).unwrap();
        let obis: Vec<&str> = o["obis"].as_str().unwrap().split(['-', ':', '.']).collect();
        want.push((
            obis.join("-"),
            Decimal::from_scaled(i128::from(raw), scaler)
                .unwrap()
                .as_str()
                .to_owned(),
            unit.to_owned(),
        ));
    }
    assert!(want.len() >= 5, "{want:?}");
    want.sort();

    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let gw = unique("gw");
    let cfg = config(
        dir.path(),
        &gw,
        AMQP_URL,
        &queue,
        &format!(
            r#"task = "{task}"
events_task = "test.commits.meter_system_events"

[beat]
every = "2s"

[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}
timeout = "3s"

[[meter]]
id = "gurux-e450"
bus = "lan"
dlms = {{ client = 1, logical = 1, security = "hls-gmac", block_key_file = {ek:?}, auth_key_file = {ak:?} }}
reads = {{ quarterly = "all" }}
"#,
            port = peer.port()
        ),
    );
    let mut agent = AgentProc::start(dir.path(), &cfg);
    let got = celery
        .wait_readings(want.len(), Duration::from_secs(90))
        .await;
    // The first read's readings (one reading id per series, the first seen).
    let mut first: Vec<&serde_json::Value> = Vec::new();
    for r in &got {
        if !first.iter().any(|f| f["series"] == r["series"]) {
            first.push(r);
        }
    }
    let mut at_celery: Vec<(String, String, String)> = first
        .iter()
        .filter(|r| r["series"] != "0-0-96-1-0-255" && r["series"] != "0-0-43-1-0-255")
        .filter(|r| r["series"] != "1-0-1-4-0-255")
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("series"), s("value"), s("unit"))
        })
        .collect();
    at_celery.sort();
    assert_eq!(at_celery, want, "{}", agent.log());
    assert!(got.iter().all(|r| r["meter"] == "gurux-e450"));
    // The extended register carries the meter's capture time, in the gateway's zone.
    let tz = jiff::tz::TimeZone::get("Europe/Stockholm").unwrap();
    let capture = Stamp::in_zone(jiff::Timestamp::from_second(CAPTURE).unwrap(), &tz).rfc3339();
    let ext = first
        .iter()
        .find(|r| r["series"] == "1-0-1-6-0-255")
        .expect("the extended register");
    assert_eq!(ext["timestamp"], capture.as_str(), "{ext}");
    // So does the demand register (its capture time); the others carry the read's own time
    // (a boundary of the 2 s beat), never the capture time.
    for r in &first {
        let stamped = r["series"] == "1-0-1-6-0-255" || r["series"] == "1-0-1-4-0-255";
        assert_eq!(r["timestamp"] == capture.as_str(), stamped, "{r}");
    }
    assert!(agent.sigterm().success(), "{}", agent.log());
}
