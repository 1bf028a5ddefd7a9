//! [`Store`] in memory: the fake that orchestration tests (drain, bus workers, beat, control)
//! run against. Same ordering and acknowledgement semantics as the real store; no disk, no
//! caps, and a switch to make writes fail.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{
    Append, Appended, COMMAND_TTL_MS, CommandLog, CommandRecord, Depth, Entry, EntryId,
    LastFailure, MeterState, ProfileState, Range, Record, Stats, Store, StoreError, Stream,
    encoded_len,
};
use crate::reading::{Cadence, Obis};

#[derive(Default)]
struct Inner {
    next_seq: u64,
    records: BTreeMap<EntryId, Record>,
    taken: BTreeSet<EntryId>,
    marks: HashMap<(String, Cadence), i64>,
    profiles: BTreeMap<(String, Obis), (i64, u64)>,
    last_read: BTreeMap<String, i64>,
    last_failure: BTreeMap<String, LastFailure>,
    last_drain_ms: Option<i64>,
    seen: std::collections::HashSet<String>,
    commands: BTreeMap<String, CommandRecord>,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    fail_writes: AtomicBool,
    fail_reads: AtomicBool,
    takes: AtomicUsize,
}

impl MemoryStore {
    pub fn new() -> Self {
        let s = MemoryStore::default();
        s.lock().next_seq = 1;
        s
    }

    /// Makes every following write fail as a full disk would, until switched off.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Makes every following `take` fail as a damaged disk would, until switched off.
    pub fn fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// How many times `take` was called (for tests of how often the drain asks).
    pub fn takes(&self) -> usize {
        self.takes.load(Ordering::SeqCst)
    }

    /// Everything buffered, oldest first (for assertions).
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "No space left on device (simulated)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Store for MemoryStore {
    fn append(&self, batch: Append) -> Result<Appended, StoreError> {
        self.check()?;
        let mut s = self.lock();
        let mut seqs = Vec::new();
        for r in &batch.readings {
            let e = s.last_read.entry(r.meter.clone()).or_insert(r.read_at.ms);
            *e = (*e).max(r.read_at.ms);
        }
        for e in &batch.events {
            if let Some(meter) = &e.meter {
                s.last_failure.insert(meter.clone(), LastFailure::of(e));
            }
        }
        let records = batch
            .readings
            .into_iter()
            .map(Record::Reading)
            .chain(batch.events.into_iter().map(Record::Event));
        for record in records {
            let seq = s.next_seq;
            s.next_seq += 1;
            s.records.insert(
                EntryId {
                    seq,
                    range: Range::of(&record),
                },
                record,
            );
            seqs.push(seq);
        }
        for m in batch.marks {
            s.marks.insert((m.meter, m.cadence), m.boundary_ms);
        }
        for m in batch.profile_marks {
            let e = s.profiles.entry((m.meter, m.profile)).or_insert((0, 0));
            *e = (m.last_ms, e.1 + m.rows);
        }
        Ok(Appended { seqs, evicted: 0 })
    }

    fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
        self.takes.fetch_add(1, Ordering::SeqCst);
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "Input/output error (simulated)".into(),
            ));
        }
        let mut s = self.lock();
        let picked: Vec<Entry> = s
            .records
            .iter()
            .filter(|(id, _)| id.range.stream() == stream && !s.taken.contains(id))
            .take(max)
            .map(|(id, r)| Entry {
                id: *id,
                record: r.clone(),
            })
            .collect();
        for e in &picked {
            s.taken.insert(e.id);
        }
        // Records are keyed by (seq, range) and seqs are unique, so this is oldest first.
        Ok(picked)
    }

    fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        self.check()?;
        let mut s = self.lock();
        for id in ids {
            s.records.remove(id);
            s.taken.remove(id);
        }
        s.last_drain_ms = Some(jiff::Timestamp::now().as_millisecond());
        Ok(())
    }

    fn nack(&self, ids: &[EntryId]) {
        let mut s = self.lock();
        for id in ids {
            s.taken.remove(id);
        }
    }

    fn stats(&self) -> Result<Stats, StoreError> {
        let s = self.lock();
        let mut depth = [Depth::default(); 3];
        for (id, r) in &s.records {
            let d = &mut depth[id.range as usize];
            d.count += 1;
            d.bytes += encoded_len(r) as u64 + 10;
        }
        Ok(Stats {
            profile: depth[0],
            events: depth[1],
            billing: depth[2],
            oldest_ms: s.records.values().map(Record::at_ms).min(),
            last_drain_ms: s.last_drain_ms,
            next_seq: s.next_seq,
            ..Stats::default()
        })
    }

    fn boundary(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError> {
        Ok(self.lock().marks.get(&(meter.to_owned(), cadence)).copied())
    }

    fn profile_mark(&self, meter: &str, profile: &Obis) -> Result<Option<i64>, StoreError> {
        let s = self.lock();
        Ok(s.profiles.get(&(meter.to_owned(), *profile)).map(|p| p.0))
    }

    fn profiles(&self) -> Result<Vec<ProfileState>, StoreError> {
        let s = self.lock();
        Ok(s.profiles
            .iter()
            .map(|((meter, profile), (last_ms, rows))| ProfileState {
                meter: meter.clone(),
                profile: *profile,
                last_ms: *last_ms,
                rows: *rows,
            })
            .collect())
    }

    fn meters(&self) -> Result<Vec<MeterState>, StoreError> {
        let s = self.lock();
        let mut by_meter: BTreeMap<&str, MeterState> = BTreeMap::new();
        for (m, ms) in &s.last_read {
            by_meter.entry(m).or_default().last_read_ms = Some(*ms);
        }
        for (m, f) in &s.last_failure {
            by_meter.entry(m).or_default().last_failure = Some(f.clone());
        }
        Ok(by_meter
            .into_iter()
            .map(|(m, mut state)| {
                state.meter = m.to_owned();
                state
            })
            .collect())
    }

    fn maintain(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.check()
    }

    fn first_time(&self, key: &str) -> Result<bool, StoreError> {
        self.check()?;
        Ok(self.lock().seen.insert(key.to_owned()))
    }
}

impl CommandLog for MemoryStore {
    fn accept_command(&self, record: &CommandRecord) -> Result<Option<CommandRecord>, StoreError> {
        self.check()?;
        let mut s = self.lock();
        let cutoff = record.accepted_ms - COMMAND_TTL_MS;
        s.commands.retain(|_, c| c.accepted_ms >= cutoff);
        if let Some(kept) = s.commands.get(&record.request_id) {
            return Ok(Some(kept.clone()));
        }
        s.commands.insert(record.request_id.clone(), record.clone());
        Ok(None)
    }

    fn finish_command(&self, request_id: &str, outcome: &str) -> Result<(), StoreError> {
        self.check()?;
        if let Some(c) = self.lock().commands.get_mut(request_id) {
            c.outcome = Some(outcome.to_owned());
        }
        Ok(())
    }

    fn forget_command(&self, request_id: &str) -> Result<(), StoreError> {
        self.check()?;
        self.lock().commands.remove(request_id);
        Ok(())
    }

    fn unfinished_commands(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        let mut s = self.lock();
        s.commands
            .retain(|_, c| c.accepted_ms >= now_ms - COMMAND_TTL_MS);
        let mut open: Vec<CommandRecord> = s
            .commands
            .values()
            .filter(|c| c.outcome.is_none())
            .cloned()
            .collect();
        open.sort_by_key(|c| c.accepted_ms);
        Ok(open)
    }
}
