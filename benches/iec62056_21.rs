//! IEC 62056-21 benchmarks.
//!
//! * `iec62056_21/parse/*`: the sans-IO parser on a realistic 4 KiB readout (a meter with
//!   tariff, billing-period and reactive registers): the frame decoder alone, decoder and
//!   data-set parser, and all the way to mapped values. Throughput in bytes of the data message.
//! * `iec62056_21/readout_300_9600_wire_time`: one meter signed on at 300 Bd and read at
//!   9600 Bd through the real driver on a pseudo-terminal, against the simulated meter taking the
//!   real time of the line (10 bits per character at the current rate, its 200 ms reaction time).
//!   The protocol's own minimum for that exchange is computed and printed beside it, so the
//!   difference is what the agent adds.
//!
//! Run with `benches/run.sh iec62056_21` (or `cargo bench --bench iec62056_21`).

use std::time::{Duration, Instant};

use amr_edge::meter::Selection;
use amr_edge::meter::Timing;
use amr_edge::meter::iec62056_21::codec::{self, Decoder, Frame};
use amr_edge::meter::iec62056_21::{IecMeterConfig, dataset, mapping, read_line};
use amr_edge::sim::iec::{SimBus, SimMeter, large_readout, spawn_pty};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::tz::TimeZone;

const READOUT_BYTES: usize = 4096;

fn readout_message() -> Vec<u8> {
    let text = dataset::write_readout(&large_readout(READOUT_BYTES));
    codec::data_message(text.as_bytes())
}

fn parse(c: &mut Criterion) {
    let message = readout_message();
    let mut g = c.benchmark_group("iec62056_21/parse");
    g.throughput(Throughput::Bytes(message.len() as u64));
    g.bench_function("decode_4KiB", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            let frames = d.feed(std::hint::black_box(&message));
            assert_eq!(frames.len(), 1);
            frames
        })
    });
    g.bench_function("decode_and_parse_4KiB", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            match d.feed(std::hint::black_box(&message)).pop() {
                Some(Ok(Frame::Data { text, .. })) => {
                    dataset::parse_readout(&text).unwrap_or_default()
                }
                _ => Vec::new(),
            }
        })
    });
    let tz = TimeZone::get("Europe/Stockholm").unwrap_or(TimeZone::UTC);
    g.bench_function("decode_parse_and_map_4KiB", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            match d.feed(std::hint::black_box(&message)).pop() {
                Some(Ok(Frame::Data { text, .. })) => {
                    let sets = dataset::parse_readout(&text).unwrap_or_default();
                    mapping::values(&sets, [1, 0], &Selection::All, &tz).values
                }
                _ => Vec::new(),
            }
        })
    });
    g.finish();
}

/// The time the exchange needs on the wire and in the reaction times the standard prescribes,
/// for a meter with reaction time `tr` and an identification of `ident_len` characters.
fn protocol_minimum(ident_len: usize, message_len: usize, tr: Duration) -> (Duration, Vec<String>) {
    let steps = [
        ("request /?!CRLF at 300 Bd", codec::wire_time(5, 300)),
        ("meter's reaction time tr", tr),
        ("identification at 300 Bd", codec::wire_time(ident_len, 300)),
        ("agent's reaction time tr", tr),
        (
            "option select ACK050CRLF at 300 Bd",
            codec::wire_time(6, 300),
        ),
        ("meter's reaction time tr", tr),
        (
            "data message at 9600 Bd",
            codec::wire_time(message_len, 9600),
        ),
        ("agent's reaction time tr before the break", tr),
    ];
    let total = steps.iter().map(|(_, d)| *d).sum();
    let lines = steps
        .iter()
        .map(|(what, d)| format!("  {:>9.3} ms  {what}", d.as_secs_f64() * 1000.0))
        .collect();
    (total, lines)
}

fn readout_on_the_wire(c: &mut Criterion) {
    let message_len = readout_message().len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bus = SimBus::new();
    let mut meter = SimMeter::landis_gyr(None, "61234567");
    // The large readout carries its own clock lines.
    meter.sets = large_readout(READOUT_BYTES);
    meter.clock = None;
    let sent =
        codec::data_message(meter.readout_text(jiff::Timestamp::now(), 0.0).as_bytes()).len();
    assert_eq!(sent, message_len);
    let ident_len = codec::identification(&meter.identification).len();
    let tr = meter.reaction;
    bus.add(meter);
    bus.set_wire_time(true);
    let pty = spawn_pty(bus).expect("pty");
    let config: IecMeterConfig = toml::from_str("max_baud = 9600").expect("config");
    let config = config
        .resolve("bench", &TimeZone::UTC, &mut Default::default())
        .expect("resolves");
    let timing = Timing {
        timeout: Duration::from_secs(2),
        retries: 0,
        ..Timing::default()
    };
    let mut port = rt.block_on(async {
        amr_edge::meter::link::open_serial(
            &toml::from_str(&format!("device = \"{}\"", pty.path().display())).expect("serial"),
            amr_edge::meter::link::Framing::IEC_SIGN_ON,
        )
        .expect("open pty")
    });

    let (minimum, lines) = protocol_minimum(ident_len, sent, tr);
    eprintln!("\nIEC 62056-21, one meter, 300 -> 9600 Bd, data message of {sent} bytes:");
    for l in &lines {
        eprintln!("{l}");
    }
    eprintln!(
        "  {:>9.3} ms  protocol minimum (the break's 5 characters at 9600 Bd, 5.2 ms, follow; a pty does not make the agent wait for them)\n",
        minimum.as_secs_f64() * 1000.0
    );

    let mut g = c.benchmark_group("iec62056_21");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(75));
    g.warm_up_time(Duration::from_secs(1));
    let mut worst_overhead = Duration::ZERO;
    let mut best = Duration::MAX;
    g.bench_function("readout_300_9600_wire_time", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let out =
                        read_line(&mut port, "bench", &config, &Selection::All, &timing).await;
                    let took = start.elapsed();
                    assert!(out.failure.is_none(), "{:?}", out.failure);
                    assert!(out.refused.is_empty(), "{:?}", out.refused);
                    worst_overhead = worst_overhead.max(took.saturating_sub(minimum));
                    best = best.min(took);
                    total += took;
                }
                total
            })
        })
    });
    g.finish();
    eprintln!(
        "readout_300_9600_wire_time: fastest {:.1} ms = protocol minimum + {:.1} ms; slowest + {:.1} ms\n",
        best.as_secs_f64() * 1000.0,
        best.saturating_sub(minimum).as_secs_f64() * 1000.0,
        worst_overhead.as_secs_f64() * 1000.0
    );
    drop(pty);
}

criterion_group!(benches, parse, readout_on_the_wire);
criterion_main!(benches);
