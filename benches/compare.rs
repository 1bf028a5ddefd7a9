//! The agent against the central system's way of doing the same work — Celery beat and a
//! Celery worker (Python, celery and pymodbus from PyPI) — polling the same simulated Modbus
//! meters every second and sending the same readings to the same kind of queue. One run, side
//! by side: CPU time per reading, resident memory, readings per second reaching the queue;
//! then the drain at one reading per message against Celery's own `send_task` publishing
//! with confirms to the same RabbitMQ.
//!
//! `COMPARE=drain` runs only the drain comparison.
//!
//! `benches/run.sh compare` (RabbitMQ on 127.0.0.1:5672; the run script points
//! `AMR_EDGE_BIN` at the release build, the binary that ships).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::AMQP_URL;
use common::rabbit::Rabbit;

const METERS: u8 = 50;
const RUN: Duration = Duration::from_secs(30);

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Resident memory of `pid` and all its descendants, in KiB.
fn tree_rss(pid: u32) -> u64 {
    let mut total = common::agent::rss_kib(pid).unwrap_or(0);
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
        total += tree_rss(k);
    }
    total
}

fn stop(mut c: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

struct Run {
    cpu_s: f64,
    peak_rss_kib: u64,
    readings: usize,
    seconds: f64,
}

/// Runs `procs` for RUN, sampling the memory of all of them, then stops them.
fn measure(procs: Vec<Child>) -> (f64, u64) {
    let cpu0 = children_cpu();
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < RUN {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(procs.iter().map(|p| tree_rss(p.id())).sum());
    }
    for p in procs {
        stop(p);
    }
    (children_cpu() - cpu0, peak)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (bin, shipped) = common::agent::shipped_bin();
    if !shipped {
        eprintln!(
            "AMR_EDGE_BIN not set: measuring the bench-profile build (benches/run.sh measures the shipped one)"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sim = Command::new(&bin)
        .args([
            "simulate",
            "--units",
            &format!("1-{METERS}"),
            "--tcp",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rabbit = rt.block_on(Rabbit::connect());
    if std::env::var("COMPARE").as_deref() == Ok("drain") {
        stop(sim);
        let venv = common::celery::venv();
        print_drain(&drain_side_by_side(&rt, &rabbit, &bin, &venv));
        return;
    }

    // The agent.
    let dir = tempfile::tempdir().unwrap();
    let queue = common::unique("amr.compare.agent");
    let mut cfg = common::agent::config(
        dir.path(),
        "gw-bench",
        AMQP_URL,
        &queue,
        "declare_queues = true",
    );
    cfg.push_str(&format!(
        "\n[beat]\nevery = \"1s\"\n\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"127.0.0.1\", port = {port}, concurrency = 4 }}\n"
    ));
    for u in 1..=METERS {
        cfg.push_str(&format!(
            "\n[[meter]]\nid = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
        ));
    }
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let agent = Command::new(&bin)
        .args(["--log", "warn", "run", "--config"])
        .arg(&cfg_path)
        .spawn()
        .unwrap();
    let (cpu, peak) = measure(vec![agent]);
    let readings: usize = rt
        .block_on(rabbit.take_all(&queue))
        .iter()
        .map(|m| m.items("readings").len())
        .sum();
    let agent_run = Run {
        cpu_s: cpu,
        peak_rss_kib: peak,
        readings,
        seconds: RUN.as_secs_f64(),
    };
    rt.block_on(rabbit.delete(&queue));
    rt.block_on(rabbit.delete(&format!("{queue}.events")));

    // The central system's way.
    let venv = common::celery::venv();
    let cqueue = common::unique("amr.compare.celery");
    let pollq = common::unique("amr.compare.poll");
    rt.block_on(rabbit.declare(&cqueue));
    let meters: Vec<String> = (1..=METERS)
        .map(|u| format!("127.0.0.1:{port}:{u}"))
        .collect();
    let celery = |args: &[&str]| {
        Command::new(venv.join("bin/python"))
            .args(["-m", "celery", "-A", "poller"])
            .args(args)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/celery"))
            .env("BENCH_BROKER", AMQP_URL)
            .env("BENCH_QUEUE", &cqueue)
            .env("BENCH_POLL_QUEUE", &pollq)
            .env("BENCH_METERS", meters.join(","))
            .env("BENCH_GATEWAY", "gw-celery")
            .env("BENCH_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let worker = celery(&[
        "worker",
        "-Q",
        &pollq,
        "--pool",
        "prefork",
        "-c",
        "2",
        "-l",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let beat = celery(&["beat", "-l", "WARNING"]);
    let (cpu, peak) = measure(vec![beat, worker]);
    let readings: usize = rt
        .block_on(rabbit.take_all(&cqueue))
        .iter()
        .map(|m| m.items("readings").len())
        .sum();
    let celery_run = Run {
        cpu_s: cpu,
        peak_rss_kib: peak,
        readings,
        seconds: RUN.as_secs_f64(),
    };
    rt.block_on(rabbit.delete(&cqueue));
    rt.block_on(rabbit.delete(&pollq));
    stop(sim);

    let drained = drain_side_by_side(&rt, &rabbit, &bin, &venv);

    let per = |r: &Run| r.cpu_s / r.readings.max(1) as f64 * 1e6;
    let rate = |r: &Run| r.readings as f64 / r.seconds;
    println!(
        "\n{METERS} SDM630 meters on Modbus TCP, every meter every second, {} s each\n",
        RUN.as_secs()
    );
    println!(
        "{:<36} {:>14} {:>18} {:>10}",
        "", "amr-edge", "Celery beat+worker", "ratio"
    );
    println!(
        "{:<36} {:>14.1} {:>18.1} {:>9.1}x",
        "CPU time per reading (µs)",
        per(&agent_run),
        per(&celery_run),
        per(&celery_run) / per(&agent_run)
    );
    println!(
        "{:<36} {:>14.1} {:>18.1} {:>9.1}x",
        "resident memory, peak (MiB)",
        agent_run.peak_rss_kib as f64 / 1024.0,
        celery_run.peak_rss_kib as f64 / 1024.0,
        celery_run.peak_rss_kib as f64 / agent_run.peak_rss_kib.max(1) as f64
    );
    println!(
        "{:<36} {:>14.0} {:>18.0} {:>9.2}x",
        "readings/s reaching the queue",
        rate(&agent_run),
        rate(&celery_run),
        rate(&agent_run) / rate(&celery_run).max(1e-9)
    );
    print_drain(&drained);
}

fn print_drain(d: &Drained) {
    println!(
        "\nDrain, 1 reading per message, publisher confirms, {DRAIN_MESSAGES} messages to one queue\n"
    );
    println!(
        "{:<36} {:>14} {:>18} {:>10}",
        "", "amr-edge", "Celery send_task", "ratio"
    );
    println!(
        "{:<36} {:>14.0} {:>18.0} {:>9.1}x",
        "messages/s",
        d.agent_rate,
        d.celery_rate,
        d.agent_rate / d.celery_rate.max(1e-9)
    );
    println!(
        "{:<36} {:>14.1} {:>18.1} {:>9.1}x",
        "CPU time per message (µs)",
        d.agent_cpu_us,
        d.celery_cpu_us,
        d.celery_cpu_us / d.agent_cpu_us.max(1e-9)
    );
}

const DRAIN_MESSAGES: usize = 20_000;

/// Messages per second into one queue, one reading each, with publisher confirms: the agent
/// (`amr-edge run`, no meters, its store seeded with the readings; timed from its start to
/// the last message in the queue, so its start and connection count against it) and
/// Celery's own `send_task` with `confirm_publish` (`benches/celery/send_tasks.py`, timed
/// inside the script, its start and connection left out). Also the CPU time each process
/// took per message, start included on both sides: the rate is bounded by the broker (one
/// queue is one Erlang process), the CPU is what the gateway spends.
fn drain_side_by_side(
    rt: &tokio::runtime::Runtime,
    rabbit: &Rabbit,
    bin: &Path,
    venv: &Path,
) -> Drained {
    let dir = tempfile::tempdir().unwrap();
    common::seed(dir.path(), &common::readings(DRAIN_MESSAGES, 50));
    let queue = common::unique("amr.compare.drain");
    let cfg = common::agent::config(
        dir.path(),
        "gw-drain",
        AMQP_URL,
        &queue,
        "declare_queues = true\nreadings_per_message = 1",
    );
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let t = Instant::now();
    let agent = Command::new(bin)
        .args(["--log", "warn", "run", "--config"])
        .arg(&cfg_path)
        .spawn()
        .unwrap();
    while (rt.block_on(rabbit.count(&queue)) as usize) < DRAIN_MESSAGES {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the agent did not drain"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let agent_rate = DRAIN_MESSAGES as f64 / t.elapsed().as_secs_f64();
    let cpu0 = children_cpu();
    stop(agent);
    let agent_cpu = children_cpu() - cpu0;
    rt.block_on(rabbit.delete(&queue));
    rt.block_on(rabbit.delete(&format!("{queue}.events")));

    let cqueue = common::unique("amr.compare.send");
    rt.block_on(rabbit.declare(&cqueue));
    let cpu0 = children_cpu();
    let out = Command::new(venv.join("bin/python"))
        .arg("send_tasks.py")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/celery"))
        .env("BENCH_BROKER", AMQP_URL)
        .env("BENCH_QUEUE", &cqueue)
        .env("BENCH_GATEWAY", "gw-celery")
        .env("BENCH_MESSAGES", DRAIN_MESSAGES.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let celery_cpu = children_cpu() - cpu0;
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    rt.block_on(rabbit.delete(&cqueue));
    let n = DRAIN_MESSAGES as f64;
    Drained {
        agent_rate,
        agent_cpu_us: agent_cpu / n * 1e6,
        celery_rate: n / secs,
        celery_cpu_us: celery_cpu / n * 1e6,
    }
}

/// Both sides of the drain comparison: messages per second, and CPU time per message of
/// the whole process (the agent's start and store, the interpreter's start and imports).
struct Drained {
    agent_rate: f64,
    agent_cpu_us: f64,
    celery_rate: f64,
    celery_cpu_us: f64,
}
