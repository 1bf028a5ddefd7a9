//! Modbus figures: coalescing of an SDM630 read against the minimum, and 1,000 meters on
//! Modbus TCP at several concurrencies against `mbpoll` reading them one after another.
//! Run with `benches/run.sh modbus` (`mbpoll` from Debian for the comparison).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amr_edge::bus::{BusConfig, BusWorker, PollRequest, Router};
use amr_edge::clock::SystemClock;
use amr_edge::meter::modbus::plan::{self, MAX_REGISTERS, Request};
use amr_edge::meter::modbus::profile::{Profiles, Register};
use amr_edge::meter::modbus::wire::{SharedWire, Tap};
use amr_edge::meter::modbus::{self, ReadPlan};
use amr_edge::meter::{MeterConfig, Selection};
use amr_edge::reading::Cadence;
use amr_edge::sim::modbus::{Meters, Unit, spawn_tcp};
use amr_edge::store::{SledStore, StoreConfig};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

fn cpu_seconds(who: i32) -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();
    rt.block_on(coalescing(&mut rows));
    rt.block_on(thousand_meters(&mut rows));
    println!("\n{:<64} measured", "figure");
    for (what, figure) in rows {
        println!("{what:<64} {figure}");
    }
}

/// The fewest requests that can cover `regs`: greedy with any gap allowed (optimal, see
/// `plan`), and the fewest bytes any plan can put on the wire (a dynamic programme over
/// where to split), for RTU framing.
fn minimum(regs: &[&Register]) -> (usize, u64) {
    let fewest = plan::plan(regs, MAX_REGISTERS, MAX_REGISTERS).len();
    let mut sorted: Vec<&Register> = regs.to_vec();
    sorted.sort_by_key(|r| r.address);
    // best[i]: fewest bytes to read sorted[..i]
    let n = sorted.len();
    let mut best = vec![u64::MAX; n + 1];
    best[0] = 0;
    for i in 0..n {
        for j in i..n {
            let span = sorted[j].end() - u32::from(sorted[i].address);
            if span > u32::from(MAX_REGISTERS) {
                break;
            }
            let cost = 8 + 5 + 2 * u64::from(span);
            best[j + 1] = best[j + 1].min(best[i].saturating_add(cost));
        }
    }
    (fewest, best[n])
}

async fn coalescing(rows: &mut Vec<(String, String)>) {
    let profiles = Profiles::built_in();
    let profile = profiles.get("eastron-sdm630").unwrap();
    let plan = ReadPlan::new(
        profile,
        profile.max_gap,
        plan::MAX_REGISTERS,
        &Selection::All,
    );
    let regs: Vec<&Register> = plan.registers.iter().collect();
    let (fewest, fewest_bytes) = minimum(&regs);
    let naive: Vec<Request> = plan::plan(&regs, 0, 2);

    // Measure one full read on the wire, over TCP against the simulated meter.
    let meters = Meters::new();
    meters.insert(1, Unit::new(profile.clone()));
    let addr = spawn_tcp(meters).await.unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let wire = SharedWire::default();
    let mut ctx = tokio_modbus::client::tcp::attach(Tap::new(stream, wire.clone()));
    let out = modbus::read(&mut ctx, &wire, false, 1, &plan, Duration::from_secs(1), 0).await;
    assert!(out.failure.is_none() && out.values.len() == regs.len());
    let w = wire.lock().unwrap().clone();

    rows.push((
        "SDM630 full read (17 series): requests".into(),
        format!(
            "{} (minimum {fewest}; one per register: {})",
            plan.requests.len(),
            naive.len()
        ),
    ));
    rows.push((
        "SDM630 full read: bytes on the wire, Modbus TCP (measured)".into(),
        format!(
            "{} (plan says {})",
            w.bytes_in + w.bytes_out,
            plan::tcp_bytes(&plan.requests)
        ),
    ));
    rows.push((
        "SDM630 full read: bytes on the wire, Modbus RTU".into(),
        format!(
            "{} (fewest-requests plan {}; fewest bytes possible {fewest_bytes} in more requests)",
            plan::rtu_bytes(&plan.requests),
            plan::rtu_bytes(&plan::plan(&regs, MAX_REGISTERS, MAX_REGISTERS)),
        ),
    ));
}

const BUSES: usize = 5;
const UNITS: u16 = 200;

const PROFILE_20: &str = r#"
name = "bench-20"
function = "input"
type = "u16"
max_gap = 0
"#;

async fn thousand_meters(rows: &mut Vec<(String, String)>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut text = PROFILE_20.to_owned();
    for i in 0..20 {
        text.push_str(&format!(
            "[[register]]\nseries = \"1-0:{}.8.{}\"\naddress = {i}\nunit = \"kWh\"\n",
            1 + i / 5,
            i % 5
        ));
    }
    let profile_path = dir.path().join("bench-20.toml");
    std::fs::write(&profile_path, &text).unwrap();
    let profiles = Profiles::load(&[&profile_path]).unwrap();

    // The simulator runs in its own process, so what is measured here is the agent's work.
    // 5 buses x 200 units = 1,000 meters (units stay in 1-200: mbpoll refuses 248 and up).
    let ports: Vec<u16> = (0..BUSES)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let bin = Path::new(env!("CARGO_BIN_EXE_amr-edge"));
    let mut sim = Command::new(bin);
    sim.args([
        "simulate",
        "--units",
        &format!("1-{UNITS}"),
        "--profile",
        "bench-20",
        "--profile-file",
    ])
    .arg(&profile_path)
    .stderr(Stdio::null());
    for p in &ports {
        sim.args(["--tcp", &format!("127.0.0.1:{p}")]);
    }
    let sim = Sim(sim.spawn().unwrap());
    for p in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    for concurrency in [1usize, 8, 32] {
        let store_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = Arc::new(
            SledStore::open(
                store_dir.path(),
                &StoreConfig::default(),
                Arc::new(SystemClock),
            )
            .unwrap(),
        );
        let shutdown = CancellationToken::new();
        let mut router = Router::default();
        let mut tasks = Vec::new();
        for (b, port) in ports.iter().enumerate() {
            let bus: BusConfig = toml::from_str(&format!(
                "name = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {port}, concurrency = {concurrency} }}"
            ))
            .unwrap();
            let meters: Vec<MeterConfig> = (1..=UNITS)
                .map(|u| {
                    toml::from_str(&format!(
                        "id = \"m{b}-{u}\"\nbus = \"lan{b}\"\nmodbus = {{ unit = {u}, profile = \"bench-20\" }}"
                    ))
                    .unwrap()
                })
                .collect();
            let ids: Vec<String> = meters.iter().map(|m| m.id.clone()).collect();
            let (bus, meters) =
                amr_edge::bus::resolve(&bus, &meters, &profiles, &jiff::tz::TimeZone::UTC).unwrap();
            let (w, h) = BusWorker::new(
                bus,
                meters,
                store.clone(),
                Arc::new(Notify::new()),
                Arc::new(SystemClock),
                jiff::tz::TimeZone::UTC,
                1024,
            );
            tasks.push(tokio::spawn(w.run(shutdown.clone())));
            router.add_bus(h, ids);
        }
        let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
        let t = Instant::now();
        let mut replies = Vec::new();
        for m in router.meters().to_vec() {
            let (tx, rx) = oneshot::channel();
            let mut req = PollRequest::new(m, Cadence::Quarterly);
            req.boundary = Some(jiff::Timestamp::now());
            req.reply = Some(tx);
            router.poll(req).await.unwrap();
            replies.push(rx);
        }
        let mut readings = 0;
        for r in replies {
            let r = r.await.unwrap();
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            readings += r.readings.len();
        }
        let wall = t.elapsed();
        let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu0;
        assert_eq!(readings, 20_000);
        shutdown.cancel();
        for t in tasks {
            let _ = t.await;
        }
        eprintln!("concurrency {concurrency}: {:.2} s", wall.as_secs_f64());
        rows.push((
            format!(
                "1,000 meters x 20 registers, {BUSES} TCP buses, {concurrency} in flight per bus"
            ),
            format!(
                "{:.2} s per cycle, {:.0} µs CPU per meter read (stored)",
                wall.as_secs_f64(),
                cpu / 1000.0 * 1e6
            ),
        ));
    }

    // The same registers read by mbpoll, one meter after another.
    if Command::new("mbpoll").arg("-V").output().is_ok() {
        let cpu0 = cpu_seconds(libc::RUSAGE_CHILDREN);
        let t = Instant::now();
        let mut failed = 0;
        let mut last_error = String::new();
        for port in &ports {
            for u in 1..=UNITS {
                let out = Command::new("mbpoll")
                    .args([
                        "-m",
                        "tcp",
                        "-a",
                        &u.to_string(),
                        "-t",
                        "3",
                        "-r",
                        "1",
                        "-c",
                        "20",
                        "-1",
                        "-q",
                    ])
                    .args(["-p", &port.to_string(), "127.0.0.1"])
                    .output()
                    .unwrap();
                if !out.status.success() {
                    failed += 1;
                    last_error = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                }
            }
        }
        let wall = t.elapsed();
        let cpu = cpu_seconds(libc::RUSAGE_CHILDREN) - cpu0;
        if failed > 0 {
            rows.push((
                "mbpoll reads that failed".into(),
                format!("{failed} of 1000: {last_error}"),
            ));
        }
        rows.push((
            "the same with mbpoll, one meter after another".into(),
            format!(
                "{:.2} s per cycle, {:.0} µs CPU per meter read",
                wall.as_secs_f64(),
                cpu / 1000.0 * 1e6
            ),
        ));
    } else {
        rows.push((
            "mbpoll (skipped: apt-get install mbpoll)".into(),
            "-".into(),
        ));
    }
    drop(sim);
}

/// Kills the simulator however the benchmark ends.
struct Sim(std::process::Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
