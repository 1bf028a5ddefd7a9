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
//! one bench: `FLASH_GROUP_COMMIT=0 benches/run.sh flash`. These two stay Modbus only, the
//! fleet of the earlier figures, so their bytes per reading compare with them (one record
//! size, one driver's batches).
//!
//! A third run, broker away, starts with 1,000,000 readings already in the store: its peak
//! resident memory (sampled every 50 ms) is the figure for memory at work, and so it polls a
//! mixed fleet, still 1,000 meters, every driver in (`FLASH_FLEET=modbus` for the Modbus-only
//! fleet of runs 1 and 2 instead, for a comparison):
//!
//! * 876 Modbus TCP SDM630s, 4 buses x 219;
//! * 96 DLMS/COSEM meters on the IEC 62056-47 wrapper, each on a bus (a TCP endpoint) of
//!   its own as meters with their own modem or IP address are (the simulator serves one
//!   meter's objects on all 96 ports), and 4 on one HDLC line (9600 Bd, physical 17-20);
//! * 16 M-Bus heat meters on 2 segments of 8 at 2400 8E1, half addressed by primary, half by
//!   secondary address;
//! * 8 IEC 62056-21 meters, each on a line of its own (an optical probe or a short RS-485
//!   line), signed on by address at 300 Bd and read at 9600.
//!
//! The serial counts are what one boundary (`EVERY_S`, 5 s) can read, since a serial bus
//! reads one meter after the other. Measured with `amr-edge poll` through `simulate`'s ptys,
//! which take the line's time: an M-Bus heat meter by primary address 0.40 s at 2400 8E1
//! (SND_NKE, REQ_UD2 and a 67-byte telegram, with the answer windows), by secondary address
//! 0.52 s (a selection first), so a segment of 8, half of each, takes 3.7 s; an IEC 62056-21
//! meter 2.5 s (sign-on, identification and option select at 300 Bd with the meter's 200 ms
//! reactions, the readout at 9600), so one to a line: two would take the whole 5 s and
//! overrun. A DLMS read over HDLC is some 600 bytes at 9600 Bd, about 0.6 s on a real line,
//! so 4 leave room; the simulator does not take the line's time for HDLC (it answers as fast
//! as the pty goes, 0.07 s), so this line is lighter than a real one. `amr-edge simulate`
//! serves all of them (`--mbus-pty`, `--iec-pty`, `--dlms-hdlc-pty`).
//!
//! Every run has `[metrics]` on (an HTTP listener on a free loopback port, scraped once
//! after the last boundary), as an agent in the field would. The table counts the polls that
//! buffered readings ("Polled and buffered" with `readings` > 0, which every driver's polls
//! log, `src/bus/poll.rs`) and, for each protocol, how many of its meters were read and how
//! many polls failed; the run fails, naming the protocol, if any of its meters was not read
//! `BOUNDARIES` times within the time allowed.
//!
//! Each run also prints the most threads the agent had at one sample (`Threads:` in
//! /proc/PID/status). `FLASH_RUNS=3` (or `1,3`, …) runs only those of the three, for quick
//! comparisons; a table for the README is of all three.
//! `FLASH_STORE_EXTRA='cache = "1MiB"'` adds lines to the agent's `[store]`, to try a
//! setting.
//!
//! `benches/run.sh flash` (RabbitMQ on 127.0.0.1:5672 for the first run).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amr_edge::reading::{Cadence, Decimal, Flags, Obis, Reading, Stamp};
use amr_edge::store::Record;
use common::rabbit::Rabbit;
use common::{AMQP_URL, Kill};

const BUSES: usize = 5;
const UNITS: usize = 200;
const BOUNDARIES: u64 = 6;
const EVERY_S: u64 = 5;

/// The mixed fleet of run 3 (the module doc says why these counts).
const MIX_MODBUS_BUSES: usize = 4;
const MIX_MODBUS_UNITS: usize = 219;
const MIX_DLMS_WRAPPER: usize = 96;
const MIX_DLMS_HDLC_PHYSICAL: &str = "17-20";
const MIX_MBUS_SEGMENTS: usize = 2;
const MIX_MBUS_METERS: usize = 8;
const MIX_IEC_LINES: usize = 8;
const MIX_IEC_METERS: usize = 1;

/// The protocols, in table order; a meter's id says which is its (see [`protocol_of`]).
const PROTOCOLS: [&str; 5] = [
    "Modbus TCP",
    "DLMS wrapper",
    "DLMS HDLC",
    "M-Bus",
    "IEC 62056-21",
];

/// Which of [`PROTOCOLS`] the meter with id `meter` speaks: Modbus `m{bus}-{unit}` (the id of
/// the earlier figures, whose records this bench's encoded size is of), DLMS `dw{n}` and
/// `dh{physical}`, M-Bus `mb{segment}-{n}`, IEC 62056-21 `iec{line}-{n}`.
fn protocol_of(meter: &str) -> usize {
    if meter.starts_with("dw") {
        1
    } else if meter.starts_with("dh") {
        2
    } else if meter.starts_with("mb") {
        3
    } else if meter.starts_with("iec") {
        4
    } else {
        0
    }
}

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

/// What `amr-edge simulate` serves, for the agent's config: the Modbus TCP ports (each with
/// units 1 to [`MIX_MODBUS_UNITS`], more than runs 1 and 2 use), the DLMS wrapper ports and
/// the ptys it printed on stdout.
struct Sim {
    modbus: Vec<u16>,
    dlms_wrapper: Vec<u16>,
    /// (path, physical addresses)
    dlms_hdlc: Vec<(String, Vec<u16>)>,
    /// (path, primary addresses, secondary addresses)
    mbus: Vec<(String, Vec<u8>, Vec<String>)>,
    /// (path, device addresses)
    iec: Vec<(String, Vec<String>)>,
}

/// The `key=` field of one of `simulate`'s pty lines, split at commas.
fn list<'a>(fields: &'a [&'a str], key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    fields
        .iter()
        .find_map(|f| f.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("simulate printed no {key}= in {fields:?}"))
        .split(',')
        .collect()
}

/// `1-8` or `5`.
fn range(s: &str) -> Vec<u8> {
    match s.split_once('-') {
        Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect(),
        None => vec![s.parse().unwrap()],
    }
}

/// `n` distinct loopback ports nothing listens on: all bound at once, then let go (taken
/// one at a time, two of them can be the same port).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Starts `amr-edge simulate` with everything any run reads, and reads its pty lines.
fn simulate(bin: &std::path::Path) -> (Kill, Sim, BufReader<std::process::ChildStdout>) {
    let mut ports = free_ports(BUSES.max(MIX_MODBUS_BUSES) + MIX_DLMS_WRAPPER);
    let dlms_wrapper = ports.split_off(BUSES.max(MIX_MODBUS_BUSES));
    let modbus = ports;
    // Its stderr says what it serves, and why it stopped if it did.
    let log_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("flash-simulate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut sim = Command::new(bin);
    sim.args([
        "simulate",
        "--units",
        &format!("1-{}", UNITS.max(MIX_MODBUS_UNITS)),
    ])
    .args(["--dlms-hdlc-pty", "--dlms-physical", MIX_DLMS_HDLC_PHYSICAL])
    .stdout(Stdio::piped())
    .stderr(log);
    for p in &modbus {
        sim.args(["--tcp", &format!("127.0.0.1:{p}")]);
    }
    for p in &dlms_wrapper {
        sim.args(["--dlms-wrapper", &format!("127.0.0.1:{p}")]);
    }
    for _ in 0..MIX_MBUS_SEGMENTS {
        sim.args(["--mbus-pty", &MIX_MBUS_METERS.to_string()]);
    }
    for _ in 0..MIX_IEC_LINES {
        sim.args(["--iec-pty", &MIX_IEC_METERS.to_string()]);
    }
    let mut child = sim.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let child = Kill(child);
    let mut out = Sim {
        modbus,
        dlms_wrapper,
        dlms_hdlc: Vec::new(),
        mbus: Vec::new(),
        iec: Vec::new(),
    };
    while out.dlms_hdlc.is_empty()
        || out.mbus.len() < MIX_MBUS_SEGMENTS
        || out.iec.len() < MIX_IEC_LINES
    {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "amr-edge simulate ended before printing its ptys; the end of {}:\n{}",
            log_path.display(),
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        let (kind, path, fields) = (words[0], words[1].to_owned(), &words[2..]);
        match kind {
            "dlms-hdlc-pty" => out.dlms_hdlc.push((
                path,
                list(fields, "physical")
                    .iter()
                    .map(|p| p.parse().unwrap())
                    .collect(),
            )),
            "mbus-pty" => out.mbus.push((
                path,
                range(list(fields, "primary")[0]),
                list(fields, "secondary")
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            "iec-pty" => out.iec.push((
                path,
                list(fields, "addresses")
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            other => panic!("amr-edge simulate printed a pty of an unknown kind: {other}"),
        }
    }
    for p in out.modbus.iter().chain(&out.dlms_wrapper) {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (child, out, stdout)
}

/// The `[[bus]]` and `[[meter]]` tables of a fleet: Modbus only (runs 1 and 2, and run 3 with
/// `FLASH_FLEET=modbus`), or the mixed one. Returns them and how many meters of each of
/// [`PROTOCOLS`] they configure.
fn fleet(sim: &Sim, mixed: bool) -> (String, [usize; 5]) {
    let mut cfg = String::new();
    let mut count = [0usize; 5];
    let (buses, units) = if mixed {
        (MIX_MODBUS_BUSES, MIX_MODBUS_UNITS)
    } else {
        (BUSES, UNITS)
    };
    for (b, p) in sim.modbus.iter().take(buses).enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {p}, concurrency = 8 }}\n"
        ));
        for u in 1..=units {
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"m{b}-{u}\"\nbus = \"lan{b}\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
            ));
            count[0] += 1;
        }
    }
    if !mixed {
        return (cfg, count);
    }
    for (i, p) in sim.dlms_wrapper.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"dlms{i}\"\ntcp = {{ host = \"127.0.0.1\", port = {p} }}\n\n[[meter]]\nid = \"dw{i}\"\nbus = \"dlms{i}\"\ndlms = {{ client = 16, logical = 1 }}\nreads = {{ quarterly = \"all\" }}\n"
        ));
        count[1] += 1;
    }
    for (l, (path, physical)) in sim.dlms_hdlc.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"hdlc{l}\"\nserial = {{ device = \"{path}\", baud = 9600 }}\ntimeout = \"2s\"\n"
        ));
        for p in physical {
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"dh{p}\"\nbus = \"hdlc{l}\"\ndlms = {{ client = 16, logical = 1, physical = {p} }}\nreads = {{ quarterly = \"all\" }}\n"
            ));
            count[2] += 1;
        }
    }
    for (l, (path, primary, secondary)) in sim.mbus.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"mbus{l}\"\nserial = {{ device = \"{path}\", baud = 2400, parity = \"even\" }}\ntimeout = \"2s\"\n"
        ));
        for (i, (p, s)) in primary.iter().zip(secondary).enumerate() {
            // Half by primary address, half by secondary (a selection before each read).
            let address = if i % 2 == 0 {
                format!("primary = {p}")
            } else {
                format!("secondary = \"{s}\"")
            };
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"mb{l}-{i}\"\nbus = \"mbus{l}\"\nmbus = {{ {address} }}\nreads = {{ quarterly = \"all\" }}\n"
            ));
            count[3] += 1;
        }
    }
    for (l, (path, addresses)) in sim.iec.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[bus]]\nname = \"iec{l}\"\nserial = {{ device = \"{path}\" }}\ntimeout = \"2s\"\n"
        ));
        for (i, a) in addresses.iter().enumerate() {
            // The simulated meters keep their clocks in UTC.
            cfg.push_str(&format!(
                "\n[[meter]]\nid = \"iec{l}-{i}\"\nbus = \"iec{l}\"\niec62056_21 = {{ address = \"{a}\", max_baud = 9600, timezone = \"UTC\" }}\nreads = {{ quarterly = \"all\" }}\n"
            ));
            count[4] += 1;
        }
    }
    (cfg, count)
}

/// What the log says of one protocol's meters.
#[derive(Clone, Default)]
struct Tally {
    /// Polls that buffered readings, per meter.
    reads: HashMap<String, u64>,
    readings: u64,
    /// "Poll failed" lines (a poll can log several).
    failed: u64,
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
    /// The peak until the scrape: polling alone.
    peak_before_scrape_kib: u64,
    peak_threads: u64,
    configured: [usize; 5],
    tally: Vec<Tally>,
    /// Bytes of the one scrape of /metrics.
    exposition: usize,
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

/// `GET /metrics` on the agent's listener: the body, or why not.
fn scrape(port: u16) -> Result<String, String> {
    let mut conn =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("no answer").to_owned());
    }
    Ok(body.to_owned())
}

fn run(
    rt: &tokio::runtime::Runtime,
    bin: &std::path::Path,
    sim: &Sim,
    mixed: bool,
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
    let metrics_port = common::free_port();
    cfg.push_str(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    cfg.push_str("\n[store]\nmax_bytes = \"1GiB\"\n");
    if let Ok(extra) = std::env::var("FLASH_STORE_EXTRA") {
        cfg.push_str(&format!("{extra}\n"));
    }
    if let Some(g) = group_commit {
        cfg.push_str(&format!("group_commit = \"{g}\"\n"));
    }
    let (meters, configured) = fleet(sim, mixed);
    cfg.push_str(&meters);
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
    let tally = Arc::new(Mutex::new(vec![Tally::default(); PROTOCOLS.len()]));
    let stderr = child.stderr.take().unwrap();
    let reader = {
        let tally = tally.clone();
        std::thread::spawn(move || {
            let mut fsyncs = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Polled and buffered") {
                    let (Some(meter), Some(n)) = (word(&line, "meter"), field(&line, "readings"))
                    else {
                        continue;
                    };
                    if n > 0 {
                        let mut t = tally.lock().unwrap();
                        let t = &mut t[protocol_of(meter)];
                        *t.reads.entry(meter.to_owned()).or_default() += 1;
                        t.readings += n;
                    }
                } else if line.contains("Poll failed") {
                    if let Some(meter) = word(&line, "meter") {
                        tally.lock().unwrap()[protocol_of(meter)].failed += 1;
                    }
                } else if line.contains("Store closed") {
                    fsyncs = field(&line, "appends").zip(field(&line, "batches"));
                }
            }
            fsyncs
        })
    };
    let t = Instant::now();
    let allowed = Duration::from_secs(BOUNDARIES * EVERY_S * 4 + 60);
    let mut peak_rss_kib = 0;
    let mut peak_threads = 0;
    // Until every configured meter was read `BOUNDARIES` times.
    let short = |tally: &[Tally]| -> Vec<String> {
        (0..PROTOCOLS.len())
            .filter(|p| configured[*p] > 0)
            .filter_map(|p| {
                let t = &tally[p];
                let done = t.reads.values().filter(|n| **n >= BOUNDARIES).count();
                (done < configured[p]).then(|| {
                    format!(
                        "{}: {done} of {} meters read {BOUNDARIES} times ({} read at all, {} polls buffered readings, {} poll failures logged)",
                        PROTOCOLS[p],
                        configured[p],
                        t.reads.len(),
                        t.reads.values().sum::<u64>(),
                        t.failed
                    )
                })
            })
            .collect()
    };
    loop {
        let missing = short(&tally.lock().unwrap());
        if missing.is_empty() {
            break;
        }
        peak_rss_kib = peak_rss_kib.max(common::agent::rss_kib(child.id()).unwrap_or(0));
        peak_threads = peak_threads.max(threads(child.id()).unwrap_or(0));
        if t.elapsed() > allowed {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!(
                "after {allowed:?} some meters were not read:\n  {}",
                missing.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak_before_scrape_kib = peak_rss_kib;
    let exposition = match scrape(metrics_port) {
        Ok(body) => body.len(),
        Err(e) => panic!("GET /metrics on 127.0.0.1:{metrics_port}: {e}"),
    };
    // Time to deliver and acknowledge the last boundary (its acknowledgement reaches the
    // disk within `ack_flush`, and at the latest with the flush on SIGTERM), before the next.
    // Still sampled: the scrape and the last polls are work too.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(EVERY_S * 1000 / 2) {
        peak_rss_kib = peak_rss_kib.max(common::agent::rss_kib(child.id()).unwrap_or(0));
        peak_threads = peak_threads.max(threads(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let written = children_written() - written0;
    let cpu_s = children_cpu() - cpu0;
    let fsyncs = reader.join().unwrap();
    let tally = tally.lock().unwrap().clone();
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
        name: match (broker, seeded, mixed) {
            (true, _, _) => "broker present: buffered, delivered, deleted",
            (false, 0, _) => "broker away: buffered only",
            (false, _, true) => "broker away, 1,000,000 buffered before, mixed",
            (false, _, false) => "broker away, 1,000,000 buffered before",
        },
        polls: tally.iter().map(|t| t.reads.values().sum::<u64>()).sum(),
        buffered: tally.iter().map(|t| t.readings).sum(),
        delivered,
        written,
        cpu_s,
        fsyncs,
        peak_rss_kib,
        peak_before_scrape_kib,
        peak_threads,
        configured,
        tally,
        exposition,
    }
}

/// `name=123` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// `name=word` in a log line.
fn word<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
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
    let mixed = match std::env::var("FLASH_FLEET").as_deref() {
        Ok("mixed") | Err(_) => true,
        Ok("modbus") => false,
        Ok(other) => panic!("FLASH_FLEET={other}: give mixed (the default) or modbus"),
    };
    let (_sim, sim, _sim_stdout) = simulate(&bin);
    // The third run is for memory at work: the agent polling 1,000 meters with a million
    // readings in its store (seeded before it starts; its writes are not counted).
    let only: Option<Vec<usize>> = std::env::var("FLASH_RUNS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let runs: Vec<Run> = [
        (false, true, 0),
        (false, false, 0),
        (mixed, false, 1_000_000),
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| only.as_ref().is_none_or(|o| o.contains(&(i + 1))))
    .map(|(_, run)| run)
    .map(|(mixed, broker, seeded)| {
        run(
            &rt,
            &bin,
            &sim,
            mixed,
            broker,
            group_commit.as_deref(),
            seeded,
        )
    })
    .collect();
    let encoded = amr_edge::store::encoded_len(&Record::Reading(typical())) as f64;
    println!(
        "\n1,000 meters, beat.every = {EVERY_S}s, {BOUNDARIES} boundaries, metrics on; store.group_commit = {}",
        group_commit.as_deref().unwrap_or("default")
    );
    println!(
        "runs 1 and 2: 1,000 SDM630s (5 Modbus TCP buses x 200); run 3: {}\n",
        if mixed {
            format!(
                "{} SDM630s ({MIX_MODBUS_BUSES} Modbus TCP buses x {MIX_MODBUS_UNITS}), {MIX_DLMS_WRAPPER} DLMS on the wrapper (a bus each), {} DLMS on HDLC (1 line), {} M-Bus ({MIX_MBUS_SEGMENTS} segments), {} IEC 62056-21 ({MIX_IEC_LINES} lines)",
                MIX_MODBUS_BUSES * MIX_MODBUS_UNITS,
                sim.dlms_hdlc.iter().map(|(_, p)| p.len()).sum::<usize>(),
                MIX_MBUS_SEGMENTS * MIX_MBUS_METERS,
                MIX_IEC_LINES * MIX_IEC_METERS,
            )
        } else {
            "the same as runs 1 and 2 (FLASH_FLEET=modbus)".to_owned()
        }
    );
    println!(
        "{:<48} {:>7} {:>9} {:>9} {:>12} {:>16} {:>10} {:>15} {:>10} {:>8}",
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
            "{:<48} {:>7} {:>9} {:>9} {:>12} {:>16} {:>10} {:>15} {:>10} {:>8}",
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
        "\nper reading: write_bytes / readings buffered; (x): against the {encoded:.0} B encoded record of an SDM630 reading; target <= 4x"
    );
    println!(
        "polls: polls that buffered readings; /metrics was scraped once in each run after the last boundary"
    );
    for r in &runs {
        println!(
            "\n{} (peak RSS {:.1} MiB before the scrape of /metrics, {} B)\n{:<14} {:>10} {:>6} {:>7} {:>9} {:>13}",
            r.name,
            r.peak_before_scrape_kib as f64 / 1024.0,
            r.exposition,
            "protocol",
            "configured",
            "read",
            "polls",
            "readings",
            "poll failures"
        );
        for (p, name) in PROTOCOLS.iter().enumerate() {
            let t = &r.tally[p];
            if r.configured[p] == 0 && t.reads.is_empty() {
                continue;
            }
            println!(
                "{:<14} {:>10} {:>6} {:>7} {:>9} {:>13}",
                name,
                r.configured[p],
                t.reads.len(),
                t.reads.values().sum::<u64>(),
                t.readings,
                t.failed
            );
        }
    }
}
