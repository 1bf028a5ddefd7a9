//! What the store keeps in memory only: what `take` handed out, what came back, and the
//! acknowledgements not yet written. No I/O here; [`super::SledStore`] holds it under one lock.
//!
//! Losing all of it (a crash, a reopen) is always safe: everything taken but not acknowledged
//! on disk is then handed out again, with the same ids — duplicates, never loss.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::super::{EntryId, Range, Record};
use super::meta::Meta;

/// A decoded chunk's records with their sequence numbers, shared with the cache.
pub(super) type Items = Arc<Vec<(u64, Record)>>;

/// Decoded records [`State`] keeps per range, for `take` and the acknowledgements after it:
/// a few takes' worth at the drain's defaults (800 records a take), some 300 KiB at most.
const CACHED_RECORDS: usize = 2048;

#[derive(Debug, Default)]
pub(super) struct State {
    /// The counters as last written.
    pub(super) meta: Meta,
    /// Highest sequence number whose append has been fsynced.
    durable: u64,
    /// Per range, the last sequence number handed out by `take`, and the chunk holding it.
    cursor: [(u64, u64); 3],
    /// Per range, the chunks `take` decoded last, newest at the back, up to
    /// [`CACHED_RECORDS`] records: the next take usually continues in the last one, and the
    /// acknowledgement of what was taken finds its chunks here instead of decoding them a
    /// second time. A chunk on disk only changes when it is rewritten or removed, and both
    /// forget it here.
    cached: [VecDeque<(u64, Items)>; 3],
    /// Taken, then not delivered: handed out again first.
    retry: BTreeSet<EntryId>,
    /// Acknowledged records of chunks that still hold unacknowledged ones, by (range, first
    /// seq). Kept in memory only: a chunk is removed when its last record is acknowledged.
    /// A crash forgets these, and they are delivered again (same ids) — duplicates, never loss.
    partial: BTreeMap<(Range, u64), BTreeSet<u64>>,
    /// Per range, how many records `partial` holds (not yet subtracted on disk).
    partial_count: [u64; 3],
    /// Per range, records evicted since the store was opened (for the metrics).
    pub(super) evicted_since_open: [u64; 3],
}

/// What an acknowledgement did to a chunk (see [`State::acknowledge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Acked {
    /// Every record it names was acknowledged before.
    Nothing,
    /// Some of the chunk's records are still to be delivered: it stays on disk as it is.
    Partly,
    /// That was the rest of the chunk: remove it, in the same batch as its counters.
    Wholly,
}

/// Partial acknowledgements taken out to be written (see [`State::take_partial`]).
pub(super) type Partial = BTreeMap<(Range, u64), BTreeSet<u64>>;

impl State {
    /// The state after opening: nothing taken, everything up to `meta.next_seq` durable.
    pub(super) fn new(meta: Meta) -> State {
        State {
            durable: meta.next_seq.saturating_sub(1),
            meta,
            ..State::default()
        }
    }

    /// Highest sequence number `take` may hand out.
    pub(super) fn durable(&self) -> u64 {
        self.durable
    }

    /// Everything up to `seq` has been applied and fsynced: `take` may hand it out.
    pub(super) fn durable_through(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// The last sequence number handed out from `range`, and the first of its chunk.
    pub(super) fn cursor(&self, range: Range) -> (u64, u64) {
        self.cursor[range as usize]
    }

    /// The records of chunk (`range`, `first`), if it is the one decoded last.
    pub(super) fn cached(&self, range: Range, first: u64) -> Option<Items> {
        self.cached[range as usize]
            .iter()
            .find(|(f, _)| *f == first)
            .map(|(_, items)| items.clone())
    }

    /// Keeps the decoded records of chunk (`range`, `first`), forgetting the oldest kept
    /// beyond [`CACHED_RECORDS`] (the newest stays, however large).
    pub(super) fn cache(&mut self, range: Range, first: u64, items: Items) {
        let kept = &mut self.cached[range as usize];
        kept.retain(|(f, _)| *f != first);
        kept.push_back((first, items));
        let mut total: usize = kept.iter().map(|(_, i)| i.len()).sum();
        while total > CACHED_RECORDS && kept.len() > 1 {
            if let Some((_, old)) = kept.pop_front() {
                total -= old.len();
            }
        }
    }

    fn uncache(&mut self, range: Range, first: u64) {
        self.cached[range as usize].retain(|(f, _)| *f != first);
    }

    /// Up to `max` records to hand out again, oldest first, from `ranges`.
    pub(super) fn retries(&self, ranges: &[Range], max: usize) -> Vec<EntryId> {
        self.retry
            .iter()
            .filter(|id| ranges.contains(&id.range))
            .take(max)
            .copied()
            .collect()
    }

    /// `id`, from chunk `first`, is on its way to the broker.
    pub(super) fn handed_out(&mut self, id: EntryId, first: u64) {
        if !self.retry.remove(&id) {
            let c = &mut self.cursor[id.range as usize];
            if id.seq > c.0 {
                *c = (id.seq, first);
            }
        }
    }

    /// Not delivered: hand it out again. Ids never handed out are ignored (they are still
    /// ahead of the cursor).
    pub(super) fn nack(&mut self, id: EntryId) {
        if id.seq <= self.cursor[id.range as usize].0 {
            self.retry.insert(id);
        }
    }

    /// `id` is not to be handed out again: delivered, or no longer in the store.
    pub(super) fn settled(&mut self, id: EntryId) {
        self.retry.remove(&id);
    }

    /// The chunk (`range`, `first`) left the store (evicted, set aside): forgets what is known
    /// of it. Its records are the ones in `first..end`, `end` being the next chunk's first
    /// sequence number (or past its last record); records of other chunks waiting to be
    /// handed out again keep waiting.
    pub(super) fn forget_chunk(&mut self, range: Range, first: u64, end: u64) {
        self.retry
            .retain(|id| !(id.range == range && (first..end).contains(&id.seq)));
        if let Some(set) = self.partial.remove(&(range, first)) {
            let c = &mut self.partial_count[range as usize];
            *c = c.saturating_sub(set.len() as u64);
        }
        self.uncache(range, first);
    }

    /// Records the acknowledgement of `acked` in chunk (`range`, `first`), whose records
    /// have the sequence numbers `seqs`.
    pub(super) fn acknowledge(
        &mut self,
        range: Range,
        first: u64,
        seqs: impl Iterator<Item = u64>,
        acked: &BTreeSet<u64>,
    ) -> Acked {
        let known = self.partial.get(&(range, first));
        let mut len = 0;
        let newly: BTreeSet<u64> = seqs
            .inspect(|_| len += 1)
            .filter(|s| acked.contains(s) && !known.is_some_and(|k| k.contains(s)))
            .collect();
        if newly.is_empty() {
            return Acked::Nothing;
        }
        let set = self.partial.entry((range, first)).or_default();
        set.extend(newly.iter().copied());
        let pc = &mut self.partial_count[range as usize];
        if set.len() == len {
            let before = (set.len() - newly.len()) as u64;
            self.partial.remove(&(range, first));
            *pc = pc.saturating_sub(before);
            // Removed from disk by the caller: nothing will ask for its records again.
            self.uncache(range, first);
            Acked::Wholly
        } else {
            *pc += newly.len() as u64;
            Acked::Partly
        }
    }

    /// Per range, acknowledged records still counted on disk.
    pub(super) fn partial_count(&self) -> [u64; 3] {
        self.partial_count
    }

    /// The partial acknowledgements, to be written: the chunks they touch are forgotten from
    /// the cache, since they are about to be rewritten. Give them back with
    /// [`Self::partial_kept`] if the write fails, or confirm with [`Self::partial_written`].
    pub(super) fn take_partial(&mut self) -> Partial {
        let partial = std::mem::take(&mut self.partial);
        for (range, first) in partial.keys() {
            self.uncache(*range, *first);
        }
        partial
    }

    pub(super) fn partial_kept(&mut self, partial: Partial) {
        self.partial = partial;
    }

    pub(super) fn partial_written(&mut self) {
        self.partial_count = [0; 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(range: Range, seq: u64) -> EntryId {
        EntryId { seq, range }
    }

    /// Hands out `seqs` of `range` from chunk `first`, as `take` does.
    fn take(st: &mut State, range: Range, first: u64, seqs: &[u64]) {
        for s in seqs {
            st.handed_out(id(range, *s), first);
        }
    }

    /// Hands them out and has them come back, as a drain that lost its connection does.
    fn take_and_nack(st: &mut State, range: Range, first: u64, seqs: &[u64]) {
        take(st, range, first, seqs);
        for s in seqs {
            st.nack(id(range, *s));
        }
    }

    #[test]
    fn a_new_state_should_let_take_hand_out_everything_already_stored() {
        let st = State::new(Meta {
            next_seq: 10,
            ..Meta::default()
        });
        assert_eq!(st.durable(), 9);
        assert_eq!(st.cursor(Range::Billing), (0, 0));
    }

    #[test]
    fn durable_through_should_never_go_back() {
        let mut st = State::default();
        st.durable_through(7);
        st.durable_through(3);
        assert_eq!(st.durable(), 7);
    }

    #[test]
    fn handing_out_should_move_the_cursor_forward_only() {
        let mut st = State::default();
        take(&mut st, Range::Profile, 10, &[10, 12]);
        assert_eq!(st.cursor(Range::Profile), (12, 10));
        take(&mut st, Range::Profile, 10, &[11]);
        assert_eq!(st.cursor(Range::Profile), (12, 10));
        assert_eq!(st.cursor(Range::Billing), (0, 0));
    }

    #[test]
    fn nacked_records_should_come_back_oldest_first_per_stream() {
        let mut st = State::default();
        take_and_nack(&mut st, Range::Billing, 13, &[13]);
        take_and_nack(&mut st, Range::Profile, 10, &[10, 11]);
        take_and_nack(&mut st, Range::Events, 12, &[12]);
        // Never handed out: ignored.
        st.nack(id(Range::Billing, 99));
        let readings = st.retries(&[Range::Profile, Range::Billing], 10);
        assert_eq!(
            readings,
            vec![
                id(Range::Profile, 10),
                id(Range::Profile, 11),
                id(Range::Billing, 13)
            ]
        );
        assert_eq!(
            st.retries(&[Range::Events], 10),
            vec![id(Range::Events, 12)]
        );
        assert_eq!(st.retries(&[Range::Profile, Range::Billing], 1).len(), 1);
        // Handed out again: out of the retry set, cursor unchanged.
        st.handed_out(id(Range::Profile, 10), 10);
        st.settled(id(Range::Profile, 11));
        assert_eq!(st.retries(&[Range::Profile], 10), Vec::<EntryId>::new());
        assert_eq!(st.cursor(Range::Profile), (11, 10));
    }

    #[test]
    fn forgetting_a_chunk_should_keep_its_neighbours_waiting_to_be_sent_again() {
        let mut st = State::default();
        // Three chunks of the same range, 10..=11, 12 and 20..=21, all taken and nacked.
        take_and_nack(&mut st, Range::Billing, 10, &[10, 11]);
        take_and_nack(&mut st, Range::Billing, 12, &[12]);
        take_and_nack(&mut st, Range::Billing, 20, &[20, 21]);
        take_and_nack(&mut st, Range::Profile, 13, &[13]);
        st.forget_chunk(Range::Billing, 12, 20);
        let left: Vec<u64> = st
            .retries(&[Range::Profile, Range::Billing], 10)
            .iter()
            .map(|i| i.seq)
            .collect();
        assert_eq!(left, vec![10, 11, 13, 20, 21]);
    }

    #[test]
    fn forgetting_a_chunk_should_drop_its_partial_acks_and_cache() {
        let mut st = State::default();
        let acked = BTreeSet::from([5]);
        st.cache(Range::Profile, 5, Arc::new(Vec::new()));
        assert_eq!(
            st.acknowledge(Range::Profile, 5, [5, 6].into_iter(), &acked),
            Acked::Partly
        );
        assert_eq!(st.partial_count(), [1, 0, 0]);
        st.forget_chunk(Range::Profile, 5, 7);
        assert_eq!(st.partial_count(), [0, 0, 0]);
        assert!(st.cached(Range::Profile, 5).is_none());
        assert!(st.take_partial().is_empty());
    }

    #[test]
    fn the_cache_should_keep_recent_chunks_up_to_its_budget_and_forget_removed_ones() {
        let mut st = State::default();
        let record = Record::Reading(crate::store::tests::reading(
            "m",
            crate::reading::Cadence::Quarterly,
            0,
            1,
        ));
        let chunk = |n: usize| -> Items { Arc::new(vec![(0, record.clone()); n]) };
        st.cache(Range::Billing, 1, chunk(1000));
        st.cache(Range::Billing, 1001, chunk(1000));
        assert!(st.cached(Range::Billing, 1).is_some());
        assert!(st.cached(Range::Billing, 1001).is_some());
        // Over the budget: the oldest goes.
        st.cache(Range::Billing, 2001, chunk(100));
        assert!(st.cached(Range::Billing, 1).is_none());
        assert!(st.cached(Range::Billing, 1001).is_some());
        assert!(st.cached(Range::Events, 2001).is_none(), "per range");
        // However large, the newest stays.
        st.cache(Range::Billing, 3001, chunk(CACHED_RECORDS + 1));
        assert!(st.cached(Range::Billing, 3001).is_some());
        assert!(st.cached(Range::Billing, 2001).is_none());
        // Acknowledged whole: removed from disk, so from the cache too.
        let seqs = || [3001, 3002].into_iter();
        st.acknowledge(Range::Billing, 3001, seqs(), &BTreeSet::from([3001, 3002]));
        assert!(st.cached(Range::Billing, 3001).is_none());
    }

    #[test]
    fn acknowledging_a_chunk_in_parts_should_count_once_and_end_with_its_removal() {
        let mut st = State::default();
        let seqs = || [1, 2, 3].into_iter();
        let r = Range::Events;
        assert_eq!(
            st.acknowledge(r, 1, seqs(), &BTreeSet::from([1, 2])),
            Acked::Partly
        );
        // Acknowledged twice (the broker confirmed a duplicate): counted once.
        assert_eq!(
            st.acknowledge(r, 1, seqs(), &BTreeSet::from([2])),
            Acked::Nothing
        );
        assert_eq!(st.partial_count(), [0, 2, 0]);
        // Not in this chunk: ignored.
        assert_eq!(
            st.acknowledge(r, 1, seqs(), &BTreeSet::from([9])),
            Acked::Nothing
        );
        assert_eq!(
            st.acknowledge(r, 1, seqs(), &BTreeSet::from([3])),
            Acked::Wholly
        );
        // The chunk goes from disk with its whole count: nothing left to subtract.
        assert_eq!(st.partial_count(), [0, 0, 0]);
        assert!(st.take_partial().is_empty());
    }

    #[test]
    fn partial_acks_should_survive_a_failed_write_and_clear_after_a_good_one() {
        let mut st = State::default();
        st.cache(Range::Billing, 1, Arc::new(Vec::new()));
        st.acknowledge(Range::Billing, 1, [1, 2].into_iter(), &BTreeSet::from([1]));
        let partial = st.take_partial();
        assert!(
            st.cached(Range::Billing, 1).is_none(),
            "about to be rewritten"
        );
        assert_eq!(partial.len(), 1);
        st.partial_kept(partial);
        assert_eq!(st.partial_count(), [0, 0, 1]);
        let partial = st.take_partial();
        assert_eq!(partial[&(Range::Billing, 1)], BTreeSet::from([1]));
        st.partial_written();
        assert_eq!(st.partial_count(), [0, 0, 0]);
        assert!(st.take_partial().is_empty());
    }
}
