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
}

impl AgentProc {
    /// Writes `config` to `dir/config.toml` and runs `amr-edge run` on it.
    pub fn start(dir: &Path, config: &str) -> AgentProc {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut a = AgentProc {
            child: None,
            dir: dir.to_owned(),
            config_path,
            log_path: dir.join("agent.log"),
            starts: 0,
            started_at_byte: 0,
        };
        a.restart();
        a
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
        let child = Command::new(bin())
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
    pub async fn wait_running(&self, timeout: Duration) {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            let since =
                String::from_utf8_lossy(log.get(self.started_at_byte..).unwrap_or_default())
                    .into_owned();
            if since.contains("Agent running") {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "the agent did not come up within {timeout:?}; its log since the start:\n{since}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// Runs the CLI with `args` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run amr-edge")
}

/// The reading ids the agent's log says it made durable ("Buffered first_seq=… readings=…",
/// written only after the store's fsync).
pub fn buffered_ids(log: &str, gateway: &str) -> std::collections::BTreeSet<String> {
    let mut ids = std::collections::BTreeSet::new();
    for line in log.lines().filter(|l| l.contains(" Buffered ")) {
        let field = |name: &str| -> Option<u64> {
            let at = line.find(&format!("{name}="))? + name.len() + 1;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        if let (Some(first), Some(n)) = (field("first_seq"), field("readings")) {
            for seq in first..first + n {
                ids.insert(format!("{gateway}-{seq}"));
            }
        }
    }
    ids
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
