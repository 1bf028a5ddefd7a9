//! Group commit: appends that arrive within `store.group_commit` of each other, from any bus,
//! are written as one sled batch with one fsync.
//!
//! The first append to arrive while no group is being written leads: it waits out the window
//! (or until the group is full) — unless it is alone and the group before it was too, so a
//! quiet gateway's lone poll, or one caller appending in a loop, waits for nobody — takes
//! every append that arrived meanwhile, merges them with
//! [`Append::extend`], writes and fsyncs them as one, and hands each caller its own part of
//! the result ([`Appended::split`]). The others wait and return only once that fsync is done
//! — the same promise as an append of their own. Appends arriving while a group is written
//! form the next group (led by the first of them, once the leader has returned), with no
//! window of their own: the fsync in progress is their window.
//!
//! A merged batch that fails is tried again caller by caller, so one caller's records that
//! cannot be encoded fail that caller only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::super::{Append, Appended, StoreError};

/// At most this many records in one group, so a chunk (one sled value per range per group)
/// stays far below the size at which sled writes values as files of their own, and a
/// partial acknowledgement rewrites little.
pub(super) const MAX_GROUP_RECORDS: usize = 2048;

pub(super) struct GroupCommit {
    window: Duration,
    queue: Mutex<Queue>,
    /// An append joined the queue (the leader waits on this).
    arrived: Condvar,
    /// A group was written, or the leader left (the others wait on this).
    committed: Condvar,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    waiting: VecDeque<(u64, Append)>,
    /// Records in `waiting`.
    records: usize,
    done: HashMap<u64, Result<Appended, StoreError>>,
    /// Someone is collecting or writing a group.
    leading: bool,
    /// The last group written had more than one append in it: others are about, so the next
    /// leader waits the window for them.
    company: bool,
    /// Groups written and appends in them, since the store was opened (for tests and
    /// benchmarks).
    groups: u64,
    appends: u64,
}

impl GroupCommit {
    pub(super) fn new(window: Duration) -> GroupCommit {
        GroupCommit {
            window,
            queue: Mutex::new(Queue::default()),
            arrived: Condvar::new(),
            committed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (groups written, appends in them) so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        let q = self.lock();
        (q.groups, q.appends)
    }

    /// Appends `batch` through `commit` (write and fsync one batch), together with whatever
    /// other appends arrive within the window. Returns once `batch` is durable, or failed.
    pub(super) fn append(
        &self,
        batch: Append,
        commit: impl Fn(Append) -> Result<Appended, StoreError>,
    ) -> Result<Appended, StoreError> {
        if self.window.is_zero() {
            let r = commit(batch);
            let mut q = self.lock();
            q.groups += 1;
            q.appends += 1;
            return r;
        }
        let mut q = self.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.records += batch.records();
        q.waiting.push_back((ticket, batch));
        self.arrived.notify_one();
        loop {
            if let Some(r) = q.done.remove(&ticket) {
                return r;
            }
            if !q.leading {
                break;
            }
            q = self.committed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        // Lead: collect, write, hand out, until our own append is among those written.
        q.leading = true;
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
        loop {
            let mut group = Vec::new();
            let mut records = 0;
            while let Some((_, b)) = q.waiting.front() {
                let n = b.records();
                if !group.is_empty() && records + n > MAX_GROUP_RECORDS {
                    break;
                }
                records += n;
                group.extend(q.waiting.pop_front());
            }
            q.records -= records;
            drop(q);
            let tickets: Vec<u64> = group.iter().map(|(t, _)| *t).collect();
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_group(group, &commit)
            }));
            q = self.lock();
            q.groups += 1;
            q.appends += tickets.len() as u64;
            q.company = tickets.len() > 1;
            let results = match results {
                Ok(r) => r,
                Err(panic) => {
                    // Let the others go (with an error: not stored) and someone else lead.
                    for t in tickets {
                        q.done.insert(
                            t,
                            Err(StoreError::Unavailable(
                                "the store's append panicked".into(),
                            )),
                        );
                    }
                    q.leading = false;
                    self.committed.notify_all();
                    drop(q);
                    std::panic::resume_unwind(panic);
                }
            };
            q.done.extend(tickets.into_iter().zip(results));
            if let Some(r) = q.done.remove(&ticket) {
                q.leading = false;
                self.committed.notify_all();
                return r;
            }
            self.committed.notify_all();
        }
    }
}

/// Writes a group as one batch; if that fails, each append on its own, so that the error
/// of one is not everyone's.
fn commit_group(
    group: Vec<(u64, Append)>,
    commit: &impl Fn(Append) -> Result<Appended, StoreError>,
) -> Vec<Result<Appended, StoreError>> {
    if group.len() == 1 {
        return group.into_iter().map(|(_, b)| commit(b)).collect();
    }
    let shapes: Vec<(usize, usize)> = group
        .iter()
        .map(|(_, b)| (b.readings.len(), b.events.len()))
        .collect();
    let mut merged = Append::default();
    let mut copies = Vec::with_capacity(group.len());
    for (_, b) in group {
        copies.push(b.clone());
        merged.extend(b);
    }
    match commit(merged) {
        Ok(a) => a.split(&shapes).into_iter().map(Ok).collect(),
        Err(_) => copies.into_iter().map(commit).collect(),
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
        fn commit(&self, b: Append) -> Result<Appended, StoreError> {
            if b.events.iter().any(|e| e.message == "poison") {
                return Err(StoreError::Unavailable("cannot encode".into()));
            }
            let n = b.records() as u64;
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
