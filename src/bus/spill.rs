//! Readings the store could not take (a full or failing disk), kept in memory, in order,
//! until it can. Bounded: past the limit the oldest profile readings (quarterly, hourly,
//! on-demand) go first, billing reads last — the store's own eviction order — and every
//! reading given up is counted, to be reported once the store takes writes again.

use std::collections::VecDeque;

use crate::store::Append;

#[derive(Debug)]
pub struct Spill {
    batches: VecDeque<Append>,
    readings: usize,
    max_readings: usize,
    /// Readings given up since the last report.
    dropped: u64,
}

impl Spill {
    pub fn new(max_readings: usize) -> Self {
        Spill {
            batches: VecDeque::new(),
            readings: 0,
            max_readings: max_readings.max(1),
            dropped: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    pub fn readings(&self) -> usize {
        self.readings
    }

    /// Keeps `batch` behind the others; returns how many readings had to be given up.
    pub fn push(&mut self, batch: Append) -> u64 {
        self.readings += batch.readings.len();
        self.batches.push_back(batch);
        let mut dropped = 0;
        while self.readings > self.max_readings && self.batches.len() > 1 {
            let victim = self
                .batches
                .iter()
                .position(|b| b.readings.iter().all(|r| r.cadence.evict_first()))
                .unwrap_or(0);
            if let Some(b) = self.batches.remove(victim) {
                self.readings -= b.readings.len();
                dropped += b.readings.len() as u64;
            }
        }
        self.dropped += dropped;
        dropped
    }

    /// The newest high-water mark of (`meter`, `profile`) among the batches kept: rows up to
    /// it are read (and wait here), so the next profile read starts after it.
    pub fn profile_mark(&self, meter: &str, profile: &crate::reading::Obis) -> Option<i64> {
        self.batches
            .iter()
            .flat_map(|b| &b.profile_marks)
            .filter(|m| m.meter == meter && m.profile == *profile)
            .map(|m| m.last_ms)
            .max()
    }

    pub fn front(&self) -> Option<&Append> {
        self.batches.front()
    }

    pub fn pop_front(&mut self) {
        if let Some(b) = self.batches.pop_front() {
            self.readings -= b.readings.len();
        }
    }

    /// Readings given up since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Cadence;
    use crate::store::tests::reading;

    fn batch(cadence: Cadence, n: usize) -> Append {
        Append {
            readings: (0..n).map(|i| reading("m", cadence, i as i64, 0)).collect(),
            ..Append::default()
        }
    }

    #[test]
    fn a_full_spill_should_give_up_profile_readings_before_billing_ones() {
        let mut s = Spill::new(10);
        assert_eq!(s.push(batch(Cadence::Daily, 4)), 0);
        assert_eq!(s.push(batch(Cadence::Quarterly, 4)), 0);
        assert_eq!(s.push(batch(Cadence::Monthly, 4)), 4);
        assert_eq!(s.readings(), 8);
        assert_eq!(s.front().unwrap().readings[0].cadence, Cadence::Daily);
        assert_eq!(s.take_dropped(), 4);
        assert_eq!(s.take_dropped(), 0);
    }

    #[test]
    fn batches_should_come_out_in_order() {
        let mut s = Spill::new(100);
        s.push(batch(Cadence::Hourly, 1));
        s.push(batch(Cadence::Daily, 2));
        assert_eq!(s.front().unwrap().readings.len(), 1);
        s.pop_front();
        assert_eq!(s.front().unwrap().readings.len(), 2);
        s.pop_front();
        assert!(s.is_empty());
        assert_eq!(s.readings(), 0);
    }
}
