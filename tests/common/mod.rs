//! Test tooling shared by the integration tests: the real RabbitMQ, a real Celery worker,
//! a TCP proxy the tests can cut, and the agent as a process.
#![allow(dead_code)]

pub mod agent;
pub mod celery;
pub mod mqtt;
pub mod proxy;
pub mod rabbit;
pub mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The RabbitMQ every test talks to (CI starts it; see `.ci/run`).
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name no other test (or earlier run) uses: queues, gateway ids.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{:04x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        fastrand::u16(..)
    )
}

/// Per meter, readings arrived in the order they were taken (rising sequence numbers) the
/// first time each arrived. Delivery is at least once (SPEC: a redelivered reading carries
/// the same id): a copy of one that already arrived may come again after later ones (its
/// confirmation was lost with the connection), but no reading may arrive for the first time
/// after a later one of its meter. Returns how many copies came again.
pub fn assert_in_order_per_meter(got: &[serde_json::Value]) -> usize {
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut again = 0;
    for (i, r) in got.iter().enumerate() {
        let id = r["reading_id"].as_str().unwrap();
        if !seen.insert(id) {
            again += 1;
            continue;
        }
        let seq: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        let meter = r["meter"].as_str().unwrap();
        if let Some(prev) = last.insert(meter, seq) {
            if prev >= seq {
                let around: Vec<&str> = got[i.saturating_sub(12)..(i + 3).min(got.len())]
                    .iter()
                    .map(|r| r["reading_id"].as_str().unwrap_or("?"))
                    .collect();
                panic!(
                    "{meter}: {seq} arrived for the first time after {prev} \
                     (arrival {i} of {}; around it: {around:?})",
                    got.len()
                );
            }
        }
    }
    again
}

/// A child process killed and reaped when dropped (a simulator, an agent a bench runs).
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on (for a server a test is about to start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` saying what was awaited.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

use amr_edge::clock::SystemClock;
use amr_edge::reading::{Cadence, Decimal, Flags, Obis, Reading, Stamp};
use amr_edge::store::{Append, SledStore, Store, StoreConfig};

/// `n` readings of `meters` meters, round robin, with a mix of cadences, flags, offsets and
/// values that a float would get wrong.
pub fn readings(n: usize, meters: usize) -> Vec<Reading> {
    let cadences = [
        Cadence::Quarterly,
        Cadence::Hourly,
        Cadence::Daily,
        Cadence::Monthly,
        Cadence::Yearly,
        Cadence::OnDemand,
    ];
    let base = 1_790_000_000_000i64;
    (0..n)
        .map(|i| {
            let at = Stamp {
                ms: base + i as i64 * 900_000,
                offset: if i % 2 == 0 { 3600 } else { 7200 },
            };
            let mut flags = Flags::empty();
            if i % 7 == 0 {
                flags.insert(Flags::LATE);
            }
            if i % 11 == 0 {
                flags.insert(Flags::CLOCK_UNSYNCED);
            }
            Reading {
                meter: format!("meter-{}", i % meters),
                id_type: "name".into(),
                series: Obis([1, 0, 1, 8, (i % 3) as u8, 255]),
                value: Decimal::from_scaled(14_567_125 + i as i128 * 1001, -3).unwrap(),
                unit: "kWh".into(),
                timestamp: at,
                read_at: Stamp {
                    ms: at.ms + 1234,
                    offset: at.offset,
                },
                cadence: cadences[i % cadences.len()],
                flags,
            }
        })
        .collect()
}

/// Writes `readings` into the store in `dir` (no agent may run on it) and returns their
/// sequence numbers.
pub fn seed(dir: &std::path::Path, readings: &[Reading]) -> Vec<u64> {
    let store = SledStore::open(
        dir,
        &StoreConfig::default(),
        std::sync::Arc::new(SystemClock),
    )
    .expect("open store");
    let mut seqs = Vec::new();
    for chunk in readings.chunks(500) {
        let a = store
            .append(Append {
                readings: chunk.to_vec(),
                ..Append::default()
            })
            .expect("append");
        seqs.extend(a.seqs);
    }
    store.flush().expect("flush");
    seqs
}

/// The JSON the centre must receive for `r` with sequence number `seq`.
pub fn expected_json(gateway: &str, seq: u64, r: &Reading) -> serde_json::Value {
    serde_json::json!({
        "reading_id": format!("{gateway}-{seq}"),
        "meter": r.meter,
        "id_type": r.id_type,
        "series": r.series.to_string(),
        "value": r.value.as_str(),
        "unit": r.unit,
        "timestamp": r.timestamp.rfc3339(),
        "read_at": r.read_at.rfc3339(),
        "cadence": r.cadence.as_str(),
        "flags": r.flags.names(),
    })
}
