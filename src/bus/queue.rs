//! The queue of polls waiting for a bus, sans-IO.
//!
//! Served by priority (on-demand first, then yearly, monthly, daily, hourly, quarterly), and
//! first come first served within a priority. A scheduled poll for a (meter, cadence) that is
//! still queued when the next boundary arrives is not queued twice: the queued one is moved
//! to the newer boundary (its values will be read now, so they belong to the newer boundary)
//! and the caller is told, to raise an overrun event.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

use super::PollRequest;
use crate::reading::Cadence;

/// What became of a pushed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The same (meter, cadence) was still queued for `skipped`; it now reads the newer
    /// boundary instead.
    Overrun {
        skipped: Option<Timestamp>,
    },
}

#[derive(Default)]
pub struct PollQueue {
    /// (priority, arrival) → request.
    entries: BTreeMap<(u8, u64), PollRequest>,
    /// Scheduled (meter, cadence) → its key in `entries`.
    scheduled: HashMap<(String, Cadence), (u8, u64)>,
    arrivals: u64,
}

impl PollQueue {
    pub fn push(&mut self, req: PollRequest) -> Pushed {
        let continuation = req.rows.as_ref().is_some_and(|j| j.is_continuation());
        if req.cadence != Cadence::OnDemand {
            let k = (req.meter.clone(), req.cadence);
            if let Some(key) = self.scheduled.get(&k).copied() {
                let queued_continues = self
                    .entries
                    .get(&key)
                    .and_then(|q| q.rows.as_ref())
                    .is_some_and(|j| j.is_continuation());
                if continuation {
                    // A newer read of the same profile is queued: it starts from the same
                    // high-water mark, so this chunk is not needed.
                    return Pushed::Queued;
                }
                if queued_continues {
                    // The next chunk of a profile read gives way to the boundary's own read,
                    // which goes on from the same mark, at the cadence's priority.
                    self.entries.remove(&key);
                    self.scheduled.remove(&k);
                } else if let Some(queued) = self.entries.get_mut(&key) {
                    let skipped = queued.boundary;
                    queued.boundary = req.boundary;
                    queued.flags = queued.flags | req.flags;
                    return Pushed::Overrun { skipped };
                }
            }
        }
        self.arrivals += 1;
        // The next chunks of profile reads (a long gap, a backfill) after everything else.
        let priority = if continuation {
            u8::MAX
        } else {
            req.cadence.priority()
        };
        let key = (priority, self.arrivals);
        if req.cadence != Cadence::OnDemand {
            self.scheduled.insert((req.meter.clone(), req.cadence), key);
        }
        self.entries.insert(key, req);
        Pushed::Queued
    }

    pub fn pop(&mut self) -> Option<PollRequest> {
        let (_, req) = self.entries.pop_first()?;
        if req.cadence != Cadence::OnDemand {
            self.scheduled.remove(&(req.meter.clone(), req.cadence));
        }
        Some(req)
    }

    /// Takes the first request that `ready` accepts, leaving the others queued in order.
    pub fn pop_where(&mut self, ready: impl Fn(&PollRequest) -> bool) -> Option<PollRequest> {
        let key = *self
            .entries
            .iter()
            .find(|(_, r)| ready(r))
            .map(|(k, _)| k)?;
        let req = self.entries.remove(&key)?;
        if req.cadence != Cadence::OnDemand {
            self.scheduled.remove(&(req.meter.clone(), req.cadence));
        }
        Some(req)
    }

    /// Removes the queued polls of `request_id` (on-demand polls, a backfill's next chunk).
    pub fn cancel(&mut self, request_id: &str) -> Vec<PollRequest> {
        let keys: Vec<(u8, u64)> = self
            .entries
            .iter()
            .filter(|(_, r)| r.request_id.as_deref() == Some(request_id))
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter_map(|k| self.entries.remove(k)).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PollRequest> {
        self.entries.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Flags;

    fn req(meter: &str, cadence: Cadence) -> PollRequest {
        PollRequest::new(meter, cadence)
    }

    #[test]
    fn on_demand_should_jump_the_queue_and_billing_go_before_profile() {
        let mut q = PollQueue::default();
        q.push(req("a", Cadence::Quarterly));
        q.push(req("b", Cadence::Daily));
        q.push(req("c", Cadence::OnDemand));
        q.push(req("d", Cadence::Quarterly));
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).map(|r| r.meter).collect();
        assert_eq!(order, ["c", "b", "a", "d"]);
    }

    #[test]
    fn a_still_queued_scheduled_poll_should_not_be_queued_twice() {
        let mut q = PollQueue::default();
        let t1: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        let mut a = req("m", Cadence::Quarterly);
        a.boundary = Some(t1);
        let mut b = req("m", Cadence::Quarterly);
        b.boundary = Some(t2);
        b.flags = Flags::LATE;
        assert_eq!(q.push(a), Pushed::Queued);
        assert_eq!(q.push(b), Pushed::Overrun { skipped: Some(t1) });
        assert_eq!(q.len(), 1);
        let got = q.pop().unwrap();
        assert_eq!(got.boundary, Some(t2));
        assert!(got.flags.contains(Flags::LATE));
        // Once popped, the next boundary queues normally.
        assert_eq!(q.push(req("m", Cadence::Quarterly)), Pushed::Queued);
    }

    #[test]
    fn on_demand_polls_should_not_be_merged_and_should_cancel_by_request_id() {
        let mut q = PollQueue::default();
        let mut a = req("m", Cadence::OnDemand);
        a.request_id = Some("r1".into());
        let mut b = req("m", Cadence::OnDemand);
        b.request_id = Some("r2".into());
        q.push(a);
        q.push(b);
        assert_eq!(q.len(), 2);
        assert_eq!(q.cancel("r1").len(), 1);
        assert_eq!(q.pop().unwrap().request_id.as_deref(), Some("r2"));
    }

    fn continuation(meter: &str, cadence: Cadence) -> PollRequest {
        let mut r = req(meter, cadence);
        let mut job = crate::bus::rows::RowsJob::new(crate::reading::Obis([1, 0, 99, 1, 0, 255]));
        job.next = Some("2026-01-01T00:00:00Z".parse().unwrap());
        r.rows = Some(Box::new(job));
        r
    }

    #[test]
    fn a_profile_reads_next_chunk_should_wait_behind_every_scheduled_read_and_give_way_to_its_boundary()
     {
        let mut q = PollQueue::default();
        q.push(continuation("a", Cadence::Daily));
        q.push(req("b", Cadence::Quarterly));
        q.push(continuation("c", Cadence::Quarterly));
        q.push(req("d", Cadence::Quarterly));
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).map(|r| r.meter).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);

        // The boundary's read replaces a queued chunk (it starts from the same mark)...
        q.push(continuation("a", Cadence::Quarterly));
        assert_eq!(q.push(req("a", Cadence::Quarterly)), Pushed::Queued);
        assert_eq!(q.len(), 1);
        assert!(q.pop().unwrap().rows.is_none());
        // ...and a chunk arriving behind a queued read of the same cadence is dropped.
        q.push(req("a", Cadence::Quarterly));
        assert_eq!(
            q.push(continuation("a", Cadence::Quarterly)),
            Pushed::Queued
        );
        assert_eq!(q.len(), 1);
    }
}
