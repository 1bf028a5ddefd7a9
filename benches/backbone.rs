//! Figures for the backbone: the store and the drain, on this machine's disk and its local
//! RabbitMQ. Run with `benches/run.sh backbone` (RabbitMQ on 127.0.0.1:5672 for the
//! drain figures; they are skipped with a note if it is not there).
//!
//! Prints one table; every figure is measured here, in this run.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amr_edge::clock::SystemClock;
use amr_edge::drain::{AmqpConfig, AmqpPublisher, Drain, DrainSettings};
use amr_edge::reading::{Cadence, Decimal, Flags, Obis, Reading, Stamp};
use amr_edge::store::{Append, Record, SledStore, Store, StoreConfig, Stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn reading(i: u64) -> Reading {
    let at = Stamp {
        ms: 1_790_000_000_000 + i as i64 * 900_000,
        offset: 3600,
    };
    Reading {
        meter: format!("SDM630-{:04}", i % 1000),
        id_type: "name".into(),
        series: Obis([1, 0, 1, 8, 0, 255]),
        value: Decimal::from_scaled(14_567_125 + i as i128, -3).unwrap(),
        unit: "kWh".into(),
        timestamp: at,
        read_at: at,
        cadence: Cadence::Quarterly,
        flags: Flags::empty(),
    }
}

fn batch(from: u64, n: u64) -> Append {
    Append {
        readings: (from..from + n).map(reading).collect(),
        ..Append::default()
    }
}

fn open(dir: &Path) -> SledStore {
    let config = StoreConfig {
        max_bytes: amr_edge::config::ByteSize(4 << 30),
        ..StoreConfig::default()
    };
    SledStore::open(dir, &config, Arc::new(SystemClock)).unwrap()
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

struct Row {
    what: String,
    figure: String,
    target: &'static str,
}

fn main() {
    let mut rows = Vec::new();
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));

    if want("store") {
        store_rates(&mut rows);
        disk_per_reading(&mut rows);
    }
    if want("drain") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(drain_rates(&mut rows));
    }
    if want("rss") {
        rss(&mut rows);
    }

    println!("\n{:<58} {:>22}  target", "figure", "measured");
    for r in rows {
        println!("{:<58} {:>22}  {}", r.what, r.figure, r.target);
    }
}

fn store_rates(rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let s = open(dir.path());
    let batches = 2000u64;
    let t = Instant::now();
    for b in 0..batches {
        s.append(batch(b * 100, 100)).unwrap();
    }
    let append = (batches * 100) as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: "store append, batches of 100, fsync per batch".into(),
        figure: format!("{:.0} readings/s", append),
        target: ">= 100000 readings/s",
    });
    let t = Instant::now();
    let mut n = 0;
    loop {
        let e = s.take(Stream::Readings, 100).unwrap();
        if e.is_empty() {
            break;
        }
        n += e.len();
        let ids: Vec<_> = e.iter().map(|e| e.id).collect();
        s.ack(&ids).unwrap();
    }
    s.flush().unwrap();
    let drain = n as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: "store take + ack, batches of 100".into(),
        figure: format!("{:.0} readings/s", drain),
        target: ">= 100000 readings/s",
    });
}

fn disk_per_reading(rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let s = open(dir.path());
    // 1,000,000 appended and acked, then 100,000 appended: what stays on disk for them.
    for b in 0..10_000u64 {
        s.append(batch(b * 100, 100)).unwrap();
        if b % 100 == 99 {
            loop {
                let e = s.take(Stream::Readings, 1000).unwrap();
                if e.is_empty() {
                    break;
                }
                let ids: Vec<_> = e.iter().map(|e| e.id).collect();
                s.ack(&ids).unwrap();
            }
        }
    }
    for b in 0..1000u64 {
        s.append(batch(2_000_000 + b * 100, 100)).unwrap();
    }
    s.flush().unwrap();
    let stats = s.stats().unwrap();
    let encoded = amr_edge::store::encoded_len(&Record::Reading(reading(1_000_000))) as f64;
    drop(s);
    let disk = dir_size(dir.path()) as f64;
    let per = disk / stats.readings() as f64;
    rows.push(Row {
        what: "disk bytes per buffered reading (1M in+out, 100k in)".into(),
        figure: format!("{per:.0} B ({:.2}x of {encoded:.0} B)", per / encoded),
        target: "<= 3x the encoded size",
    });
}

async fn drain_once(n: u64, per_message: usize) -> Option<f64> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(open(dir.path()));
    for b in 0..n / 1000 {
        store.append(batch(b * 1000, 1000)).unwrap();
    }
    let queue = format!("amr.bench.{}", std::process::id());
    let mut amqp = AmqpConfig::for_url(AMQP);
    amqp.queue = queue.clone();
    amqp.events_queue = format!("{queue}.events");
    amqp.declare_queues = true;
    amqp.readings_per_message = per_message;
    let (drain, status) = Drain::new(
        DrainSettings::new("gw-bench", &amqp),
        store.clone(),
        AmqpPublisher::new(amqp, "bench".into()),
        Arc::new(Notify::new()),
    );
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let task = tokio::spawn(drain.run(shutdown.clone()));
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if status.borrow().records >= n {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) && status.borrow().records == 0 {
            shutdown.cancel();
            return None;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = task.await;
    purge(&queue).await;
    Some(secs)
}

async fn purge(queue: &str) {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    if let Ok(c) = lapin::Connection::connect(AMQP, props).await {
        if let Ok(ch) = c.create_channel().await {
            for q in [queue.to_owned(), format!("{queue}.events")] {
                let _ = ch.queue_delete(&q, Default::default()).await;
            }
        }
    }
}

async fn drain_rates(rows: &mut Vec<Row>) {
    match drain_once(50_000, 1).await {
        Some(secs) => rows.push(Row {
            what: "drain to local RabbitMQ, confirms, 1 reading/message".into(),
            figure: format!("{:.0} messages/s", 50_000.0 / secs),
            target: ">= 5000 messages/s",
        }),
        None => rows.push(Row {
            what: "drain (skipped: no RabbitMQ on 127.0.0.1:5672)".into(),
            figure: "-".into(),
            target: "",
        }),
    }
    if let Some(secs) = drain_once(1_000_000, 100).await {
        rows.push(Row {
            what: "drain to local RabbitMQ, confirms, 100 readings/message".into(),
            figure: format!("{:.0} readings/s", 1_000_000.0 / secs),
            target: ">= 100000 readings/s",
        });
    }
}

/// Resident memory of `amr-edge run` holding 1,000,000 buffered readings (broker out of
/// reach, so nothing drains), read from /proc after it settles.
fn rss(rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    {
        let s = open(dir.path());
        for b in 0..1000u64 {
            s.append(batch(b * 1000, 1000)).unwrap();
        }
    }
    // 1,000 meters on 10 buses, read monthly (none is due in the measurement: the figure is
    // what the agent holds, not what it does), and a broker out of reach so nothing drains.
    let config = dir.path().join("config.toml");
    let mut text = format!(
        "[gateway]\nid = \"gw-rss\"\ndata_dir = \"{}\"\n[store]\nmax_bytes = \"4GiB\"\n[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:9/%2f\"\n",
        dir.path().display()
    );
    for b in 0..10 {
        text.push_str(&format!(
            "[[bus]]\nname = \"lan{b}\"\ntcp = {{ host = \"127.0.0.1\", port = {} }}\n",
            20000 + b
        ));
    }
    for m in 0..1000 {
        text.push_str(&format!(
            "[[meter]]\nid = \"m{m}\"\nbus = \"lan{}\"\nmodbus = {{ unit = {}, profile = \"eastron-sdm630\" }}\nreads = {{ monthly = \"all\" }}\n",
            m % 10,
            1 + m % 247
        ));
    }
    std::fs::write(&config, text).unwrap();
    let (bin, shipped) = common::agent::shipped_bin();
    let which = if shipped {
        ""
    } else {
        " (bench-profile binary; benches/run.sh measures the shipped one)"
    };
    let t = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(["--log", "warn", "run", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    let pid = child.id();
    // Started once the status socket answers.
    while !dir.path().join("agent.sock").exists() {
        assert!(
            child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60),
            "the agent did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = t.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let kb = common::agent::rss_kib(pid).unwrap_or(0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    rows.push(Row {
        what: format!("resident memory of `run`, 1,000,000 readings, 1,000 meters{which}"),
        figure: format!("{:.1} MiB", kb as f64 / 1024.0),
        target: "<= 20 MiB",
    });
    rows.push(Row {
        what: "cold start of `run`, 1,000,000 readings, 1,000 meters".into(),
        figure: format!("{:.0} ms", start.as_secs_f64() * 1000.0),
        target: "",
    });
}
