//! The agent as a separate process, as it runs on a gateway: started with a config file,
//! stopped with SIGTERM or killed with SIGKILL, its log kept for assertions.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::eventually;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_amr-edge"))
}

/// The binary whose memory and CPU a benchmark reports: `AMR_EDGE_BIN` when set
/// (`benches/run.sh` points it at the release-profile build, the one that ships), else the
/// one cargo built for this target, which under `cargo bench` is the bench profile, optimised
/// differently (see `Cargo.toml`). The flag says which one it is, for the printed table.
pub fn shipped_bin() -> (PathBuf, bool) {
    match std::env::var_os("AMR_EDGE_BIN") {
        Some(path) => (PathBuf::from(path), true),
        None => (bin(), false),
    }
}

/// A config for tests: the given broker and queues, no buses unless `extra` adds them.
pub fn config(data_dir: &Path, gateway: &str, amqp_url: &str, queue: &str, extra: &str) -> String {
    format!(
        r#"
[gateway]
id = "{gateway}"
timezone = "Europe/Stockholm"
data_dir = "{data_dir}"

[amqp]
url = "{amqp_url}"
queue = "{queue}"
events_queue = "{queue}.events"
max_backoff = "2s"
connect_timeout = "3s"
{extra}
"#,
        data_dir = data_dir.display()
    )
}

pub struct AgentProc {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    starts: u32,
    /// Where the log stood when the current process was started.
    started_at_byte: usize,
    /// `--log-format json`: one JSON object per log line (see [`buffered_events`]).
    json_log: bool,
    /// libfaketime's `FAKETIME` for the next start (see [`AgentProc::fake_time`]).
    faketime: Option<String>,
}

impl AgentProc {
    /// Writes `config` to `dir/config.toml` and runs `amr-edge run` on it.
    pub fn start(dir: &Path, config: &str) -> AgentProc {
        Self::start_with(dir, config, false)
    }

    /// As [`AgentProc::start`], logging with `--log-format json`, so that the test reads the
    /// agent's structured events (fields, not wording).
    pub fn start_json(dir: &Path, config: &str) -> AgentProc {
        Self::start_with(dir, config, true)
    }

    /// As [`AgentProc::start_json`], with the agent's wall clock starting at `at` under
    /// libfaketime (see [`AgentProc::fake_time`]).
    pub fn start_json_at(dir: &Path, config: &str, at: jiff::Timestamp) -> AgentProc {
        Self::start_with_clock(dir, config, true, Some(faketime_at(at)))
    }

    fn start_with(dir: &Path, config: &str, json_log: bool) -> AgentProc {
        Self::start_with_clock(dir, config, json_log, None)
    }

    fn start_with_clock(
        dir: &Path,
        config: &str,
        json_log: bool,
        faketime: Option<String>,
    ) -> AgentProc {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut a = AgentProc {
            child: None,
            dir: dir.to_owned(),
            config_path,
            log_path: dir.join("agent.log"),
            starts: 0,
            started_at_byte: 0,
            json_log,
            faketime,
        };
        a.restart();
        a
    }

    /// The wall clock the next [`AgentProc::restart`] starts at (whole seconds), under
    /// Debian's libfaketime preloaded into the agent itself (so signals reach it directly);
    /// the monotonic clock the beat sleeps on stays real. `None`: the real clock.
    pub fn fake_time(&mut self, at: Option<jiff::Timestamp>) {
        self.faketime = at.map(faketime_at);
    }

    /// Starts the process (again), appending to the same log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        self.started_at_byte = std::fs::metadata(&self.log_path).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let format: &[&str] = if self.json_log {
            &["--log-format", "json"]
        } else {
            &[]
        };
        let mut cmd = Command::new(bin());
        if let Some(at) = &self.faketime {
            cmd.env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", at)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                // FAKETIME's absolute time is read in the local zone.
                .env("TZ", "UTC");
        }
        let child = cmd
            .args(format)
            .args(["--log", "info,amr_edge=debug", "run", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start amr-edge");
        self.child = Some(child);
    }

    /// Waits until the process started last has come up (signals are handled from then on;
    /// a SIGTERM before that gets the default action, as for any program).
    pub async fn wait_running(&mut self, timeout: Duration) {
        if let Err(e) = self.try_wait_running(timeout).await {
            panic!("the agent did not come up: {e}");
        }
    }

    /// As [`AgentProc::wait_running`], but says why instead of panicking: the process
    /// exited, or did not come up within `timeout`.
    pub async fn try_wait_running(&mut self, timeout: Duration) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            let since =
                String::from_utf8_lossy(log.get(self.started_at_byte..).unwrap_or_default())
                    .into_owned();
            if since.contains("Agent running") {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "exited with {status}; its log since the start:\n{since}"
                    ));
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "not up within {timeout:?}; its log since the start:\n{since}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many bytes the log has now (to tell later lines from earlier ones).
    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log_path).map_or(0, |m| m.len() as usize)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (panics after 40 s).
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(40))
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!(
                    "agent did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `times` times.
    pub async fn wait_log(&self, needle: &str, times: usize, timeout: Duration) {
        eventually(
            timeout,
            &format!("`{needle}` ×{times} in the agent log"),
            || async { (self.log().matches(needle).count() >= times).then_some(()) },
        )
        .await
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// libfaketime's `FAKETIME` for a clock that starts at `at` (read in the zone `TZ`: UTC).
fn faketime_at(at: jiff::Timestamp) -> String {
    format!("@{}", at.strftime("%Y-%m-%d %H:%M:%S"))
}

/// Debian's libfaketime (package `faketime`), multi-threaded variant.
pub fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (apt-get install faketime)")
}

/// Runs the CLI with `args` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run amr-edge")
}

/// One durable append, as the agent reports it in its structured log (`--log-format json`):
/// the `Buffered` event of `bus::append`, written only after the store's append returned.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub first_seq: u64,
    pub readings: u64,
    /// The event's own timestamp.
    pub at: jiff::Timestamp,
    /// Where its line starts in the log.
    pub log_offset: usize,
}

impl Buffered {
    pub fn ids(&self, gateway: &str) -> impl Iterator<Item = String> + '_ {
        let gateway = gateway.to_owned();
        (self.first_seq..self.first_seq + self.readings).map(move |s| format!("{gateway}-{s}"))
    }
}

/// The reading ids of every `Buffered` event in a JSON log: what the agent reported durable.
pub fn buffered_ids(log: &str, gateway: &str) -> std::collections::BTreeSet<String> {
    buffered_events(log)
        .iter()
        .flat_map(|b| b.ids(gateway).collect::<Vec<_>>())
        .collect()
}

/// Every `Buffered` event in a JSON log, read from its fields (`first_seq`, `readings`), not
/// from the wording of a line. Lines that are not JSON objects (a panic message) are skipped.
pub fn buffered_events(log: &str) -> Vec<Buffered> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in log.split_inclusive('\n') {
        let at_line = offset;
        offset += line.len();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // Flattened (`flatten_event`) or nested under "fields", whichever the agent writes.
        let fields = v.get("fields").unwrap_or(&v);
        if fields["message"] != "Buffered" {
            continue;
        }
        let (Some(first_seq), Some(readings)) =
            (fields["first_seq"].as_u64(), fields["readings"].as_u64())
        else {
            continue;
        };
        let Some(at) = v["timestamp"].as_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        out.push(Buffered {
            first_seq,
            readings,
            at,
            log_offset: at_line,
        });
    }
    out
}

/// Resident memory of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Simulated SDM630s, unit ids 1..=`units`, on loopback TCP.
pub async fn sdm630s(units: u8) -> std::net::SocketAddr {
    let meters = amr_edge::sim::modbus::Meters::new();
    let profile = amr_edge::meter::modbus::profile::Profiles::built_in()
        .get("eastron-sdm630")
        .unwrap()
        .clone();
    for u in 1..=units {
        meters.insert(u, amr_edge::sim::modbus::Unit::new(profile.clone()));
    }
    amr_edge::sim::modbus::spawn_tcp(meters).await.unwrap()
}

/// Reads every meter every second, on one TCP bus.
pub fn polling(sim: std::net::SocketAddr, units: u8, concurrency: usize) -> String {
    let mut s = format!(
        "\n[beat]\nevery = \"1s\"\n\n[[bus]]\nname = \"lan\"\ntimeout = \"2s\"\ntcp = {{ host = \"{}\", port = {}, concurrency = {concurrency} }}\n",
        sim.ip(),
        sim.port()
    );
    for u in 1..=units {
        s.push_str(&format!(
            "\n[[meter]]\nid = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
        ));
    }
    s
}
