//! CPU per reading as a count that does not move with the machine's load: instructions per
//! reading under `valgrind --tool=callgrind`, for a fixed workload — 200 simulated SDM630s
//! (2 Modbus TCP buses x 100, `amr-edge simulate` in its own process, not traced) read
//! `ROUNDS` times each by the agent's own bus workers, every poll stored in a sled store
//! (group commit as configured by default), then everything drained through the drain's
//! real message encoding to a broker stand-in that confirms at once, and acknowledged.
//!
//! The bench runs itself twice under callgrind, with `ROUNDS` rounds and with none (start,
//! store open, connections, shutdown), and prints (instructions with − instructions without)
//! / readings: the cost of a reading, start-up cancelled out. Then the functions that cost
//! most, inclusive, from `callgrind_annotate`. Needs valgrind (`benches/run.sh cpu` installs
//! it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use amr_edge::bus::{BusConfig, BusWorker, PollRequest, Router};
use amr_edge::clock::SystemClock;
use amr_edge::drain::celery::TaskMessage;
use amr_edge::drain::{AmqpConfig, Confirmation, Drain, DrainSettings, PublishError, Publisher};
use amr_edge::meter::MeterConfig;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::reading::Cadence;
use amr_edge::store::{SledStore, StoreConfig};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

const BUSES: usize = 2;
const UNITS: u16 = 100;
const ROUNDS: u32 = 3;

/// A broker that takes every message and confirms it at once.
struct Null;

impl Publisher for Null {
    type Confirm = std::future::Ready<Confirmation>;
    async fn connect(&mut self) -> Result<(), PublishError> {
        Ok(())
    }
    async fn ensure_queue(&mut self, _queue: &str) -> Result<(), PublishError> {
        Ok(())
    }
    async fn publish(
        &mut self,
        _queue: &str,
        msg: TaskMessage,
    ) -> Result<Self::Confirm, PublishError> {
        std::hint::black_box(&msg);
        Ok(std::future::ready(Confirmation::Ack))
    }
    async fn close(&mut self) {}
}

/// The workload, in this process: read every meter `rounds` times, store, drain.
fn workload(ports: &[u16], rounds: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = Arc::new(
            SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock)).unwrap(),
        );
        let profiles = Profiles::built_in();
        let shutdown = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let mut router = Router::default();
        let mut tasks = Vec::new();
        for (b, port) in ports.iter().enumerate() {
            let bus: BusConfig = toml::from_str(&format!(
                "name = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {port}, concurrency = 8 }}"
            ))
            .unwrap();
            let meters: Vec<MeterConfig> = (1..=UNITS)
                .map(|u| {
                    toml::from_str(&format!(
                        "id = \"m{b}-{u}\"\nbus = \"lan{b}\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}"
                    ))
                    .unwrap()
                })
                .collect();
            let ids: Vec<String> = meters.iter().map(|m| m.id.clone()).collect();
            let (bus, meters) =
                amr_edge::bus::resolve(&bus, &meters, &profiles, &jiff::tz::TimeZone::UTC)
                    .unwrap();
            let (w, h) = BusWorker::new(
                bus,
                meters,
                store.clone(),
                wake.clone(),
                Arc::new(SystemClock),
                jiff::tz::TimeZone::UTC,
                1024,
            );
            tasks.push(tokio::spawn(w.run(shutdown.clone())));
            router.add_bus(h, ids);
        }
        let mut readings = 0u64;
        for round in 0..rounds {
            let mut replies = Vec::new();
            for m in router.meters().to_vec() {
                let (tx, rx) = oneshot::channel();
                let mut req = PollRequest::new(m, Cadence::Quarterly);
                req.boundary = Some(
                    jiff::Timestamp::from_second(1_790_000_000 + i64::from(round) * 900).unwrap(),
                );
                req.reply = Some(tx);
                router.poll(req).await.unwrap();
                replies.push(rx);
            }
            for r in replies {
                let r = r.await.unwrap();
                assert!(r.errors.is_empty() && r.stored, "{:?}", r.errors);
                readings += r.readings.len() as u64;
            }
        }
        let amqp = AmqpConfig::for_url("amqp://127.0.0.1:1/%2f");
        let (drain, status) = Drain::new(
            DrainSettings::new("gw-cpu", &amqp),
            store.clone(),
            Null,
            wake.clone(),
        );
        let drain = tokio::spawn(drain.run(shutdown.clone()));
        while status.borrow().records < readings {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let _ = drain.await;
        println!("readings {readings}");
    });
}

fn callgrind(exe: &Path, ports: &[u16], rounds: u32, out: &Path) -> (u64, u64) {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let o = Command::new("valgrind")
        .args(["--tool=callgrind", "--separate-threads=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["--workload", &rounds.to_string(), &ports.join(",")])
        .stderr(Stdio::piped())
        .output()
        .expect("valgrind (apt-get install valgrind)");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let readings = stdout
        .lines()
        .find_map(|l| l.strip_prefix("readings "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let text = std::fs::read_to_string(out).unwrap();
    let ir = text
        .lines()
        .find_map(|l| l.strip_prefix("summary: ").or(l.strip_prefix("totals: ")))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ir, readings)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--workload") {
        let rounds = args[i + 1].parse().unwrap();
        let ports: Vec<u16> = args[i + 2].split(',').map(|p| p.parse().unwrap()).collect();
        // The allocator as the agent sets it, first thing in its `main`.
        amr_edge::alloc::tune();
        workload(&ports, rounds);
        return;
    }
    let ports: Vec<u16> = (0..BUSES)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_amr-edge"));
    sim.args(["simulate", "--units", &format!("1-{UNITS}")])
        .stderr(Stdio::null());
    for p in &ports {
        sim.args(["--tcp", &format!("127.0.0.1:{p}")]);
    }
    let mut sim = sim.spawn().unwrap();
    for p in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base_out: PathBuf = dir.path().join("callgrind.base");
    let work_out: PathBuf = dir.path().join("callgrind.work");
    let (base, _) = callgrind(&exe, &ports, 0, &base_out);
    let (work, readings) = callgrind(&exe, &ports, ROUNDS, &work_out);
    let _ = sim.kill();
    let _ = sim.wait();
    let per = (work.saturating_sub(base)) as f64 / readings.max(1) as f64;
    println!(
        "\n{} SDM630s ({BUSES} TCP buses x {UNITS}), {ROUNDS} rounds, stored and drained (broker stand-in)\n",
        BUSES * UNITS as usize
    );
    println!("{:<58} {:>16}", "figure", "measured");
    println!(
        "{:<58} {:>16}",
        "instructions, start-up and shutdown only", base
    );
    println!(
        "{:<58} {:>16}",
        format!("instructions, with {readings} readings"),
        work
    );
    println!("{:<58} {:>16.0}", "instructions per reading", per);
    if let Some(path) = std::env::var_os("CPU_CALLGRIND_KEEP") {
        let _ = std::fs::copy(&work_out, path);
    }
    // Where they went: inclusive cost per function, the first lines.
    if let Ok(o) = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(&work_out)
        .output()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        println!("\nfunctions by inclusive instructions (callgrind_annotate, top 25):");
        for l in text
            .lines()
            .skip_while(|l| !l.contains("file:function"))
            .skip(2)
            .take(25)
        {
            println!("{l}");
        }
    }
}
