//! The simulated DLMS/COSEM meter (tests/dlms/meter.py) as a process a Rust test owns.
//! Include it next to `mod common;`:
//!
//! ```ignore
//! mod common;
//! #[path = "dlms/peer.rs"]
//! mod dlms_peer;
//! ```
#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dlms/meter.py")
}

/// A running meter.py, killed on drop.
pub struct DlmsMeter {
    child: Child,
    /// Its ready line: `{"ready": true, "transport": …, "meters": [17], "port": …}`.
    pub ready: serde_json::Value,
}

impl DlmsMeter {
    /// Starts meter.py with `args` (`["--wrapper"]`, `["--hdlc", device, "--physical",
    /// "17"]`, …) and waits for its ready line. Its log goes to the test's stderr.
    pub fn start(args: &[&str]) -> DlmsMeter {
        let mut child = Command::new(crate::common::celery::venv().join("bin/python"))
            .arg(script())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/dlms/meter.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("meter.py {args:?} did not start ({e}): {line:?}"));
        DlmsMeter { child, ready }
    }

    /// The wrapper's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.ready["port"].as_u64().expect("a wrapper meter") as u16
    }

    /// What a meter started with `args` serves (`--dump-json`): per meter, every object's
    /// OBIS, class, attribute values, scaler and unit.
    pub fn dump(args: &[&str]) -> serde_json::Value {
        let out = Command::new(crate::common::celery::venv().join("bin/python"))
            .arg(script())
            .arg("--dump-json")
            .args(args)
            .output()
            .expect("run tests/dlms/meter.py --dump-json");
        assert!(out.status.success(), "meter.py --dump-json {args:?} failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for DlmsMeter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
