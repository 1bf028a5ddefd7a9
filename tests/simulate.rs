//! `amr-edge simulate`'s serial meters on the ptys it opens itself (`--mbus-pty`, `--iec-pty`,
//! `--dlms-hdlc-pty`): the lines it prints on stdout are enough to configure an agent, and
//! `amr-edge poll` — the real drivers, in another process, opening the ptys as serial ports —
//! reads one meter of each kind through them. And its refusals of bad counts.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::Kill;
use common::agent::{bin, cli};

/// One of `simulate`'s pty lines: kind, path, `key=value` fields.
struct PtyLine {
    kind: String,
    path: String,
    fields: Vec<(String, String)>,
}

impl PtyLine {
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key}= on the {} line", self.kind))
    }
}

/// Starts `simulate` with `args` and reads `n` pty lines from its stdout.
fn simulate(args: &[&str], n: usize) -> (Kill, Vec<PtyLine>) {
    let mut child = Command::new(bin())
        .arg("simulate")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run amr-edge simulate");
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let lines = BufReader::new(stdout)
        .lines()
        .take(n)
        .map(|l| {
            let l = l.unwrap();
            let mut words = l.split_whitespace();
            let kind = words.next().unwrap().to_owned();
            let path = words.next().unwrap().to_owned();
            let fields = words
                .map(|w| {
                    let (k, v) = w.split_once('=').expect("key=value");
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            PtyLine { kind, path, fields }
        })
        .collect::<Vec<_>>();
    assert_eq!(lines.len(), n, "simulate printed fewer pty lines");
    (child, lines)
}

#[test]
fn poll_should_read_a_meter_of_each_kind_through_the_ptys_simulate_prints() {
    let (_sim, lines) = simulate(
        &[
            "--mbus-pty",
            "2",
            "--iec-pty",
            "2",
            "--dlms-hdlc-pty",
            "--dlms-physical",
            "17-18",
        ],
        3,
    );
    let line = |kind: &str| {
        lines
            .iter()
            .find(|l| l.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} line"))
    };
    let (hdlc, mbus, iec) = (line("dlms-hdlc-pty"), line("mbus-pty"), line("iec-pty"));
    assert_eq!(hdlc.get("physical"), "17,18");
    assert_eq!(hdlc.get("baud"), "9600");
    assert_eq!(mbus.get("primary"), "1-2");
    assert_eq!((mbus.get("baud"), mbus.get("parity")), ("2400", "even"));
    let secondary: Vec<&str> = mbus.get("secondary").split(',').collect();
    assert_eq!(secondary.len(), 2);
    assert!(
        secondary
            .iter()
            .all(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()))
    );
    let addresses: Vec<&str> = iec.get("addresses").split(',').collect();
    assert_eq!(addresses.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[gateway]
id = "gw-sim"
timezone = "UTC"
data_dir = "{data}"

[amqp]
url = "amqp://guest:guest@127.0.0.1:1/%2f"

[[bus]]
name = "hdlc"
serial = {{ device = "{hdlc}", baud = 9600 }}
timeout = "2s"

[[meter]]
id = "dlms-18"
bus = "hdlc"
dlms = {{ client = 16, logical = 1, physical = 18 }}

[[bus]]
name = "mbus"
serial = {{ device = "{mbus}", baud = 2400, parity = "even" }}
timeout = "2s"

[[meter]]
id = "heat-primary"
bus = "mbus"
mbus = {{ primary = 1 }}

[[meter]]
id = "heat-secondary"
bus = "mbus"
mbus = {{ secondary = "{secondary}" }}

[[bus]]
name = "iec"
serial = {{ device = "{iec}" }}
timeout = "2s"

[[meter]]
id = "lgz-2"
bus = "iec"
iec62056_21 = {{ address = "{address}", max_baud = 9600, timezone = "UTC" }}
"#,
        data = dir.path().display(),
        hdlc = hdlc.path,
        mbus = mbus.path,
        secondary = secondary[1],
        iec = iec.path,
        address = addresses[1],
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = cli(&[
        "poll",
        "--config",
        config_path.to_str().unwrap(),
        "--json",
        "dlms-18",
        "heat-primary",
        "heat-secondary",
        "lgz-2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let polls: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let value = |meter: &str, series: &str| -> (String, String) {
        let poll = polls
            .iter()
            .find(|p| p["meter"] == meter)
            .unwrap_or_else(|| panic!("no poll of {meter}: {stdout}"));
        assert_eq!(poll["errors"], serde_json::json!([]), "{meter}: {stdout}");
        let v = poll["values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["series"] == series)
            .unwrap_or_else(|| panic!("{meter} has no {series}: {stdout}"));
        (
            v["value"].as_str().unwrap().to_owned(),
            v["unit"].as_str().unwrap().to_owned(),
        )
    };
    // The simulators' registers (src/sim/): a heat meter's 1234567 kWh, the Landis+Gyr-like
    // meter's 1.8.0, the DLMS meter's active energy import (moving with its clock).
    assert_eq!(
        value("heat-primary", "6-0-1-8-0-255"),
        ("1234567000".into(), "Wh".into())
    );
    assert_eq!(
        value("heat-secondary", "6-0-1-8-0-255"),
        ("1234567000".into(), "Wh".into())
    );
    assert_eq!(
        value("lgz-2", "1-0-1-8-0-255"),
        ("1234.567".into(), "kWh".into())
    );
    assert_eq!(value("dlms-18", "1-0-1-8-0-255").1, "Wh");
}

#[test]
fn simulate_should_refuse_bad_counts_and_addresses_saying_which() {
    for (args, why) in [
        (&["--mbus-pty", "0"][..], "0 is not in 1..=250"),
        (&["--mbus-pty", "251"][..], "251 is not in 1..=250"),
        (&["--iec-pty", "33"][..], "33 is not in 1..=32"),
        (
            &["--iec-pty", "two"][..],
            "invalid value 'two' for '--iec-pty <N>'",
        ),
        (
            &["--dlms-hdlc-pty", "--dlms-physical", "3"][..],
            "--dlms-physical 3: 3 is not a physical address",
        ),
        (
            &["--dlms-hdlc-pty", "--dlms-physical", "17-x"][..],
            "--dlms-physical 17-x:",
        ),
        (&[][..], "nothing to serve"),
    ] {
        let out = cli(&[&["simulate"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
