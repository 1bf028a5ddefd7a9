//! Chunks that cannot be decoded (a bad sector, a scribbled file): moved to the `aside` tree,
//! counted and reported, so that one damaged chunk never stops the drain.

use sled::{Batch, IVec};

use super::super::{Range, StoreError};
use super::keys::{chunk_count, parse_key, rkey};
use super::state::State;
use super::{SledStore, io};
use crate::reading::EventKind;

impl SledStore {
    /// Moves an undecodable chunk to the `aside` tree, counts it and reports it. Called with
    /// the state locked; flushes, since it is rare and its report must be durable before
    /// anything can take it.
    pub(super) fn set_aside(
        &self,
        st: &mut State,
        range: Range,
        first: u64,
        v: &IVec,
        e: &postcard::Error,
    ) -> Result<(), StoreError> {
        let k = rkey(range, first);
        // Its records are the ones below the next chunk's first sequence number: chunks of a
        // range never overlap (each holds records of one append, or one event).
        let end = self
            .tree()?
            .range(rkey(range, first.saturating_add(1))..=rkey(range, u64::MAX))
            .next()
            .transpose()
            .map_err(io)?
            .and_then(|(k, _)| parse_key(&k))
            .map_or(u64::MAX, |(_, next)| next);
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
        let seq = self.stage_event(
            &mut meta,
            &mut batch,
            EventKind::StoreCorruption,
            format!("{lost} buffered records could not be read and were set aside"),
            &[
                ("count", lost.to_string()),
                ("first_seq", first.to_string()),
                ("range", range.name().to_owned()),
            ],
        )?;
        self.write(st, meta, batch)?;
        st.forget_chunk(range, first, end);
        self.h()?.flush()?;
        st.durable_through(seq);
        Ok(())
    }
}
