//! The simulated M-Bus segment read by an independent master: pyMeterBus (PyPI
//! `pymeterbus`, in the tests' virtualenv) over pyserial's `socket://` to the simulator's
//! TCP port. Its decoder must accept every telegram and agree with ours on every numeric
//! value; a few values are also checked against what the simulator was built with.
//!
//! "Agree" is exact in the only sense pyMeterBus allows: it scales values in binary floating
//! point (`418 × 0.1` comes back as 41.80000000000000426…, one ulp off the double nearest
//! 41.8), so its value, rounded to the record's own resolution (the VIF's decimal places,
//! which our exact decimal has), must equal ours digit for digit.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use amr_edge::meter::mbus::app::{self, Value};
use amr_edge::sim::mbus::{Segment, spawn_tcp};

fn pymeterbus(url: &str, mode: &str, target: &str) -> Vec<serde_json::Value> {
    let venv = common::celery::venv();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/mbus/pymeterbus_master.py"
    );
    let out = Command::new(venv.join("bin/python"))
        .args([script, url, mode, target])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "pyMeterBus failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Our decode of the simulator's telegrams of one slave: numeric values, in record order.
fn ours(seg: &Segment, slave: usize) -> Vec<Vec<Option<String>>> {
    let s = &seg.slaves[slave];
    (0..s.telegrams.len())
        .map(|i| {
            let f = s.rsp_ud(i);
            let t = app::decode(&f).unwrap();
            t.records()
                .map(|r| match r.value() {
                    Value::Number(_) | Value::Real { .. } => {
                        r.value().to_decimal().map(|d| d.to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// pyMeterBus's Decimal as ours: it keeps trailing zeros and exponents (`1.2E+3`).
fn normalise(s: &str) -> Option<String> {
    let (m, e) = match s.split_once(['E', 'e']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (s, 0),
    };
    let d = amr_edge::reading::Decimal::parse(m).ok()?.shift(e).ok()?;
    // Trailing fraction zeros carry no value.
    let t = d.as_str();
    let t = if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.')
    } else {
        t
    };
    Some(if t == "-0" { "0".into() } else { t.into() })
}

/// pyMeterBus's value, rounded to the decimal places of ours, is ours.
fn same(theirs: &str, ours: &str) -> bool {
    let places = ours.split_once('.').map_or(0, |(_, f)| f.len() as i32);
    let Some(mut t) = normalise(theirs) else {
        return false;
    };
    // Cut the float's long binary tail first (it is far below the rounding digit), so the
    // digits fit an i128.
    if let Some(dot) = t.find('.') {
        t.truncate((dot + 1 + places as usize + 3).min(t.len()));
    }
    let Ok(d) = amr_edge::reading::Decimal::parse(&t) else {
        return false;
    };
    let Ok((m, e)) = d.parts() else { return false };
    // m × 10^e to `places` decimals, half away from zero.
    let shift = e + places;
    let rounded = if shift >= 0 {
        m * 10i128.pow(shift as u32)
    } else {
        let div = 10i128.pow((-shift) as u32);
        let q = m / div;
        if (m % div).abs() * 2 >= div {
            q + m.signum()
        } else {
            q
        }
    };
    amr_edge::reading::Decimal::from_scaled(rounded, -places)
        .is_ok_and(|r| normalise(r.as_str()) == normalise(ours))
}

fn compare(seg: &Segment, slave: usize, got: &[serde_json::Value]) -> usize {
    let want = ours(seg, slave);
    assert_eq!(got.len(), want.len(), "telegrams");
    let mut checked = 0;
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        let recs = g["records"].as_array().unwrap();
        // pyMeterBus lists the manufacturer-data block (DIF 0F/1F) as a record; we do not.
        let recs: Vec<_> = recs
            .iter()
            .filter(|r| {
                let f = r["function"].as_str().unwrap_or("");
                !f.contains("SPECIAL") && !f.contains("MORE_RECORDS") && !f.contains("MANUFACT")
            })
            .collect();
        assert_eq!(recs.len(), w.len(), "telegram {t}: {recs:?}");
        for (i, (r, ours)) in recs.iter().zip(w).enumerate() {
            let Some(ours) = ours else { continue };
            let theirs = r["value"].as_str().unwrap();
            assert!(
                same(theirs, ours),
                "telegram {t} record {i}: pyMeterBus {r} vs ours {ours}"
            );
            checked += 1;
        }
        assert_eq!(g["more"].as_bool(), Some(t + 1 < want.len()));
    }
    checked
}

#[test]
fn pymeterbus_should_read_the_simulated_segment_like_our_decoder() {
    let seg = Segment::demo();
    let shared = Arc::new(Mutex::new(seg.clone()));
    let sim = spawn_tcp(shared).unwrap();
    let url = format!("socket://{}", sim.addr().unwrap());
    let mut checked = 0;
    // Primary addressing: the heat meter (one telegram), the electricity meter (three).
    let heat = pymeterbus(&url, "primary", "1");
    assert_eq!(heat[0]["id"].as_str(), Some("12345678"));
    assert_eq!(heat[0]["manufacturer"].as_str(), Some("KAM"));
    // Values the simulator was built with: 01234567 kWh (VIF 06) and 6543.21 m3.
    let v: Vec<&str> = heat[0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    assert!(same(v[0], "1234567000"), "{}", v[0]);
    assert!(same(v[1], "6543.21"), "{}", v[1]);
    checked += compare(&seg, 0, &heat);
    let elec = pymeterbus(&url, "primary", "3");
    assert_eq!(elec.len(), 3);
    checked += compare(&seg, 2, &elec);
    // Secondary addressing: the water meter, selected by id, manufacturer, version, medium
    // (pyMeterBus's 16 hex digits: id, the manufacturer's bytes as sent, version, medium).
    let water = pymeterbus(&url, "secondary", "23456789AE4C6807");
    assert_eq!(water[0]["id"].as_str(), Some("23456789"));
    checked += compare(&seg, 1, &water);
    println!("pyMeterBus agrees with our decoder on {checked} values");
    assert!(checked >= 12);
}
