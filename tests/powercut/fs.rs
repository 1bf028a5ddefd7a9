//! The power-cut filesystem (`powercut_fs.py`, beside this file) mounted for one test: a
//! FUSE mount whose unsynced writes vanish when the test cuts the power. What it models and
//! what it does not is written in the script's docstring and in `README.md` here.
//!
//! Each mount lives in a fresh temporary directory (`mnt/` over `backing/`), is unmounted when
//! the value drops — a panicking test too — and fails loudly where FUSE is missing rather
//! than skipping.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct PowerCutFs {
    root: tempfile::TempDir,
    mnt: PathBuf,
    daemon: Option<Daemon>,
    mounts: u32,
}

struct Daemon {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/powercut_fs.py")
}

/// Panics, saying what to install, unless this machine can mount FUSE filesystems.
fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "the power-cut tests need /dev/fuse (load the fuse module; in a container pass --device /dev/fuse)"
    );
    let fusermount = Command::new("fusermount3")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        fusermount,
        "the power-cut tests need fusermount3: install Debian's fuse3 (tests/run.sh does)"
    );
}

impl PowerCutFs {
    pub fn mount() -> PowerCutFs {
        require_fuse();
        let root = tempfile::Builder::new()
            .prefix("powercut-")
            .tempdir()
            .unwrap();
        let mnt = root.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(root.path().join("backing")).unwrap();
        let mut fs = PowerCutFs {
            root,
            mnt,
            daemon: None,
            mounts: 0,
        };
        fs.start();
        fs
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The daemon's stderr, across every mount.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("fs.log")).unwrap_or_default()
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none(), "already mounted");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("fs.log"))
            .unwrap();
        let mut child = Command::new(crate::common::celery::venv().join("bin/python"))
            .arg(script())
            .arg(self.root.path().join("backing"))
            .arg(&self.mnt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start powercut_fs.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            stdin,
            lines,
        };
        match d.lines.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.contains("\"ready\"") => {}
            other => {
                let _ = d.child.kill();
                let _ = d.child.wait();
                panic!(
                    "the power-cut filesystem did not mount ({other:?}); its log:\n{}",
                    self.log()
                );
            }
        }
        self.mounts += 1;
        self.daemon = Some(d);
    }

    fn ask(&mut self, cmd: &str) -> Value {
        let d = self.daemon.as_mut().expect("mounted");
        writeln!(d.stdin, "{cmd}").expect("the power-cut filesystem's control pipe");
        d.stdin.flush().unwrap();
        let line = d
            .lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no answer to `{cmd}` from the power-cut filesystem: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("`{cmd}` answered {line:?}: {e}"))
    }

    /// Power fails now: what was not durable is gone, and every operation on the mount fails
    /// with EIO until [`PowerCutFs::remount`]. Returns what was dropped (the daemon's counts).
    pub fn cut(&mut self) -> Value {
        self.ask("cut")
    }

    /// Counters, without changing anything.
    pub fn stats(&mut self) -> Value {
        self.ask("stats")
    }

    /// Power is back: unmounts and mounts the durable state again. Nothing may hold a file
    /// open on the mount (kill the processes that used it first).
    pub fn remount(&mut self) {
        self.unmount();
        self.start();
    }

    fn unmount(&mut self) {
        let Some(mut d) = self.daemon.take() else {
            return;
        };
        let start = Instant::now();
        let mut clean = false;
        while start.elapsed() < Duration::from_secs(5) {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                clean = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !clean {
            // Something still holds the mount: detach it anyway, the next mount is a new one.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = d.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = d.child.kill();
        let _ = d.child.wait();
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        self.unmount();
    }
}
