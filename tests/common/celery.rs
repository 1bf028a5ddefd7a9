//! A real Celery worker (Python `celery` from PyPI, in a virtualenv this tooling creates on
//! first use) consuming the test's queues and recording every task it runs.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{AMQP_URL, eventually};

/// The virtualenv with celery, created once per target dir (under a file lock: tests in
/// several processes may ask at once).
pub fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-venv");
        std::fs::create_dir_all(root.parent().unwrap()).unwrap();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.with_extension("lock"))
            .unwrap();
        // SAFETY: flock on a descriptor we own, released when `lock` drops.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let reqs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/requirements.txt");
        let stamp = root.join(".installed");
        let wanted = std::fs::read_to_string(&reqs).unwrap();
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&root)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "python3 -m venv failed: install python3 and python3-venv"
            );
            let ok = Command::new(root.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&reqs)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "pip install -r {} failed (PyPI reachable?)",
                reqs.display()
            );
            std::fs::write(&stamp, wanted).unwrap();
        }
        root
    })
    .clone()
}

pub struct Celery {
    child: Child,
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Celery {
    /// Starts a worker on `queues` with the centre's task names (or `task`, `events_task`).
    pub async fn start(queues: &[&str], task: &str, events_task: &str) -> Celery {
        let venv = venv();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.jsonl");
        std::fs::write(&out, "").unwrap();
        let log = std::fs::File::create(dir.path().join("celery.log")).unwrap();
        let child = Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "celery",
                "-A",
                "amr_worker",
                "worker",
                "--pool",
                "solo",
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["-l", "WARNING", "-Q", &queues.join(",")])
            .arg("--hostname")
            .arg(format!("test-{}@localhost", super::unique("w")))
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/celery"))
            .env("AMR_TEST_BROKER", AMQP_URL)
            .env("AMR_TEST_OUT", &out)
            .env("AMR_TEST_TASK", task)
            .env("AMR_TEST_EVENTS_TASK", events_task)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start celery");
        let celery = Celery {
            child,
            out,
            _dir: dir,
        };
        // Ready once it has declared its queues.
        let rabbit = super::rabbit::Rabbit::connect().await;
        for q in queues {
            let q = q.to_string();
            eventually(
                Duration::from_secs(60),
                "the Celery worker to declare its queues",
                || {
                    let rabbit = &rabbit;
                    let q = q.clone();
                    async move { queue_exists(rabbit, &q).await.then_some(()) }
                },
            )
            .await;
        }
        celery
    }

    /// Every task call recorded so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The readings received so far, in the order the worker ran the tasks.
    pub fn readings(&self) -> Vec<serde_json::Value> {
        self.items("readings")
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.items("events")
    }

    fn items(&self, kind: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .flat_map(|r| r[kind].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until at least `n` distinct reading ids have arrived.
    pub async fn wait_readings(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        eventually(
            timeout,
            &format!("{n} readings at the Celery worker"),
            || async {
                let r = self.readings();
                let distinct: std::collections::HashSet<_> =
                    r.iter().map(|x| x["reading_id"].to_string()).collect();
                (distinct.len() >= n).then_some(r)
            },
        )
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("celery.log")).unwrap_or_default()
    }
}

async fn queue_exists(rabbit: &super::rabbit::Rabbit, queue: &str) -> bool {
    // A passive declare on a missing queue closes the channel; use a fresh connection.
    let _ = rabbit;
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let Ok(conn) = lapin::Connection::connect(AMQP_URL, props).await else {
        return false;
    };
    let Ok(ch) = conn.create_channel().await else {
        return false;
    };
    let ok = ch
        .queue_declare(
            queue,
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye").await;
    ok
}

impl Drop for Celery {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
