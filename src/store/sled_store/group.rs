//! Group commit: appends that arrive within `store.group_commit` of each other, from any bus,
//! are written as one sled batch with one fsync.
//!
//! An append is handed in with a [`Reply`] ([`GroupCommit::submit`]) and waits for it without
//! a thread of its own: a bus's append awaits a oneshot
//! ([`SledStore::append_async`](super::SledStore)), so a boundary with a thousand meters parks
//! no thread per poll (each blocking thread is a stack and malloc state of its own; that was
//! most of the agent's memory at work). The append that finds nobody leading starts the
//! leader ([`GroupCommit::lead`], one blocking thread), which writes groups until nobody is
//! waiting. For each group it waits out the window (or until the group is full) — unless the
//! first append is alone and the group before it was too, so a quiet gateway's lone poll, or
//! one caller appending in a loop, waits for nobody — takes every append waiting, merges them
//! with [`Append::extend`], writes and fsyncs them as one, and only then tells each caller its
//! own part of the result ([`Appended::split`]): the same promise as an append of their own.
//! Appends arriving while a group is written form the next group, with a window of its own.
//! A blocking caller ([`GroupCommit::append`]) that starts the leader leads on its own thread,
//! and so may return a group or two after its own fsync, once nobody waits.
//!
//! A merged batch that fails is tried again caller by caller, so one caller's records that
//! cannot be encoded fail that caller only. A leader that panics drops the replies of its group
//! and of every append waiting, and so does one whose thread never starts (a runtime shutting
//! down, [`GroupCommit::abandon`]): each of those callers is told its append failed (nothing of
//! it was acknowledged as stored), and the next append starts a new leader.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::super::{Append, Appended, StoreError};

/// At most this many records in one group, so a chunk (one sled value per range per group)
/// stays far below the size at which sled writes values as files of their own, and a
/// partial acknowledgement rewrites little.
pub(super) const MAX_GROUP_RECORDS: usize = 2048;

/// Told an append's result, once the fsync that covers it is done (or it failed). Dropped
/// without being called when the append was not written (a leader that panicked).
pub(super) type Reply = Box<dyn FnOnce(Result<Appended, StoreError>) + Send>;

pub(super) struct GroupCommit {
    window: Duration,
    queue: Mutex<Queue>,
    /// An append joined the queue (the leader waits on this).
    arrived: Condvar,
}

struct Waiting {
    batch: Arc<Append>,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// Records in `waiting`.
    records: usize,
    /// A leader is collecting or writing a group.
    leading: bool,
    /// The last group written had more than one append in it: others are about, so the next
    /// group waits the window for them.
    company: bool,
    /// Groups written and appends in them, since the store was opened (for tests and
    /// benchmarks).
    groups: u64,
    appends: u64,
}

/// The leader's hold on the queue: if it unwinds (a panic in the write), the appends waiting
/// are let go unwritten and the next append leads.
struct Leading<'a> {
    group: &'a GroupCommit,
    armed: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.group.abandon();
        }
    }
}

impl GroupCommit {
    pub(super) fn new(window: Duration) -> GroupCommit {
        GroupCommit {
            window,
            queue: Mutex::new(Queue::default()),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Group commit is off (`store.group_commit = 0`): every append is written on its own.
    pub(super) fn is_off(&self) -> bool {
        self.window.is_zero()
    }

    /// (groups written, appends in them) so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        let q = self.lock();
        (q.groups, q.appends)
    }

    /// Hands `batch` in; `reply` is told its result once the fsync covering it is done.
    /// Returns `true` when nobody leads: the caller must then run [`GroupCommit::lead`] on a
    /// thread that may block, or the batch is never written.
    pub(super) fn submit(&self, batch: impl Into<Arc<Append>>, reply: Reply) -> bool {
        let batch = batch.into();
        let mut q = self.lock();
        q.records += batch.records();
        q.waiting.push_back(Waiting { batch, reply });
        self.arrived.notify_one();
        !std::mem::replace(&mut q.leading, true)
    }

    /// Writes groups through `commit` (write and fsync one batch) until nobody is waiting;
    /// for whoever [`GroupCommit::submit`] told to lead.
    pub(super) fn lead(&self, commit: impl Fn(&[Arc<Append>]) -> Result<Appended, StoreError>) {
        let mut leading = Leading {
            group: self,
            armed: true,
        };
        let mut q = self.lock();
        loop {
            if q.waiting.is_empty() {
                q.leading = false;
                leading.armed = false;
                return;
            }
            if !self.is_off() {
                let deadline = Instant::now() + self.window;
                while q.records < MAX_GROUP_RECORDS && (q.company || q.waiting.len() > 1) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    q = self
                        .arrived
                        .wait_timeout(q, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let mut group = Vec::new();
            let mut records = 0;
            while let Some(w) = q.waiting.front() {
                let n = w.batch.records();
                if !group.is_empty() && (self.is_off() || records + n > MAX_GROUP_RECORDS) {
                    break;
                }
                records += n;
                group.extend(q.waiting.pop_front());
            }
            q.records -= records;
            drop(q);
            let (batches, replies): (Vec<Arc<Append>>, Vec<Reply>) =
                group.into_iter().map(|w| (w.batch, w.reply)).unzip();
            let results = commit_group(batches, &commit);
            q = self.lock();
            q.groups += 1;
            q.appends += replies.len() as u64;
            q.company = replies.len() > 1;
            drop(q);
            for (reply, r) in replies.into_iter().zip(results) {
                reply(r);
            }
            q = self.lock();
        }
    }

    /// The leader that [`GroupCommit::submit`] asked for will not run (it panicked, or its
    /// thread was never started: a runtime shutting down): the appends waiting are let go
    /// unwritten, each caller told so, and the next append leads.
    pub(super) fn abandon(&self) {
        let mut q = self.lock();
        let waiting = std::mem::take(&mut q.waiting);
        q.records = 0;
        q.leading = false;
        drop(q);
        // Their replies, dropped unsent, outside the lock.
        drop(waiting);
    }

    /// Appends `batch` through `commit` (write and fsync one batch), together with whatever
    /// other appends arrive within the window, on the caller's thread. Returns once `batch`
    /// is durable, or failed.
    pub(super) fn append(
        &self,
        batch: Append,
        commit: impl Fn(&[Arc<Append>]) -> Result<Appended, StoreError>,
    ) -> Result<Appended, StoreError> {
        if self.is_off() {
            let r = commit(&[Arc::new(batch)]);
            let mut q = self.lock();
            q.groups += 1;
            q.appends += 1;
            return r;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let reply: Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if self.submit(batch, reply) {
            self.lead(commit);
        }
        rx.recv().unwrap_or_else(|_| Err(not_written()))
    }
}

/// What an append is told whose reply was dropped unwritten.
pub(super) fn not_written() -> StoreError {
    StoreError::Unavailable("the store's append failed before it was written".into())
}

/// Writes a group as one batch; if that fails, each append on its own, so that the error
/// of one is not everyone's. `commit` borrows the batches: none is copied, for the merge or
/// for the retries.
fn commit_group(
    group: Vec<Arc<Append>>,
    commit: &impl Fn(&[Arc<Append>]) -> Result<Appended, StoreError>,
) -> Vec<Result<Appended, StoreError>> {
    if group.len() == 1 {
        return vec![commit(&group)];
    }
    let shapes: Vec<(usize, usize)> = group
        .iter()
        .map(|b| (b.readings.len(), b.events.len()))
        .collect();
    match commit(&group) {
        Ok(a) => a.split(&shapes).into_iter().map(Ok).collect(),
        Err(_) => group
            .iter()
            .map(|b| commit(std::slice::from_ref(b)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::reading::{EventKind, Stamp, SystemEvent};

    fn event(n: usize) -> SystemEvent {
        SystemEvent::new(
            EventKind::StoreError,
            Stamp {
                ms: 1_790_000_000_000,
                offset: 0,
            },
            format!("e{n}"),
        )
    }

    /// A stand-in for "write and fsync": numbers the records from a shared counter, takes
    /// `fsync` to do it, and counts the fsyncs that have completed.
    struct FakeDisk {
        next_seq: AtomicU64,
        syncs: AtomicU64,
        fsync: Duration,
    }

    impl FakeDisk {
        fn commit(&self, batches: &[Arc<Append>]) -> Result<Appended, StoreError> {
            let events = || batches.iter().flat_map(|b| &b.events);
            if events().any(|e| e.message == "poison") {
                return Err(StoreError::Unavailable("cannot encode".into()));
            }
            let n = batches.iter().map(|b| b.records()).sum::<usize>() as u64;
            let first = self.next_seq.fetch_add(n, Ordering::SeqCst);
            std::thread::sleep(self.fsync);
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(Appended {
                seqs: (first..first + n).collect(),
                evicted: 0,
            })
        }
    }

    #[test]
    fn concurrent_appends_should_share_fsyncs_and_each_return_after_the_one_covering_it() {
        let disk = Arc::new(FakeDisk {
            next_seq: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            fsync: Duration::from_millis(30),
        });
        let g = Arc::new(GroupCommit::new(Duration::from_millis(20)));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (g, disk) = (g.clone(), disk.clone());
                std::thread::spawn(move || {
                    let batch = Append {
                        events: (0..=i).map(event).collect(),
                        ..Append::default()
                    };
                    let before = disk.syncs.load(Ordering::SeqCst);
                    let a = g.append(batch, |b| disk.commit(b)).unwrap();
                    // An fsync completed after this append was handed in: the one that
                    // covered it (the fake only counts a sync once it is done).
                    assert!(disk.syncs.load(Ordering::SeqCst) > before);
                    (i, a)
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in threads {
            let (i, a) = t.join().unwrap();
            assert_eq!(
                a.seqs.len(),
                i + 1,
                "each caller gets its own records' numbers"
            );
            assert!(a.seqs.windows(2).all(|w| w[1] == w[0] + 1));
            seqs.extend(a.seqs);
        }
        seqs.sort();
        assert_eq!(seqs, (0..36).collect::<Vec<u64>>());
        let syncs = disk.syncs.load(Ordering::SeqCst);
        assert!(syncs < 8, "8 concurrent appends took {syncs} fsyncs");
        assert_eq!(g.counts(), (syncs, 8));
    }

    #[test]
    fn a_group_that_fails_should_fail_only_the_append_that_caused_it() {
        let disk = Arc::new(FakeDisk {
            next_seq: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            fsync: Duration::from_millis(1),
        });
        let g = Arc::new(GroupCommit::new(Duration::from_millis(50)));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (g, disk) = (g.clone(), disk.clone());
                std::thread::spawn(move || {
                    let mut e = event(i);
                    if i == 2 {
                        e.message = "poison".into();
                    }
                    let batch = Append {
                        events: vec![e],
                        ..Append::default()
                    };
                    (i, g.append(batch, |b| disk.commit(b)))
                })
            })
            .collect();
        for t in threads {
            let (i, r) = t.join().unwrap();
            assert_eq!(r.is_err(), i == 2, "{i}: {r:?}");
        }
    }

    #[test]
    fn appends_handed_in_should_be_written_by_one_leader_and_each_told_after_its_fsync() {
        let disk = FakeDisk {
            next_seq: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            fsync: Duration::from_millis(1),
        };
        let g = GroupCommit::new(Duration::from_millis(20));
        let (tx, rx) = std::sync::mpsc::channel();
        let syncs = Arc::new(AtomicU64::new(0));
        let mut leaders = 0;
        // Fifty callers hand their appends in and none of them waits on a thread: the only
        // thread that writes is the one leader.
        for i in 0..50 {
            let (tx, syncs) = (tx.clone(), syncs.clone());
            let batch = Append {
                events: vec![event(i)],
                ..Append::default()
            };
            let reply: Reply = Box::new(move |r| {
                tx.send((i, r, syncs.load(Ordering::SeqCst))).unwrap();
            });
            if g.submit(batch, reply) {
                leaders += 1;
            }
        }
        assert_eq!(
            leaders, 1,
            "only the first append to find nobody leading leads"
        );
        g.lead(|b| {
            let r = disk.commit(b);
            syncs.store(disk.syncs.load(Ordering::SeqCst), Ordering::SeqCst);
            r
        });
        drop(tx);
        let mut seqs = Vec::new();
        for (i, r, synced) in rx {
            let a = r.unwrap();
            assert_eq!(a.seqs.len(), 1, "{i}");
            assert!(synced > 0, "{i} was told before any fsync");
            seqs.extend(a.seqs);
        }
        seqs.sort();
        assert_eq!(seqs, (0..50).collect::<Vec<u64>>());
        let (groups, appends) = g.counts();
        assert_eq!(appends, 50);
        assert!(groups < 50, "50 appends took {groups} fsyncs");
        // The leader left once nobody waited: the next append leads again.
        assert!(g.submit(Append::default(), Box::new(|_| ())));
    }

    #[test]
    fn a_leader_that_panics_should_fail_its_callers_and_let_the_next_append_lead() {
        let g = GroupCommit::new(Duration::from_millis(5));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            let reply: Reply = Box::new(move |r| tx.send(r).unwrap());
            g.submit(
                Append {
                    events: vec![event(i)],
                    ..Append::default()
                },
                reply,
            );
        }
        drop(tx);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.lead(|_| panic!("the disk layer panicked"))
        }));
        assert!(panicked.is_err());
        // Nobody was told "stored"; every reply was dropped unsent.
        assert_eq!(rx.iter().count(), 0);
        let disk = FakeDisk {
            next_seq: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            fsync: Duration::ZERO,
        };
        let a = g
            .append(
                Append {
                    events: vec![event(9)],
                    ..Append::default()
                },
                |b| disk.commit(b),
            )
            .unwrap();
        assert_eq!(a.seqs, vec![0]);
    }

    #[test]
    fn a_leader_that_never_runs_should_let_its_callers_go_and_the_next_append_lead() {
        let g = GroupCommit::new(Duration::from_millis(5));
        let (tx, rx) = std::sync::mpsc::channel::<Result<Appended, StoreError>>();
        let tx2 = tx.clone();
        assert!(g.submit(Append::default(), Box::new(move |r| tx.send(r).unwrap())));
        assert!(!g.submit(Append::default(), Box::new(move |r| tx2.send(r).unwrap())));
        g.abandon();
        // Both replies were dropped unsent: each caller hears "not written", never "stored".
        assert!(rx.recv().is_err());
        assert!(g.submit(Append::default(), Box::new(|_| ())));
    }

    #[test]
    fn a_lone_append_should_wait_no_longer_than_the_window() {
        let disk = FakeDisk {
            next_seq: AtomicU64::new(7),
            syncs: AtomicU64::new(0),
            fsync: Duration::ZERO,
        };
        let g = GroupCommit::new(Duration::from_millis(5));
        let t = Instant::now();
        let a = g
            .append(
                Append {
                    events: vec![event(0)],
                    ..Append::default()
                },
                |b| disk.commit(b),
            )
            .unwrap();
        assert_eq!(a.seqs, vec![7]);
        assert!(t.elapsed() < Duration::from_secs(1));
        let off = GroupCommit::new(Duration::ZERO);
        let a = off.append(Append::default(), |b| disk.commit(b)).unwrap();
        assert!(a.seqs.is_empty());
    }
}
