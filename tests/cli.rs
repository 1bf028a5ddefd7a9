//! The command line as a user meets it: `check` on good and broken configs, `status` with
//! and without an agent, `demo` with and without a broker, one agent per data directory.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::agent::{AgentProc, cli, config};
use common::rabbit::{Rabbit, scratch_queue};
use common::{AMQP_URL, readings, seed, unique};

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs")
}

#[test]
fn every_broken_config_should_be_rejected_naming_the_file_line_and_key() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs().join("bad")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` line", path.display()))
            .to_owned();
        let out = cli(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        let name = path.display().to_string();
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(
            err.contains(&expect),
            "{name}: expected `{expect}` in:\n{err}"
        );
        // FILE:LINE:COL, except for a file that is empty or lacks a whole section.
        let located = err.contains(&format!("{name}:"))
            && err[name.len()..]
                .chars()
                .nth(1)
                .is_some_and(|c| c.is_ascii_digit());
        assert!(
            located || text.lines().count() <= 3,
            "{name}: no line in:\n{err}"
        );
        n += 1;
    }
    assert!(n >= 25, "only {n} broken configs");
}

#[test]
fn a_good_config_should_print_the_resolved_plan() {
    let out = cli(&[
        "check",
        "--config",
        configs().join("good.toml").to_str().unwrap(),
    ]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "valid",
        "gw-0042 (Europe/Stockholm)",
        "bus rs485-1: serial /dev/ttyAMA0 9600 8N1, RS-485 direction by the driver",
        "meter SDM630-0001",
        "quarterly  2 series in 1 request(s)",
        "monthly    17 series in 2 request(s): fc04 0+80, fc04 342+4",
        "meter LGZ-61234567",
        "rate 200/s",
    ] {
        assert!(s.contains(want), "`{want}` missing from:\n{s}");
    }
}

/// The ```toml block after `marker` in the README.
fn readme_block(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = &readme[readme.find(marker).expect(marker)..];
    let start = after.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + after[start..].find("```").unwrap();
    after[start..end].to_owned()
}

#[test]
fn the_readme_example_config_and_profile_should_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("heat-meter.toml");
    std::fs::write(&profile, readme_block("A profile file of your own")).unwrap();
    let example = readme_block("A complete example").replace(
        "/etc/amr-edge/profiles/heat-meter.toml",
        profile.to_str().unwrap(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, example).unwrap();
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_without_an_agent_should_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), &readings(5, 1));
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, config(dir.path(), "gw-s", AMQP_URL, "q", "")).unwrap();
    let out = cli(&["status", "--config", cfg.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("agent        not running"), "{s}");
    assert!(s.contains("buffer       5 readings, 0 events"), "{s}");
    assert!(s.contains("last drain   never"), "{s}");
    let out = cli(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["buffer"]["readings"], 5);
    assert!(j["buffer"]["oldest_unsent_age_s"].as_i64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_data_dir_should_fail_fast_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "gw-lock",
        AMQP_URL,
        &unique("q"),
        "declare_queues = true",
    );
    let first = AgentProc::start(dir.path(), &cfg);
    first
        .wait_log("Agent starting", 1, Duration::from_secs(20))
        .await;
    let started = std::time::Instant::now();
    let out = cli(&["run", "--config", first.config_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "another amr-edge (pid {}) is running",
            first.pid()
        )),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_demo_should_poll_and_buffer_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = cli(&[
        "demo",
        "--for",
        "5s",
        "--every",
        "1s",
        "--amqp",
        "amqp://guest:guest@127.0.0.1:9/%2f",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Polled and buffered"), "{err}");
    assert!(err.contains("Broker not available"), "{err}");
    let out = cli(&[
        "status",
        "--json",
        "--config",
        data.join("demo.toml").to_str().unwrap(),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["buffer"]["readings"].as_u64().unwrap() >= 22, "{j}");
    // Three Modbus meters, two DLMS/COSEM ones, the IEC 62056-21 one and three M-Bus meters.
    let meters = j["meters"].as_array().unwrap();
    assert_eq!(meters.len(), 9, "{j}");
    assert!(meters.iter().any(|m| m["meter"] == "demo-dlms"), "{j}");
    // The one read from its load profile: six hours of quarter-hour rows, and its mark.
    assert!(err.contains("Profile rows buffered"), "{err}");
    let lp = meters
        .iter()
        .find(|m| m["meter"] == "demo-dlms-lp")
        .unwrap();
    let profile = &lp["profiles"][0];
    assert_eq!(profile["profile"], "1-0-99-1-0-255", "{j}");
    // 24, or 25 if the run straddled a quarter hour (the next row, read by the next tick).
    let rows = profile["rows"].as_u64().unwrap();
    assert!((24..=25).contains(&rows), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_should_drain_to_the_broker_when_one_answers() {
    let (queue, _queues) = scratch_queue("amr.demo");
    let events = format!("{queue}.events");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = cli(&[
        "--log-format",
        "json",
        "demo",
        "--for",
        "5s",
        "--every",
        "1s",
        "--queue",
        &queue,
        "--events-queue",
        &events,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // JSON logs: every log line parses, and says what happened in fields.
    let logs: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l["message"] == "Delivered to the broker")
    );
    assert!(
        logs.iter()
            .any(|l| l["message"] == "Polled and buffered" && l["meter"] == "demo-sdm630")
    );
    assert!(
        logs.iter()
            .any(|l| l["message"] == "Polled and buffered" && l["meter"] == "demo-lgz")
    );
    let rabbit = Rabbit::connect().await;
    let msgs = rabbit.take_all(&queue).await;
    let n: usize = msgs.iter().map(|m| m.items("readings").len()).sum();
    assert!(n >= 22, "{n} readings in the queue");
}

#[test]
fn version_should_print_the_crate_version() {
    let out = cli(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("amr-edge {}", env!("CARGO_PKG_VERSION"))
    );
}
