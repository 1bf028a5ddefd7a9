//! DLMS/COSEM figures: a register read and a day of load profile rows over the IEC 62056-47
//! wrapper — request/answer round trips and bytes on the wire per read, counted by a proxy between the driver (as the agent
//! runs it) and the simulated meter (src/sim/dlms/) — and the resident memory of an idle
//! agent (`amr-edge run`, the shipped binary) with 200 DLMS meters configured on one bus,
//! idle as in `benches/backbone.rs`: the broker out of reach, nothing due to be read.
//! Run with `benches/run.sh dlms`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "../tests/dlms/wire.rs"]
mod wire;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amr_edge::meter::Request;
use amr_edge::meter::link::Slot;
use amr_edge::reading::{Cadence, Obis};
use amr_edge::sim::dlms::{Meter, MeterSpec, spawn_wrapper};

async fn register_reads(rows: &mut Vec<(String, String)>) {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let levels = [
        ("public", "client = 16, logical = 1".to_owned()),
        (
            "HLS-GMAC",
            format!(
                "client = 1, logical = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
            ),
        ),
    ];
    for (level, section) in &levels {
        for (what, reads, n) in [
            ("1 register", "[\"1-0:1.8.0\"]", 1),
            (
                "reads = \"all\" (9 registers, 2 data objects)",
                "\"all\"",
                9,
            ),
        ] {
            // The object list and scalers cached by the row before are forgotten; the
            // invocation counter in the same data dir is kept (the meter wants it rising).
            let _ = std::fs::remove_file(dir.path().join("dlms/bench.objects"));
            let (bus, m) = wire::meter(proxy.port(), "bench", section, reads, dir.path());
            let req = Request {
                cadence: Cadence::Quarterly,
                series: None,
            };
            // The first read of a meter also reads its object list and its registers'
            // scalers (once: cached on disk).
            for first in [true, false] {
                *wire.lock().unwrap() = wire::Wire::default();
                let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
                let out = m.read(&mut slot, &req, &bus.timing).await;
                drop(slot);
                assert!(out.failure.is_none(), "{level} {what}: {:?}", out.failure);
                let energy: Obis = "1-0:1.8.0".parse().unwrap();
                assert!(out.values.iter().any(|v| v.series == energy));
                assert!(out.values.len() >= n, "{:?}", out.values);
                // Let the proxy count the RLRE.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let w = wire.lock().unwrap().clone();
                let label = format!(
                    "{level}, {what}{}",
                    if first {
                        ", first read (object list, scalers)"
                    } else {
                        ""
                    }
                );
                rows.push((
                    format!("DLMS wrapper read: {label}"),
                    format!(
                        "{} round trips, {} B to meter, {} B from meter, {} B total",
                        w.round_trips(),
                        w.to_meter,
                        w.from_meter,
                        w.to_meter + w.from_meter
                    ),
                ));
            }
        }
    }
}

/// One day of 96 quarter-hour rows (clock and two energy registers) read as the bus reads
/// rows, issue #14's budget of ≤ 3 GET round trips: the first read (no cached header: the
/// capture objects and period, then the columns' scalers, then the buffer — what every read
/// was before the header was cached) and the next.
async fn profile_reads(rows: &mut Vec<(String, String)>) {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let levels = [
        ("public", "client = 16, logical = 1".to_owned()),
        (
            "HLS-GMAC",
            format!(
                "client = 1, logical = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
            ),
        ),
    ];
    for (level, section) in &levels {
        let _ = std::fs::remove_file(dir.path().join("dlms/bench.objects"));
        let (bus, m) = wire::meter(proxy.port(), "bench", section, "\"all\"", dir.path());
        for first in [true, false] {
            let (_, w) = wire::read_day(&bus, &m, &wire).await;
            rows.push((
                format!(
                    "DLMS wrapper profile, 1 day (96 rows × 2 values): {level}, {}",
                    if first {
                        "first read (header, scalers)"
                    } else {
                        "cached header"
                    }
                ),
                format!(
                    "{} round trips ({}), {} GETs, {} B to meter, {} B from meter, {} B total",
                    w.round_trips(),
                    w.apdus(),
                    w.gets(),
                    w.to_meter,
                    w.from_meter,
                    w.to_meter + w.from_meter
                ),
            ));
        }
    }
}

async fn two_hundred_meters(rows: &mut Vec<(String, String)>) {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = format!(
        r#"[gateway]
id = "gw-bench"
timezone = "UTC"
data_dir = "{data}"

[amqp]
url = "amqp://guest:guest@127.0.0.1:9/%2f"

[[bus]]
name = "lan"
tcp = {{ host = "127.0.0.1", port = {port} }}
"#,
        data = dir.path().join("data").display(),
        port = sim.port()
    );
    for i in 0..200 {
        cfg.push_str(&format!(
            "\n[[meter]]\nid = \"dlms-{i:03}\"\nbus = \"lan\"\ndlms = {{ client = 16, logical = 1 }}\nreads = {{ quarterly = \"all\", daily = \"all\" }}\n"
        ));
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    let (bin, shipped) = common::agent::shipped_bin();
    let which = if shipped {
        ""
    } else {
        " (bench-profile binary; benches/run.sh measures the shipped one)"
    };
    let mut child = Command::new(bin)
        .args(["--log", "warn", "run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let mut peak = 0;
    let mut last = 0;
    while start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(r) = common::agent::rss_kib(pid) {
            peak = peak.max(r);
            last = r;
        }
    }
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    rows.push((
        "idle agent, 200 DLMS meters on one bus: resident memory".into(),
        format!(
            "{:.1} MiB after 20 s (peak {:.1} MiB; budget 15 MiB){which}",
            last as f64 / 1024.0,
            peak as f64 / 1024.0
        ),
    ));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();
    rt.block_on(register_reads(&mut rows));
    rt.block_on(profile_reads(&mut rows));
    rt.block_on(two_hundred_meters(&mut rows));
    println!("\n{:<72} measured", "figure");
    for (what, figure) in rows {
        println!("{what:<72} {figure}");
    }
}
