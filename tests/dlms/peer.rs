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

/// What tests/dlms/load_profile.py says the load profile holds at `times` (UTC seconds) on
/// the meter with HDLC physical address `physical`, computed by that module itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRows {
    /// The scalers of the import (1-0:1.8.0) and export (1-0:2.8.0) columns, in Wh.
    pub import_scaler: i32,
    pub export_scaler: i32,
    /// Per time: (t, import raw, export raw).
    pub rows: Vec<(i64, i64, i64)>,
}

/// The rows at `times`, as load_profile.py computes them (one Python run for all).
pub fn load_profile(times: &[i64], physical: u16) -> ProfileRows {
    const PRINT: &str = "import json, sys\n\
        sys.path.insert(0, sys.argv[1])\n\
        import load_profile as p\n\
        ph = int(sys.argv[2])\n\
        ts = json.loads(sys.stdin.read())\n\
        rows = [[t, p.import_raw(t, ph), p.export_raw(t, ph)] for t in ts]\n\
        print(json.dumps({'import': p.IMPORT_SCALER, 'export': p.EXPORT_SCALER, 'rows': rows}))";
    let mut child = Command::new(crate::common::celery::venv().join("bin/python"))
        .args(["-c", PRINT])
        .arg(script().parent().unwrap())
        .arg(physical.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tests/dlms/load_profile.py");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(times).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "load_profile.py failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let int = |v: &serde_json::Value| v.as_i64().expect("an integer");
    ProfileRows {
        import_scaler: int(&v["import"]) as i32,
        export_scaler: int(&v["export"]) as i32,
        rows: v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (int(&r[0]), int(&r[1]), int(&r[2])))
            .collect(),
    }
}

impl Drop for DlmsMeter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
