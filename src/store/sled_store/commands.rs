//! [`CommandLog`] on sled: accepted commands in their own tree, `commands`, out of the way of
//! the buffer's key layout.
//!
//! | key | value |
//! |---|---|
//! | request id | [`CommandRecord`], postcard |
//!
//! Every write is followed by the store's full flush (sled's, then [`super::super::disk`]'s
//! fsyncs) before it returns: see "What is durable when" in the store's module doc. A record
//! that cannot be decoded (written by another version) is forgotten.

use sled::Tree;

use super::{SledStore, io};
use crate::store::{COMMAND_TTL_MS, CommandLog, CommandRecord, StoreError};

impl SledStore {
    fn commands(&self) -> Result<Tree, StoreError> {
        self.h()?.db.open_tree("commands").map_err(io)
    }

    /// Removes the records accepted before `cutoff_ms`; returns the others.
    fn sweep_commands(
        &self,
        tree: &Tree,
        cutoff_ms: i64,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let mut batch = sled::Batch::default();
        let mut kept = Vec::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(io)?;
            match postcard::from_bytes::<CommandRecord>(&v) {
                Ok(c) if c.accepted_ms >= cutoff_ms => kept.push(c),
                _ => batch.remove(k),
            }
        }
        tree.apply_batch(batch).map_err(io)?;
        Ok(kept)
    }

    fn accept_command_inner(
        &self,
        record: &CommandRecord,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let tree = self.commands()?;
        self.sweep_commands(&tree, record.accepted_ms - COMMAND_TTL_MS)?;
        let value = postcard::to_stdvec(record).unwrap_or_default();
        match tree
            .compare_and_swap(
                record.request_id.as_bytes(),
                None as Option<&[u8]>,
                Some(value),
            )
            .map_err(io)?
        {
            Ok(()) => {
                self.h()?.flush()?;
                Ok(None)
            }
            Err(cas) => Ok(cas
                .current
                .and_then(|v| postcard::from_bytes::<CommandRecord>(&v).ok())),
        }
    }

    fn finish_command_inner(&self, request_id: &str, outcome: &str) -> Result<(), StoreError> {
        let tree = self.commands()?;
        let Some(v) = tree.get(request_id.as_bytes()).map_err(io)? else {
            return Ok(());
        };
        let Ok(mut record) = postcard::from_bytes::<CommandRecord>(&v) else {
            return Ok(());
        };
        record.outcome = Some(outcome.to_owned());
        tree.insert(
            request_id.as_bytes(),
            postcard::to_stdvec(&record).unwrap_or_default(),
        )
        .map_err(io)?;
        self.h()?.flush()
    }

    fn forget_command_inner(&self, request_id: &str) -> Result<(), StoreError> {
        self.commands()?.remove(request_id.as_bytes()).map_err(io)?;
        self.h()?.flush()
    }

    fn unfinished_commands_inner(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        let tree = self.commands()?;
        let mut open: Vec<CommandRecord> = self
            .sweep_commands(&tree, now_ms - COMMAND_TTL_MS)?
            .into_iter()
            .filter(|c| c.outcome.is_none())
            .collect();
        open.sort_by_key(|c| c.accepted_ms);
        Ok(open)
    }
}

impl CommandLog for SledStore {
    fn accept_command(&self, record: &CommandRecord) -> Result<Option<CommandRecord>, StoreError> {
        self.guard(|| self.accept_command_inner(record))
    }
    fn finish_command(&self, request_id: &str, outcome: &str) -> Result<(), StoreError> {
        self.guard(|| self.finish_command_inner(request_id, outcome))
    }
    fn forget_command(&self, request_id: &str) -> Result<(), StoreError> {
        self.guard(|| self.forget_command_inner(request_id))
    }
    fn unfinished_commands(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        self.guard(|| self.unfinished_commands_inner(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::SystemClock;
    use crate::store::StoreConfig;

    fn record(id: &str, at: i64) -> CommandRecord {
        CommandRecord {
            request_id: id.into(),
            accepted_ms: at,
            command: r#"{"poll":{}}"#.into(),
            outcome: None,
        }
    }

    #[test]
    fn accepted_commands_should_survive_a_reopen_with_their_state() {
        let dir = tempfile::tempdir().unwrap();
        let open = || SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock));
        let now = 1_800_000_000_000;
        {
            let s = open().unwrap();
            assert_eq!(s.accept_command(&record("a", now)).unwrap(), None);
            assert_eq!(s.accept_command(&record("b", now + 1)).unwrap(), None);
            s.finish_command("b", r#"{"status":"done"}"#).unwrap();
            assert_eq!(s.accept_command(&record("c", now + 2)).unwrap(), None);
            s.forget_command("c").unwrap();
        }
        let s = open().unwrap();
        assert_eq!(s.unfinished_commands(now).unwrap(), vec![record("a", now)]);
        let again = s.accept_command(&record("b", now + 5)).unwrap().unwrap();
        assert_eq!(again.outcome.as_deref(), Some(r#"{"status":"done"}"#));
        assert_eq!(s.accept_command(&record("c", now + 6)).unwrap(), None);
    }

    #[test]
    fn records_older_than_a_week_should_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            SledStore::open(dir.path(), &StoreConfig::default(), Arc::new(SystemClock)).unwrap();
        let now = 1_800_000_000_000;
        s.accept_command(&record("old", now)).unwrap();
        let later = now + COMMAND_TTL_MS + 1;
        assert!(s.unfinished_commands(later).unwrap().is_empty());
        assert_eq!(s.accept_command(&record("old", later)).unwrap(), None);
    }
}
