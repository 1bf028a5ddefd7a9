//! The [`Store`] operations on sled: append, take, acknowledge, and the rest.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sled::{Batch, IVec};

use super::super::{
    Append, AppendFuture, Appended, Entry, EntryId, LastFailure, MeterState, ProfileState, Range,
    Record, Stats, Store, StoreError, Stream,
};
use super::group::{Reply, not_written};
use super::keys::{
    RecordRef, decode_chunk, decode_failure, decode_profile_mark, encode_chunk, encode_failure,
    encode_profile_mark, mark_key, meter_key, parse_key, profile_key, rkey,
};
use super::state::{Acked, Items, State};
use super::{SledStore, io};
use crate::reading::{Cadence, Obis};

/// Command ids older than this are forgotten.
fn cutoff_commands(now_ms: i64) -> i64 {
    now_ms - 7 * 86_400_000
}

impl SledStore {
    /// Writes the partial acknowledgements kept in memory: each partly delivered chunk is
    /// rewritten without its delivered records. Done on flush (shutdown) and once a minute,
    /// which bounds what a crash can make the drain send twice.
    pub(super) fn persist_partial(&self, st: &mut State) -> Result<(), StoreError> {
        let partial = st.take_partial();
        if partial.is_empty() {
            return Ok(());
        }
        let mut meta = st.meta.clone();
        let written = (|| {
            let mut batch = Batch::default();
            let tree = self.tree()?;
            for ((range, first), acked) in &partial {
                let k = rkey(*range, *first);
                let Some(v) = tree.get(k).map_err(io)? else {
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
                    let nv = encode_chunk(*first, &keep)?;
                    d.bytes += (k.len() + nv.len()) as u64;
                    batch.insert(&k[..], nv);
                }
            }
            self.write(st, meta, batch)
        })();
        match written {
            Ok(()) => st.partial_written(),
            Err(_) => st.partial_kept(partial),
        }
        written
    }

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

    /// Writes `batches` as one (one sled batch, one flush): their readings first, in order,
    /// then their events, as [`Append::extend`] would have merged them, but borrowed, so
    /// that no reading is copied on its way to the disk. The sequence numbers come back in
    /// that order ([`Appended::split`] hands each batch its own).
    fn append_inner<B: Borrow<Append>>(&self, batches: &[B]) -> Result<Appended, StoreError> {
        let batches = || batches.iter().map(Borrow::borrow);
        if batches().all(Append::is_empty) {
            return Ok(Appended::default());
        }
        let readings = || batches().flat_map(|b| &b.readings);
        let events = || batches().flat_map(|b| &b.events);
        let mut batch = Batch::default();
        let mut last_read: BTreeMap<&str, i64> = BTreeMap::new();
        for r in readings() {
            let e = last_read.entry(r.meter.as_str()).or_insert(r.read_at.ms);
            *e = (*e).max(r.read_at.ms);
        }
        for (meter, ms) in &last_read {
            batch.insert(meter_key(b'l', meter), &ms.to_be_bytes()[..]);
        }
        for e in events() {
            if let Some(meter) = &e.meter {
                batch.insert(meter_key(b'f', meter), encode_failure(&LastFailure::of(e)));
            }
        }
        for m in batches().flat_map(|b| &b.marks) {
            batch.insert(
                mark_key(&m.meter, m.cadence),
                &m.boundary_ms.to_be_bytes()[..],
            );
        }
        // One profile may be marked twice in a batch that group commit merged: its rows add
        // up, and the later mark wins, as in two appends one after the other.
        let mut profiles: BTreeMap<_, (i64, u64)> = BTreeMap::new();
        for m in batches().flat_map(|b| &b.profile_marks) {
            let key = profile_key(&m.meter, &m.profile);
            let entry = match profiles.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let before = self.tree()?.get(e.key()).map_err(io)?;
                    let rows = before
                        .and_then(|v| decode_profile_mark(&v))
                        .map_or(0, |(_, n)| n);
                    e.insert((m.last_ms, rows))
                }
            };
            *entry = (m.last_ms, entry.1.saturating_add(m.rows));
        }
        for (key, (last_ms, rows)) in profiles {
            batch.insert(key, &encode_profile_mark(last_ms, rows)[..]);
        }
        drop(last_read);
        let records: Vec<RecordRef<'_>> = readings()
            .map(RecordRef::Reading)
            .chain(events().map(RecordRef::Event))
            .collect();

        let mut st = self.lock();
        let mut meta = st.meta.clone();
        let first_new = meta.next_seq;
        let seqs: Vec<u64> = (first_new..first_new + records.len() as u64).collect();
        meta.next_seq += records.len() as u64;
        for range in Range::ALL {
            let items: Vec<(u64, RecordRef<'_>)> = seqs
                .iter()
                .zip(&records)
                .filter(|(_, r)| r.range() == range)
                .map(|(s, r)| (*s, *r))
                .collect();
            if let Some((first, _)) = items.first() {
                self.stage(&mut meta, &mut batch, range, *first, &items)?;
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
        // (id, chunk first-seq, record). Grown as found, not sized for `max`: the drain asks
        // for a few messages' worth (over 100 KiB of these at once) and most takes find a
        // poll's worth or nothing, and a buffer that large is an mmap and a munmap per call
        // (glibc's threshold is 128 KiB, `src/alloc.rs`).
        let mut found: Vec<(EntryId, u64, Record)> = Vec::new();
        // Chunks that cannot be decoded, found by either path below: set aside once each.
        let mut bad: BTreeMap<(Range, u64), (IVec, postcard::Error)> = BTreeMap::new();
        let mut decoded: BTreeMap<(Range, u64), Vec<(u64, Record)>> = BTreeMap::new();
        for id in st.retries(ranges, max) {
            let Some((first, v)) = self.chunk_of(id.range, id.seq)? else {
                st.settled(id);
                continue;
            };
            let items = decoded.entry((id.range, first)).or_insert_with(|| {
                decode_chunk(first, &v).unwrap_or_else(|e| {
                    bad.insert((id.range, first), (v.clone(), e));
                    Vec::new()
                })
            });
            match items.iter().find(|(s, _)| *s == id.seq) {
                Some((_, r)) => found.push((id, first, r.clone())),
                // Acknowledged or evicted meanwhile, or in a chunk being set aside.
                None => st.settled(id),
            }
        }
        for &range in ranges {
            let (cursor, cursor_chunk) = st.cursor(range);
            let durable = st.durable();
            if cursor_chunk > durable {
                continue;
            }
            let mut n = 0;
            for item in self
                .tree()?
                .range(rkey(range, cursor_chunk)..=rkey(range, durable))
            {
                if n >= max {
                    break;
                }
                let (k, v) = item.map_err(io)?;
                let Some((_, first)) = parse_key(&k) else {
                    continue;
                };
                let items = match st.cached(range, first) {
                    Some(items) => items,
                    None => match decode_chunk(first, &v) {
                        Ok(items) => Arc::new(items),
                        Err(e) => {
                            bad.entry((range, first)).or_insert((v, e));
                            continue;
                        }
                    },
                };
                for (seq, r) in items.iter() {
                    if *seq > cursor && n < max {
                        found.push((EntryId { seq: *seq, range }, first, r.clone()));
                        n += 1;
                    }
                }
                // For the next take (which continues in the last chunk) and for the
                // acknowledgements of what this one hands out.
                st.cache(range, first, items);
            }
        }
        found.sort_by_key(|(id, _, _)| id.seq);
        found.truncate(max);
        let mut out = Vec::with_capacity(found.len());
        for (id, first, record) in found {
            st.handed_out(id, first);
            out.push(Entry { id, record });
        }
        for ((range, first), (v, e)) in bad {
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
            items: Items,
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
            st.settled(id);
            let r = id.range as usize;
            let hit =
                current[r].filter(|&i| (touched[i].first..=touched[i].last).contains(&id.seq));
            let i = match hit {
                Some(i) => i,
                None => {
                    let Some((first, v)) = self.chunk_of(id.range, id.seq)? else {
                        continue;
                    };
                    let items = match st.cached(id.range, first) {
                        Some(items) => items,
                        None => match decode_chunk(first, &v) {
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
            let seqs = t.items.iter().map(|(s, _)| *s);
            if st.acknowledge(t.range, t.first, seqs, &t.acked) == Acked::Wholly {
                // The last of the chunk: remove it, and count that on disk.
                let k = rkey(t.range, t.first);
                batch.remove(&k[..]);
                let d = &mut meta.depth[t.range as usize];
                d.count = d.count.saturating_sub(t.items.len() as u64);
                d.bytes = d.bytes.saturating_sub((k.len() + t.old_len) as u64);
            }
        }
        meta.last_drain_ms = Some(self.clock.now_ms());
        self.write(&mut st, meta, batch)
    }

    fn stats_inner(&self) -> Result<Stats, StoreError> {
        let (mut meta, partial, evicted_by_class) = {
            let st = self.lock();
            (st.meta.clone(), st.partial_count(), st.evicted_since_open)
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
            evicted_by_class,
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

    fn profile_mark_inner(&self, meter: &str, profile: &Obis) -> Result<Option<i64>, StoreError> {
        Ok(self
            .tree()?
            .get(profile_key(meter, profile))
            .map_err(io)?
            .and_then(|v| decode_profile_mark(&v))
            .map(|(last, _)| last))
    }

    fn profiles_inner(&self) -> Result<Vec<ProfileState>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix(b"p") {
            let (k, v) = item.map_err(io)?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            let Some((meter, profile)) = name.split_once('\0') else {
                continue;
            };
            let (Ok(profile), Some((last_ms, rows))) =
                (profile.parse::<Obis>(), decode_profile_mark(&v))
            else {
                tracing::debug!(key = %name, "Profile mark not readable: left out");
                continue;
            };
            out.push(ProfileState {
                meter: meter.to_owned(),
                profile,
                last_ms,
                rows,
            });
        }
        Ok(out)
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
            match decode_failure(&v) {
                Some(f) => by_meter.entry(meter).or_default().last_failure = Some(f),
                None => tracing::debug!(%meter, "Last failure not readable: left out"),
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
        if self.report_evictions(&mut meta, &mut batch)?.is_none() {
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

/// The store, for a group's leader thread: dropped without having led, it abandons the group.
struct Lead(Option<Arc<SledStore>>);

impl Drop for Lead {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.group.abandon();
        }
    }
}

impl Store for SledStore {
    fn append(&self, batch: Append) -> Result<Appended, StoreError> {
        self.group
            .append(batch, |b| self.guard(|| self.append_inner(b)))
    }
    fn append_async(self: Arc<Self>, batch: Arc<Append>) -> AppendFuture {
        if self.group.is_off() {
            return Box::pin(async move {
                tokio::task::spawn_blocking(move || self.append(Arc::unwrap_or_clone(batch)))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Unavailable(format!("store task failed: {e}")))
                    })
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply: Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if self.group.submit(batch, reply) {
            // The one thread of this group (and of those that follow while appends keep
            // coming); everyone else waits on their oneshot. Its panic reaches nobody but the
            // callers it drops (see `group`); so does a leader a shutting-down runtime never
            // starts (`Lead`'s drop), rather than leaving the next appends without one.
            let lead = Lead(Some(self));
            tokio::task::spawn_blocking(move || {
                let mut lead = lead;
                if let Some(s) = lead.0.take() {
                    s.group.lead(|b| s.guard(|| s.append_inner(b)));
                }
            });
        }
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(not_written())) })
    }
    fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError> {
        self.guard(|| self.take_inner(stream, max))
    }
    fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError> {
        self.guard(|| self.ack_inner(ids))
    }
    fn nack(&self, ids: &[EntryId]) {
        let mut st = self.lock();
        for id in ids {
            st.nack(*id);
        }
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
    fn profile_mark(&self, meter: &str, profile: &Obis) -> Result<Option<i64>, StoreError> {
        self.profile_mark_inner(meter, profile)
    }
    fn profiles(&self) -> Result<Vec<ProfileState>, StoreError> {
        self.profiles_inner()
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
