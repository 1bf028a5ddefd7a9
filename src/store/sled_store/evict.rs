//! Eviction: which chunks go when the buffer is over `max_bytes` or a record is older than
//! `max_age`, removing them in the batch that needed the room, and the one event that reports
//! them. The only way a record leaves the store without being delivered.

use sled::Batch;

use super::super::{Range, Record, StoreError};
use super::keys::{chunk_count, decode_chunk, parse_key, range_prefix, rkey};
use super::meta::Meta;
use super::state::State;
use super::{SledStore, io};
use crate::reading::{EventKind, Flags};

/// A chunk chosen for eviction.
pub(super) struct Victim {
    key: [u8; 10],
    range: Range,
    count: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

impl SledStore {
    /// Picks whole chunks to evict, oldest first in eviction order, until the buffer is
    /// `need_bytes` smaller, or (with `cutoff_ms`) while chunks are older than the cutoff.
    pub(super) fn choose_victims(
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
            for item in self.tree()?.scan_prefix(range_prefix(range)) {
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
                    // trustworthy age and is left to the size cap: a chunk holding one is not
                    // evicted by age, but its other records still say where the young ones
                    // begin. (Skipping such chunks without looking made every `maintain`
                    // decode the whole buffer when one reading in each chunk was unsynced:
                    // a million readings paged in and decoded once a minute.)
                    let unsynced = |r: &Record| matches!(r, Record::Reading(r) if r.flags.contains(Flags::CLOCK_UNSYNCED));
                    let youngest = items
                        .iter()
                        .filter(|(_, r)| !unsynced(r))
                        .map(|(_, r)| r.at_ms())
                        .max();
                    if youngest.is_some_and(|y| y >= cutoff) {
                        break;
                    }
                    if items.iter().any(|(_, r)| unsynced(r)) {
                        continue;
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
    pub(super) fn evict_into(
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
            st.evicted_since_open[v.range as usize] += v.count;
            u.first_seq = Some(u.first_seq.map_or(v.first, |f| f.min(v.first)));
            u.last_seq = u.last_seq.max(v.last);
            st.forget_chunk(v.range, v.first, v.last + 1);
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
    pub(super) fn report_evictions(
        &self,
        meta: &mut Meta,
        batch: &mut Batch,
    ) -> Result<Option<u64>, StoreError> {
        let u = meta.unreported.clone();
        let n: u64 = u.per_range.iter().sum();
        if n == 0 {
            return Ok(None);
        }
        let why = match (u.by_size > 0, u.by_age > 0) {
            (true, true) => "max_bytes and max_age",
            (true, false) => "max_bytes",
            _ => "max_age",
        };
        let [profile, events, billing] = u.per_range;
        let seq = self.stage_event(
            meta,
            batch,
            EventKind::Eviction,
            format!(
                "Evicted {n} buffered records ({why}): {profile} profile readings, {events} events, {billing} billing readings"
            ),
            &[
                ("count", n.to_string()),
                ("reason", why.to_owned()),
                ("profile", profile.to_string()),
                ("events", events.to_string()),
                ("billing", billing.to_string()),
                ("first_seq", u.first_seq.unwrap_or(0).to_string()),
                ("last_seq", u.last_seq.to_string()),
            ],
        )?;
        // Counted as reported only in the batch that holds the report.
        meta.unreported = Default::default();
        tracing::warn!(
            count = n,
            profile,
            events,
            billing,
            reason = why,
            "Evicted buffered records: the buffer is full and the broker is out of reach"
        );
        Ok(Some(seq))
    }
}
