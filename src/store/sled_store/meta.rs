//! The counters (`m`), how they are written with every batch and rebuilt when lost, and the
//! high-water mark beside the store (`store.seq`).

use serde::{Deserialize, Serialize};
use sled::{Batch, Tree};

use super::super::{Depth, Range, Record, StoreError, clock_floor, initial_sequence};
use super::keys::{
    AsRecord, Wire, chunk_count, decode_chunk, encode_chunk, parse_key, range_prefix, rkey,
};
use super::state::State;
use super::{SledStore, io};
use crate::reading::{EventKind, Stamp, SystemEvent};

const META: &[u8] = b"m";
/// Beside the store: the sequence number after the last durable one, as of the last minute.
const HIGH_WATER: &str = "store.seq";
const FORMAT: u8 = 2;

/// Read with postcard; written with [`Meta::encode`], which cannot fail.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format: u8,
    pub(super) next_seq: u64,
    pub(super) depth: [Depth; 3],
    pub(super) evicted: u64,
    pub(super) set_aside: u64,
    pub(super) last_drain_ms: Option<i64>,
    /// Evictions not yet reported in a system event.
    pub(super) unreported: Unreported,
}

/// Evictions since the last eviction event. Reported by [`super::super::Store::maintain`],
/// once a minute at most: an event per eviction would itself fill the store that is evicting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Unreported {
    pub(super) per_range: [u64; 3],
    pub(super) first_seq: Option<u64>,
    pub(super) last_seq: u64,
    pub(super) by_size: u64,
    pub(super) by_age: u64,
}

impl Meta {
    /// The counters in postcard's wire format, field by field in declaration order (see
    /// [`super::keys`]): what `postcard::to_stdvec` writes, without its error case.
    fn encode(&self) -> Vec<u8> {
        let mut w = Wire::default();
        w.u8(self.format).varint(self.next_seq);
        for d in &self.depth {
            w.varint(d.count).varint(d.bytes);
        }
        w.varint(self.evicted)
            .varint(self.set_aside)
            .option(self.last_drain_ms, |w, ms| {
                w.zigzag(ms);
            });
        let u = &self.unreported;
        for n in u.per_range {
            w.varint(n);
        }
        w.option(u.first_seq, |w, s| {
            w.varint(s);
        })
        .varint(u.last_seq)
        .varint(u.by_size)
        .varint(u.by_age);
        w.into_vec()
    }
}

impl SledStore {
    /// Applies `batch` with the counters `meta` in it, atomically; on success they are the
    /// counters in memory. Not durable until [`super::Handles::flush`].
    pub(super) fn write(
        &self,
        st: &mut State,
        mut meta: Meta,
        mut batch: Batch,
    ) -> Result<(), StoreError> {
        meta.format = FORMAT;
        batch.insert(META, meta.encode());
        self.tree()?.apply_batch(batch).map_err(io)?;
        st.meta = meta;
        Ok(())
    }

    /// Adds a chunk to `batch` and counts it.
    pub(super) fn stage(
        &self,
        meta: &mut Meta,
        batch: &mut Batch,
        range: Range,
        first: u64,
        items: &[(u64, impl AsRecord)],
    ) -> Result<(), StoreError> {
        let k = rkey(range, first);
        let v = encode_chunk(first, items)?;
        let d = &mut meta.depth[range as usize];
        d.count += items.len() as u64;
        d.bytes += (k.len() + v.len()) as u64;
        batch.insert(&k[..], v);
        Ok(())
    }

    /// Adds a system event of the store's own to `batch`, with the next sequence number,
    /// which it returns.
    pub(super) fn stage_event(
        &self,
        meta: &mut Meta,
        batch: &mut Batch,
        kind: EventKind,
        message: String,
        details: &[(&str, String)],
    ) -> Result<u64, StoreError> {
        let mut event = SystemEvent::new(
            kind,
            Stamp::in_zone(self.clock.now(), &jiff::tz::TimeZone::UTC),
            message,
        );
        for (k, v) in details {
            event = event.detail(*k, v);
        }
        let seq = meta.next_seq;
        meta.next_seq += 1;
        self.stage(
            meta,
            batch,
            Range::Events,
            seq,
            &[(seq, &Record::Event(event))],
        )?;
        Ok(seq)
    }

    /// The sequence number last seen handed out, kept beside the store (not in it): if the
    /// store's files come back with less, they lost their tail (a damaged card, a truncated
    /// file). Say so, and never reuse those ids.
    pub(super) fn check_high_water(&self, recovered: u64) {
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
        let mut batch = Batch::default();
        let event = self.stage_event(
            &mut meta,
            &mut batch,
            EventKind::StoreCorruption,
            format!(
                "The store's files lost their tail: records below sequence {next} were recovered, {} had been handed out; the missing ones, if not delivered before, are lost",
                hw - 1
            ),
            &[
                ("recovered_below", next.to_string()),
                ("handed_out_up_to", (hw - 1).to_string()),
            ],
        );
        // The counters are written even without the event: the next sequence number must
        // stay above the mark.
        let written = self
            .write(&mut st, meta, batch)
            .and_then(|()| self.h()?.flush());
        match (event, written) {
            (Ok(seq), Ok(())) => st.durable_through(seq),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "Could not record the store's lost tail as an event");
            }
        }
    }

    /// Records beside the store the sequence number after the last durable one (see
    /// [`Self::check_high_water`]); not `next_seq`, which counts appends still on their way
    /// to the disk.
    pub(super) fn save_high_water(&self) {
        let next = self.lock().durable() + 1;
        let path = self.dir.join(HIGH_WATER);
        if let Err(e) = super::super::disk::write_atomically(&path, next.to_string().as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "Could not record the store's high-water mark");
        }
    }
}

/// The counters as last written, made safe: recounted if unreadable, and the next sequence
/// number kept above every record present.
/// Also returns the next sequence number the files themselves account for, before the
/// clock floor (for [`SledStore::check_high_water`]).
pub(super) fn load_meta(tree: &Tree, now_ms: i64) -> Result<(Meta, u64), String> {
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
        if let Some(Ok((k, v))) = tree.scan_prefix(range_prefix(range)).next_back() {
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
    meta.next_seq = meta.next_seq.max(clock_floor(now_ms));
    Ok((meta, recovered))
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn meta(fields: [u64; 12], drain: Option<i64>, first: Option<u64>) -> Meta {
        let d = |i: usize| Depth {
            count: fields[i],
            bytes: fields[i + 1],
        };
        Meta {
            format: fields[0] as u8,
            next_seq: fields[1],
            depth: [d(2), d(4), d(6)],
            evicted: fields[8],
            set_aside: fields[9],
            last_drain_ms: drain,
            unreported: Unreported {
                per_range: [fields[10], fields[11], fields[0]],
                first_seq: first,
                last_seq: fields[1] ^ fields[8],
                by_size: fields[10] >> 3,
                by_age: fields[11] >> 5,
            },
        }
    }

    #[test]
    fn counters_should_encode_as_postcard_at_the_edges() {
        for m in [
            Meta::default(),
            meta([u64::MAX; 12], Some(i64::MIN), Some(u64::MAX)),
            meta(
                [127, 128, 16_383, 16_384, 0, 1, 2, 3, 4, 5, 6, 7],
                Some(-1),
                None,
            ),
        ] {
            assert_eq!(m.encode(), postcard::to_stdvec(&m).unwrap(), "{m:?}");
            assert_eq!(postcard::from_bytes::<Meta>(&m.encode()).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn counters_should_encode_exactly_as_postcard_does(
            fields in any::<[u64; 12]>(),
            drain in any::<Option<i64>>(),
            first in any::<Option<u64>>(),
        ) {
            let m = meta(fields, drain, first);
            prop_assert_eq!(m.encode(), postcard::to_stdvec(&m).unwrap());
        }
    }
}
