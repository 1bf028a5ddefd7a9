//! The timing knobs against simulated meters that need them: one that drops the first
//! request after a connect (`connect_delay`), one that ignores a request that comes too soon
//! after its last answer (`turnaround`, `inter_request`). Each is unreadable without the knob
//! and read with it, through `amr-edge poll` on a config file, as a field engineer checks it.

mod common;

use std::time::Duration;

use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::modbus::{Fault, Meters, Unit, spawn_tcp};

/// How long the simulated meters need: long enough that a loaded machine does not pass the
/// pause by accident, short enough for a quick test.
const NEED_MS: u64 = 800;

async fn sim(fault: Fault) -> (Meters, std::net::SocketAddr) {
    let meters = Meters::new();
    let profile = Profiles::built_in().get("eastron-sdm630").unwrap().clone();
    let mut unit = Unit::new(profile);
    unit.fault = fault;
    meters.insert(1, unit);
    let addr = spawn_tcp(meters.clone()).await.unwrap();
    (meters, addr)
}

fn config(dir: &std::path::Path, addr: std::net::SocketAddr, bus: &str, meter: &str) -> String {
    format!(
        r#"
[gateway]
id = "gw-timing"
data_dir = "{}"

[amqp]
url = "amqp://guest:guest@127.0.0.1:5672"

[[bus]]
name = "lan"
tcp = {{ host = "{}", port = {} }}
timeout = "1s"
retries = 0
{bus}

[[meter]]
id = "m1"
bus = "lan"
modbus = {{ unit = 1, profile = "eastron-sdm630" }}
reads = {{ daily = "all" }}
{meter}
"#,
        dir.display(),
        addr.ip(),
        addr.port()
    )
}

/// Runs `amr-edge poll --json` on `config`; the values read and the errors.
async fn poll(config: String) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = tokio::process::Command::new(common::agent::bin())
        .args(["poll", "--json", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "poll printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report = &json[0];
    let values = report["values"].as_array().map_or(0, Vec::len);
    let errors = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    (values, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_drops_the_first_request_should_be_read_only_with_connect_delay() {
    let (_meters, addr) = sim(Fault::SlowConnect(NEED_MS)).await;
    let dir = tempfile::tempdir().unwrap();

    let (values, errors) = poll(config(dir.path(), addr, "", "")).await;
    assert_eq!(values, 0, "read without the knob: {errors:?}");
    assert!(errors.iter().any(|e| e.contains("no answer")), "{errors:?}");

    let delay = format!("connect_delay = \"{}ms\"", NEED_MS + 400);
    let (values, errors) = poll(config(dir.path(), addr, &delay, "")).await;
    assert!(
        values > 0 && errors.is_empty(),
        "{values} values, {errors:?}"
    );

    // The same knob on the meter alone.
    let (values, errors) = poll(config(dir.path(), addr, "", &delay)).await;
    assert!(
        values > 0 && errors.is_empty(),
        "{values} values, {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_needs_a_turnaround_should_be_read_only_with_the_pause() {
    let (meters, addr) = sim(Fault::Turnaround(NEED_MS)).await;
    let dir = tempfile::tempdir().unwrap();

    let (values, errors) = poll(config(dir.path(), addr, "", "")).await;
    assert_eq!(values, 0, "read without the knob: {errors:?}");
    assert!(errors.iter().any(|e| e.contains("no answer")), "{errors:?}");

    let pause = format!("\"{}ms\"", NEED_MS + 400);
    // Each poll starts after the meter's last answer has aged.
    let settle = Duration::from_millis(NEED_MS + 400);
    tokio::time::sleep(settle).await;
    let before = meters.requests();
    let (values, errors) = poll(config(
        dir.path(),
        addr,
        &format!("turnaround = {pause}"),
        "",
    ))
    .await;
    assert!(
        values > 0 && errors.is_empty(),
        "{values} values, {errors:?}"
    );
    // More than one request per read, or the pause between them was never needed.
    assert!(meters.requests() - before >= 2, "one request per read");
    tokio::time::sleep(settle).await;

    let (values, errors) = poll(config(
        dir.path(),
        addr,
        "",
        &format!("inter_request = {pause}"),
    ))
    .await;
    assert!(
        values > 0 && errors.is_empty(),
        "{values} values, {errors:?}"
    );
}

#[test]
fn a_connect_delay_on_a_serial_bus_should_be_refused_with_its_key() {
    let text = r#"
[gateway]
id = "gw"
data_dir = "/tmp/x"

[amqp]
url = "amqp://localhost"

[[bus]]
name = "rs485"
serial = { device = "/dev/ttyUSB0" }
connect_delay = "1s"
turnaround = "20s"
"#;
    let e = amr_edge::config::Config::from_toml(text, std::path::Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bus[0].connect_delay: applies to TCP links only"),
        "{e}"
    );
    assert!(e.contains("bus[0].turnaround: must be at most"), "{e}");
}

#[test]
fn check_should_show_the_pauses_of_buses_and_meters() {
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = "127.0.0.1:502".parse().unwrap();
    let text = config(
        dir.path(),
        addr,
        "turnaround = \"20ms\"",
        "connect_delay = \"1s\"\ninter_request = \"100ms\"",
    ) + "\n[metrics]\nlisten = \"127.0.0.1:9464\"\n";
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let out = common::agent::cli(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 retries, turnaround 20ms\n"), "{stdout}");
    assert!(
        stdout.contains("pauses     connect_delay 1s, inter_request 100ms"),
        "{stdout}"
    );
    assert!(
        stdout.contains("metrics    http://127.0.0.1:9464/metrics"),
        "{stdout}"
    );
}
