//! [`Store`] on sled: one tree, keys laid out so every question is a short range scan.
//!
//! | key | value |
//! |---|---|
//! | `r` range first-seq(8, big-endian) | a chunk: the records of one range from one append |
//! | `m` | [`Meta`]: counters, next sequence number |
//! | `b` meter `\0` cadence | last boundary read, Unix ms (8, big-endian) |
//! | `p` meter `\0` profile | a profile's high-water mark: last row, Unix ms; rows read (8 + 8, big-endian) |
//! | `l` meter | last reading stored, Unix ms |
//! | `f` meter | last failure: (Unix ms, kind, message), postcard |
//! | `c` request id | when a command with that id was accepted, Unix ms |
//!
//! Records are kept in chunks, one sled value per range per append (a poll's readings), not
//! one per record: sled spends about 8 µs and 140 bytes of log on every item it stores, which
//! for a 60-byte reading would triple the disk use and cap appends well below the rate a
//! backlog needs. A chunk is `count (u32 LE)`, its top bit set, followed by the
//! postcard of the strings its readings repeat (meter, id type, unit, each once) and
//! `[(offset from first-seq, record)]` with those strings as indexes and the times as
//! differences ([`keys::encode_chunk`]): about 40 % fewer bytes than the records' own
//! encoding (31 instead of 53 per reading in a chunk of the flash bench's polls), and sled
//! writes a chunk's bytes several times over. Chunks written before that format (the top bit
//! clear: the postcard of `[(offset, record)]`) are read as they are, and written in the new
//! one only when a partial acknowledgement rewrites them; an agent older than the format
//! cannot read the new chunks (it would set them aside). Acknowledging part of a chunk
//! rewrites it without the acknowledged records (in the same atomic batch as the counters);
//! the last record acknowledged removes it. Evictions take whole chunks, oldest first.
//!
//! Chunks that cannot be decoded are moved to a second tree, `aside`, and reported.
//!
//! # Layout
//!
//! * [`keys`]: the keys above, and the encoding of chunks and of the small values.
//! * [`meta`]: the counters, written with every batch and rebuilt when lost; the high-water
//!   mark beside the store.
//! * [`evict`]: choosing chunks to evict, evicting them, reporting it.
//! * [`aside`]: setting undecodable chunks aside.
//! * [`state`]: what is kept in memory only — the cursor, records to hand out again, partial
//!   acknowledgements, the chunk decoded last.
//! * [`group`]: group commit, several appends in one batch and one fsync.
//! * [`ops`]: the [`Store`](super::Store) operations.
//! * here: opening, reopening after a write error, the cap the filesystem allows.

mod aside;
mod commands;
mod evict;
mod group;
mod keys;
mod meta;
mod ops;
mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sled::{IVec, Tree};

use super::disk::DiskSync;
use super::{Range, StoreConfig, StoreError};
use crate::clock::SharedClock;
use group::GroupCommit;
use keys::{decode_chunk, parse_key, rkey};
use meta::load_meta;
use state::State;

pub struct SledStore {
    /// The open database. Replaced by [`SledStore::reopen_if_broken`] after a write error: sled stops
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
    /// Appends waiting to share a batch and an fsync (`store.group_commit`).
    group: GroupCommit,
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

fn io(e: sled::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
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
        let store = SledStore {
            handles: RwLock::new(Some(handles)),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            cap: Mutex::new((config.max_bytes.0, None)),
            dir: dir.to_owned(),
            config: config.clone(),
            clock,
            state: Mutex::new(State::new(meta)),
            path,
            group: GroupCommit::new(config.group_commit.0),
        };
        store.effective_cap();
        store.check_high_water(recovered);
        Ok(store)
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
        *st = State::new(meta);
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

    /// Appends written since the store was opened, and the batches (each one fsync) they
    /// were written in: with group commit, fewer batches than appends.
    pub fn group_commits(&self) -> (u64, u64) {
        let (groups, appends) = self.group.counts();
        (appends, groups)
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
    fn first_at_ms(&self, range: Range) -> Option<i64> {
        let (k, v) = self
            .tree()
            .ok()?
            .scan_prefix(keys::range_prefix(range))
            .next()?
            .ok()?;
        let (_, first) = parse_key(&k)?;
        let items = decode_chunk(first, &v).ok()?;
        items.iter().map(|(_, r)| r.at_ms()).min()
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
            Err(e) if is_locked(&e) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) if is_locked(&e) => {
                return Err(StoreError::Locked(format!(
                    "the store at {} is in use by another process ({e})",
                    path.display()
                )));
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

/// sled found its files locked by another open database (its message is all it gives).
fn is_locked(e: &sled::Error) -> bool {
    e.to_string().contains("could not acquire lock")
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
        let (appends, batches) = self.group_commits();
        tracing::debug!(appends, batches, "Store closed");
    }
}
