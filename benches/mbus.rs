//! M-Bus figures (`benches/run.sh mbus`): decoding throughput of real long frames; frames and
//! bytes on the wire to read one meter against the protocol minimum; a secondary-address
//! search of a simulated 250-meter segment, in CPU time and in bus time at 2400 Bd.
//! Prints figures; asserts nothing about time.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use amr_edge::meter::mbus::app::{self, Value};
use amr_edge::meter::mbus::link;
use amr_edge::meter::mbus::master::{Read, ReadConfig, Step};
use amr_edge::meter::mbus::scan::{Mode, Scan, ScanConfig, ScanStep};
use amr_edge::meter::mbus::{SecondaryMask, Timing, series};
use amr_edge::sim::mbus::Segment;

fn real_frames() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/mbus-frames/test-frames");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("../shared/mbus-frames/test-frames") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "hex") {
            let t = std::fs::read_to_string(&p).unwrap();
            let b: Vec<u8> = t
                .split_whitespace()
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect();
            if b.len() > 60 {
                out.push(b);
            }
        }
    }
    out
}

fn throughput(frames: &[Vec<u8>], what: &str, f: impl Fn(&[u8]) -> usize) {
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let mut n = 0usize;
    let start = Instant::now();
    let mut sink = 0usize;
    while start.elapsed() < Duration::from_secs(2) {
        for fr in frames {
            sink += f(fr);
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(sink);
    println!(
        "{:<58} {:.1} MB/s",
        format!("decoding {} real long frames: {what}", frames.len()),
        (bytes * n) as f64 / secs / 1e6
    );
}

/// Drives a read against the segment; returns (frames, bytes) each way.
fn read_wire(seg: &mut Segment, config: ReadConfig) -> (u32, u32, u32, u32) {
    let mut read = Read::new(config);
    let mut step = read.start();
    loop {
        match step {
            Step::Done(r) => {
                let w = r.expect("read").wire;
                return (
                    w.frames_sent,
                    w.bytes_sent,
                    w.frames_received,
                    w.bytes_received,
                );
            }
            Step::Send { bytes, .. } => {
                step = match seg.handle(&bytes) {
                    Some(a) => read.received(&a).unwrap_or_else(|| read.silence()),
                    None => read.silence(),
                }
            }
        }
    }
}

fn main() {
    println!();
    let frames = real_frames();
    throughput(&frames, "frame + records", |f| match app::decode(f) {
        Ok(t) => t.records().map(|r| r.data.len()).sum(),
        Err(_) => 0,
    });
    throughput(&frames, "+ values", |f| match app::decode(f) {
        Ok(t) => t
            .records()
            .map(|r| match r.value() {
                Value::Number(n) => n.mantissa as usize,
                _ => 1,
            })
            .sum(),
        Err(_) => 0,
    });
    throughput(&frames, "+ decimals and series", |f| match app::decode(f) {
        Ok(t) => series::values([t], &series::Overrides::default()).len(),
        Err(_) => 0,
    });

    // One meter: ours against the minimum (one REQ_UD2 per telegram and its RSP_UD; the
    // SND_NKE or selection that makes the FCB sequence well defined is ours on top).
    let mut seg = Segment::demo();
    for (name, config, telegrams, secondary) in [
        (
            "heat meter, primary",
            ReadConfig::primary(1, 2400),
            1,
            false,
        ),
        (
            "electricity meter, 3 telegrams, primary",
            ReadConfig::primary(3, 2400),
            3,
            false,
        ),
        (
            "water meter, secondary",
            ReadConfig::secondary(SecondaryMask::parse("23456789").unwrap(), 2400),
            1,
            true,
        ),
    ] {
        let slave = match name.split(',').next() {
            Some("heat meter") => 0,
            Some("water meter") => 1,
            _ => 2,
        };
        let rsp: usize = (0..telegrams)
            .map(|i| seg.slaves[slave].rsp_ud(i).len())
            .sum();
        let (fs, bs, fr, br) = read_wire(&mut seg, config);
        // Minimum: REQ_UD2 (5 bytes) per telegram and the answers; secondary adds the
        // selection (17 bytes) and its E5, which cannot be avoided.
        let (min_frames, min_bytes) = if secondary {
            (2 * telegrams + 2, telegrams * 5 + rsp + 17 + 1)
        } else {
            (2 * telegrams, telegrams * 5 + rsp)
        };
        println!(
            "{:<58} {} frames / {} bytes (minimum {} / {})",
            format!("read one meter: {name}"),
            fs + fr,
            bs + br,
            min_frames,
            min_bytes
        );
    }

    // Secondary search of 250 meters.
    let timing = Timing::new(2400);
    let mut seg = Segment::many(250, 42);
    let start = Instant::now();
    let mut scan = Scan::new(ScanConfig {
        mode: Mode::Secondary {
            start: SecondaryMask::ANY,
        },
        timing,
        retries: 0,
    });
    let mut bus = Duration::ZERO;
    let mut step = scan.start();
    let report = loop {
        match step {
            ScanStep::Done(r) => break r,
            ScanStep::Send { bytes, pause, .. } => {
                bus += pause + link::wire_time(bytes.len(), timing.baud);
                match seg.handle(&bytes) {
                    Some(a) => {
                        // Reaction (11 bit times), the answer, and the gap that ends it.
                        bus += link::bit_time(11, timing.baud)
                            + link::wire_time(a.len(), timing.baud)
                            + timing.gap;
                        let _ = scan.received(&a);
                    }
                    None => bus += timing.answer_window(),
                }
                step = scan.silence();
            }
        }
    };
    let cpu = start.elapsed();
    println!(
        "{:<58} {} found, {} selections, {:.1} ms CPU, {:.0} s on the bus",
        "secondary search, 250 simulated meters, 2400 Bd",
        report.meters.len(),
        report.probes,
        cpu.as_secs_f64() * 1e3,
        bus.as_secs_f64()
    );
}
