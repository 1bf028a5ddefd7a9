//! The M-Bus decoder against real meters' frames: `../shared/mbus-frames` (libmbus's test
//! frames, see its README). Every real frame must decode to the values and units of
//! libmbus's normalised decode (`*.norm.xml`), one table over all of them; every malformed
//! frame must be rejected with an error; arbitrary bytes and bit flips must never panic.
//!
//! libmbus normalises differently from us in a few documented ways, which the comparison
//! converts rather than skips (see `libmbus_form`):
//!
//! * durations: libmbus converts `min`, `h`, `d` to seconds; we keep the meter's unit;
//! * units are spelt `m^3` there, `m3` here;
//! * numbers: libmbus prints a double with six decimals; we keep the exact decimal, which must
//!   equal libmbus's value rounded to six places (reals: to f32 precision, since libmbus
//!   widens the f32 and we print its shortest decimal);
//! * a date-time with the IV (invalid) bit: libmbus prints zeros, we keep the fields and flag it;
//! * a plain-text VIF: libmbus prints the text as the quantity and `-` as the unit; the text is
//!   our unit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use amr_edge::meter::mbus::app::{self, Coding, Telegram, Value};
use amr_edge::meter::mbus::series;

fn frames_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/mbus-frames");
    assert!(
        dir.join("test-frames").is_dir() && dir.join("error-frames").is_dir(),
        "the real M-Bus frames are missing: expected {} with test-frames/ and error-frames/",
        dir.display()
    );
    dir
}

fn hex_file(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

/// The files say ISO-8859-1 but are UTF-8 (`°C`); read either.
fn text_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().into_iter().map(char::from).collect(),
    }
}

fn tag<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = block.find(&open)? + open.len();
    let end = block[start..].find(&close)? + start;
    Some(&block[start..end])
}

fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

/// One record as libmbus's normalised decode prints it.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    function: String,
    storage: String,
    tariff: Option<String>,
    device: Option<String>,
    unit: String,
    quantity: String,
    value: String,
}

fn expected(xml: &str) -> (String, Vec<Expected>) {
    let mut parts = xml.split("<DataRecord");
    let head = parts.next().unwrap_or_default();
    let slave = tag(head, "SlaveInformation").unwrap_or_default().to_owned();
    let records = parts
        .map(|b| Expected {
            function: unescape(tag(b, "Function").unwrap_or_default()),
            storage: tag(b, "StorageNumber").unwrap_or("0").to_owned(),
            tariff: tag(b, "Tariff").map(str::to_owned),
            device: tag(b, "Device").map(str::to_owned),
            unit: unescape(tag(b, "Unit").unwrap_or_default()),
            quantity: unescape(tag(b, "Quantity").unwrap_or_default()),
            value: unescape(tag(b, "Value").unwrap_or_default()),
        })
        .collect();
    (slave, records)
}

/// `(mantissa, exponent)` of a decimal string.
fn parts(s: &str) -> Option<(i128, i32)> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let m: i128 = format!("{int}{frac}").parse().ok()?;
    Some((if neg { -m } else { m }, -(frac.len() as i32)))
}

/// `m × 10^e` rounded half away from zero to `places` decimals, as a mantissa at -places.
fn round_to(m: i128, e: i32, places: i32) -> Option<i128> {
    let shift = e + places;
    if shift >= 0 {
        return m.checked_mul(10i128.checked_pow(shift as u32)?);
    }
    let div = 10i128.checked_pow((-shift) as u32)?;
    let q = m / div;
    let r = (m % div).abs();
    Some(if r * 2 >= div { q + m.signum() } else { q })
}

/// libmbus's base unit for one of ours: (unit, factor, power of ten).
fn libmbus_unit(unit: &str) -> Option<(&'static str, i128, i32)> {
    Some(match unit {
        "s" => ("s", 1, 0),
        "min" => ("s", 60, 0),
        "h" => ("s", 3600, 0),
        "d" => ("s", 86400, 0),
        "MWh" => ("Wh", 1, 6),
        "GJ" => ("J", 1, 9),
        "MW" => ("W", 1, 6),
        "GJ/h" => ("J/h", 1, 9),
        "t" => ("kg", 1, 3),
        _ => return None,
    })
}

/// Why a record of ours cannot equal libmbus's, if it cannot; otherwise `None`.
fn compare(r: &app::Record<'_>, e: &Expected) -> Option<String> {
    let mut why = String::new();
    let function = r.function.name();
    if function != e.function {
        let _ = write!(why, "function {function:?} vs {:?}; ", e.function);
    }
    if r.storage.to_string() != e.storage {
        let _ = write!(why, "storage {} vs {}; ", r.storage, e.storage);
    }
    if let Some(t) = &e.tariff {
        if r.tariff.to_string() != *t {
            let _ = write!(why, "tariff {} vs {t}; ", r.tariff);
        }
    }
    if let Some(d) = &e.device {
        if r.subunit.to_string() != *d {
            let _ = write!(why, "subunit {} vs {d}; ", r.subunit);
        }
    }
    let unit = r.unit.to_string();
    let plain_text = matches!(r.unit, app::Unit::Text(_));
    let converted = libmbus_unit(&unit);
    // Units: ours → libmbus's spelling.
    let ours_as_libmbus = if plain_text {
        "-".to_owned()
    } else if let Some((u, _, _)) = converted {
        u.to_owned()
    } else {
        unit.replace("m3", "m^3")
    };
    // Where the standard names a quantity without a unit, libmbus prints the name as the
    // unit ("Units for H.C.A.", "Reserved").
    let unit_ok = ours_as_libmbus == e.unit
        || (ours_as_libmbus.is_empty()
            && (e.unit == "-" || e.unit.is_empty() || e.unit == r.meaning.quantity.name()));
    if !unit_ok {
        let _ = write!(why, "unit {unit:?} vs {:?}; ", e.unit);
    }
    if plain_text && unit != e.quantity {
        let _ = write!(
            why,
            "plain-text unit {unit:?} vs quantity {:?}; ",
            e.quantity
        );
    }
    let value = r.value();
    let ok = match value {
        Value::Number(n) => {
            let (mut m, mut ex) = (n.mantissa, n.exponent);
            if let Some((_, f, p)) = converted {
                m *= f;
                ex += p;
            }
            match (round_to(m, ex, 6), parts(&e.value)) {
                (Some(ours), Some((theirs, -6))) => ours == theirs,
                _ => false,
            }
        }
        Value::Real { value, exponent } => {
            let p = converted.map_or(0, |(_, _, p)| p);
            let ours = f64::from(value) * 10f64.powi(exponent + p);
            let theirs: f64 = e.value.parse().unwrap_or(f64::NAN);
            (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0)
        }
        Value::Time(t) => {
            let s = if t.kind == 'G' {
                t.to_string()
            } else if t.invalid {
                "1900-01-00T00:00:00".to_owned()
            } else {
                t.to_string()
            };
            let s = if t.kind == 'G' { s } else { format!("{s}Z") };
            s == e.value
        }
        Value::Text(_) => value.text().unwrap_or_default() == e.value,
        // libmbus prints variable-length binary most significant byte first.
        Value::Bytes(b) => {
            let mut b = b.to_vec();
            b.reverse();
            hex_spaced(&b) == e.value
        }
        Value::InvalidBcd(b) => hex_spaced(b) == e.value,
        Value::Empty => e.value.is_empty() || e.value == "0.000000",
    };
    if !ok {
        let _ = write!(why, "value {value:?} vs {:?}; ", e.value);
    }
    (!why.is_empty()).then_some(why)
}

fn hex_spaced(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Deliberate differences: (frame, record index, reason). Each is checked to still differ, so
/// the list cannot go stale.
const DIFFERENCES: &[(&str, usize, &str)] = &[
    (
        "ELS_Elster-F96-Plus",
        4,
        "BCD with hex digits (BD EB DD DD): the meter's error marker (EN 13757-3 annex B); \
         libmbus makes a number of it, we keep the bytes raw (InvalidBcd) and deliver no value",
    ),
    ("ELS_Elster-F96-Plus", 5, "the same, BD EB DD"),
    ("abb_f95", 2, "BCD with hex digits (DD B4 EB DD), as above"),
    ("abb_f95", 3, "the same, DD B4 EB"),
    (
        "sen_pollutherm",
        2,
        "VIF 7B without its extension bit (the FB escape sent wrongly): libmbus prints an \
         empty record, we keep the value 302 as a reserved quantity with a private series",
    ),
];

#[test]
fn every_real_frame_should_decode_like_libmbus() {
    let dir = frames_dir().join("test-frames");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hex"))
        .collect();
    names.sort();
    assert!(names.len() >= 70, "only {} real frames", names.len());
    let mut failures = Vec::new();
    let mut matched_frames = 0;
    let mut matched_records = 0;
    let mut differences_seen = Vec::new();
    for path in &names {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let bytes = hex_file(path);
        let xml = text_file(&path.with_extension("norm.xml"));
        let (slave, want) = expected(&xml);
        let t = match app::decode(&bytes) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: does not decode: {e}"));
                continue;
            }
        };
        let mut frame_ok = true;
        let mut exact = true;
        // The header.
        if let Some(id) = t.identity() {
            let want_id = tag(&slave, "Id").unwrap_or_default();
            if id.id_string().trim_start_matches('0') != want_id.trim_start_matches('0') {
                failures.push(format!("{name}: id {} vs {want_id}", id.id_string()));
                frame_ok = false;
            }
            let want_man = tag(&slave, "Manufacturer").unwrap_or_default();
            if id.manufacturer_str() != want_man {
                failures.push(format!(
                    "{name}: manufacturer {} vs {want_man}",
                    id.manufacturer_str()
                ));
                frame_ok = false;
            }
            if Some(id.version.to_string().as_str()) != tag(&slave, "Version") {
                failures.push(format!("{name}: version {}", id.version));
                frame_ok = false;
            }
        }
        let header = t.header.unwrap();
        if Some(header.access.to_string().as_str()) != tag(&slave, "AccessNumber") {
            failures.push(format!("{name}: access number {}", header.access));
            frame_ok = false;
        }
        // The records, then the manufacturer data as libmbus lists it: one more record.
        let ours: Vec<_> = t.records().collect();
        let extra = usize::from(t.manufacturer_data.is_some());
        if ours.len() + extra != want.len() {
            failures.push(format!(
                "{name}: {} records (+{extra} manufacturer data) vs {} in libmbus",
                ours.len(),
                want.len()
            ));
            frame_ok = false;
        }
        for (i, (r, e)) in ours.iter().zip(&want).enumerate() {
            // Fixed data structures: libmbus prints only unit and value ("Actual value").
            let why = if t.ci == 0x73 {
                let unit = r.unit.to_string();
                let v = r.value().to_decimal().map(|d| d.to_string());
                let unit_ok = unit == e.unit || (unit.is_empty() && !e.unit.is_empty());
                (!(unit_ok && v.as_deref() == Some(e.value.as_str())))
                    .then(|| format!("fixed: {unit} {v:?} vs {} {}", e.unit, e.value))
            } else {
                compare(r, e)
            };
            let listed = DIFFERENCES
                .iter()
                .find(|(n, idx, _)| *n == name && *idx == i);
            match (why, listed) {
                (None, None) => matched_records += 1,
                (Some(why), None) => {
                    failures.push(format!("{name} record {i} ({:02X?}): {why}", r.vib));
                    frame_ok = false;
                }
                (Some(_), Some(d)) => {
                    differences_seen.push(*d);
                    exact = false;
                }
                (None, Some(_)) => {
                    failures.push(format!(
                        "{name} record {i}: listed as a difference but matches now"
                    ));
                    frame_ok = false;
                }
            }
        }
        if let (Some(data), Some(e)) = (t.manufacturer_data, want.get(ours.len())) {
            let function = if t.more_follows {
                "More records follow"
            } else {
                "Manufacturer specific"
            };
            if e.function != function || hex_spaced(data) != e.value {
                failures.push(format!(
                    "{name}: manufacturer data {function} {} vs {} {}",
                    hex_spaced(data),
                    e.function,
                    e.value
                ));
                frame_ok = false;
            } else {
                matched_records += 1;
            }
        }
        // Every record gets a series.
        for r in &ours {
            let _ = series::series(r, t.identity().map(|i| i.medium));
        }
        if frame_ok && exact {
            matched_frames += 1;
        }
    }
    println!(
        "{matched_frames} of {} real frames match libmbus exactly, the rest but for the listed differences; {matched_records} records match; {} deliberate differences",
        names.len(),
        differences_seen.len()
    );
    for (n, i, why) in &differences_seen {
        println!("  difference: {n} record {i}: {why}");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_malformed_frame_should_be_rejected_with_an_error() {
    let dir = frames_dir().join("error-frames");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "hex") {
            continue;
        }
        let bytes = hex_file(&path);
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        match app::decode(&bytes) {
            Ok(t) => panic!(
                "{name}: decoded as {} records, should be rejected",
                t.records().count()
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() > 10, "{name}: unclear error {msg:?}");
                println!("{name}: {msg}");
            }
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} malformed frames");
}

/// Decodes as far as it goes and touches every value, as the driver will.
fn exercise(bytes: &[u8]) {
    if let Ok(t) = app::decode(bytes) {
        let medium = t.identity().map(|i| i.medium);
        for r in t.records() {
            let v = r.value();
            let _ = v.to_decimal();
            let _ = v.text();
            if let Value::Time(t) = v {
                let _ = t.civil();
                let _ = t.to_string();
            }
            let _ = r.unit.to_string();
            let _ = series::series(&r, medium);
            let _ = matches!(r.coding, Coding::Text);
        }
    }
    // The user data alone under every CI.
    for ci in [0x72, 0x76, 0x78, 0x7A, 0x73, 0x77, 0x70] {
        if let Ok(t) = Telegram::parse(ci, bytes) {
            for r in t.records() {
                let _ = r.value().to_decimal();
            }
        }
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn real_frames() -> Vec<Vec<u8>> {
        let dir = frames_dir().join("test-frames");
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "hex"))
            .map(|p| hex_file(&p))
            .collect();
        v.sort();
        v
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_should_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            exercise(&bytes);
        }

        #[test]
        fn bit_flips_in_real_frames_should_never_panic(
            pick in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
            fix_checksum in any::<bool>(),
        ) {
            let frames = real_frames();
            let mut f = pick.get(&frames).clone();
            for (at, bit) in flips {
                let i = at.index(f.len());
                f[i] ^= 1 << bit;
            }
            if fix_checksum && f.len() > 6 && f[0] == 0x68 {
                // Let the flip reach the application layer.
                let l = usize::from(f[1]).min(f.len() - 6);
                f[1] = l as u8;
                f[2] = l as u8;
                f[3] = 0x68;
                let cs = f[4..4 + l].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                f[4 + l] = cs;
                f[5 + l] = 0x16;
                f.truncate(6 + l);
            }
            exercise(&f);
        }
    }
}
