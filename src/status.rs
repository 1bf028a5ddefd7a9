//! `amr-edge status`: the state of the buffer and the meters, whether or not the agent runs.
//!
//! A running agent holds the store open (sled allows one process), so it answers on a Unix
//! socket in the data directory; when no agent runs, `status` opens the store itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bus::Health;
use crate::drain::DrainStatus;
use crate::store::{MeterState, ProfileState, Stats, Store};

pub const SOCKET: &str = "agent.sock";

/// Everything `status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub gateway: String,
    pub version: String,
    /// Pid of the running agent, if one runs.
    pub agent_pid: Option<u32>,
    pub started_at: Option<String>,
    pub buffer: BufferReport,
    pub drain: Option<DrainReport>,
    pub meters: Vec<MeterReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferReport {
    pub readings: u64,
    pub events: u64,
    pub bytes: u64,
    pub disk_bytes: u64,
    pub oldest_unsent: Option<String>,
    pub oldest_unsent_age_s: Option<i64>,
    pub evictions: u64,
    pub set_aside: u64,
    pub last_drain: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainReport {
    pub connected: bool,
    pub last_error: Option<String>,
    pub delivered_messages: u64,
    pub delivered_records: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeterReport {
    pub meter: String,
    pub last_read: Option<String>,
    pub last_failure: Option<String>,
    pub health: Health,
    /// Its profile-based reads: the high-water mark and rows read of each profile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<ProfileReport>,
}

/// One (meter, profile) of a profile-based read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileReport {
    /// OBIS, `A-B-C-D-E-F`.
    pub profile: String,
    /// The newest row buffered: the next read asks for the rows after it.
    pub high_water_mark: String,
    pub rows: u64,
}

fn ts(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

impl StatusReport {
    pub fn build(
        gateway: &str,
        stats: &Stats,
        meters: &[MeterState],
        profiles: &[ProfileState],
        configured: &[String],
        drain: Option<&DrainStatus>,
        now_ms: i64,
    ) -> StatusReport {
        let mut meter_reports: Vec<MeterReport> = configured
            .iter()
            .map(|id| {
                let s = meters.iter().find(|m| &m.meter == id);
                let last_read = s.and_then(|s| s.last_read_ms);
                let failure = s.and_then(|s| s.last_failure.as_ref());
                let health = Health::from_last(last_read, failure.map(|f| f.at_ms));
                MeterReport {
                    meter: id.clone(),
                    last_read: last_read.map(ts),
                    last_failure: failure
                        .map(|f| format!("{} {}: {}", ts(f.at_ms), f.kind, f.message)),
                    health,
                    profiles: profiles
                        .iter()
                        .filter(|p| &p.meter == id)
                        .map(|p| ProfileReport {
                            profile: p.profile.to_string(),
                            high_water_mark: ts(p.last_ms),
                            rows: p.rows,
                        })
                        .collect(),
                }
            })
            .collect();
        meter_reports.sort_by(|a, b| a.meter.cmp(&b.meter));
        StatusReport {
            gateway: gateway.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            agent_pid: None,
            started_at: None,
            buffer: BufferReport {
                readings: stats.readings(),
                events: stats.events.count,
                bytes: stats.bytes(),
                disk_bytes: stats.disk_bytes,
                oldest_unsent: stats.oldest_ms.map(ts),
                oldest_unsent_age_s: stats.oldest_ms.map(|o| (now_ms - o) / 1000),
                evictions: stats.evicted,
                set_aside: stats.set_aside,
                last_drain: stats.last_drain_ms.map(ts),
            },
            drain: drain.map(|d| DrainReport {
                connected: d.connected,
                last_error: d.last_error.clone(),
                delivered_messages: d.messages,
                delivered_records: d.records,
            }),
            meters: meter_reports,
        }
    }

    /// The human form.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let b = &self.buffer;
        let _ = writeln!(s, "gateway      {}", self.gateway);
        match self.agent_pid {
            Some(pid) => {
                let _ = writeln!(
                    s,
                    "agent        running (pid {pid}, since {})",
                    self.started_at.as_deref().unwrap_or("?")
                );
            }
            None => {
                let _ = writeln!(s, "agent        not running");
            }
        }
        let _ = writeln!(
            s,
            "buffer       {} readings, {} events, {} ({} on disk)",
            b.readings,
            b.events,
            crate::primitives::ByteSize(b.bytes),
            crate::primitives::ByteSize(b.disk_bytes)
        );
        let _ = writeln!(
            s,
            "oldest       {}",
            match (&b.oldest_unsent, b.oldest_unsent_age_s) {
                (Some(t), Some(age)) => format!(
                    "{t} ({} ago)",
                    humantime::format_duration(std::time::Duration::from_secs(age.max(0) as u64))
                ),
                _ => "nothing unsent".into(),
            }
        );
        let _ = writeln!(s, "evictions    {}", b.evictions);
        if b.set_aside > 0 {
            let _ = writeln!(s, "set aside    {} unreadable records", b.set_aside);
        }
        let _ = writeln!(
            s,
            "last drain   {}",
            b.last_drain.as_deref().unwrap_or("never")
        );
        if let Some(d) = &self.drain {
            let _ = writeln!(
                s,
                "broker       {}{}",
                if d.connected {
                    "connected"
                } else {
                    "not connected"
                },
                d.last_error
                    .as_ref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
        if !self.meters.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<24} {:<10} {:<26} last failure",
                "meter", "health", "last read"
            );
            for m in &self.meters {
                let _ = writeln!(
                    s,
                    "{:<24} {:<10} {:<26} {}",
                    m.meter,
                    m.health,
                    m.last_read.as_deref().unwrap_or("-"),
                    m.last_failure.as_deref().unwrap_or("-")
                );
                for p in &m.profiles {
                    let _ = writeln!(
                        s,
                        "  profile {} {} rows, read up to {}",
                        p.profile, p.rows, p.high_water_mark
                    );
                }
            }
        }
        s
    }
}

/// Answers `status` queries on `{data_dir}/agent.sock` while the agent runs.
pub struct StatusServer {
    pub path: PathBuf,
    pub gateway: String,
    pub meters: Vec<String>,
    pub store: Arc<dyn Store>,
    pub drain: watch::Receiver<DrainStatus>,
    pub started_at: Timestamp,
}

impl StatusServer {
    pub async fn run(self, shutdown: CancellationToken) {
        let _ = std::fs::remove_file(&self.path);
        let listener = match UnixListener::bind(&self.path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot open the status socket; `amr-edge status` will not reach this agent");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                conn = listener.accept() => {
                    let Ok((mut stream, _)) = conn else { continue };
                    let report = self.report().await;
                    let body = serde_json::to_vec(&report).unwrap_or_default();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.write_all(&body)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    async fn report(&self) -> StatusReport {
        let store = self.store.clone();
        let (stats, meters, profiles) = tokio::task::spawn_blocking(move || {
            (
                store.stats().unwrap_or_default(),
                store.meters().unwrap_or_default(),
                store.profiles().unwrap_or_default(),
            )
        })
        .await
        .unwrap_or_default();
        let drain = self.drain.borrow().clone();
        let mut r = StatusReport::build(
            &self.gateway,
            &stats,
            &meters,
            &profiles,
            &self.meters,
            Some(&drain),
            Timestamp::now().as_millisecond(),
        );
        r.agent_pid = Some(std::process::id());
        r.started_at = Some(self.started_at.to_string());
        r
    }
}

/// Asks the agent running on `data_dir`.
pub async fn query(data_dir: &Path) -> std::io::Result<StatusReport> {
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        UnixStream::connect(data_dir.join(SOCKET)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let mut buf = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut buf),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
