//! The exposition: Prometheus text format 0.0.4, written by hand.
//!
//! Not `prometheus-client`: it writes OpenMetrics only (`# EOF`, `# UNIT`, `info` types,
//! counters declared without their `_total`), which node_exporter's textfile collector and
//! `promtool check metrics` read with the classic text parser and refuse or misread. The
//! classic format is what Prometheus, node_exporter and promtool all take, and it is a few
//! lines of `write!`.
//!
//! Every series is written from a snapshot taken at the scrape: the counters, the store's
//! [`crate::store::Stats`] (tracked, never a scan), the drain's status, and the process's own
//! figures from the kernel.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{BUCKETS, CADENCES, Delivery, Histogram, Metrics, View, lock};
use crate::drain::DrainStatus;
use crate::store::Stats;

/// The exposition now: reads the store's stats on a blocking thread.
pub async fn scrape(view: &Arc<View>) -> String {
    let s = view.store.clone();
    let stats = tokio::task::spawn_blocking(move || s.stats())
        .await
        .ok()
        .and_then(Result::ok);
    let drain = view.drain.borrow().clone();
    let now_s = view.clock.now().as_millisecond() as f64 / 1000.0;
    let process = Process::now();
    let mut out = String::with_capacity(16 * 1024);
    encode(
        &mut out,
        &Snapshot {
            metrics: &view.metrics,
            stats: stats.as_ref(),
            drain: &drain,
            now_s,
            started_s: view.started_at.as_millisecond() as f64 / 1000.0,
            meters: view.meters,
            process,
        },
    );
    out
}

/// Everything a rendering reads.
pub struct Snapshot<'a> {
    pub metrics: &'a Metrics,
    /// `None`: the store could not say (the series are left out, not zeroed).
    pub stats: Option<&'a Stats>,
    pub drain: &'a DrainStatus,
    pub now_s: f64,
    pub started_s: f64,
    pub meters: usize,
    pub process: Process,
}

/// The process's memory and CPU, from the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
}

impl Process {
    pub fn now() -> Process {
        let mut p = Process::default();
        // SAFETY: getrusage writes the struct it is given and nothing else.
        unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
                let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
                p.cpu_seconds = t(ru.ru_utime) + t(ru.ru_stime);
            }
        }
        // statm: size resident shared … in pages.
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            // SAFETY: sysconf reads a constant.
            let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
            let mut f = statm
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            p.virtual_bytes = f.next().unwrap_or(0) * page;
            p.resident_bytes = f.next().unwrap_or(0) * page;
        }
        p
    }
}

/// A label value, escaped as the text format wants: `\\`, `\"`, `\n`.
struct Esc<'a>(&'a str);

impl std::fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let (counts, sum) = h.snapshot();
    let sep = if labels.is_empty() { "" } else { "," };
    for (b, c) in BUCKETS.iter().zip(counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
    }
    let total = counts[BUCKETS.len()];
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {total}");
}

/// Writes the whole exposition into `out`.
pub fn encode(out: &mut String, s: &Snapshot<'_>) {
    let m = s.metrics;
    let buses = m.buses();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    head(
        out,
        "amr_edge_build_info",
        "gauge",
        "The agent's version; always 1.",
    );
    let _ = writeln!(
        out,
        "amr_edge_build_info{{version=\"{}\",arch=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    head(out, "amr_edge_meters", "gauge", "Meters configured.");
    let _ = writeln!(out, "amr_edge_meters {}", s.meters);

    // Readings, from the meter to the broker.
    let per_cadence =
        |out: &mut String,
         name: &str,
         help: &str,
         pick: &dyn Fn(&super::BusMetrics) -> &[std::sync::atomic::AtomicU64; 6]| {
            head(out, name, "counter", help);
            for b in &buses {
                for (c, n) in CADENCES.iter().zip(pick(b)) {
                    let _ = writeln!(
                        out,
                        "{name}{{bus=\"{}\",cadence=\"{}\"}} {}",
                        Esc(&b.name),
                        c.as_str(),
                        load(n)
                    );
                }
            }
        };
    per_cadence(
        out,
        "amr_edge_readings_polled_total",
        "Values read from meters.",
        &|b| &b.polled,
    );
    per_cadence(
        out,
        "amr_edge_readings_buffered_total",
        "Readings made durable in the store.",
        &|b| &b.buffered,
    );
    let d = &m.drain;
    head(
        out,
        "amr_edge_readings_delivered_total",
        "counter",
        "Readings the broker confirmed.",
    );
    let _ = writeln!(
        out,
        "amr_edge_readings_delivered_total {}",
        load(&d.readings_delivered)
    );
    head(
        out,
        "amr_edge_events_delivered_total",
        "counter",
        "System events the broker confirmed.",
    );
    let _ = writeln!(
        out,
        "amr_edge_events_delivered_total {}",
        load(&d.events_delivered)
    );

    // The buffer.
    if let Some(st) = s.stats {
        let classes = [
            ("profile", st.profile),
            ("billing", st.billing),
            ("events", st.events),
        ];
        head(
            out,
            "amr_edge_buffer_records",
            "gauge",
            "Records buffered, not yet delivered, by eviction class.",
        );
        for (c, d) in classes {
            let _ = writeln!(out, "amr_edge_buffer_records{{class=\"{c}\"}} {}", d.count);
        }
        head(
            out,
            "amr_edge_buffer_bytes",
            "gauge",
            "Bytes of the records buffered, by eviction class.",
        );
        for (c, d) in classes {
            let _ = writeln!(out, "amr_edge_buffer_bytes{{class=\"{c}\"}} {}", d.bytes);
        }
        head(
            out,
            "amr_edge_buffer_oldest_age_seconds",
            "gauge",
            "Age of the oldest record not yet delivered; 0 when the buffer is empty.",
        );
        let age = st
            .oldest_ms
            .map_or(0.0, |ms| (s.now_s - ms as f64 / 1000.0).max(0.0));
        let _ = writeln!(out, "amr_edge_buffer_oldest_age_seconds {age}");
        head(
            out,
            "amr_edge_store_disk_bytes",
            "gauge",
            "The store's files on disk.",
        );
        let _ = writeln!(out, "amr_edge_store_disk_bytes {}", st.disk_bytes);
        head(
            out,
            "amr_edge_evictions_total",
            "counter",
            "Records evicted undelivered (buffer full or too old) since the agent started, by eviction class.",
        );
        for (c, n) in [
            ("profile", st.evicted_by_class[0]),
            ("events", st.evicted_by_class[1]),
            ("billing", st.evicted_by_class[2]),
        ] {
            let _ = writeln!(out, "amr_edge_evictions_total{{class=\"{c}\"}} {n}");
        }
        if let Some(ms) = st.last_drain_ms {
            head(
                out,
                "amr_edge_last_delivery_timestamp_seconds",
                "gauge",
                "When the broker last confirmed a delivery.",
            );
            let _ = writeln!(
                out,
                "amr_edge_last_delivery_timestamp_seconds {}",
                ms as f64 / 1000.0
            );
        }
    }

    // The drain.
    head(
        out,
        "amr_edge_drain_messages_total",
        "counter",
        "Messages published, by stream and how they ended.",
    );
    for (i, stream) in ["readings", "events"].iter().enumerate() {
        for how in Delivery::ALL {
            let _ = writeln!(
                out,
                "amr_edge_drain_messages_total{{stream=\"{stream}\",outcome=\"{}\"}} {}",
                how.as_str(),
                load(&d.messages[i][how as usize])
            );
        }
    }
    head(
        out,
        "amr_edge_drain_confirm_seconds",
        "histogram",
        "From publishing a message to the broker's confirmation.",
    );
    histogram(
        out,
        "amr_edge_drain_confirm_seconds",
        "",
        &d.confirm_seconds,
    );
    head(
        out,
        "amr_edge_broker_connected",
        "gauge",
        "1 while the drain has a session with the broker.",
    );
    let _ = writeln!(
        out,
        "amr_edge_broker_connected {}",
        u8::from(s.drain.connected)
    );
    head(
        out,
        "amr_edge_broker_reconnects_total",
        "counter",
        "Sessions with the broker started after the first.",
    );
    let _ = writeln!(
        out,
        "amr_edge_broker_reconnects_total {}",
        load(&d.connects).saturating_sub(1)
    );

    // Buses.
    head(
        out,
        "amr_edge_polls_total",
        "counter",
        "Polls of meters, by bus and outcome.",
    );
    for b in &buses {
        let bus = Esc(&b.name);
        let _ = writeln!(
            out,
            "amr_edge_polls_total{{bus=\"{bus}\",outcome=\"ok\"}} {}\namr_edge_polls_total{{bus=\"{bus}\",outcome=\"failed\"}} {}",
            load(&b.polls_ok),
            load(&b.polls_failed)
        );
    }
    head(
        out,
        "amr_edge_poll_duration_seconds",
        "histogram",
        "How long a poll of one meter took, by bus.",
    );
    for b in &buses {
        histogram(
            out,
            "amr_edge_poll_duration_seconds",
            &format!("bus=\"{}\"", Esc(&b.name)),
            &b.poll_seconds,
        );
    }
    head(
        out,
        "amr_edge_failures_total",
        "counter",
        "Failed reads and refused requests, by bus and system event kind.",
    );
    for b in &buses {
        for (kind, n) in lock(&b.failures).iter() {
            let _ = writeln!(
                out,
                "amr_edge_failures_total{{bus=\"{}\",kind=\"{kind}\"}} {n}",
                Esc(&b.name)
            );
        }
    }
    per_cadence(
        out,
        "amr_edge_beat_overruns_total",
        "Reads still queued at their next boundary (overruns), by bus and cadence.",
        &|b| &b.overruns,
    );
    head(
        out,
        "amr_edge_profile_rows_total",
        "counter",
        "Rows read from meters' own load profiles (profile-based reads and backfills), by bus.",
    );
    for b in &buses {
        let _ = writeln!(
            out,
            "amr_edge_profile_rows_total{{bus=\"{}\"}} {}",
            Esc(&b.name),
            b.profile_rows.load(Ordering::Relaxed)
        );
    }

    // Per meter, when asked for.
    let per_meter: Vec<_> = buses
        .iter()
        .map(|b| (b, lock(&b.meters).clone()))
        .filter(|(_, m)| !m.is_empty())
        .collect();
    if !per_meter.is_empty() {
        head(
            out,
            "amr_edge_meter_readings_polled_total",
            "counter",
            "Values read from the meter.",
        );
        for (b, meters) in &per_meter {
            for (id, c) in meters {
                let _ = writeln!(
                    out,
                    "amr_edge_meter_readings_polled_total{{bus=\"{}\",meter=\"{}\"}} {}",
                    Esc(&b.name),
                    Esc(id),
                    c.readings
                );
            }
        }
        head(
            out,
            "amr_edge_meter_polls_total",
            "counter",
            "Polls of the meter, by outcome.",
        );
        for (b, meters) in &per_meter {
            for (id, c) in meters {
                let (bus, meter) = (Esc(&b.name), Esc(id));
                let _ = writeln!(
                    out,
                    "amr_edge_meter_polls_total{{bus=\"{bus}\",meter=\"{meter}\",outcome=\"ok\"}} {}\namr_edge_meter_polls_total{{bus=\"{bus}\",meter=\"{meter}\",outcome=\"failed\"}} {}",
                    c.polls_ok, c.polls_failed
                );
            }
        }
        head(
            out,
            "amr_edge_meter_last_success_timestamp_seconds",
            "gauge",
            "When a poll last read the meter.",
        );
        for (b, meters) in &per_meter {
            for (id, c) in meters {
                if let Some(t) = c.last_ok_s {
                    let _ = writeln!(
                        out,
                        "amr_edge_meter_last_success_timestamp_seconds{{bus=\"{}\",meter=\"{}\"}} {t}",
                        Esc(&b.name),
                        Esc(id)
                    );
                }
            }
        }
    }

    // The process (the names every Prometheus client library uses).
    let p = s.process;
    head(
        out,
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent.",
    );
    let _ = writeln!(out, "process_cpu_seconds_total {}", p.cpu_seconds);
    head(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size.",
    );
    let _ = writeln!(out, "process_resident_memory_bytes {}", p.resident_bytes);
    head(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size.",
    );
    let _ = writeln!(out, "process_virtual_memory_bytes {}", p.virtual_bytes);
    head(
        out,
        "process_start_time_seconds",
        "gauge",
        "When the agent started, Unix seconds.",
    );
    let _ = writeln!(out, "process_start_time_seconds {}", s.started_s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Failure;
    use crate::reading::Cadence;
    use std::time::Duration;

    fn render(m: &Metrics, stats: Option<&Stats>) -> String {
        let mut out = String::new();
        encode(
            &mut out,
            &Snapshot {
                metrics: m,
                stats,
                drain: &DrainStatus::default(),
                now_s: 1000.0,
                started_s: 900.0,
                meters: 2,
                process: Process::now(),
            },
        );
        out
    }

    #[test]
    fn labels_should_be_escaped() {
        let m = Metrics::default();
        m.bus("a\"b\\c\nd").buffered(Cadence::Daily, 1);
        let out = render(&m, None);
        assert!(
            out.contains(
                "amr_edge_readings_buffered_total{bus=\"a\\\"b\\\\c\\nd\",cadence=\"daily\"} 1"
            ),
            "{out}"
        );
    }

    #[test]
    fn every_sample_should_follow_its_type_line() {
        let m = Metrics::default();
        m.set_per_meter(true);
        let b = m.bus("lan");
        b.poll(&crate::metrics::PollEnd {
            meter: "m1",
            cadence: Cadence::Quarterly,
            values: 3,
            took: Duration::from_millis(40),
            failure: None,
            refused: &[],
            at: jiff::Timestamp::UNIX_EPOCH,
        });
        b.poll(&crate::metrics::PollEnd {
            meter: "m2",
            cadence: Cadence::Quarterly,
            values: 0,
            took: Duration::from_secs(2),
            failure: Some(&Failure::Timeout(Duration::from_secs(1))),
            refused: &[],
            at: jiff::Timestamp::UNIX_EPOCH,
        });
        let stats = Stats {
            oldest_ms: Some(400_000),
            ..Stats::default()
        };
        let out = render(&m, Some(&stats));
        let mut family = String::new();
        let mut seen = std::collections::HashSet::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(family.clone()), "{family} declared twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .unwrap_or(name);
            assert!(name == family || base == family, "{line} under {family}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(
            out.contains("amr_edge_buffer_oldest_age_seconds 600\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "amr_edge_meter_polls_total{bus=\"lan\",meter=\"m2\",outcome=\"failed\"} 1"
            )
        );
        assert!(out.contains("amr_edge_poll_duration_seconds_bucket{bus=\"lan\",le=\"0.05\"} 1"));
        assert!(out.contains("amr_edge_poll_duration_seconds_count{bus=\"lan\"} 2"));
        assert!(
            out.contains("amr_edge_failures_total{bus=\"lan\",kind=\"meter_not_answering\"} 1")
        );
    }

    #[test]
    fn per_meter_series_should_be_absent_by_default() {
        let m = Metrics::default();
        m.bus("lan").poll(&crate::metrics::PollEnd {
            meter: "m1",
            cadence: Cadence::Daily,
            values: 1,
            took: Duration::from_millis(1),
            failure: None,
            refused: &[],
            at: jiff::Timestamp::UNIX_EPOCH,
        });
        assert!(!render(&m, None).contains("meter=\""));
    }
}
