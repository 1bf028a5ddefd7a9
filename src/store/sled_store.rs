//! [`Store`] on sled: one tree, keys laid out so every question is a short range scan.
//!
//! | key | value |
//! |---|---|
//! | `r` range first-seq(8, big-endian) | a chunk: the records of one range from one append |
//! | `m` | [`Meta`]: counters, next sequence number |
//! | `b` meter `\0` cadence | last boundary read, Unix ms (8, big-endian) |
//! | `l` meter | last reading stored, Unix ms |
//! | `f` meter | last failure: (Unix ms, kind, message), postcard |
//! | `c` request id | when a command with that id was accepted, Unix ms |
//!
//! Records are kept in chunks, one sled value per range per append (a poll's readings), not
//! one per record: sled spends about 8 µs and 140 bytes of log on every item it stores, which
//! for a 60-byte reading would triple the disk use and cap appends well below the rate a
//! backlog needs. A chunk is `count (u32 LE)` followed by the postcard of
//! `[(offset from first-seq, record)]`. Acknowledging part of a chunk rewrites it without the
//! acknowledged records (in the same atomic batch as the counters); the last record acknowledged
//! removes it. Evictions take whole chunks, oldest first.
//!
//! Chunks that cannot be decoded are moved to a second tree, `aside`, and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sled::{Batch, IVec, Tree};

use super::disk::DiskSync;
use super::{
    Append, Appended, Depth, Entry, EntryId, MeterState, Range, Record, Stats, Store, StoreConfig,
    StoreError, Stream, initial_sequence,
};
use crate::clock::SharedClock;
use crate::reading::{Cadence, EventKind, Flags, Stamp, SystemEvent};

// The command records, in a file of their own (a child module, so it reaches the handles).
#[path = "commands.rs"]
mod commands;

const META: &[u8] = b"m";
/// Beside the store: the highest sequence number handed out, as of the last minute.
const HIGH_WATER: &str = "store.seq";
const FORMAT: u8 = 2;

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

/// A decoded chunk's records with their sequence numbers, shared with the cache.
type Items = Arc<Vec<(u64, Record)>>;

#[derive(Debug, Default)]
struct State {
    meta: Meta,
    /// Highest sequence number whose append has been fsynced.
    durable: u64,
    /// Per range, the last sequence number handed out by `take`, and the chunk holding it.
    cursor: [(u64, u64); 3],
    /// Per range, the chunk `take` last decoded: the next take usually continues in it.
    /// Chunks never change on disk (they are only removed), so the copy stays right.
    cached: [Option<(u64, Items)>; 3],
    /// Taken, then not delivered: handed out again first.
    retry: BTreeSet<EntryId>,
    /// Acknowledged records of chunks that still hold unacknowledged ones, by (range, first
    /// seq). Kept in memory only: a chunk is removed when its last record is acknowledged.
    /// A crash forgets these, and they are delivered again (same ids) — duplicates, never loss.
    partial: BTreeMap<(Range, u64), BTreeSet<u64>>,
    /// Per range, how many records `partial` holds (not yet subtracted on disk).
    partial_count: [u64; 3],
}

impl State {
    /// Forgets what is known of a chunk that left the store.
    fn forget_chunk(&mut self, range: Range, first: u64) {
        if let Some(set) = self.partial.remove(&(range, first)) {
            let c = &mut self.partial_count[range as usize];
            *c = c.saturating_sub(set.len() as u64);
        }
        if self.cached[range as usize]
            .as_ref()
            .is_some_and(|(f, _)| *f == first)
        {
            self.cached[range as usize] = None;
        }
    }
}

impl State {
    /// Everything up to `seq` has been applied and fsynced: `take` may hand it out.
    fn durable_through(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }
}

pub struct SledStore {
    /// The open database. Replaced by [`SledStore::reopen`] after a write error: sled stops
    /// writing for good after one (a full disk), until it is opened again.
    handles: RwLock<Option<Handles>>,
    /// A write failed; reopen before the next operation (at most every few seconds).
    broken: AtomicBool,
    last_reopen: Mutex<Option<std::time::Instant>>,
    /// The cap actually applied: `max_bytes`, or less if the filesystem has less room.
    cap: Mutex<(u64, Option<std::time::Instant>)>,
    dir: PathBuf,
    config: StoreConfig,
    clock: SharedClock,
    state: Mutex<State>,
    path: PathBuf,
}

#[derive(Clone)]
struct Handles {
    db: sled::Db,
    tree: Tree,
    aside: Tree,
    disk: Arc<DiskSync>,
}

impl Handles {
    /// sled's flush, then what it leaves out for a power cut (see [`super::disk`]): only
    /// after this returns is what was applied durable.
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(io)?;
        self.disk.sync().map_err(|e| {
            StoreError::Unavailable(format!("could not make the store durable (fsync): {e}"))
        })
    }
}

fn rkey(range: Range, seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = b'r';
    k[1] = range as u8;
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Option<(Range, u64)> {
    if k.len() != 10 || k[0] != b'r' {
        return None;
    }
    let range = match k[1] {
        0 => Range::Profile,
        1 => Range::Events,
        2 => Range::Billing,
        _ => return None,
    };
    Some((range, u64::from_be_bytes(k[2..].try_into().ok()?)))
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

/// Encodes a chunk whose first record has sequence number `first`.
fn encode_chunk(first: u64, items: &[(u64, &Record)]) -> Vec<u8> {
    let body: Vec<(u32, &Record)> = items
        .iter()
        .map(|(seq, r)| ((seq - first) as u32, *r))
        .collect();
    let mut v = (items.len() as u32).to_le_bytes().to_vec();
    // Encoding our own types into a Vec cannot fail.
    v.extend(postcard::to_stdvec(&body).unwrap_or_default());
    v
}

/// The records of a chunk with their sequence numbers.
fn decode_chunk(first: u64, v: &[u8]) -> Result<Vec<(u64, Record)>, postcard::Error> {
    let body = v
        .get(4..)
        .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
    let items: Vec<(u32, Record)> = postcard::from_bytes(body)?;
    Ok(items
        .into_iter()
        .map(|(off, r)| (first + u64::from(off), r))
        .collect())
}

/// The record count from a chunk's header, without decoding it.
fn chunk_count(v: &[u8]) -> u64 {
    v.get(..4)
        .and_then(|h| h.try_into().ok())
        .map_or(0, |h| u64::from(u32::from_le_bytes(h)))
}

/// A chunk chosen for eviction.
struct Victim {
    key: [u8; 10],
    range: Range,
    count: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, config: &StoreConfig, clock: SharedClock) -> Result<Self, StoreError> {
        let path = dir.join("store");
        super::disk::create_dir_durably(dir).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let handles = open_db(&path, config)?;
        let (meta, recovered) =
            load_meta(&handles.tree, clock.now_ms()).map_err(|reason| StoreError::Open {
                path: path.clone(),
                reason,
            })?;
        let durable = meta.next_seq.saturating_sub(1);
        let store = SledStore {
            handles: RwLock::new(Some(handles)),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            cap: Mutex::new((config.max_bytes.0, None)),
            dir: dir.to_owned(),
            config: config.clone(),
            clock,
            state: Mutex::new(State {
                meta,
                durable,
                ..State::default()
            }),
            path,
        };
        store.effective_cap();
        store.check_high_water(recovered);
        Ok(store)
    }

    /// The sequence number last seen handed out, kept beside the store (not in it): if the
    /// store's files come back with less, they lost their tail (a damaged card, a truncated
    /// file). Say so, and never reuse those ids.
    fn check_high_water(&self, recovered: u64) {
        let Some(hw) = std::fs::read_to_string(self.dir.join(HIGH_WATER))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        else {
            return;
        };
        let mut st = self.lock();
        let next = recovered;
        if hw <= next {
            return;
        }
        tracing::error!(
            holds_up_to = next,
            handed_out = hw,
            "The store's files lost records: sequence numbers up to {hw} had been handed out"
        );
        let mut meta = st.meta.clone();
        meta.next_seq = meta.next_seq.max(hw);
        let event = SystemEvent::new(
            EventKind::StoreCorruption,
            Stamp::in_zone(self.clock.now(), &jiff::tz::TimeZone::UTC),
            format!(
                "The store's files lost their tail: records below sequence {next} were recovered, {} had been handed out; the missing ones, if not delivered before, are lost",
                hw - 1
            ),
        )
        .detail("recovered_below", next)
        .detail("handed_out_up_to", hw - 1);
        let seq = meta.next_seq;
        meta.next_seq += 1;
        let mut batch = Batch::default();
        self.stage(
            &mut meta,
            &mut batch,
            Range::Events,
            seq,
            &[(seq, &Record::Event(event))],
        );
        let written = self.write(&mut st, meta, batch);
        if written.and_then(|()| self.h()?.flush()).is_ok() {
            st.durable_through(seq);
        }
    }

    /// Records beside the store the sequence number after the last durable one (see
    /// [`Self::check_high_water`]); not `next_seq`, which counts appends still on their way
    /// to the disk.
    fn save_high_water(&self) {
        let next = self.lock().durable + 1;
        let path = self.dir.join(HIGH_WATER);
        if let Err(e) = super::disk::write_atomically(&path, next.to_string().as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "Could not record the store's high-water mark");
        }
    }

    fn h(&self) -> Result<Handles, StoreError> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is being reopened".into()))
    }

    pub(super) fn tree(&self) -> Result<Tree, StoreError> {
        self.h().map(|h| h.tree)
    }

    /// After a write error: drop the database and open it again, at most every 2 s. What a
    /// reopen finds is what reached the disk; the in-memory bookkeeping starts afresh, as
    /// after a restart (taken records are handed out again).
    fn reopen_if_broken(&self) -> Result<(), StoreError> {
        if !self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2)) {
                return Err(StoreError::Unavailable(
                    "the store could not write; retrying shortly".into(),
                ));
            }
            *last = Some(std::time::Instant::now());
        }
        // Lock order everywhere: state, then handles, then cap.
        let mut st = self.lock();
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // Let go of the old database first: sled holds a file lock until its last handle goes.
        drop(handles.take());
        let fresh = open_db(&self.path, &self.config)?;
        let (meta, _) =
            load_meta(&fresh.tree, self.clock.now_ms()).map_err(StoreError::Unavailable)?;
        let durable = meta.next_seq.saturating_sub(1);
        *st = State {
            meta,
            durable,
            ..State::default()
        };
        *handles = Some(fresh);
        self.broken.store(false, Ordering::SeqCst);
        tracing::warn!(path = %self.path.display(), "Store reopened after a write error");
        drop(handles);
        drop(st);
        // The filesystem may have changed (space freed, or not): size the cap again.
        self.cap.lock().unwrap_or_else(|p| p.into_inner()).1 = None;
        self.effective_cap();
        Ok(())
    }

    /// Runs a store operation: reopens a broken store first, and marks it broken when the
    /// operation fails to write.
    fn guard<T>(&self, op: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.reopen_if_broken()?;
        let r = op();
        if let Err(StoreError::Unavailable(e)) = &r {
            tracing::warn!(error = %e, "Store write failed");
            self.broken.store(true, Ordering::SeqCst);
        }
        r
    }

    /// `max_bytes`, or less when the filesystem cannot hold that much: sled's files take
    /// about twice the bytes buffered, more for small stores (whole 512 KiB segments), so
    /// the buffer may use a third of the room it has, keeping a reserve for everyone else.
    /// Measured from the filesystem at most once a second (a statvfs call).
    fn effective_cap(&self) -> u64 {
        let mut cap = self.cap.lock().unwrap_or_else(|p| p.into_inner());
        if cap
            .1
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return cap.0;
        }
        let configured = self.config.max_bytes.0;
        let value = match (fs_space(&self.dir), self.h().map(|h| h.db.size_on_disk())) {
            (Some((avail, total)), Ok(Ok(ours))) => {
                let reserve = (8u64 << 20).min(total / 10);
                let room = (avail + ours).saturating_sub(reserve) / 3;
                if room < configured && cap.0 >= configured {
                    tracing::warn!(
                        max_bytes = configured,
                        room,
                        dir = %self.dir.display(),
                        "The filesystem has less room than store.max_bytes: buffering less"
                    );
                }
                configured.min(room.max(64 << 10))
            }
            _ => configured,
        };
        *cap = (value, Some(std::time::Instant::now()));
        value
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that match what was applied (the
        // meta is only replaced after a successful write), so the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunk of `range` that holds `seq`, if it is still there.
    fn chunk_of(&self, range: Range, seq: u64) -> Result<Option<(u64, IVec)>, StoreError> {
        let found = self
            .tree()?
            .range(rkey(range, 0)..=rkey(range, seq))
            .next_back()
            .transpose()
            .map_err(io)?;
        Ok(found.and_then(|(k, v)| parse_key(&k).map(|(_, first)| (first, v))))
    }

    /// Picks whole chunks to evict, oldest first in eviction order, until the buffer is
    /// `need_bytes` smaller, or (with `cutoff_ms`) while chunks are older than the cutoff.
    fn choose_victims(
        &self,
        meta: &Meta,
        need_bytes: u64,
        cutoff_ms: Option<i64>,
    ) -> Result<Vec<Victim>, StoreError> {
        let mut out = Vec::new();
        let mut freed = 0u64;
        for range in Range::ALL {
            if cutoff_ms.is_none() && freed >= need_bytes {
                break;
            }
            if meta.depth[range as usize].count == 0 {
                continue;
            }
            for item in self.tree()?.scan_prefix([b'r', range as u8]) {
                if cutoff_ms.is_none() && freed >= need_bytes {
                    break;
                }
                let (k, v) = item.map_err(io)?;
                let Some((_, first)) = parse_key(&k) else {
                    continue;
                };
                let items = decode_chunk(first, &v).unwrap_or_default();
                if let Some(cutoff) = cutoff_ms {
                    // Age eviction: chunks are in time order within a range, so stop at the
                    // first young one. A reading taken on an unsynchronised clock has no
                    // trustworthy age and is left to the size cap.
                    let unsynced = items.iter().any(|(_, r)| {
                        matches!(r, Record::Reading(r) if r.flags.contains(Flags::CLOCK_UNSYNCED))
                    });
                    if unsynced {
                        continue;
                    }
                    let youngest = items.iter().map(|(_, r)| r.at_ms()).max().unwrap_or(0);
                    if youngest >= cutoff {
                        break;
                    }
                }
                let bytes = (k.len() + v.len()) as u64;
                freed += bytes;
                out.push(Victim {
                    key: rkey(range, first),
                    range,
                    count: chunk_count(&v),
                    bytes,
                    first,
                    last: items.last().map_or(first, |(s, _)| *s),
                });
            }
        }
        Ok(out)
    }

    /// Removes victims in `batch` and counts them for the next eviction report.
    fn evict_into(
        &self,
        st: &mut State,
        meta: &mut Meta,
        batch: &mut Batch,
        victims: &[Victim],
        by_age: bool,
    ) -> u64 {
        let mut n = 0;
        let u = &mut meta.unreported;
        for v in victims {
            batch.remove(&v.key[..]);
            let d = &mut meta.depth[v.range as usize];
            d.count = d.count.saturating_sub(v.count);
            d.bytes = d.bytes.saturating_sub(v.bytes);
            u.per_range[v.range as usize] += v.count;
            u.first_seq = Some(u.first_seq.map_or(v.first, |f| f.min(v.first)));
            u.last_seq = u.last_seq.max(v.last);
            st.retry
                .retain(|id| !(id.range == v.range && (v.first..=v.last).contains(&id.seq)));
            st.forget_chunk(v.range, v.first);
            n += v.count;
        }
        meta.evicted += n;
        if by_age {
            meta.unreported.by_age += n;
        } else {
            meta.unreported.by_size += n;
        }
        if n > 0 {
            tracing::debug!(count = n, by_age, "Evicting");
        }
        n
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
        let seq = meta.next_seq;
        meta.next_seq += 1;
        self.stage(
            meta,
            batch,
            Range::Events,
            seq,
            &[(seq, &Record::Event(event))],
        );
        Some(seq)
    }

    /// Adds a chunk to `batch` and counts it.
    fn stage(
        &self,
        meta: &mut Meta,
        batch: &mut Batch,
        range: Range,
        first: u64,
        items: &[(u64, &Record)],
    ) {
        let k = rkey(range, first);
        let v = encode_chunk(first, items);
        let d = &mut meta.depth[range as usize];
        d.count += items.len() as u64;
        d.bytes += (k.len() + v.len()) as u64;
        batch.insert(&k[..], v);
    }

    fn write(&self, st: &mut State, mut meta: Meta, mut batch: Batch) -> Result<(), StoreError> {
        meta.format = FORMAT;
        batch.insert(META, postcard::to_stdvec(&meta).unwrap_or_default());
        self.tree()?.apply_batch(batch).map_err(io)?;
        st.meta = meta;
        Ok(())
    }

    fn first_at_ms(&self, range: Range) -> Option<i64> {
        let (k, v) = self
            .tree()
            .ok()?
            .scan_prefix([b'r', range as u8])
            .next()?
            .ok()?;
        let (_, first) = parse_key(&k)?;
        let items = decode_chunk(first, &v).ok()?;
        items.iter().map(|(_, r)| r.at_ms()).min()
    }

    /// Moves an undecodable chunk to the `aside` tree, counts it and reports it. Called with
    /// the state locked; flushes, since it is rare and its report must be durable before
    /// anything can take it.
    fn set_aside(
        &self,
        st: &mut State,
        range: Range,
        first: u64,
        v: &IVec,
        e: &postcard::Error,
    ) -> Result<(), StoreError> {
        let k = rkey(range, first);
        // Copied first: a crash between the two writes leaves it in both places, and the next
        // take sets it aside again.
        self.h()?.aside.insert(k, v.clone()).map_err(io)?;
        let mut meta = st.meta.clone();
        let mut batch = Batch::default();
        batch.remove(&k[..]);
        let lost = chunk_count(v).max(1);
        let d = &mut meta.depth[range as usize];
        d.count = d.count.saturating_sub(lost);
        d.bytes = d.bytes.saturating_sub((k.len() + v.len()) as u64);
        meta.set_aside += lost;
        tracing::error!(first_seq = first, range = range.name(), records = lost, error = %e, "Buffered records unreadable, set aside");
        let event = SystemEvent::new(
            EventKind::StoreCorruption,
            Stamp::in_zone(self.clock.now(), &jiff::tz::TimeZone::UTC),
            format!("{lost} buffered records could not be read and were set aside"),
        )
        .detail("count", lost)
        .detail("first_seq", first)
        .detail("range", range.name());
        let seq = meta.next_seq;
        meta.next_seq += 1;
        self.stage(
            &mut meta,
            &mut batch,
            Range::Events,
            seq,
            &[(seq, &Record::Event(event))],
        );
        st.retry.retain(|id| {
            !(id.range == range && id.seq >= first && id.seq < first + lost.max(1 << 20))
        });
        st.forget_chunk(range, first);
        self.write(st, meta, batch)?;
        self.h()?.flush()?;
        st.durable_through(seq);
        Ok(())
    }
}

fn open_db(path: &Path, config: &StoreConfig) -> Result<Handles, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.to_owned(),
        reason,
    };
    let sled_config = sled::Config::new()
        .path(path)
        .cache_capacity(config.cache.0)
        .flush_every_ms(Some(config.ack_flush.0.as_millis().max(1) as u64))
        .mode(sled::Mode::LowSpace);
    // sled locks its files and lets go of them from a background thread a moment after the
    // last handle is dropped (by `status`, a test that filled the store, or a reopen): wait
    // a little rather than fail. The agent's own lock keeps a second agent out.
    let mut attempts = 0;
    let db = loop {
        match sled_config.open() {
            Ok(db) => break db,
            Err(e) if e.to_string().contains("could not acquire lock") && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(open_err(e.to_string())),
        }
    };
    let tree = db
        .open_tree("buffer")
        .map_err(|e| open_err(e.to_string()))?;
    let aside = db.open_tree("aside").map_err(|e| open_err(e.to_string()))?;
    db.flush().map_err(|e| open_err(e.to_string()))?;
    let disk = DiskSync::open(path)
        .map_err(|e| open_err(format!("could not make the store durable (fsync): {e}")))?;
    Ok(Handles {
        db,
        tree,
        aside,
        disk: Arc::new(disk),
    })
}

/// The counters as last written, made safe: recounted if unreadable, and the next sequence
/// number kept above every record present.
/// Also returns the next sequence number the files themselves account for, before the
/// clock floor (for [`SledStore::check_high_water`]).
fn load_meta(tree: &Tree, now_ms: i64) -> Result<(Meta, u64), String> {
    let meta = match tree.get(META).map_err(|e| e.to_string())? {
        Some(v) => match postcard::from_bytes::<Meta>(&v) {
            Ok(m) if m.format == FORMAT => Some(m),
            Ok(m) => {
                return Err(format!(
                    "store format {} is not format {FORMAT}: written by another version",
                    m.format
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Store counters unreadable, recounting");
                None
            }
        },
        None => None,
    };
    let mut meta = match meta {
        Some(m) => m,
        None if tree.is_empty() => Meta {
            format: FORMAT,
            next_seq: initial_sequence(now_ms),
            ..Meta::default()
        },
        None => recount(tree, now_ms).map_err(|e| e.to_string())?,
    };
    // A sequence number is never handed out twice, even if the counters were written by a
    // buggy or older build: stay above the highest record present …
    for range in Range::ALL {
        if let Some(Ok((k, v))) = tree.scan_prefix([b'r', range as u8]).next_back() {
            if let (Some((_, first)), Ok(items)) = (parse_key(&k), decode_chunk(0, &v)) {
                let last = items.last().map_or(first, |(off, _)| first + off);
                meta.next_seq = meta.next_seq.max(last + 1);
            }
        }
    }
    // … and above the clock in microseconds (as a new store starts), so that a store whose
    // files lost their tail — records already delivered and gone — does not hand out their
    // ids again, which the centre would take for duplicates and drop.
    let recovered = if tree.is_empty() { 0 } else { meta.next_seq };
    meta.next_seq = meta.next_seq.max(super::clock_floor(now_ms));
    Ok((meta, recovered))
}

/// Bytes available to us and the filesystem's size, for the directory `dir`.
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the struct we own; `c` is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frag = s.f_frsize as u64;
    Some((s.f_bavail as u64 * frag, s.f_blocks as u64 * frag))
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
        if let Some((range, first)) = parse_key(&k) {
            let d = &mut meta.depth[range as usize];
            d.count += chunk_count(&v);
            d.bytes += (k.len() + v.len()) as u64;
            meta.next_seq = meta.next_seq.max(first + chunk_count(&v).max(1));
        }
    }
    Ok(meta)
}

impl SledStore {
    /// Writes the partial acknowledgements kept in memory: each partly delivered chunk is
    /// rewritten without its delivered records. Done on flush (shutdown) and once a minute,
    /// which bounds what a crash can make the drain send twice.
    fn persist_partial(&self, st: &mut State) -> Result<(), StoreError> {
        if st.partial.is_empty() {
            return Ok(());
        }
        let mut meta = st.meta.clone();
        let mut batch = Batch::default();
        let partial = std::mem::take(&mut st.partial);
        for ((range, first), acked) in &partial {
            let k = rkey(*range, *first);
            let Some(v) = self.tree()?.get(k).map_err(io)? else {
                continue;
            };
            let Ok(items) = decode_chunk(*first, &v) else {
                continue;
            };
            let keep: Vec<(u64, &Record)> = items
                .iter()
                .filter(|(s, _)| !acked.contains(s))
                .map(|(s, r)| (*s, r))
                .collect();
            let d = &mut meta.depth[*range as usize];
            d.count = d.count.saturating_sub((items.len() - keep.len()) as u64);
            d.bytes = d.bytes.saturating_sub((k.len() + v.len()) as u64);
            if keep.is_empty() {
                batch.remove(&k[..]);
            } else {
                let nv = encode_chunk(*first, &keep);
                d.bytes += (k.len() + nv.len()) as u64;
                batch.insert(&k[..], nv);
            }
            if st.cached[*range as usize]
                .as_ref()
                .is_some_and(|(f, _)| f == first)
            {
                st.cached[*range as usize] = None;
            }
        }
        match self.write(st, meta, batch) {
            Ok(()) => {
                st.partial_count = [0; 3];
                Ok(())
            }
            Err(e) => {
                st.partial = partial;
                Err(e)
            }
        }
    }
}

/// Command ids older than this are forgotten.
fn cutoff_commands(now_ms: i64) -> i64 {
    now_ms - 7 * 86_400_000
}

impl SledStore {
    fn forget_old_commands(&self, cutoff_ms: i64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let tree = self.tree()?;
        for item in tree.scan_prefix(b"c") {
            let (k, v) = item.map_err(io)?;
            let at = v.as_ref().try_into().map(i64::from_be_bytes).unwrap_or(0);
            if at < cutoff_ms {
                batch.remove(k);
            }
        }
        tree.apply_batch(batch).map_err(io)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        let mut st = self.lock();
        if let Err(e) = self.persist_partial(&mut st) {
            tracing::warn!(error = %e, "Could not record the last acknowledgements; they will be delivered again");
        }
        drop(st);
        if let Ok(h) = self.h() {
            let _ = h.flush();
        }
    }
}

impl SledStore {
    fn append_inner(&self, batch_in: Append) -> Result<Appended, StoreError> {
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
                let failure = (e.at.ms, e.kind.as_str(), e.message.as_str());
                batch.insert(
                    meter_key(b'f', meter),
                    postcard::to_stdvec(&failure).unwrap_or_default(),
                );
            }
        }
        for m in &marks {
            batch.insert(
                mark_key(&m.meter, m.cadence),
                &m.boundary_ms.to_be_bytes()[..],
            );
        }
        drop(last_read);
        let records: Vec<Record> = readings
            .into_iter()
            .map(Record::Reading)
            .chain(events.into_iter().map(Record::Event))
            .collect();

        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let first_new = meta.next_seq;
        let seqs: Vec<u64> = (first_new..first_new + records.len() as u64).collect();
        meta.next_seq += records.len() as u64;
        for range in Range::ALL {
            let items: Vec<(u64, &Record)> = seqs
                .iter()
                .zip(&records)
                .filter(|(_, r)| Range::of(r) == range)
                .map(|(s, r)| (*s, r))
                .collect();
            if let Some((first, _)) = items.first() {
                self.stage(&mut meta, &mut batch, range, *first, &items);
            }
        }
        let total: u64 = meta.depth.iter().map(|d| d.bytes).sum();
        let cap = self.effective_cap();
        let mut evicted = 0;
        if total > cap {
            // Victims come from what is already on disk; this batch is not in the tree yet.
            let victims = self.choose_victims(&meta, total - cap, None)?;
            evicted = self.evict_into(&mut st, &mut meta, &mut batch, &victims, false);
        }
        let last = meta.next_seq - 1;
        let snapshot = st.meta.clone();
        self.write(&mut st, meta, batch)?;
        drop(st);

        if let Err(e) = self.h()?.flush() {
            // Not on disk, so not stored: undo in memory so a retry by the caller does not
            // also leave this copy behind to be flushed later.
            let mut st = self.lock();
            let mut undo = Batch::default();
            for range in Range::ALL {
                for seq in &seqs {
                    undo.remove(&rkey(range, *seq)[..]);
                }
            }
            let _ = self.write(&mut st, snapshot, undo);
            return Err(e);
        }
        self.lock().durable_through(last);
        Ok(Appended { seqs, evicted })
    }

    fn take_inner(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
        let mut st = self.lock();
        let ranges: &[Range] = match stream {
            Stream::Readings => &[Range::Profile, Range::Billing],
            Stream::Events => &[Range::Events],
        };
        // (id, chunk first-seq, record, from retry)
        let mut found: Vec<(EntryId, u64, Record, bool)> = Vec::with_capacity(max);
        let retry: Vec<EntryId> = st
            .retry
            .iter()
            .filter(|id| ranges.contains(&id.range))
            .take(max)
            .copied()
            .collect();
        let mut decoded: BTreeMap<(Range, u64), Vec<(u64, Record)>> = BTreeMap::new();
        for id in retry {
            let chunk = self.chunk_of(id.range, id.seq)?;
            let record = chunk.and_then(|(first, v)| {
                let items = decoded
                    .entry((id.range, first))
                    .or_insert_with(|| decode_chunk(first, &v).unwrap_or_default());
                items
                    .iter()
                    .find(|(s, _)| *s == id.seq)
                    .map(|(_, r)| (first, r.clone()))
            });
            match record {
                Some((first, r)) => found.push((id, first, r, true)),
                None => {
                    st.retry.remove(&id);
                }
            }
        }
        let mut bad = Vec::new();
        for &range in ranges {
            let (cursor, cursor_chunk) = st.cursor[range as usize];
            if cursor_chunk > st.durable {
                continue;
            }
            let mut n = 0;
            let mut last_decoded = None;
            for item in self
                .tree()?
                .range(rkey(range, cursor_chunk)..=rkey(range, st.durable))
            {
                if n >= max {
                    break;
                }
                let (k, v) = item.map_err(io)?;
                let Some((_, first)) = parse_key(&k) else {
                    continue;
                };
                let items = match &st.cached[range as usize] {
                    Some((f, items)) if *f == first => items.clone(),
                    _ => match decode_chunk(first, &v) {
                        Ok(items) => Arc::new(items),
                        Err(e) => {
                            bad.push((range, first, v, e));
                            continue;
                        }
                    },
                };
                for (seq, r) in items.iter() {
                    if *seq > cursor && n < max {
                        found.push((EntryId { seq: *seq, range }, first, r.clone(), false));
                        n += 1;
                    }
                }
                last_decoded = Some((first, items));
            }
            if last_decoded.is_some() {
                st.cached[range as usize] = last_decoded;
            }
        }
        found.sort_by_key(|(id, _, _, _)| id.seq);
        found.truncate(max);
        let mut out = Vec::with_capacity(found.len());
        for (id, first, record, from_retry) in found {
            if from_retry {
                st.retry.remove(&id);
            } else {
                let c = &mut st.cursor[id.range as usize];
                if id.seq > c.0 {
                    *c = (id.seq, first);
                }
            }
            out.push(Entry { id, record });
        }
        for (range, first, v, e) in bad {
            self.set_aside(&mut st, range, first, &v, &e)?;
        }
        Ok(out)
    }

    fn ack_inner(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        /// A chunk some of whose records are being acknowledged.
        struct Touched {
            range: Range,
            first: u64,
            last: u64,
            old_len: usize,
            items: Arc<Vec<(u64, Record)>>,
            acked: BTreeSet<u64>,
        }
        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let mut batch = Batch::default();
        let mut sorted: Vec<EntryId> = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        // Ids in sequence order meet their chunks in order: one read per chunk touched.
        let mut touched: Vec<Touched> = Vec::new();
        let mut current: [Option<usize>; 3] = [None; 3];
        for id in sorted {
            st.retry.remove(&id);
            let r = id.range as usize;
            let hit =
                current[r].filter(|&i| (touched[i].first..=touched[i].last).contains(&id.seq));
            let i = match hit {
                Some(i) => i,
                None => {
                    let Some((first, v)) = self.chunk_of(id.range, id.seq)? else {
                        continue;
                    };
                    let items = match &st.cached[r] {
                        Some((f, items)) if *f == first => items.clone(),
                        _ => match decode_chunk(first, &v) {
                            Ok(items) => Arc::new(items),
                            Err(_) => continue,
                        },
                    };
                    let last = items.last().map_or(first, |(s, _)| *s);
                    if id.seq > last {
                        // Already acknowledged (or evicted): nothing holds it any more.
                        continue;
                    }
                    touched.push(Touched {
                        range: id.range,
                        first,
                        last,
                        old_len: v.len(),
                        items,
                        acked: BTreeSet::new(),
                    });
                    current[r] = Some(touched.len() - 1);
                    touched.len() - 1
                }
            };
            touched[i].acked.insert(id.seq);
        }
        for t in touched {
            let k = rkey(t.range, t.first);
            let newly: BTreeSet<u64> = {
                let known = st.partial.get(&(t.range, t.first));
                t.items
                    .iter()
                    .map(|(s, _)| *s)
                    .filter(|s| t.acked.contains(s) && !known.is_some_and(|k| k.contains(s)))
                    .collect()
            };
            if newly.is_empty() {
                continue;
            }
            let set = st.partial.entry((t.range, t.first)).or_default();
            set.extend(newly.iter().copied());
            if set.len() == t.items.len() {
                // The last of the chunk: remove it, and count that on disk.
                let before = set.len() as u64 - newly.len() as u64;
                st.partial.remove(&(t.range, t.first));
                let pc = &mut st.partial_count[t.range as usize];
                *pc = pc.saturating_sub(before);
                batch.remove(&k[..]);
                let d = &mut meta.depth[t.range as usize];
                d.count = d.count.saturating_sub(t.items.len() as u64);
                d.bytes = d.bytes.saturating_sub((k.len() + t.old_len) as u64);
            } else {
                st.partial_count[t.range as usize] += newly.len() as u64;
            }
        }
        meta.last_drain_ms = Some(self.clock.now_ms());
        self.write(&mut st, meta, batch)
    }

    fn nack_inner(&self, ids: &[EntryId]) {
        let mut st = self.lock();
        for id in ids {
            if id.seq <= st.cursor[id.range as usize].0 {
                st.retry.insert(*id);
            }
        }
    }

    fn stats_inner(&self) -> Result<Stats, StoreError> {
        let (mut meta, partial) = {
            let st = self.lock();
            (st.meta.clone(), st.partial_count)
        };
        for (d, p) in meta.depth.iter_mut().zip(partial) {
            d.count = d.count.saturating_sub(p);
        }
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
            disk_bytes: self
                .h()
                .ok()
                .and_then(|h| h.db.size_on_disk().ok())
                .unwrap_or(0),
        })
    }

    fn boundary_inner(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError> {
        Ok(self
            .tree()?
            .get(mark_key(meter, cadence))
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    fn meters_inner(&self) -> Result<Vec<MeterState>, StoreError> {
        let mut by_meter: BTreeMap<String, MeterState> = BTreeMap::new();
        let tree = self.tree()?;
        for item in tree.scan_prefix(b"l") {
            let (k, v) = item.map_err(io)?;
            let meter = String::from_utf8_lossy(&k[1..]).into_owned();
            let ms = v.as_ref().try_into().ok().map(i64::from_be_bytes);
            by_meter.entry(meter.clone()).or_default().last_read_ms = ms;
        }
        for item in tree.scan_prefix(b"f") {
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

    fn maintain_inner(&self) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_ms() - self.config.max_age.0.as_millis() as i64;
        self.forget_old_commands(cutoff_commands(self.clock.now_ms()))?;
        let mut st = self.lock();
        self.persist_partial(&mut st)?;
        let mut meta = st.meta.clone();
        let victims = self.choose_victims(&meta, 0, Some(cutoff))?;
        let mut batch = Batch::default();
        let n = self.evict_into(&mut st, &mut meta, &mut batch, &victims, true);
        if self.report_evictions(&mut meta, &mut batch).is_none() {
            return Ok(0);
        }
        let last = meta.next_seq - 1;
        self.write(&mut st, meta, batch)?;
        drop(st);
        self.h()?.flush()?;
        self.lock().durable_through(last);
        Ok(n)
    }

    fn flush_inner(&self) -> Result<(), StoreError> {
        self.persist_partial(&mut self.lock())?;
        self.h()?.flush()
    }

    fn first_time_inner(&self, key: &str) -> Result<bool, StoreError> {
        let now = self.clock.now_ms().to_be_bytes();
        let fresh = self
            .tree()?
            .compare_and_swap(meter_key(b'c', key), None as Option<&[u8]>, Some(&now[..]))
            .map_err(io)?
            .is_ok();
        if fresh {
            self.h()?.flush()?;
        }
        Ok(fresh)
    }
}

impl Store for SledStore {
    fn append(&self, batch: Append) -> Result<Appended, StoreError> {
        self.guard(|| self.append_inner(batch))
    }
    fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
        self.guard(|| self.take_inner(stream, max))
    }
    fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        self.guard(|| self.ack_inner(ids))
    }
    fn nack(&self, ids: &[EntryId]) {
        self.nack_inner(ids)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        self.stats_inner()
    }
    fn boundary(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError> {
        self.boundary_inner(meter, cadence)
    }
    fn meters(&self) -> Result<Vec<MeterState>, StoreError> {
        self.meters_inner()
    }
    fn maintain(&self) -> Result<u64, StoreError> {
        self.save_high_water();
        self.guard(|| {
            // Look at the filesystem again: someone may have filled it, or freed it.
            self.cap.lock().unwrap_or_else(|p| p.into_inner()).1 = None;
            self.effective_cap();
            self.maintain_inner()
        })
    }
    fn flush(&self) -> Result<(), StoreError> {
        let r = self.guard(|| self.flush_inner());
        self.save_high_water();
        r
    }
    fn first_time(&self, key: &str) -> Result<bool, StoreError> {
        self.guard(|| self.first_time_inner(key))
    }
}
