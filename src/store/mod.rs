//! The durable buffer between the meters and the centre.
//!
//! A reading counts as read only once the store has it on disk. The drain takes the oldest
//! records first and removes them only when RabbitMQ has confirmed them. Everything goes
//! through the small [`Store`] trait: [`SledStore`] is the real one, [`MemoryStore`] the fake
//! for unit tests of orchestration.
//!
//! # Records and order
//!
//! Every record (reading or system event) gets a sequence number from one counter that never
//! goes back, so `{gateway}-{sequence}` is a stable reading id. Records live in three ranges:
//! readings that are evicted first (quarterly, hourly, on-demand), readings kept longest
//! (daily, monthly, yearly) and system events. [`Store::take`] merges the two reading ranges
//! by sequence, so the drain sees readings in the order they were taken, per meter too.
//!
//! # What is durable when
//!
//! "Durable" here means: survives a power cut, not only a killed process. A killed process
//! loses nothing the kernel has accepted; a power cut (or a board reset, a pulled SD card)
//! loses everything in the page cache and the device's write cache that no `fsync` covered.
//! sled's own `flush()` is not enough for that (it uses `sync_file_range`, see [`disk`]), so
//! every step below that says "fsyncs" means sled's flush followed by [`disk`]'s fdatasync of
//! the log, fsync of new blob files and fsync of the directories whose entries changed.
//!
//! * [`Store::append`] writes the records, the boundary marks of the reads they came from, the
//!   high-water marks of the profiles their rows came from ([`ProfileMark`]), the
//!   per-meter bookkeeping and the counters in **one atomic batch**, then fsyncs, and only then
//!   returns. A crash or power cut before the fsync loses the whole batch (the caller was never
//!   told it was stored, and the boundary is not marked read, so the beat reads it again); one
//!   after it loses nothing. There is never a boundary marked done without its readings, nor a
//!   reading without its boundary mark, nor a profile row counted read without its readings
//!   (or read twice by the next profile read): sled's recovery replays whole batches or none.
//!   A batch whose records cannot be encoded is refused before anything is written (the
//!   caller keeps it, as for a full disk); the store's own small values (counters, a meter's
//!   last failure) are encoded by a function that cannot fail, so no batch ever carries an
//!   empty value in their place.
//! * **Group commit** (`store.group_commit`, 5 ms by default, at most [`MAX_GROUP_COMMIT`],
//!   0 = off): appends that arrive within the window of each other, from any bus, are
//!   written as one atomic batch (in the order [`Append::extend`] would merge them, borrowed,
//!   not copied) and covered by one fsync. What changed is only who shares the batch:
//!   every append still returns only after the fsync that covers it, so a poll still
//!   counts as read only once its readings are on disk; a cut before that fsync loses the
//!   whole group, none of whose callers was told it was stored, and one after it loses none
//!   of it. Each caller gets the sequence numbers of its
//!   own records ([`Appended::split`]). A merged batch that fails is written again caller by
//!   caller, so a batch that cannot be encoded fails its own caller only. Groups hold at most
//!   a couple of thousand records (chunks stay small values). An append waits the window
//!   only when there is company (others waiting, or the last group had several): a quiet
//!   gateway's lone poll, or a caller appending in a loop, is written at once, as before.
//!   The buses append with [`Store::append_async`]: an append waiting for its group holds no
//!   thread, only the group's leader writes and fsyncs (one blocking thread), and every
//!   caller is told its result after that fsync, exactly as a blocking `append` returns.
//! * [`Store::take`] hands out only records whose append has returned (its fsync done), so
//!   nothing reaches the broker that a crash could make the store forget.
//! * Taking changes nothing on disk. After a crash or a reopen, everything taken but not
//!   acknowledged is pending again and will be sent again, with the same reading ids: delivery
//!   is at least once, and duplicates are recognisable.
//! * [`Store::ack`] removes the chunks whose records are now all acknowledged, with the
//!   counters, in one atomic batch, without an fsync of its own: sled's background flush (a
//!   real fsync) makes it durable within [`StoreConfig::ack_flush`], and [`Store::flush`] at
//!   shutdown at once. Acknowledgements of part of a chunk are kept in memory and written (the
//!   chunk rewritten without them) by the next `maintain` or `flush`. A crash or a power cut
//!   before either means duplicates, never loss.
//! * Commands from the centre ([`CommandLog`], one record per `request_id`):
//!   [`CommandLog::accept_command`] writes the record — the parsed command, state *accepted*
//!   — and fsyncs before it returns, and control acknowledges the command to the broker, and
//!   queues its polls, only after that. A crash before the fsync: the broker still has the
//!   command and delivers it again. A crash after it: the record is there, and the next start
//!   finds it in [`CommandLog::unfinished_commands`] and runs the command to its end.
//!   [`CommandLog::finish_command`] writes the final reply into the record (state *done*) and
//!   fsyncs before control sends that reply, so a command is never run again once its reply
//!   went out; a crash between the fsync and the send loses that one reply (the same
//!   `request_id` again gets it from the record). [`CommandLog::forget_command`] (a command
//!   that could not be queued) removes the record, durably. Records are forgotten a week
//!   after they were accepted, by the next `accept_command` or `unfinished_commands`.
//! * [`Store::first_time`] (a bare request id, the older form) fsyncs before it says "first".
//! * Evictions (the store is over `max_bytes`, or a record is older than `max_age`) happen
//!   inside the batch that caused them, together with the eviction counters. The system event
//!   that reports them is written by the next [`Store::maintain`] (once a minute), from those
//!   counters, so a crash in between delays the report but never loses it. Eviction is the
//!   only way a readable record leaves without being delivered.
//! * A chunk that cannot be decoded (met by `take`, first time or resent) is copied to the
//!   `aside` tree, then removed with its counters and a `store_corruption` event in one batch,
//!   fsynced. A crash between the two leaves it in both places, and the next take sets it
//!   aside again; records of other chunks waiting to be resent keep waiting.
//! * The high-water mark beside the store (`store.seq`: the sequence number after the last
//!   durable one, written by `maintain` and `flush`) is replaced atomically and durably (temp
//!   file, fsync, rename, fsync of the directory): after any cut it holds a value that was
//!   true, so a store that comes back with less than it says is known to have lost its tail.
//! * A store sled cannot open at all is moved aside with a durable rename before a new one is
//!   started (`agent`), so a cut right after cannot bring the damaged one back. A store whose
//!   files another process holds is [`StoreError::Locked`], never damaged: it is left alone.
//!
//! Counters (depth and bytes per range, evictions, the next sequence number) are kept in the
//! same batches as the records they count, so they are right after a crash and nothing is
//! counted by scanning. What is in memory only (what was taken, what came back, partial
//! acknowledgements) is lost by a crash without harm: everything not acknowledged on disk is
//! handed out again.
//!
//! Where these rules live: `sled_store/ops.rs` (append, take, ack), `sled_store/meta.rs`
//! (counters, high-water mark), `sled_store/evict.rs`, `sled_store/aside.rs`,
//! `sled_store/state.rs` (the in-memory part), [`disk`] (the fsyncs).

pub mod disk;
mod memory;
mod sled_store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use memory::MemoryStore;
pub use sled_store::SledStore;

use crate::primitives::{ByteSize, HumanDuration, Problems};
use crate::reading::{Cadence, EventKind, Obis, Reading, SystemEvent};

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Above this many bytes of buffered records, the oldest are evicted (SPEC §8 order).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Records older than this are evicted, whatever the space.
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// sled's page cache. Small: a gateway has little RAM and the buffer is read once.
    #[serde(default = "default_cache")]
    pub cache: ByteSize,
    /// How soon an acknowledgement reaches the disk. A crash within this window means the
    /// acknowledged records are sent again (same ids), never that they are lost.
    #[serde(default = "default_ack_flush")]
    pub ack_flush: HumanDuration,
    /// Group commit: how long an append waits for others (from any bus) to share its batch
    /// and its fsync. Each still returns only once the fsync that covers it is done. 0 = off
    /// (one fsync per append); at most [`MAX_GROUP_COMMIT`].
    #[serde(default = "default_group_commit")]
    pub group_commit: HumanDuration,
}

/// The longest `store.group_commit` allowed: every poll waits up to this long for its fsync
/// to begin, on top of the fsync itself.
pub const MAX_GROUP_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

fn default_max_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_age() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(90 * 86_400))
}
fn default_cache() -> ByteSize {
    ByteSize(4 << 20)
}
fn default_ack_flush() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(500))
}
fn default_group_commit() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(5))
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
            cache: default_cache(),
            ack_flush: default_ack_flush(),
            group_commit: default_group_commit(),
        }
    }
}

impl StoreConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if self.max_bytes.0 < 64 << 10 {
            p.push(format!("{at}.max_bytes"), "must be at least 64KiB");
        }
        if self.max_age.0 < std::time::Duration::from_secs(3600) {
            p.push(format!("{at}.max_age"), "must be at least 1h");
        }
        if self.cache.0 < 256 << 10 {
            p.push(format!("{at}.cache"), "must be at least 256KiB");
        }
        if self.group_commit.0 > MAX_GROUP_COMMIT {
            p.push(
                format!("{at}.group_commit"),
                "must be at most 100ms (0 turns group commit off)",
            );
        }
    }
}

/// Which records [`Store::take`] hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Readings,
    Events,
}

/// Where a record lives. The order here is the eviction order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Range {
    /// Quarterly, hourly and on-demand readings.
    Profile = 0,
    /// System events.
    Events = 1,
    /// Daily, monthly and yearly readings.
    Billing = 2,
}

impl Range {
    pub const ALL: [Range; 3] = [Range::Profile, Range::Events, Range::Billing];

    pub fn of(record: &Record) -> Range {
        match record {
            Record::Reading(r) => Range::of_reading(r),
            Record::Event(_) => Range::Events,
        }
    }

    /// The range of a reading: interval data is evicted first.
    pub fn of_reading(reading: &Reading) -> Range {
        if reading.cadence.evict_first() {
            Range::Profile
        } else {
            Range::Billing
        }
    }

    pub fn stream(self) -> Stream {
        match self {
            Range::Events => Stream::Events,
            _ => Stream::Readings,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Range::Profile => "profile",
            Range::Events => "events",
            Range::Billing => "billing",
        }
    }
}

/// A buffered record's identity: enough to acknowledge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub seq: u64,
    pub range: Range,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Reading(Reading),
    Event(SystemEvent),
}

impl Record {
    /// Gateway time of the record: when it was read, or when the event happened.
    pub fn at_ms(&self) -> i64 {
        match self {
            Record::Reading(r) => r.read_at.ms,
            Record::Event(e) => e.at.ms,
        }
    }
}

/// A record handed out by [`Store::take`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub record: Record,
}

/// "The read of `boundary` for (`meter`, `cadence`) is done": persisted with its readings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub meter: String,
    pub cadence: Cadence,
    /// The boundary, in Unix milliseconds.
    pub boundary_ms: i64,
}

/// "Every row of (`meter`, `profile`) up to `last_ms` is buffered": the high-water mark of a
/// profile-based read, persisted with the rows' readings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileMark {
    pub meter: String,
    pub profile: Obis,
    /// The newest row's time, in Unix milliseconds: the next read asks for rows after it.
    pub last_ms: i64,
    /// Rows this batch adds, for the count `status` shows.
    pub rows: u64,
}

/// What the store knows of a (meter, profile), for `status` and `inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProfileState {
    pub meter: String,
    pub profile: Obis,
    /// The high-water mark: the newest row buffered, Unix ms.
    pub last_ms: i64,
    /// Rows read by profile-based reads since the store was created.
    pub rows: u64,
}

/// One atomic write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Append {
    pub readings: Vec<Reading>,
    pub events: Vec<SystemEvent>,
    pub marks: Vec<Mark>,
    pub profile_marks: Vec<ProfileMark>,
}

impl Append {
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
            && self.events.is_empty()
            && self.marks.is_empty()
            && self.profile_marks.is_empty()
    }

    /// The records it holds (readings and events): what gets sequence numbers.
    pub fn records(&self) -> usize {
        self.readings.len() + self.events.len()
    }

    /// Adds `other` after this one: group commit writes several callers' appends as one
    /// batch. Every field is merged here (and only here), so a new field needs one line.
    /// Later values win where two set the same key (a mark, a last failure), as they would
    /// have in two appends one after the other.
    pub fn extend(&mut self, other: Append) {
        let Append {
            readings,
            events,
            marks,
            profile_marks,
        } = other;
        self.readings.extend(readings);
        self.events.extend(events);
        self.marks.extend(marks);
        self.profile_marks.extend(profile_marks);
    }
}

impl Appended {
    /// Splits what the append of a merged batch did into what each caller's append would
    /// have: `shapes` are the callers' (readings, events), in the order they were merged
    /// with [`Append::extend`]. The merged sequence numbers are all the readings, then all
    /// the events, so each caller gets its readings' run and its events' run. Evictions are
    /// reported once, with the first caller.
    pub fn split(self, shapes: &[(usize, usize)]) -> Vec<Appended> {
        let readings: usize = shapes.iter().map(|s| s.0).sum();
        let (mut r, mut e) = (0, readings);
        let mut evicted = self.evicted;
        shapes
            .iter()
            .map(|&(nr, ne)| {
                let mut seqs = Vec::with_capacity(nr + ne);
                seqs.extend_from_slice(&self.seqs[r..r + nr]);
                seqs.extend_from_slice(&self.seqs[e..e + ne]);
                r += nr;
                e += ne;
                Appended {
                    seqs,
                    evicted: std::mem::take(&mut evicted),
                }
            })
            .collect()
    }
}

/// What an append did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Sequence numbers given to the records, readings first, in order.
    pub seqs: Vec<u64>,
    /// Records evicted to make room, reported in an eviction event within the same batch.
    pub evicted: u64,
}

/// Per-range depth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depth {
    pub count: u64,
    pub bytes: u64,
}

/// What `status` shows; cheap to compute (no scan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub profile: Depth,
    pub billing: Depth,
    pub events: Depth,
    /// Records evicted since the store was created.
    pub evicted: u64,
    /// Records evicted since the store was opened, by [`Range`] (profile, events, billing):
    /// the metrics' counters by eviction class.
    pub evicted_by_class: [u64; 3],
    /// Records that could not be decoded and were set aside.
    pub set_aside: u64,
    /// Gateway time of the oldest record not yet delivered.
    pub oldest_ms: Option<i64>,
    /// When the broker last confirmed a delivery.
    pub last_drain_ms: Option<i64>,
    pub next_seq: u64,
    /// The store's files, as the filesystem counts them.
    pub disk_bytes: u64,
}

impl Stats {
    pub fn readings(&self) -> u64 {
        self.profile.count + self.billing.count
    }
    pub fn bytes(&self) -> u64 {
        self.profile.bytes + self.billing.bytes + self.events.bytes
    }
}

/// What the store knows of a meter, for `status` and `inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterState {
    pub meter: String,
    /// Gateway time of the last reading stored.
    pub last_read_ms: Option<i64>,
    /// The last failure reported for the meter.
    pub last_failure: Option<LastFailure>,
}

/// A meter's last failure: the newest system event about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastFailure {
    /// Gateway time of the event.
    pub at_ms: i64,
    pub kind: EventKind,
    pub message: String,
}

impl LastFailure {
    pub fn of(event: &SystemEvent) -> LastFailure {
        LastFailure {
            at_ms: event.at.ms,
            kind: event.kind,
            message: event.message.clone(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The write did not happen (disk full, I/O error). Keep the data and try again later.
    #[error("the store could not write: {0}")]
    Unavailable(String),
    /// Another process holds the store's files (sled's lock, still held after several
    /// seconds of waiting): leave them alone; do not move them aside.
    #[error("{0}")]
    Locked(String),
    /// The store's files cannot be opened at all.
    #[error("the store at {path} cannot be opened: {reason}")]
    Open { path: PathBuf, reason: String },
}

/// What [`Store::append_async`] returns: the append's result, once it is durable.
pub type AppendFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Appended, StoreError>> + Send>>;

/// The buffer. All methods but [`Store::append_async`] may block on disk I/O: call them from
/// a blocking thread.
pub trait Store: CommandLog + Send + Sync + 'static {
    /// Writes `batch` atomically and durably (see the module doc). Evicts if needed.
    fn append(&self, batch: Append) -> Result<Appended, StoreError>;
    /// [`Store::append`] for async callers, with the same promise: resolves once `batch` is
    /// durable, or failed. Waiting costs no thread where the store can help it (the sled
    /// store's group commit); by default it is `append` on a blocking thread. Dropping the
    /// future does not take the batch back: it may still be written. The batch is shared,
    /// not copied: a caller that must keep it should it fail (the bus's spill) keeps a
    /// reference, and the store writes from its own without a copy where it can.
    fn append_async(self: std::sync::Arc<Self>, batch: std::sync::Arc<Append>) -> AppendFuture {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.append(std::sync::Arc::unwrap_or_clone(batch)))
                .await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store task failed: {e}"))))
        })
    }
    /// Up to `max` of the oldest records of `stream` not already taken, oldest first.
    fn take(&self, stream: Stream, max: usize) -> Result<Vec<Entry>, StoreError>;
    /// The broker has them: remove. Unknown ids (evicted meanwhile) are ignored.
    fn ack(&self, ids: &[EntryId]) -> Result<(), StoreError>;
    /// Not delivered: hand them out again, before anything newer.
    fn nack(&self, ids: &[EntryId]);
    /// Depth, bytes, evictions, oldest record, last drain.
    fn stats(&self) -> Result<Stats, StoreError>;
    /// The last boundary read for (`meter`, `cadence`), in Unix milliseconds.
    fn boundary(&self, meter: &str, cadence: Cadence) -> Result<Option<i64>, StoreError>;
    /// Per-meter last read and last failure.
    fn meters(&self) -> Result<Vec<MeterState>, StoreError>;
    /// The high-water mark of (`meter`, `profile`): the newest row buffered, Unix ms.
    fn profile_mark(&self, meter: &str, profile: &Obis) -> Result<Option<i64>, StoreError>;
    /// Every (meter, profile) read so far, with its mark and row count.
    fn profiles(&self) -> Result<Vec<ProfileState>, StoreError>;
    /// Evicts what `max_age` says is too old, and reports every eviction since the last call
    /// in one system event. Called once a minute. Returns the records evicted by age.
    fn maintain(&self) -> Result<u64, StoreError>;
    /// Makes every acknowledgement durable now (on shutdown).
    fn flush(&self) -> Result<(), StoreError>;
    /// Records `key` (a command's request id), durably, and says whether it is new. Keys are
    /// kept for a week. Control uses [`CommandLog`] instead, which keeps what the command was
    /// and how it ended; this stays until `sled_store.rs` is split, then goes.
    fn first_time(&self, key: &str) -> Result<bool, StoreError>;
}

/// How long a command's record is kept: the same `request_id` within it runs once.
pub const COMMAND_TTL_MS: i64 = 7 * 86_400_000;

/// A command the gateway accepted, as the store keeps it: what to run and, once it has run,
/// the reply that said so. What the strings hold is control's business (JSON); the store
/// keeps them as they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub request_id: String,
    /// When it was accepted, Unix ms; [`COMMAND_TTL_MS`] later the record is forgotten.
    pub accepted_ms: i64,
    /// The parsed command.
    pub command: String,
    /// The final reply, once the command is done; `None` while it runs.
    pub outcome: Option<String>,
}

/// Accepted commands, durably (see the module doc). Every [`Store`] is one. All methods may
/// block on disk I/O.
pub trait CommandLog {
    /// Records `record` durably, unless one with its `request_id` is kept: then returns that
    /// one and writes nothing. First forgets records accepted more than [`COMMAND_TTL_MS`]
    /// before `record.accepted_ms`.
    fn accept_command(&self, record: &CommandRecord) -> Result<Option<CommandRecord>, StoreError>;
    /// The command is done: keeps `outcome` in its record, durably. Unknown ids are ignored.
    fn finish_command(&self, request_id: &str, outcome: &str) -> Result<(), StoreError>;
    /// Removes a command's record, durably (it was accepted but could not be queued).
    fn forget_command(&self, request_id: &str) -> Result<(), StoreError>;
    /// Commands accepted and not done, oldest first: to finish after a restart. Forgets
    /// records accepted more than [`COMMAND_TTL_MS`] before `now_ms` first.
    fn unfinished_commands(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError>;
}

/// The sequence number a new store starts at: its creation time in microseconds, so that a
/// data directory that is wiped and recreated never hands out an id the centre has already
/// seen (the centre de-duplicates on reading ids). A clock that is obviously unset (before
/// 2020, an RTC-less board at boot) gives a random start far above any such time instead.
pub fn initial_sequence(now_ms: i64) -> u64 {
    match clock_floor(now_ms) {
        0 => (1u64 << 60) + fastrand::u64(..1u64 << 59),
        floor => floor,
    }
}

/// The clock in microseconds, or 0 for a clock that is obviously unset (before 2020).
pub(crate) fn clock_floor(now_ms: i64) -> u64 {
    const Y2020_MS: i64 = 1_577_836_800_000;
    if now_ms >= Y2020_MS {
        now_ms as u64 * 1000
    } else {
        0
    }
}

/// The size of a record as the store encodes it (for benchmarks, capacity planning and the
/// fake's byte counts); 0 for a record that cannot be encoded, which no store would take
/// (its append fails).
pub fn encoded_len(record: &Record) -> usize {
    postcard::to_stdvec(record).map_or(0, |v| v.len())
}

#[cfg(test)]
pub(crate) mod tests;
