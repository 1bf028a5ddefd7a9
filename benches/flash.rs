//! Flash wear: bytes the agent makes the block device write per reading. 1,000 simulated
//! SDM630s (5 Modbus TCP buses x 200 units, `amr-edge simulate` in its own process) read by
//! the agent (the shipped binary) at a compressed cadence (`beat.every`) for a fixed number
//! of boundaries; then the agent is stopped (SIGTERM: it flushes the last acknowledgements)
//! and its `write_bytes` read — every thread's, sled's background flusher included — from
//! the kernel's accounting of the reaped child (`ru_oublock` × 512 is `write_bytes`).
//!
//! Two runs: the broker present (every reading buffered, delivered and deleted), and the
//! broker away for the whole run (buffered only). Each with `store.group_commit` as given by
//! `FLASH_GROUP_COMMIT` (default: the agent's default), so a before/after is two runs of this
//! one bench: `FLASH_GROUP_COMMIT=0 benches/run.sh flash`.
//!
//! A third run, broker away, starts with 1,000,000 readings already in the store: its peak
//! resident memory (sampled every 50 ms) is the figure for memory at work. Each run also
//! prints the most threads the agent had at one sample (`Threads:` in /proc/PID/status).
//! `FLASH_RUNS=3` (or `1,3`, …) runs only those of the three, for quick comparisons; a table
//! for the README is of all three.
//! `FLASH_STORE_EXTRA='cache = "1MiB"'` adds lines to the agent's `[store]`, to try a
//! setting.
//!
//! `benches/run.sh flash` (RabbitMQ on 127.0.0.1:5672 for the first run).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amr_edge::reading::{Cadence, Decimal, Flags, Obis, Reading, Stamp};
use amr_edge::store::Record;
use common::rabbit::Rabbit;
use common::{AMQP_URL, Kill};

const BUSES: usize = 5;
const UNITS: usize = 200;
const BOUNDARIES: u64 = 6;
const EVERY_S: u64 = 5;

/// Blocks written by reaped children so far, in bytes.
fn children_written() -> u64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_oublock as u64 * 512
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// A reading as this bench's meters give them, for the encoded size.
fn typical() -> Reading {
    let at = Stamp {
        ms: 1_790_000_000_000,
        offset: 3600,
    };
    Reading {
        meter: "m0-100".into(),
        id_type: "name".into(),
        series: Obis([1, 0, 1, 8, 0, 255]),
        value: Decimal::from_scaled(14_567_125, -3).unwrap(),
        unit: "kWh".into(),
        timestamp: at,
        read_at: at,
        cadence: Cadence::Quarterly,
        flags: Flags::empty(),
    }
}

struct Run {
    name: &'static str,
    polls: u64,
    buffered: u64,
    delivered: u64,
    written: u64,
    cpu_s: f64,
    fsyncs: Option<(u64, u64)>,
    peak_rss_kib: u64,
    peak_threads: u64,
}

/// `Threads:` of a process, from /proc.
fn threads(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Threads:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn run(
    rt: &tokio::runtime::Runtime,
    bin: &std::path::Path,
    ports: &[u16],
    broker: bool,
    group_commit: Option<&str>,
    seeded: usize,
) -> Run {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if seeded > 0 {
        common::seed(dir.path(), &common::readings(seeded, 1000));
    }
    let queue = common::unique("amr.flash");
    let url = if broker {
        AMQP_URL.to_owned()
    } else {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", common::free_port())
    };
    let mut cfg = common::agent::config(
        dir.path(),
        "gw-flash",
        &url,
        &queue,
        "declare_queues = true",
    );
    cfg.push_str(&format!("\n[beat]\nevery = \"{EVERY_S}s\"\n"));
    cfg.push_str("\n[store]\nmax_bytes = \"1GiB\"\n");
    if let Ok(extra) = std::env::var("FLASH_STORE_EXTRA") {
        cfg.push_str(&format!("{extra}\n"));
    }
    if let Some(g) = group_commit {
        cfg.push_str(&format!("group_commit = \"{g}\"\n"));
    }
    for (b, p) in ports.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {p}, concurrency = 8 }}\n"
        ));
        for u in 1..=UNITS {
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"m{b}-{u}\"\nbus = \"lan{b}\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
            ));
        }
    }
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    // The log goes to a pipe, not a file: a log file's writes are not the store's.
    let written0 = children_written();
    let cpu0 = children_cpu();
    let mut child = Command::new(bin)
        .args(["--log", "info,amr_edge::store=debug", "run", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let polls = Arc::new(AtomicU64::new(0));
    let buffered = Arc::new(AtomicU64::new(0));
    let stderr = child.stderr.take().unwrap();
    let reader = {
        let (polls, buffered) = (polls.clone(), buffered.clone());
        std::thread::spawn(move || {
            let mut fsyncs = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Polled and buffered") {
                    polls.fetch_add(1, Ordering::SeqCst);
                    if let Some(n) = field(&line, "readings") {
                        buffered.fetch_add(n, Ordering::SeqCst);
                    }
                } else if line.contains("Store closed") {
                    fsyncs = field(&line, "appends").zip(field(&line, "batches"));
                }
            }
            fsyncs
        })
    };
    let t = Instant::now();
    let want = BOUNDARIES * (BUSES * UNITS) as u64;
    let mut peak_rss_kib = 0;
    let mut peak_threads = 0;
    while polls.load(Ordering::SeqCst) < want {
        peak_rss_kib = peak_rss_kib.max(common::agent::rss_kib(child.id()).unwrap_or(0));
        peak_threads = peak_threads.max(threads(child.id()).unwrap_or(0));
        assert!(
            t.elapsed() < Duration::from_secs(BOUNDARIES * EVERY_S * 4 + 60),
            "the agent read {} of {want} meters",
            polls.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time to deliver and acknowledge the last boundary (its acknowledgement reaches the
    // disk within `ack_flush`, and at the latest with the flush on SIGTERM), before the next.
    std::thread::sleep(Duration::from_millis(EVERY_S * 1000 / 2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let written = children_written() - written0;
    let cpu_s = children_cpu() - cpu0;
    let fsyncs = reader.join().unwrap();
    let delivered = if broker {
        let rabbit = rt.block_on(Rabbit::connect());
        let n = rt
            .block_on(rabbit.take_all(&queue))
            .iter()
            .map(|m| m.items("readings").len() as u64)
            .sum();
        rt.block_on(rabbit.delete(&queue));
        rt.block_on(rabbit.delete(&format!("{queue}.events")));
        n
    } else {
        0
    };
    Run {
        name: match (broker, seeded) {
            (true, _) => "broker present: buffered, delivered, deleted",
            (false, 0) => "broker away: buffered only",
            (false, _) => "broker away, 1,000,000 buffered before",
        },
        polls: polls.load(Ordering::SeqCst),
        buffered: buffered.load(Ordering::SeqCst),
        delivered,
        written,
        cpu_s,
        fsyncs,
        peak_rss_kib,
        peak_threads,
    }
}

/// `name=123` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (bin, shipped) = common::agent::shipped_bin();
    if !shipped {
        eprintln!(
            "AMR_EDGE_BIN not set: measuring the bench-profile build (benches/run.sh measures the shipped one)"
        );
    }
    let group_commit = std::env::var("FLASH_GROUP_COMMIT").ok();
    let ports: Vec<u16> = (0..BUSES).map(|_| common::free_port()).collect();
    let mut sim = Command::new(&bin);
    sim.args(["simulate", "--units", &format!("1-{UNITS}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for p in &ports {
        sim.args(["--tcp", &format!("127.0.0.1:{p}")]);
    }
    let _sim = Kill(sim.spawn().unwrap());
    for p in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The third run is for memory at work: the agent polling 1,000 meters with a million
    // readings in its store (seeded before it starts; its writes are not counted).
    let only: Option<Vec<usize>> = std::env::var("FLASH_RUNS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let runs: Vec<Run> = [(true, 0), (false, 0), (false, 1_000_000)]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| only.as_ref().is_none_or(|o| o.contains(&(i + 1))))
        .map(|(_, run)| run)
        .map(|(broker, seeded)| run(&rt, &bin, &ports, broker, group_commit.as_deref(), seeded))
        .collect();
    let encoded = amr_edge::store::encoded_len(&Record::Reading(typical())) as f64;
    println!(
        "\n1,000 SDM630s (5 TCP buses x 200), beat.every = {EVERY_S}s, {BOUNDARIES} boundaries; store.group_commit = {}\n",
        group_commit.as_deref().unwrap_or("default")
    );
    println!(
        "{:<46} {:>7} {:>9} {:>9} {:>12} {:>16} {:>10} {:>15} {:>10} {:>8}",
        "",
        "polls",
        "buffered",
        "delivered",
        "write_bytes",
        "per reading",
        "CPU/read",
        "appends/fsyncs",
        "peak RSS",
        "threads"
    );
    for r in &runs {
        let per = r.written as f64 / r.buffered.max(1) as f64;
        println!(
            "{:<46} {:>7} {:>9} {:>9} {:>12} {:>16} {:>10} {:>15} {:>10} {:>8}",
            r.name,
            r.polls,
            r.buffered,
            r.delivered,
            r.written,
            format!("{per:.0} B ({:.2}x)", per / encoded),
            format!("{:.1} µs", r.cpu_s / r.buffered.max(1) as f64 * 1e6),
            r.fsyncs.map_or("-".to_owned(), |(a, b)| format!("{a}/{b}")),
            format!("{:.1} MiB", r.peak_rss_kib as f64 / 1024.0),
            r.peak_threads,
        );
    }
    println!(
        "\nper reading: write_bytes / readings buffered; (x): against the {encoded:.0} B encoded record; target <= 4x"
    );
}
