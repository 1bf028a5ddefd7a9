//! Store tests: the sled store against a model, and the eviction rules.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::clock::{Clock, ManualClock, SharedClock};
use crate::reading::{Decimal, EventKind, Flags, Obis, Stamp};

pub(crate) fn reading(meter: &str, cadence: Cadence, value: i64, at_ms: i64) -> Reading {
    let at = Stamp {
        ms: at_ms,
        offset: 3600,
    };
    Reading {
        meter: meter.to_owned(),
        id_type: "name".to_owned(),
        series: Obis([1, 0, 1, 8, 0, 255]),
        value: Decimal::from_scaled(value.into(), -3).unwrap(),
        unit: "kWh".to_owned(),
        timestamp: at,
        read_at: at,
        cadence,
        flags: Flags::empty(),
    }
}

fn clock() -> Arc<ManualClock> {
    ManualClock::new("2026-11-21T10:00:00Z".parse().unwrap())
}

fn open(dir: &std::path::Path, config: &StoreConfig, clock: SharedClock) -> SledStore {
    // Reopening in the same process right after a drop: sled's background I/O threads can
    // hold the database file (and its lock) a moment longer than the dropped `Db`, so the
    // open fails with `StoreError::Locked` (sled: "could not acquire lock"; seen often on loaded CI machines and under
    // qemu). The agent itself opens the store once per process; only tests reopen it.
    let mut attempts = 0;
    loop {
        match SledStore::open(dir, config, clock.clone()) {
            Err(StoreError::Locked(_)) if attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
}

#[test]
fn appended_readings_should_be_taken_oldest_first_across_cadences() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &StoreConfig::default(), clock());
    let now = clock().now_ms();
    s.append(Append {
        readings: vec![
            reading("a", Cadence::Quarterly, 1, now),
            reading("a", Cadence::Daily, 2, now),
            reading("a", Cadence::Quarterly, 3, now),
        ],
        ..Append::default()
    })
    .unwrap();
    let got = s.take(Stream::Readings, 10).unwrap();
    let values: Vec<_> = got
        .iter()
        .map(|e| match &e.record {
            Record::Reading(r) => r.value.to_string(),
            Record::Event(_) => unreachable!(),
        })
        .collect();
    assert_eq!(values, ["0.001", "0.002", "0.003"]);
    assert!(got.windows(2).all(|w| w[0].id.seq + 1 == w[1].id.seq));
    assert!(s.take(Stream::Readings, 10).unwrap().is_empty());
}

#[test]
fn a_new_store_should_start_its_sequence_at_its_creation_time() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    let a = s
        .append(Append {
            readings: vec![reading("a", Cadence::Daily, 1, 0)],
            ..Append::default()
        })
        .unwrap();
    assert_eq!(a.seqs, vec![c.now_ms() as u64 * 1000]);
}

#[test]
fn reopening_should_keep_records_counters_and_boundaries_and_hand_out_unacked_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let seqs = {
        let s = open(dir.path(), &StoreConfig::default(), c.clone());
        let a = s
            .append(Append {
                readings: (0..5)
                    .map(|i| reading("m", Cadence::Hourly, i, c.now_ms()))
                    .collect(),
                marks: vec![Mark {
                    meter: "m".into(),
                    cadence: Cadence::Hourly,
                    boundary_ms: 42,
                }],
                ..Append::default()
            })
            .unwrap();
        let taken = s.take(Stream::Readings, 3).unwrap();
        s.ack(&[taken[0].id]).unwrap();
        a.seqs
    };
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    let st = s.stats().unwrap();
    assert_eq!(st.readings(), 4);
    assert_eq!(st.next_seq, seqs[4] + 1);
    assert!(st.last_drain_ms.is_some());
    assert_eq!(s.boundary("m", Cadence::Hourly).unwrap(), Some(42));
    let again: Vec<u64> = s
        .take(Stream::Readings, 10)
        .unwrap()
        .iter()
        .map(|e| e.id.seq)
        .collect();
    assert_eq!(again, seqs[1..].to_vec());
}

#[test]
fn a_full_store_should_evict_profile_readings_before_events_before_billing() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig {
        max_bytes: ByteSize(64 << 10),
        ..StoreConfig::default()
    };
    let s = open(dir.path(), &config, c.clone());
    let now = c.now_ms();
    // Billing readings first, so they are the oldest: age alone must not decide.
    for i in 0..100 {
        s.append(Append {
            readings: vec![reading("m", Cadence::Monthly, i, now)],
            ..Append::default()
        })
        .unwrap();
    }
    let mut evicted = 0;
    for i in 0..2000 {
        evicted += s
            .append(Append {
                readings: vec![reading("m", Cadence::Quarterly, i, now)],
                ..Append::default()
            })
            .unwrap()
            .evicted;
    }
    // Reports come from maintenance, all evictions in one event.
    assert_eq!(s.take(Stream::Events, 10).unwrap().len(), 0);
    s.maintain().unwrap();
    let st = s.stats().unwrap();
    assert!(evicted > 0);
    assert_eq!(st.evicted, evicted);
    // By class: only profile readings went (the metrics' amr_edge_evictions_total{class}).
    assert_eq!(st.evicted_by_class, [evicted, 0, 0]);
    assert_eq!(st.billing.count, 100, "billing readings must survive");
    assert!(st.bytes() <= config.max_bytes.0 + 1024, "{st:?}");
    // Every eviction was reported, and the reports add up.
    let events = s.take(Stream::Events, 10_000).unwrap();
    assert_eq!(events.len(), 1);
    let reported: u64 = events
        .iter()
        .filter_map(|e| match &e.record {
            Record::Event(ev) if ev.kind == EventKind::Eviction => ev
                .details
                .iter()
                .find(|(k, _)| k == "count")
                .map(|(_, v)| v.parse::<u64>().unwrap()),
            _ => None,
        })
        .sum();
    assert_eq!(reported, evicted);
    // The survivors are the newest quarterly readings.
    let readings = s.take(Stream::Readings, 10_000).unwrap();
    let last = readings.last().unwrap();
    match &last.record {
        Record::Reading(r) => assert_eq!(r.value.as_str(), "1.999"),
        Record::Event(_) => unreachable!(),
    }
}

#[test]
fn max_age_should_evict_old_records_but_not_unsynchronised_ones() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig::default();
    let s = open(dir.path(), &config, c.clone());
    let now = c.now_ms();
    let day = 86_400_000;
    let mut unsynced = reading("m", Cadence::Daily, 1, now - 200 * day);
    unsynced.flags.insert(Flags::CLOCK_UNSYNCED);
    // One poll, one append: as the bus worker writes them.
    for r in [
        reading("m", Cadence::Daily, 2, now - 100 * day),
        unsynced,
        reading("m", Cadence::Daily, 3, now - 10 * day),
    ] {
        s.append(Append {
            readings: vec![r],
            ..Append::default()
        })
        .unwrap();
    }
    assert_eq!(s.maintain().unwrap(), 1);
    let st = s.stats().unwrap();
    assert_eq!((st.billing.count, st.evicted), (2, 1));
}

#[test]
fn age_eviction_should_stop_at_a_young_chunk_that_also_holds_an_unsynchronised_reading() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    let now = c.now_ms();
    let day = 86_400_000;
    let mut unsynced = reading("m", Cadence::Daily, 1, now - 200 * day);
    unsynced.flags.insert(Flags::CLOCK_UNSYNCED);
    // A young chunk (with an unsynchronised reading in it), then one that says it is old:
    // the scan stops at the young one rather than reading the whole buffer on, so the old
    // one behind it waits for the size cap (as it would behind any young chunk).
    for readings in [
        vec![unsynced, reading("m", Cadence::Daily, 2, now - day)],
        vec![reading("m", Cadence::Daily, 3, now - 100 * day)],
    ] {
        s.append(Append {
            readings,
            ..Append::default()
        })
        .unwrap();
    }
    assert_eq!(s.maintain().unwrap(), 0);
    assert_eq!(s.stats().unwrap().billing.count, 3);
}

#[test]
fn an_undecodable_record_should_be_set_aside_and_reported_not_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    let mut seqs = Vec::new();
    for v in [1, 2] {
        let a = s
            .append(Append {
                readings: vec![reading("m", Cadence::Daily, v, c.now_ms())],
                ..Append::default()
            })
            .unwrap();
        seqs.extend(a.seqs);
    }
    // Scribble over the first poll's records as a bad sector would.
    scribble(&s, Range::Billing, seqs[0]);
    let got = s.take(Stream::Readings, 10).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id.seq, seqs[1]);
    let st = s.stats().unwrap();
    assert_eq!((st.set_aside, st.billing.count), (1, 1));
    let events = s.take(Stream::Events, 10).unwrap();
    assert!(matches!(&events[0].record, Record::Event(e) if e.kind == EventKind::StoreCorruption));
    // Reopening does not bring it back.
    drop(s);
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    assert_eq!(s.take(Stream::Readings, 10).unwrap().len(), 1);
}

/// Scribbles over the records of the chunk of `range` that starts at `first`, as a bad
/// sector would; its header (the record count) stays.
fn scribble(s: &SledStore, range: Range, first: u64) {
    let mut k = vec![b'r', range as u8];
    k.extend_from_slice(&first.to_be_bytes());
    let tree = s.tree().unwrap();
    let mut v = tree.get(&k).unwrap().expect("the chunk").to_vec();
    v.truncate(4);
    v.extend_from_slice(&[0xff, 0xff, 0xff]);
    tree.insert(k, v).unwrap();
}

#[test]
fn a_store_written_before_the_dense_chunk_format_should_hand_out_every_record_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig::default();
    let now = c.now_ms();
    let mut written = Vec::new();
    {
        let s = open(dir.path(), &config, c.clone());
        for round in 0..3 {
            let readings: Vec<Reading> = (0..4)
                .map(|i| reading(&format!("m{i}"), Cadence::Quarterly, round * 10 + i, now))
                .collect();
            let seqs = s
                .append(Append {
                    readings: readings.clone(),
                    ..Append::default()
                })
                .unwrap()
                .seqs;
            written.extend(seqs.into_iter().zip(readings));
        }
        // Each chunk rewritten as the store wrote them before: count, then postcard's
        // `[(offset, record)]`.
        let tree = s.tree().unwrap();
        for item in tree.scan_prefix([b'r', Range::Profile as u8]) {
            let (k, _) = item.unwrap();
            let first = u64::from_be_bytes(k[2..].try_into().unwrap());
            let body: Vec<(u32, Record)> = written
                .iter()
                .filter(|(seq, _)| *seq >= first && *seq < first + 4)
                .map(|(seq, r)| ((seq - first) as u32, Record::Reading(r.clone())))
                .collect();
            let mut v = (body.len() as u32).to_le_bytes().to_vec();
            v.extend(postcard::to_stdvec(&body).unwrap());
            tree.insert(k, v).unwrap();
        }
        s.flush().unwrap();
    }
    let s = open(dir.path(), &config, c.clone());
    let taken = s.take(Stream::Readings, 100).unwrap();
    let got: Vec<(u64, Record)> = taken.into_iter().map(|e| (e.id.seq, e.record)).collect();
    let want: Vec<(u64, Record)> = written
        .into_iter()
        .map(|(seq, r)| (seq, Record::Reading(r)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.stats().unwrap().set_aside, 0);
}

#[test]
fn a_chunk_damaged_while_its_records_wait_to_be_resent_should_be_set_aside_and_its_neighbours_resent()
 {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    // Three polls: three chunks of the same range, with consecutive sequence numbers.
    let mut firsts = Vec::new();
    for v in 0..3 {
        let a = s
            .append(Append {
                readings: (0..2)
                    .map(|i| reading("m", Cadence::Daily, v * 2 + i, c.now_ms()))
                    .collect(),
                ..Append::default()
            })
            .unwrap();
        firsts.push(a.seqs[0]);
    }
    // All sent, none confirmed (the broker went away): all to be sent again.
    let taken = s.take(Stream::Readings, 10).unwrap();
    assert_eq!(taken.len(), 6);
    s.nack(&taken.iter().map(|e| e.id).collect::<Vec<_>>());
    scribble(&s, Range::Billing, firsts[0]);
    // Taken again two at a time: the damaged chunk is met first (that take gives nothing),
    // the others wait meanwhile.
    let mut again = Vec::new();
    for _ in 0..4 {
        let got = s.take(Stream::Readings, 2).unwrap();
        again.extend(got.iter().map(|e| e.id.seq));
    }
    let neighbours: Vec<u64> = taken[2..].iter().map(|e| e.id.seq).collect();
    assert_eq!(
        again, neighbours,
        "the healthy chunks are sent again at once"
    );
    let st = s.stats().unwrap();
    assert_eq!((st.set_aside, st.billing.count), (2, 4), "{st:?}");
    let events = s.take(Stream::Events, 10).unwrap();
    assert!(
        matches!(&events[..], [e] if matches!(&e.record, Record::Event(ev) if ev.kind == EventKind::StoreCorruption)),
        "{events:?}"
    );
}

#[test]
fn a_second_open_of_the_same_dir_should_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path(), &StoreConfig::default(), clock());
    let e = SledStore::open(dir.path(), &StoreConfig::default(), clock())
        .err()
        .expect("a second open must fail");
    assert!(matches!(e, StoreError::Locked(_)), "{e}");
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

// ---- the model ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Append {
        profile: u8,
        billing: u8,
        events: u8,
    },
    Take {
        events: bool,
        max: usize,
    },
    Ack(Vec<prop::sample::Index>),
    Nack(Vec<prop::sample::Index>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, 0u8..2).prop_map(|(profile, billing, events)| Op::Append { profile, billing, events }),
        3 => (any::<bool>(), 1usize..8).prop_map(|(events, max)| Op::Take { events, max }),
        2 => prop::collection::vec(any::<prop::sample::Index>(), 0..5).prop_map(Op::Ack),
        1 => prop::collection::vec(any::<prop::sample::Index>(), 0..3).prop_map(Op::Nack),
        1 => Just(Op::Reopen),
    ]
}

/// What the store must do, written as plainly as possible.
#[derive(Default)]
struct Model {
    records: BTreeMap<u64, Record>,
    in_flight: BTreeSet<u64>,
}

impl Model {
    fn take(&mut self, stream: Stream, max: usize) -> Vec<u64> {
        let picked: Vec<u64> = self
            .records
            .iter()
            .filter(|(seq, r)| Range::of(r).stream() == stream && !self.in_flight.contains(seq))
            .take(max)
            .map(|(s, _)| *s)
            .collect();
        self.in_flight.extend(&picked);
        picked
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_should_agree_with_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let c = clock();
        let config = StoreConfig::default();
        let mut store = Some(open(dir.path(), &config, c.clone()));
        let mut model = Model::default();
        let mut taken: Vec<EntryId> = Vec::new();
        let mut n = 0i64;
        for op in ops {
            let s = store.as_ref().unwrap();
            match op {
                Op::Append { profile, billing, events } => {
                    let mut batch = Append::default();
                    for _ in 0..profile { n += 1; batch.readings.push(reading("p", Cadence::Quarterly, n, c.now_ms())); }
                    for _ in 0..billing { n += 1; batch.readings.push(reading("b", Cadence::Daily, n, c.now_ms())); }
                    for _ in 0..events {
                        n += 1;
                        batch.events.push(SystemEvent::new(EventKind::LinkError, Stamp { ms: c.now_ms(), offset: 0 }, format!("e{n}")));
                    }
                    let records: Vec<Record> = batch.readings.iter().cloned().map(Record::Reading)
                        .chain(batch.events.iter().cloned().map(Record::Event)).collect();
                    let a = s.append(batch).unwrap();
                    prop_assert_eq!(a.seqs.len(), records.len());
                    for (seq, r) in a.seqs.into_iter().zip(records) {
                        prop_assert!(model.records.keys().all(|k| *k < seq));
                        model.records.insert(seq, r);
                    }
                }
                Op::Take { events, max } => {
                    let stream = if events { Stream::Events } else { Stream::Readings };
                    let got = s.take(stream, max).unwrap();
                    let want = model.take(stream, max);
                    let got_seqs: Vec<u64> = got.iter().map(|e| e.id.seq).collect();
                    prop_assert_eq!(&got_seqs, &want);
                    for e in &got {
                        prop_assert_eq!(&e.record, &model.records[&e.id.seq]);
                    }
                    taken.extend(got.iter().map(|e| e.id));
                }
                Op::Ack(picks) | Op::Nack(picks) if taken.is_empty() => { let _ = picks; }
                Op::Ack(picks) => {
                    let ids: Vec<EntryId> = picks.iter().map(|i| taken[i.index(taken.len())]).collect();
                    s.ack(&ids).unwrap();
                    for id in &ids {
                        model.records.remove(&id.seq);
                        model.in_flight.remove(&id.seq);
                    }
                    taken.retain(|t| !ids.contains(t));
                }
                Op::Nack(picks) => {
                    let ids: Vec<EntryId> = picks.iter().map(|i| taken[i.index(taken.len())]).collect();
                    s.nack(&ids);
                    for id in &ids { model.in_flight.remove(&id.seq); }
                    taken.retain(|t| !ids.contains(t));
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(open(dir.path(), &config, c.clone()));
                    model.in_flight.clear();
                    taken.clear();
                }
            }
            let st = store.as_ref().unwrap().stats().unwrap();
            let count = |stream| model.records.values().filter(|r| Range::of(r).stream() == stream).count() as u64;
            prop_assert_eq!(st.readings(), count(Stream::Readings));
            prop_assert_eq!(st.events.count, count(Stream::Events));
        }
    }
}

#[test]
fn a_store_whose_files_lost_their_tail_should_say_so_and_not_reuse_ids() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let mut last = 0;
    {
        let s = open(dir.path(), &StoreConfig::default(), c.clone());
        for i in 0..200 {
            let a = s
                .append(Append {
                    readings: (0..50)
                        .map(|j| reading("m", Cadence::Daily, i * 50 + j, c.now_ms()))
                        .collect(),
                    ..Append::default()
                })
                .unwrap();
            last = *a.seqs.last().unwrap();
        }
        s.flush().unwrap();
    }
    let db = dir.path().join("store/db");
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 3]).unwrap();
    let s = open(dir.path(), &StoreConfig::default(), c.clone());
    assert!(s.stats().unwrap().readings() < 10_000, "the tail is gone");
    let events = s.take(Stream::Events, 10).unwrap();
    assert!(
        events.iter().any(
            |e| matches!(&e.record, Record::Event(ev) if ev.kind == EventKind::StoreCorruption)
        ),
        "{events:?}"
    );
    let a = s
        .append(Append {
            readings: vec![reading("m", Cadence::Daily, 1, c.now_ms())],
            ..Append::default()
        })
        .unwrap();
    assert!(
        a.seqs[0] > last,
        "ids handed out before are never handed out again"
    );
}

#[test]
fn both_stores_should_know_each_meters_last_read_and_last_failure_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let now = clock().now_ms();
    let mut failure = SystemEvent::new(
        EventKind::LinkError,
        Stamp {
            ms: now + 5,
            offset: 0,
        },
        "serial line: no such device",
    );
    failure.meter = Some("b".into());
    let batch = || Append {
        readings: vec![reading("a", Cadence::Daily, 1, now)],
        events: vec![failure.clone()],
        ..Default::default()
    };
    let want = vec![
        MeterState {
            meter: "a".into(),
            last_read_ms: Some(now),
            last_failure: None,
        },
        MeterState {
            meter: "b".into(),
            last_read_ms: None,
            last_failure: Some(LastFailure {
                at_ms: now + 5,
                kind: EventKind::LinkError,
                message: "serial line: no such device".into(),
            }),
        },
    ];
    {
        let s = open(dir.path(), &StoreConfig::default(), clock());
        s.append(batch()).unwrap();
        assert_eq!(s.meters().unwrap(), want);
    }
    let s = open(dir.path(), &StoreConfig::default(), clock());
    assert_eq!(s.meters().unwrap(), want, "after a reopen");
    let m = MemoryStore::default();
    m.append(batch()).unwrap();
    assert_eq!(m.meters().unwrap(), want, "the memory store");
}

#[test]
fn both_stores_should_keep_a_profiles_high_water_mark_and_row_count_with_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig::default();
    let profile = Obis([1, 0, 99, 1, 0, 255]);
    let batch = |last_ms: i64, rows: u64| Append {
        readings: vec![reading("m1", Cadence::Quarterly, 1, last_ms)],
        profile_marks: vec![ProfileMark {
            meter: "m1".into(),
            profile,
            last_ms,
            rows,
        }],
        ..Append::default()
    };
    let memory = MemoryStore::new();
    {
        let sled = open(dir.path(), &config, c.clone());
        for s in [&sled as &dyn Store, &memory] {
            assert_eq!(s.profile_mark("m1", &profile).unwrap(), None);
            s.append(batch(1_000, 4)).unwrap();
            s.append(batch(2_000, 3)).unwrap();
            assert_eq!(s.profile_mark("m1", &profile).unwrap(), Some(2_000));
            assert_eq!(s.profile_mark("m2", &profile).unwrap(), None);
        }
    }
    let sled = open(dir.path(), &config, c);
    for s in [&sled as &dyn Store, &memory] {
        assert_eq!(s.profile_mark("m1", &profile).unwrap(), Some(2_000));
        assert_eq!(
            s.profiles().unwrap(),
            vec![ProfileState {
                meter: "m1".into(),
                profile,
                last_ms: 2_000,
                rows: 7,
            }]
        );
    }
}

#[test]
fn concurrent_appends_should_share_fsyncs_and_each_get_its_own_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig {
        group_commit: HumanDuration::from_millis(20),
        ..StoreConfig::default()
    };
    let s = Arc::new(open(dir.path(), &config, c.clone()));
    let now = c.now_ms();
    // Eight buses, each appending one poll's batch at the same moment, several times.
    let threads: Vec<_> = (0..8)
        .map(|bus| {
            let s = s.clone();
            std::thread::spawn(move || {
                let meter = format!("m{bus}");
                let mut mine = Vec::new();
                for round in 0..5 {
                    let batch = Append {
                        readings: (0..=bus)
                            .map(|i| reading(&meter, Cadence::Quarterly, round * 10 + i, now))
                            .collect(),
                        events: vec![
                            SystemEvent::new(
                                EventKind::Overrun,
                                Stamp { ms: now, offset: 0 },
                                format!("{meter} {round}"),
                            )
                            .meter(meter.clone()),
                        ],
                        marks: vec![Mark {
                            meter: meter.clone(),
                            cadence: Cadence::Quarterly,
                            boundary_ms: now + round,
                        }],
                        profile_marks: vec![ProfileMark {
                            meter: meter.clone(),
                            profile: Obis([1, 0, 99, 1, 0, 255]),
                            last_ms: now + round,
                            rows: 2,
                        }],
                    };
                    let a = s.append(batch).unwrap();
                    assert_eq!(a.seqs.len(), bus as usize + 2);
                    mine.push(a.seqs);
                }
                (meter, mine)
            })
        })
        .collect();
    let mut owner: BTreeMap<u64, (String, bool)> = BTreeMap::new();
    for t in threads {
        let (meter, mine) = t.join().unwrap();
        for seqs in mine {
            let (events, readings) = seqs.split_last().unwrap();
            for seq in readings {
                assert!(owner.insert(*seq, (meter.clone(), true)).is_none());
            }
            assert!(owner.insert(*events, (meter.clone(), false)).is_none());
        }
    }
    // Every record is where its caller was told, with its caller's data.
    let readings = s.take(Stream::Readings, 1000).unwrap();
    let events = s.take(Stream::Events, 1000).unwrap();
    assert_eq!(readings.len() + events.len(), owner.len());
    for e in readings.iter().chain(&events) {
        let (meter, is_reading) = &owner[&e.id.seq];
        match &e.record {
            Record::Reading(r) => assert!(*is_reading && &r.meter == meter),
            Record::Event(ev) => assert!(!is_reading && ev.meter.as_ref() == Some(meter)),
        }
    }
    for bus in 0..8 {
        assert_eq!(
            s.boundary(&format!("m{bus}"), Cadence::Quarterly).unwrap(),
            Some(now + 4)
        );
    }
    for p in s.profiles().unwrap() {
        assert_eq!((p.last_ms, p.rows), (now + 4, 10), "{}", p.meter);
    }
    let (appends, batches) = s.group_commits();
    assert_eq!(appends, 40);
    assert!(batches < 40, "40 concurrent appends took {batches} batches");
}

#[test]
fn appends_awaited_on_one_blocking_thread_should_still_share_fsyncs() {
    // One blocking thread in all: if waiting for a group took a thread, the appends could
    // only be written one after the other, one fsync each.
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let config = StoreConfig {
        group_commit: HumanDuration::from_millis(20),
        ..StoreConfig::default()
    };
    let s: Arc<SledStore> = Arc::new(open(dir.path(), &config, c.clone()));
    let now = c.now_ms();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..100)
            .map(|m| {
                let s = s.clone();
                tokio::spawn(async move {
                    let meter = format!("m{m}");
                    let batch = Append {
                        readings: vec![reading(&meter, Cadence::Quarterly, m, now)],
                        marks: vec![Mark {
                            meter: meter.clone(),
                            cadence: Cadence::Quarterly,
                            boundary_ms: now,
                        }],
                        ..Append::default()
                    };
                    (meter, s.append_async(batch.into()).await)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mut owner = BTreeMap::new();
    for (meter, r) in results {
        let seqs = r.unwrap().seqs;
        assert_eq!(seqs.len(), 1);
        assert!(owner.insert(seqs[0], meter.clone()).is_none());
        assert_eq!(s.boundary(&meter, Cadence::Quarterly).unwrap(), Some(now));
    }
    let taken = s.take(Stream::Readings, 1000).unwrap();
    assert_eq!(taken.len(), 100);
    for e in &taken {
        match &e.record {
            Record::Reading(r) => assert_eq!(r.meter, owner[&e.id.seq]),
            Record::Event(_) => panic!("no events were appended"),
        }
    }
    let (appends, batches) = s.group_commits();
    assert_eq!(appends, 100);
    assert!(batches < 100, "100 appends took {batches} batches");
}

#[test]
fn group_commit_should_be_bounded_in_the_config() {
    let mut p = Problems::default();
    let config = StoreConfig {
        group_commit: HumanDuration::from_millis(101),
        ..StoreConfig::default()
    };
    config.validate("store", &mut p);
    assert!(format!("{p:?}").contains("group_commit"), "{p:?}");
    let mut p = Problems::default();
    StoreConfig {
        group_commit: HumanDuration::from_millis(0),
        ..StoreConfig::default()
    }
    .validate("store", &mut p);
    assert!(p.0.is_empty(), "{p:?}");
}

#[test]
fn appended_should_split_into_each_callers_own_records() {
    // Three callers: (2 readings, 1 event), (0, 2), (1, 0); the merged seqs are the three
    // readings, then the three events.
    let merged = Appended {
        seqs: vec![10, 11, 12, 13, 14, 15],
        evicted: 4,
    };
    let parts = merged.split(&[(2, 1), (0, 2), (1, 0)]);
    assert_eq!(parts[0].seqs, vec![10, 11, 13]);
    assert_eq!(parts[1].seqs, vec![14, 15]);
    assert_eq!(parts[2].seqs, vec![12]);
    assert_eq!(
        parts.iter().map(|p| p.evicted).collect::<Vec<_>>(),
        vec![4, 0, 0]
    );
}

#[test]
fn a_merged_batch_should_count_a_profiles_rows_from_both_parts_and_keep_the_later_mark() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &StoreConfig::default(), clock());
    let profile = Obis([1, 0, 99, 1, 0, 255]);
    let mark = |last_ms, rows| Append {
        profile_marks: vec![ProfileMark {
            meter: "m1".into(),
            profile,
            last_ms,
            rows,
        }],
        ..Append::default()
    };
    s.append(mark(1_000, 3)).unwrap();
    // What group commit does with two appends of the same profile: one batch.
    let mut merged = mark(2_000, 4);
    merged.extend(mark(3_000, 5));
    s.append(merged).unwrap();
    assert_eq!(s.profile_mark("m1", &profile).unwrap(), Some(3_000));
    assert_eq!(s.profiles().unwrap()[0].rows, 12);
}
