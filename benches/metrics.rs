//! What metrics cost on a gateway with 1,000 meters: the agent (the shipped binary) polls
//! 1,000 simulated SDM630s (5 Modbus TCP buses x 200 units, `amr-edge simulate` in its own
//! process) once, then is scraped 200 times. Three runs: metrics off, on, on with
//! `per_meter = true`. Printed: the agent's CPU time per scrape (from /proc, the agent's own
//! utime + stime over the scrapes), the exposition's size, and resident memory after the
//! polls and after the scrapes, against the run with metrics off.
//!
//! `benches/run.sh metrics` (the run script points `AMR_EDGE_BIN` at the release build).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::{Kill, free_port};
use std::time::{Duration, Instant};

const BUSES: usize = 5;
const UNITS: usize = 200;
const SCRAPES: u32 = 200;

/// utime + stime of `pid`, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    out
}

struct Run {
    name: &'static str,
    rss_polled_kib: u64,
    rss_scraped_kib: Option<u64>,
    cpu_per_scrape_ms: Option<f64>,
    wall_per_scrape_ms: Option<f64>,
    bytes: Option<usize>,
}

fn run(bin: &std::path::Path, sim_ports: &[u16], metrics: Option<bool>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("amqp://guest:guest@127.0.0.1:{}", free_port());
    let mut cfg = common::agent::config(dir.path(), "gw-bench", &dead, "q", "");
    let port = free_port();
    if let Some(per_meter) = metrics {
        cfg.push_str(&format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nper_meter = {per_meter}\n"
        ));
    }
    // One round of polls a minute: the scrapes come after the first, before the next.
    cfg.push_str("\n[beat]\nevery = \"60s\"\n");
    for (b, p) in sim_ports.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {p}, concurrency = 8 }}\n"
        ));
        for u in 1..=UNITS {
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"m{b}-{u}\"\nbus = \"lan{b}\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\nreads = {{ quarterly = [\"1-0:1.8.0\", \"1-0:2.8.0\"] }}\n"
            ));
        }
    }
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let agent = Kill(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.matches("Polled and buffered").count() >= BUSES * UNITS {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the agent did not poll every meter: {}",
            text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_polled_kib = common::agent::rss_kib(pid).unwrap();
    let name = match metrics {
        None => "metrics off",
        Some(false) => "metrics on",
        Some(true) => "metrics on, per_meter = true",
    };
    if metrics.is_none() {
        return Run {
            name,
            rss_polled_kib,
            rss_scraped_kib: None,
            cpu_per_scrape_ms: None,
            wall_per_scrape_ms: None,
            bytes: None,
        };
    }
    let bytes = scrape(port).len();
    let cpu0 = cpu_s(pid);
    let t0 = Instant::now();
    for _ in 0..SCRAPES {
        scrape(port);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_s(pid) - cpu0;
    std::thread::sleep(Duration::from_secs(1));
    Run {
        name,
        rss_polled_kib,
        rss_scraped_kib: common::agent::rss_kib(pid),
        cpu_per_scrape_ms: Some(cpu / f64::from(SCRAPES) * 1e3),
        wall_per_scrape_ms: Some(wall / f64::from(SCRAPES) * 1e3),
        bytes: Some(bytes),
    }
}

fn main() {
    let (bin, shipped) = common::agent::shipped_bin();
    if !shipped {
        eprintln!(
            "AMR_EDGE_BIN not set: measuring the bench-profile build (benches/run.sh measures the shipped one)"
        );
    }
    let ports: Vec<u16> = (0..BUSES).map(|_| free_port()).collect();
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
    let runs: Vec<Run> = [None, Some(false), Some(true)]
        .into_iter()
        .map(|m| run(&bin, &ports, m))
        .collect();
    let off = runs[0].rss_polled_kib as f64;
    println!(
        "\n1,000 meters (5 TCP buses x 200 SDM630s), polled once; {SCRAPES} scrapes of GET /metrics\n"
    );
    println!(
        "{:<30} {:>12} {:>12} {:>14} {:>14} {:>16} {:>16}",
        "", "CPU/scrape", "wall/scrape", "exposition", "RSS polled", "RSS scraped", "vs off"
    );
    for r in &runs {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2} {unit}"));
        let last = r.rss_scraped_kib.unwrap_or(r.rss_polled_kib) as f64;
        println!(
            "{:<30} {:>12} {:>12} {:>14} {:>14} {:>16} {:>16}",
            r.name,
            opt(r.cpu_per_scrape_ms, "ms"),
            opt(r.wall_per_scrape_ms, "ms"),
            r.bytes.map_or("-".to_owned(), |b| format!("{b} B")),
            format!("{:.2} MiB", r.rss_polled_kib as f64 / 1024.0),
            r.rss_scraped_kib
                .map_or("-".to_owned(), |k| format!("{:.2} MiB", k as f64 / 1024.0)),
            format!("{:+.2} MiB", (last - off) / 1024.0),
        );
    }
}
