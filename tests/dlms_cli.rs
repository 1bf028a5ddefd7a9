//! `amr-edge poll --config F METER --profile OBIS --from T --to T` against the simulated
//! DLMS/COSEM meter (src/sim/dlms/, itself proved against Gurux's client in
//! tests/dlms_sim.rs): the rows of a range exactly, as JSON and as a table, over the public
//! client and HLS-GMAC; and the clear errors for a non-DLMS meter, a malformed time and a
//! range that ends before it starts.

mod common;

use std::path::Path;

use amr_edge::reading::{Decimal, Stamp};
use amr_edge::sim::dlms::{self, Meter, MeterSpec};
use common::agent::cli;
use jiff::Timestamp;
use jiff::tz::TimeZone;

fn config(dir: &Path, port: u16) -> std::path::PathBuf {
    let ek = dir.join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let extra = format!(
        r#"
[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}
timeout = "3s"

[[meter]]
id = "dlms-public"
bus = "lan"
dlms = {{ client = 16, logical = 1 }}

[[meter]]
id = "dlms-hls"
bus = "lan"
dlms = {{ client = 1, logical = 1, security = "hls-gmac", block_key_file = {ek:?}, auth_key_file = {ak:?} }}

[[bus]]
name = "modbus"
tcp = {{ host = "127.0.0.1", port = 9 }}

[[meter]]
id = "sdm"
bus = "modbus"
modbus = {{ unit = 1, profile = "eastron-sdm630" }}
"#
    );
    let text = common::agent::config(
        &dir.join("data"),
        "gw-profile",
        "amqp://127.0.0.1:9",
        "q",
        &extra,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || cli(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_range_should_print_the_meters_rows_exactly() {
    let meter = Meter::new(MeterSpec::new(17));
    let addr = dlms::spawn_wrapper(meter.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), addr.port());
    let tz = TimeZone::get("Europe/Stockholm").unwrap();
    // Rows 10 ..= 20 of the buffer: the last ones would move if a quarter hour passed.
    let times = dlms::row_times(meter.now().as_second(), 3);
    let (from, to) = (times[10], times[20]);
    let from_arg = Timestamp::from_second(from).unwrap().to_string();
    // --to as a local time in the gateway's zone.
    let to_arg = Timestamp::from_second(to)
        .unwrap()
        .to_zoned(tz.clone())
        .datetime()
        .to_string();
    for m in ["dlms-public", "dlms-hls"] {
        let out = run([
            "poll",
            "--config",
            path.to_str().unwrap(),
            m,
            "--profile",
            "1-0:99.1.0",
            "--from",
            &from_arg,
            "--to",
            &to_arg,
            "--json",
        ]
        .map(String::from)
        .to_vec())
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{m}: {stderr}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["capture_period_s"], 900, "{j}");
        let rows = j["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 11, "{m}: {j}");
        for (row, t) in rows.iter().zip(&times[10..=20]) {
            let ts = Stamp::in_zone(Timestamp::from_second(*t).unwrap(), &tz).rfc3339();
            assert_eq!(row["timestamp"], ts.as_str(), "{m}");
            let import = Decimal::from_scaled(i128::from(dlms::import_raw(*t, 17)), -1).unwrap();
            let export = Decimal::from_scaled(i128::from(dlms::export_raw(*t, 17)), 3).unwrap();
            assert_eq!(
                row["values"],
                serde_json::json!([
                    {"series": "1-0-1-8-0-255", "value": import.as_str(), "unit": "Wh"},
                    {"series": "1-0-2-8-0-255", "value": export.as_str(), "unit": "Wh"},
                ]),
                "{m}"
            );
        }
    }
    // The table: a header, then one line per row.
    let out = run([
        "poll",
        "--config",
        path.to_str().unwrap(),
        "dlms-public",
        "--profile",
        "1-0:99.1.0",
        "--from",
        &from_arg,
        "--to",
        &to_arg,
    ]
    .map(String::from)
    .to_vec())
    .await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12, "{text}");
    assert!(lines[0].contains("1-0-1-8-0-255 [Wh]"), "{text}");
    let import = Decimal::from_scaled(i128::from(dlms::import_raw(from, 17)), -1).unwrap();
    assert!(lines[1].contains(import.as_str()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_profile_requests_should_be_clear_errors() {
    let addr = dlms::spawn_wrapper(Meter::new(MeterSpec::new(17)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), addr.port());
    let p = path.to_str().unwrap().to_owned();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "sdm",
                "--from",
                "2026-12-01T00:00:00Z",
                "--to",
                "2026-12-01T01:00:00Z",
            ],
            "`sdm` is a modbus meter; --profile reads DLMS/COSEM load profiles",
        ),
        (
            &[
                "dlms-public",
                "--from",
                "yesterday",
                "--to",
                "2026-12-01T01:00:00Z",
            ],
            "--from `yesterday` is not a time",
        ),
        (
            &[
                "dlms-public",
                "--from",
                "2026-12-01T02:00:00Z",
                "--to",
                "2026-12-01T01:00:00Z",
            ],
            "is after --to",
        ),
        (
            &[
                "nope",
                "--from",
                "2026-12-01T00:00:00Z",
                "--to",
                "2026-12-01T01:00:00Z",
            ],
            "no meter `nope`",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["poll".to_owned(), "--config".into(), p.clone()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend(["--profile".to_owned(), "1-0:99.1.0".into()]);
        let out = run(all).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
