//! [`Store`] on sled: one tree, keys laid out so every question is a short range scan.
//!
//! | key | value |
//! |---|---|
//! | `r` range seq(8, big-endian) | a record, postcard |
//! | `m` | [`Meta`]: counters, next sequence number |
//! | `b` meter `\0` cadence | last boundary read, Unix ms (8, big-endian) |
//! | `l` meter | last reading stored, Unix ms |
//! | `f` meter | last failure: (Unix ms, kind, message), postcard |
//!
//! Records that cannot be decoded are moved to a second tree, `aside`, and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sled::{Batch, IVec, Tree};

use super::{
    Append, Appended, Depth, Entry, EntryId, MeterState, Range, Record, Stats, Store, StoreConfig,
    StoreError, Stream, decode, encode, initial_sequence,
};
use crate::clock::SharedClock;
use crate::reading::{Cadence, EventKind, Flags, Stamp, SystemEvent};

const META: &[u8] = b"m";
const FORMAT: u8 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    format: u8,
    next_seq: u64,
    depth: [Depth; 3],
    evicted: u64,
    set_aside: u64,
    last_drain_ms: Option<i64>,
    /// Evictions not yet reported in a system event.
    unreported: Unreported,
}

/// Evictions since the last eviction event. Reported by [`Store::maintain`], once a minute at
/// most: an event per eviction would itself fill the store that is evicting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Unreported {
    per_range: [u64; 3],
    first_seq: Option<u64>,
    last_seq: u64,
    by_size: u64,
    by_age: u64,
}

#[derive(Debug, Default)]
struct State {
    meta: Meta,
    /// Highest sequence number whose append has been fsynced.
    durable: u64,
    /// Per range, the last sequence number handed out by `take`.
    cursor: [u64; 3],
    /// Taken, then not delivered: handed out again first.
    retry: BTreeSet<EntryId>,
}

impl State {
    /// Everything up to `seq` has been applied and fsynced: `take` may hand it out.
    fn durable_through(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }
}

pub struct SledStore {
    db: sled::Db,
    pub(super) tree: Tree,
    aside: Tree,
    config: StoreConfig,
    clock: SharedClock,
    state: Mutex<State>,
    path: PathBuf,
}

fn rkey(range: Range, seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = b'r';
    k[1] = range as u8;
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn range_of_key(k: &[u8]) -> Option<EntryId> {
    if k.len() != 10 || k[0] != b'r' {
        return None;
    }
    let range = match k[1] {
        0 => Range::Profile,
        1 => Range::Events,
        2 => Range::Billing,
        _ => return None,
    };
    let seq = u64::from_be_bytes(k[2..].try_into().ok()?);
    Some(EntryId { seq, range })
}

fn mark_key(meter: &str, cadence: Cadence) -> Vec<u8> {
    let mut k = Vec::with_capacity(meter.len() + 12);
    k.push(b'b');
    k.extend_from_slice(meter.as_bytes());
    k.push(0);
    k.extend_from_slice(cadence.as_str().as_bytes());
    k
}

fn meter_key(tag: u8, meter: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(meter.len() + 1);
    k.push(tag);
    k.extend_from_slice(meter.as_bytes());
    k
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What an eviction pass removed, for its system event.
#[derive(Default)]
struct Evicted {
    per_range: [u64; 3],
    first_seq: Option<u64>,
    last_seq: u64,
    /// Victims and the size of their values.
    keys: BTreeMap<EntryId, usize>,
}

impl Evicted {
    fn count(&self) -> u64 {
        self.per_range.iter().sum()
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, config: &StoreConfig, clock: SharedClock) -> Result<Self, StoreError> {
        let path = dir.join("store");
        let open_err = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache.0)
            .flush_every_ms(Some(config.ack_flush.0.as_millis().max(1) as u64))
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| open_err(e.to_string()))?;
        let tree = db
            .open_tree("buffer")
            .map_err(|e| open_err(e.to_string()))?;
        let aside = db.open_tree("aside").map_err(|e| open_err(e.to_string()))?;
        let meta = match tree.get(META).map_err(|e| open_err(e.to_string()))? {
            Some(v) => match postcard::from_bytes::<Meta>(&v) {
                Ok(m) if m.format == FORMAT => Some(m),
                Ok(m) => {
                    return Err(open_err(format!(
                        "store format {} is not format {FORMAT}: written by another version",
                        m.format
                    )));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Store counters unreadable, recounting");
                    None
                }
            },
            None => None,
        };
        let meta = match meta {
            Some(m) => m,
            None if tree.is_empty() => Meta {
                format: FORMAT,
                next_seq: initial_sequence(clock.now_ms()),
                ..Meta::default()
            },
            None => recount(&tree, clock.now_ms()).map_err(|e| open_err(e.to_string()))?,
        };
        let mut meta = meta;
        // A sequence number is never handed out twice, even if the counters were written by
        // a buggy or older build: stay above the highest key present.
        for range in Range::ALL {
            if let Some(Ok((k, _))) = tree.scan_prefix([b'r', range as u8]).next_back() {
                if let Some(id) = range_of_key(&k) {
                    meta.next_seq = meta.next_seq.max(id.seq + 1);
                }
            }
        }
        let durable = meta.next_seq.saturating_sub(1);
        Ok(SledStore {
            db,
            tree,
            aside,
            config: config.clone(),
            clock,
            state: Mutex::new(State {
                meta,
                durable,
                ..State::default()
            }),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that match what was applied (the
        // meta is only replaced after a successful write), so the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks victims, oldest first in eviction order, until the buffer is `need` bytes
    /// smaller, or until `too_old` says the oldest record is young enough.
    fn choose_victims(
        &self,
        meta: &Meta,
        need_bytes: u64,
        cutoff_ms: Option<i64>,
    ) -> Result<Evicted, StoreError> {
        let mut ev = Evicted::default();
        let mut freed = 0u64;
        for range in Range::ALL {
            if cutoff_ms.is_none() && freed >= need_bytes {
                break;
            }
            if meta.depth[range as usize].count == 0 {
                continue;
            }
            for item in self.tree.scan_prefix([b'r', range as u8]) {
                let (k, v) = item.map_err(io)?;
                let Some(id) = range_of_key(&k) else { continue };
                match cutoff_ms {
                    Some(cutoff) => {
                        // Age eviction: records are in time order within a range, so stop at
                        // the first young one. A reading taken on an unsynchronised clock has
                        // no trustworthy age and is left to the size cap.
                        match decode(&v) {
                            Ok(Record::Reading(r)) if r.flags.contains(Flags::CLOCK_UNSYNCED) => {
                                continue;
                            }
                            Ok(rec) if rec.at_ms() >= cutoff => break,
                            _ => {}
                        }
                    }
                    None if freed >= need_bytes => break,
                    None => {}
                }
                freed += (k.len() + v.len()) as u64;
                ev.per_range[range as usize] += 1;
                ev.first_seq = Some(ev.first_seq.map_or(id.seq, |s| s.min(id.seq)));
                ev.last_seq = ev.last_seq.max(id.seq);
                ev.keys.insert(id, v.len());
            }
        }
        Ok(ev)
    }

    /// Removes victims in `batch` and counts them for the next eviction report.
    fn evict_into(
        &self,
        st: &mut State,
        meta: &mut Meta,
        batch: &mut Batch,
        ev: &Evicted,
        by_age: bool,
    ) {
        for (id, len) in &ev.keys {
            let k = rkey(id.range, id.seq);
            batch.remove(&k[..]);
            let d = &mut meta.depth[id.range as usize];
            d.count = d.count.saturating_sub(1);
            d.bytes = d.bytes.saturating_sub((k.len() + len) as u64);
            st.retry.remove(id);
        }
        let n = ev.count();
        meta.evicted += n;
        let u = &mut meta.unreported;
        for (total, add) in u.per_range.iter_mut().zip(ev.per_range) {
            *total += add;
        }
        if let Some(first) = ev.first_seq {
            u.first_seq = Some(u.first_seq.map_or(first, |f| f.min(first)));
        }
        u.last_seq = u.last_seq.max(ev.last_seq);
        if by_age {
            u.by_age += n;
        } else {
            u.by_size += n;
        }
        tracing::debug!(count = n, by_age, "Evicted buffered records");
    }

    /// Stages the system event that reports the evictions counted so far.
    fn report_evictions(&self, meta: &mut Meta, batch: &mut Batch) -> Option<u64> {
        let u = std::mem::take(&mut meta.unreported);
        let n: u64 = u.per_range.iter().sum();
        if n == 0 {
            return None;
        }
        let why = match (u.by_size > 0, u.by_age > 0) {
            (true, true) => "max_bytes and max_age",
            (true, false) => "max_bytes",
            _ => "max_age",
        };
        tracing::warn!(
            count = n,
            profile = u.per_range[0],
            events = u.per_range[1],
            billing = u.per_range[2],
            reason = why,
            "Evicted buffered records: the buffer is full and the broker is out of reach"
        );
        let event = SystemEvent::new(
            EventKind::Eviction,
            Stamp::in_zone(self.clock.now(), &jiff::tz::TimeZone::UTC),
            format!(
                "Evicted {n} buffered records ({why}): {} profile readings, {} events, {} billing readings",
                u.per_range[0], u.per_range[1], u.per_range[2]
            ),
        )
        .detail("count", n)
        .detail("reason", why)
        .detail("profile", u.per_range[0])
        .detail("events", u.per_range[1])
        .detail("billing", u.per_range[2])
        .detail("first_seq", u.first_seq.unwrap_or(0))
        .detail("last_seq", u.last_seq);
        Some(self.stage(meta, batch, Record::Event(event)))
    }

    /// Adds a record to `batch` with the next sequence number.
    fn stage(&self, meta: &mut Meta, batch: &mut Batch, record: Record) -> u64 {
        let seq = meta.next_seq;
        meta.next_seq += 1;
        let range = Range::of(&record);
        let k = rkey(range, seq);
        let v = encode(&record);
        let d = &mut meta.depth[range as usize];
        d.count += 1;
        d.bytes += (k.len() + v.len()) as u64;
        batch.insert(&k[..], v);
        seq
    }

    fn write(&self, st: &mut State, mut meta: Meta, mut batch: Batch) -> Result<(), StoreError> {
        batch.insert(META, postcard::to_stdvec(&meta).unwrap_or_default());
        self.tree.apply_batch(batch).map_err(io)?;
        meta.format = FORMAT;
        st.meta = meta;
        Ok(())
    }

    fn first_at_ms(&self, range: Range) -> Option<i64> {
        let (_, v) = self.tree.scan_prefix([b'r', range as u8]).next()?.ok()?;
        decode(&v).ok().map(|r| r.at_ms())
    }
}

/// Rebuilds the counters by scanning, when they were lost. Slow, and only on a damaged store.
fn recount(tree: &Tree, now_ms: i64) -> sled::Result<Meta> {
    let mut meta = Meta {
        format: FORMAT,
        next_seq: initial_sequence(now_ms),
        ..Meta::default()
    };
    for item in tree.scan_prefix(b"r") {
        let (k, v) = item?;
        if let Some(id) = range_of_key(&k) {
            let d = &mut meta.depth[id.range as usize];
            d.count += 1;
            d.bytes += (k.len() + v.len()) as u64;
            meta.next_seq = meta.next_seq.max(id.seq + 1);
        }
    }
    Ok(meta)
}

impl Store for SledStore {
    fn append(&self, batch_in: Append) -> Result<Appended, StoreError> {
        if batch_in.is_empty() {
            return Ok(Appended::default());
        }
        let Append {
            readings,
            events,
            marks,
        } = batch_in;
        let mut batch = Batch::default();
        let mut last_read: BTreeMap<&str, i64> = BTreeMap::new();
        for r in &readings {
            let e = last_read.entry(r.meter.as_str()).or_insert(r.read_at.ms);
            *e = (*e).max(r.read_at.ms);
        }
        for (meter, ms) in &last_read {
            batch.insert(meter_key(b'l', meter), &ms.to_be_bytes()[..]);
        }
        for e in &events {
            if let Some(meter) = &e.meter {
                if e.kind != EventKind::Eviction {
                    let failure = (e.at.ms, e.kind.as_str(), e.message.as_str());
                    batch.insert(
                        meter_key(b'f', meter),
                        postcard::to_stdvec(&failure).unwrap_or_default(),
                    );
                }
            }
        }
        for m in &marks {
            batch.insert(
                mark_key(&m.meter, m.cadence),
                &m.boundary_ms.to_be_bytes()[..],
            );
        }

        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let first_new = meta.next_seq;
        let mut seqs = Vec::with_capacity(readings.len() + events.len());
        for r in readings {
            seqs.push(self.stage(&mut meta, &mut batch, Record::Reading(r)));
        }
        for e in events {
            seqs.push(self.stage(&mut meta, &mut batch, Record::Event(e)));
        }
        let total: u64 = meta.depth.iter().map(|d| d.bytes).sum();
        let mut evicted = 0;
        if total > self.config.max_bytes.0 {
            // Victims come from what is already on disk; this batch is not in the tree yet.
            let ev = self.choose_victims(&meta, total - self.config.max_bytes.0, None)?;
            if !ev.keys.is_empty() {
                evicted = ev.count();
                self.evict_into(&mut st, &mut meta, &mut batch, &ev, false);
            }
        }
        let last = meta.next_seq - 1;
        let snapshot = st.meta.clone();
        self.write(&mut st, meta, batch)?;
        drop(st);

        if let Err(e) = self.db.flush() {
            // Not on disk, so not stored: undo in memory so a retry by the caller does not
            // also leave this copy behind to be flushed later.
            let mut st = self.lock();
            let mut undo = Batch::default();
            for seq in first_new..=last {
                for range in Range::ALL {
                    undo.remove(&rkey(range, seq)[..]);
                }
            }
            let _ = self.write(&mut st, snapshot, undo);
            return Err(io(e));
        }
        self.lock().durable_through(last);
        Ok(Appended { seqs, evicted })
    }

    fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
        let mut st = self.lock();
        let ranges: &[Range] = match stream {
            Stream::Readings => &[Range::Profile, Range::Billing],
            Stream::Events => &[Range::Events],
        };
        let mut found: Vec<(EntryId, IVec, bool)> = Vec::with_capacity(max);
        let retry: Vec<EntryId> = st
            .retry
            .iter()
            .filter(|id| ranges.contains(&id.range))
            .take(max)
            .copied()
            .collect();
        for id in retry {
            match self.tree.get(rkey(id.range, id.seq)).map_err(io)? {
                Some(v) => found.push((id, v, true)),
                None => {
                    st.retry.remove(&id);
                }
            }
        }
        for &range in ranges {
            let from = rkey(range, st.cursor[range as usize].saturating_add(1));
            let to = rkey(range, st.durable);
            if from > to {
                continue;
            }
            for item in self.tree.range(from..=to).take(max) {
                let (k, v) = item.map_err(io)?;
                if let Some(id) = range_of_key(&k) {
                    found.push((id, v, false));
                }
            }
        }
        found.sort_by_key(|(id, _, _)| id.seq);
        found.truncate(max);

        let mut out = Vec::with_capacity(found.len());
        let mut bad = Vec::new();
        for (id, v, from_retry) in found {
            if from_retry {
                st.retry.remove(&id);
            } else {
                let c = &mut st.cursor[id.range as usize];
                *c = (*c).max(id.seq);
            }
            match decode(&v) {
                Ok(record) => out.push(Entry { id, record }),
                Err(e) => bad.push((id, v, e)),
            }
        }
        if !bad.is_empty() {
            self.set_aside(&mut st, bad)?;
        }
        Ok(out)
    }

    fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let mut batch = Batch::default();
        let ids: BTreeSet<&EntryId> = ids.iter().collect();
        for id in ids {
            let k = rkey(id.range, id.seq);
            if let Some(v) = self.tree.get(k).map_err(io)? {
                batch.remove(&k[..]);
                let d = &mut meta.depth[id.range as usize];
                d.count = d.count.saturating_sub(1);
                d.bytes = d.bytes.saturating_sub((k.len() + v.len()) as u64);
            }
            st.retry.remove(id);
        }
        meta.last_drain_ms = Some(self.clock.now_ms());
        self.write(&mut st, meta, batch)
    }

    fn nack(&self, ids: &[EntryId]) {
        let mut st = self.lock();
        for id in ids {
            if id.seq <= st.cursor[id.range as usize] {
                st.retry.insert(*id);
            }
        }
    }

    fn stats(&self) -> Result<Stats, StoreError> {
        let meta = self.lock().meta.clone();
        let oldest_ms = Range::ALL
            .iter()
            .filter(|r| meta.depth[**r as usize].count > 0)
            .filter_map(|r| self.first_at_ms(*r))
            .min();
        Ok(Stats {
            profile: meta.depth[Range::Profile as usize],
            billing: meta.depth[Range::Billing as usize],
            events: meta.depth[Range::Events as usize],
            evicted: meta.evicted,
            set_aside: meta.set_aside,
            oldest_ms,
            last_drain_ms: meta.last_drain_ms,
            next_seq: meta.next_seq,
            disk_bytes: self.db.size_on_disk().unwrap_or(0),
        })
    }

    fn boundary(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError> {
        Ok(self
            .tree
            .get(mark_key(meter, cadence))
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    fn meters(&self) -> Result<Vec<MeterState>, StoreError> {
        let mut by_meter: BTreeMap<String, MeterState> = BTreeMap::new();
        for item in self.tree.scan_prefix(b"l") {
            let (k, v) = item.map_err(io)?;
            let meter = String::from_utf8_lossy(&k[1..]).into_owned();
            let ms = v.as_ref().try_into().ok().map(i64::from_be_bytes);
            by_meter.entry(meter.clone()).or_default().last_read_ms = ms;
        }
        for item in self.tree.scan_prefix(b"f") {
            let (k, v) = item.map_err(io)?;
            let meter = String::from_utf8_lossy(&k[1..]).into_owned();
            if let Ok(f) = postcard::from_bytes::<(i64, String, String)>(&v) {
                by_meter.entry(meter).or_default().last_failure = Some(f);
            }
        }
        Ok(by_meter
            .into_iter()
            .map(|(meter, mut s)| {
                s.meter = meter;
                s
            })
            .collect())
    }

    fn maintain(&self) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_ms() - self.config.max_age.0.as_millis() as i64;
        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let ev = self.choose_victims(&meta, 0, Some(cutoff))?;
        let n = ev.count();
        let mut batch = Batch::default();
        if n > 0 {
            self.evict_into(&mut st, &mut meta, &mut batch, &ev, true);
        }
        if self.report_evictions(&mut meta, &mut batch).is_none() {
            return Ok(0);
        }
        let last = meta.next_seq - 1;
        self.write(&mut st, meta, batch)?;
        drop(st);
        self.db.flush().map_err(io)?;
        self.lock().durable_through(last);
        Ok(n)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(io)
    }
}

impl SledStore {
    /// Moves undecodable records to the `aside` tree, counts them and reports them.
    fn set_aside(
        &self,
        st: &mut State,
        bad: Vec<(EntryId, IVec, postcard::Error)>,
    ) -> Result<(), StoreError> {
        let mut meta = st.meta.clone();
        let mut batch = Batch::default();
        for (id, v, e) in &bad {
            let k = rkey(id.range, id.seq);
            // Copied first: a crash between the two writes leaves it in both places, and the
            // next take sets it aside again.
            self.aside.insert(k, v.clone()).map_err(io)?;
            batch.remove(&k[..]);
            let d = &mut meta.depth[id.range as usize];
            d.count = d.count.saturating_sub(1);
            d.bytes = d.bytes.saturating_sub((k.len() + v.len()) as u64);
            meta.set_aside += 1;
            tracing::error!(seq = id.seq, range = id.range.name(), error = %e, "Buffered record unreadable, set aside");
        }
        let event = SystemEvent::new(
            EventKind::StoreCorruption,
            Stamp::in_zone(self.clock.now(), &jiff::tz::TimeZone::UTC),
            format!(
                "{} buffered records could not be read and were set aside",
                bad.len()
            ),
        )
        .detail("count", bad.len())
        .detail(
            "seqs",
            bad.iter()
                .map(|(id, _, _)| id.seq.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        let seq = self.stage(&mut meta, &mut batch, Record::Event(event));
        self.write(st, meta, batch)?;
        // A rare path: flush under the lock, so the report is durable before it can be taken.
        // Everything applied before this flush is durable after it.
        self.db.flush().map_err(io)?;
        st.durable_through(seq);
        Ok(())
    }
}
