//! A bus scan for commissioning, as a state machine (sans-IO, driven like
//! [`super::master::Read`]): which meters are on a segment, by primary address or by the
//! standard secondary-address wildcard search, and each found meter as a ready `[[meter]]`
//! block for the config.
//!
//! # Primary scan
//!
//! SND_NKE to each address 0–250: an `E5` means a meter is there, and a REQ_UD2 then reads its
//! identity from the long header. Garbled bytes mean several meters share the address
//! (reported as a collision; re-address them one at a time).
//!
//! # Secondary search (EN 13757-3 annex, the usual "wildcard search")
//!
//! Select with the id `FFFFFFFF` (every digit a wildcard, any manufacturer, version and
//! medium). No answer: nobody matches. One clean `E5`, then one clean RSP_UD to a REQ_UD2 at
//! 253: exactly one meter matches — found. Garbled bytes at either step: several match, so
//! the first wildcard digit is fixed to 0, 1, …, 9 in turn and each narrower mask is tried the
//! same way, depth first. Identical `E5`s of two slaves overlay into one clean `E5`, which is
//! why a match needs the RSP_UD. Nor is a clean RSP_UD proof: its checksum is an 8-bit sum,
//! and among the thousands of collisions of a large segment some overlays of two telegrams
//! pass it (the bench's 250 simulated meters gave seven such phantoms, each hiding the real
//! meters under its mask). So a meter heard under a mask with wildcards is confirmed by
//! selecting its exact address (all eight digits, manufacturer, version, medium) and reading
//! it again; if that finds no such meter, the mask is narrowed as for a collision.
//! The segment is deselected (SND_NKE to 253) at the end.

use std::time::Duration;

use super::app::{self, Identity};
use super::link::{self, Split};
use super::master::{Answer, Expect, Wire};
use super::{SecondaryMask, Timing};

/// What to scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Primary addresses `from..=to` (at most 250).
    Primary { from: u8, to: u8 },
    /// The wildcard search, starting from `start` (usually [`SecondaryMask::ANY`]).
    Secondary { start: SecondaryMask },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanConfig {
    pub mode: Mode,
    pub timing: Timing,
    /// Repetitions of a probe that got no answer (0: scans are slow enough).
    pub retries: u8,
}

/// How a meter was found, and so how to address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Primary(u8),
    Secondary,
}

/// A meter on the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundMeter {
    pub via: Via,
    /// From its RSP_UD's long header (absent if it answers without one).
    pub identity: Option<Identity>,
    /// The address field of its answer: its primary address.
    pub primary: u8,
}

impl FoundMeter {
    /// A `[[meter]]` block for the config: the meter's id is manufacturer and serial
    /// (`KAM-12345678`).
    pub fn to_toml(&self, bus: &str) -> String {
        let mut s = String::from("[[meter]]\n");
        let (name, comment) = match self.identity {
            Some(id) => (
                format!("{}-{}", id.manufacturer_str(), id.id_string()),
                format!(
                    "# {} {}, version {}, medium {:#04x} ({}), primary address {}\n",
                    id.manufacturer_str(),
                    id.id_string(),
                    id.version,
                    id.medium,
                    super::vif::medium_name(id.medium),
                    self.primary
                ),
            ),
            None => (format!("mbus-{}", self.primary), String::new()),
        };
        s.push_str(&comment);
        s.push_str(&format!("id = {}\n", toml_string(&name)));
        s.push_str(&format!("bus = {}\n", toml_string(bus)));
        match (self.via, self.identity) {
            (Via::Secondary, Some(id)) => s.push_str(&format!(
                "mbus = {{ secondary = \"{}\" }}\n",
                id.id_string()
            )),
            (Via::Primary(a), _) => s.push_str(&format!("mbus = {{ primary = {a} }}\n")),
            (Via::Secondary, None) => {
                s.push_str(&format!("mbus = {{ primary = {} }}\n", self.primary))
            }
        }
        s.push_str("reads = { daily = \"all\" }\n");
        s
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where several meters answered at once and the scan could not tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collision {
    /// Several meters have this primary address.
    Primary(u8),
    /// Several meters match this fully specified id (same serial, different manufacturer or
    /// medium).
    Secondary(SecondaryMask),
}

/// The end of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub meters: Vec<FoundMeter>,
    pub collisions: Vec<Collision>,
    /// Selections (secondary) or addresses (primary) probed.
    pub probes: u32,
    pub wire: Wire,
}

/// What the transport does next (the same contract as [`super::master::Step`]).
#[derive(Clone, Debug, PartialEq)]
pub enum ScanStep {
    Send {
        bytes: Vec<u8>,
        pause: Duration,
        expect: Expect,
    },
    Done(ScanReport),
}

/// What one probe heard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heard {
    Nothing,
    Ack,
    /// An RSP_UD with this identity and address.
    UserData(Option<Identity>, u8),
    Garbled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// SND_NKE to a primary address.
    Nke(u8),
    /// REQ_UD2 to a primary address.
    ReqPrimary(u8),
    Select(SecondaryMask),
    ReqSecondary(SecondaryMask),
    Deselect,
}

/// A scan in progress.
#[derive(Debug)]
pub struct Scan {
    config: ScanConfig,
    probe: Probe,
    tries: u8,
    rx: Vec<u8>,
    heard: Heard,
    stack: Vec<SecondaryMask>,
    /// While confirming a meter heard under a wildcard mask: that mask, narrowed if the
    /// meter's exact address does not confirm it.
    confirming: Option<SecondaryMask>,
    report: ScanReport,
    done: bool,
}

impl Scan {
    pub fn new(config: ScanConfig) -> Self {
        Scan {
            config,
            probe: Probe::Deselect,
            tries: 0,
            rx: Vec::new(),
            heard: Heard::Nothing,
            stack: Vec::new(),
            confirming: None,
            report: ScanReport::default(),
            done: false,
        }
    }

    pub fn start(&mut self) -> ScanStep {
        match self.config.mode {
            Mode::Primary { from, .. } => self.probe(Probe::Nke(from)),
            Mode::Secondary { start } => {
                self.stack.push(start);
                self.next_mask()
            }
        }
    }

    fn bytes(probe: Probe) -> Vec<u8> {
        match probe {
            Probe::Nke(a) => link::snd_nke(a).to_vec(),
            Probe::ReqPrimary(a) => link::req_ud2(a, true).to_vec(),
            Probe::Select(m) => link::select(false, &m),
            Probe::ReqSecondary(_) => link::req_ud2(link::ADDR_NETWORK, true).to_vec(),
            Probe::Deselect => link::snd_nke(link::ADDR_NETWORK).to_vec(),
        }
    }

    fn probe(&mut self, probe: Probe) -> ScanStep {
        if matches!(probe, Probe::Nke(_) | Probe::Select(_)) {
            self.report.probes += 1;
        }
        self.probe = probe;
        self.tries = 1;
        self.send()
    }

    fn send(&mut self) -> ScanStep {
        self.rx.clear();
        self.heard = Heard::Nothing;
        let bytes = Self::bytes(self.probe);
        self.report.wire.frames_sent += 1;
        self.report.wire.bytes_sent += bytes.len() as u32;
        let t = self.config.timing;
        let answer = match self.probe {
            Probe::ReqPrimary(_) | Probe::ReqSecondary(_) => Answer::UserData,
            _ => Answer::Ack,
        };
        ScanStep::Send {
            expect: Expect {
                answer,
                window: link::wire_time(bytes.len(), t.baud) + t.answer_window(),
                gap: t.gap,
            },
            bytes,
            pause: t.idle(),
        }
    }

    /// Bytes from the line. A scan listens for the whole window (a second answer may follow
    /// the first), so this never ends a probe by itself: it returns `None` and the transport
    /// calls [`Scan::silence`] when the line stays quiet.
    pub fn received(&mut self, bytes: &[u8]) -> Option<ScanStep> {
        if self.done {
            return None;
        }
        self.rx.extend_from_slice(bytes);
        self.report.wire.bytes_received += bytes.len() as u32;
        loop {
            match link::split(&self.rx) {
                Split::Incomplete { .. } => return None,
                Split::Invalid { skip, .. } => {
                    self.heard = Heard::Garbled;
                    self.rx.drain(..skip);
                }
                Split::Frame(n) => {
                    let frame: Vec<u8> = self.rx.drain(..n).collect();
                    if frame == Self::bytes(self.probe) {
                        continue; // an echo of our own request
                    }
                    self.report.wire.frames_received += 1;
                    let this = match link::parse(&frame) {
                        Ok(link::Frame::Ack) => Heard::Ack,
                        Ok(f @ link::Frame::Long { address, .. }) if f.is_rsp_ud() => {
                            let identity =
                                app::Telegram::from_frame(f).ok().and_then(|t| t.identity());
                            Heard::UserData(identity, address)
                        }
                        _ => Heard::Garbled,
                    };
                    self.heard = match (self.heard, this) {
                        (Heard::Nothing, h) => h,
                        // A second answer in one window: more than one slave.
                        _ => Heard::Garbled,
                    };
                }
            }
        }
    }

    /// The window passed: decide on what was heard.
    pub fn silence(&mut self) -> ScanStep {
        if self.done {
            return ScanStep::Done(self.report.clone());
        }
        let heard = if self.rx.is_empty() {
            self.heard
        } else {
            Heard::Garbled // a frame that never completed
        };
        if heard == Heard::Nothing && self.tries <= self.config.retries {
            self.tries += 1;
            return self.send();
        }
        match (self.probe, heard) {
            (Probe::Nke(a), Heard::Ack) => self.probe(Probe::ReqPrimary(a)),
            (Probe::Nke(a), Heard::Garbled) | (Probe::ReqPrimary(a), Heard::Garbled) => {
                self.report.collisions.push(Collision::Primary(a));
                self.next_primary(a)
            }
            (Probe::ReqPrimary(a), Heard::UserData(identity, primary)) => {
                self.report.meters.push(FoundMeter {
                    via: Via::Primary(a),
                    identity,
                    primary,
                });
                self.next_primary(a)
            }
            (Probe::Nke(a), _) | (Probe::ReqPrimary(a), _) => self.next_primary(a),
            (Probe::Select(m), Heard::Ack) => self.probe(Probe::ReqSecondary(m)),
            (Probe::ReqSecondary(m), Heard::UserData(Some(id), primary)) if m.matches(&id) => {
                let exact = SecondaryMask::exact(&id);
                if m != exact {
                    // Heard under wildcards: confirm by the exact address first.
                    self.confirming = Some(m);
                    return self.probe(Probe::Select(exact));
                }
                self.confirming = None;
                if !self.report.meters.iter().any(|f| f.identity == Some(id)) {
                    self.report.meters.push(FoundMeter {
                        via: Via::Secondary,
                        identity: Some(id),
                        primary,
                    });
                }
                self.next_mask()
            }
            // Several answered, or an answer that does not match the selection.
            (Probe::Select(m), Heard::Garbled)
            | (Probe::ReqSecondary(m), Heard::Garbled)
            | (Probe::ReqSecondary(m), Heard::UserData(..)) => match self.confirming.take() {
                Some(wild) => self.narrow(wild),
                None => self.narrow(m),
            },
            (Probe::Select(_), _) | (Probe::ReqSecondary(_), _) => match self.confirming.take() {
                // No meter has the address heard: that answer was an overlay.
                Some(wild) => self.narrow(wild),
                None => self.next_mask(),
            },
            (Probe::Deselect, _) => {
                self.done = true;
                ScanStep::Done(self.report.clone())
            }
        }
    }

    fn next_primary(&mut self, a: u8) -> ScanStep {
        let Mode::Primary { to, .. } = self.config.mode else {
            return self.finish();
        };
        if a >= to.min(link::MAX_PRIMARY) {
            self.done = true;
            return ScanStep::Done(self.report.clone());
        }
        self.probe(Probe::Nke(a + 1))
    }

    /// Several meters match `m`: try each value of its first wildcard digit.
    fn narrow(&mut self, m: SecondaryMask) -> ScanStep {
        match m.digits.iter().position(|&d| d == 0xF) {
            Some(i) => {
                for d in (0..=9u8).rev() {
                    let mut n = m;
                    n.digits[i] = d;
                    self.stack.push(n);
                }
            }
            None => self.report.collisions.push(Collision::Secondary(m)),
        }
        self.next_mask()
    }

    fn next_mask(&mut self) -> ScanStep {
        match self.stack.pop() {
            Some(m) => self.probe(Probe::Select(m)),
            None => self.finish(),
        }
    }

    fn finish(&mut self) -> ScanStep {
        self.probe(Probe::Deselect)
    }

    /// The meters found so far.
    pub fn found(&self) -> &[FoundMeter] {
        &self.report.meters
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::sim::mbus::{Segment, Slave};

    fn drive(seg: &mut Segment, mode: Mode) -> ScanReport {
        let mut scan = Scan::new(ScanConfig {
            mode,
            timing: Timing::new(2400),
            retries: 0,
        });
        let mut step = scan.start();
        for _ in 0..100_000 {
            match step {
                ScanStep::Done(r) => return r,
                ScanStep::Send { bytes, .. } => {
                    if let Some(a) = seg.handle(&bytes) {
                        assert!(scan.received(&a).is_none());
                    }
                    step = scan.silence();
                }
            }
        }
        panic!("the scan did not end");
    }

    #[test]
    fn primary_scan_should_find_each_meter_with_its_identity() {
        let mut seg = Segment::demo();
        let r = drive(&mut seg, Mode::Primary { from: 0, to: 250 });
        let ids: Vec<String> = r
            .meters
            .iter()
            .map(|m| m.identity.unwrap().id_string())
            .collect();
        assert_eq!(ids, ["12345678", "23456789", "34567890"]);
        assert_eq!(r.meters[0].via, Via::Primary(1));
        assert_eq!(r.probes, 251);
    }

    #[test]
    fn primary_scan_should_report_two_meters_on_one_address_as_a_collision() {
        let mut seg = Segment::new(vec![
            Slave::heat(5, "11111111"),
            Slave::water(5, "22222222"),
        ]);
        let r = drive(&mut seg, Mode::Primary { from: 0, to: 10 });
        assert!(r.meters.is_empty());
        assert_eq!(r.collisions, vec![Collision::Primary(5)]);
    }

    #[test]
    fn secondary_search_should_narrow_collisions_digit_by_digit() {
        let mut seg = Segment::demo();
        let r = drive(
            &mut seg,
            Mode::Secondary {
                start: SecondaryMask::ANY,
            },
        );
        let mut ids: Vec<String> = r
            .meters
            .iter()
            .map(|m| m.identity.unwrap().id_string())
            .collect();
        ids.sort();
        assert_eq!(ids, ["12345678", "23456789", "34567890"]);
        assert!(r.collisions.is_empty());
        // All wildcards (a collision), the ten first digits (three of them one meter each),
        // and each of the three confirmed by its exact address.
        assert_eq!(r.probes, 14);
    }

    #[test]
    fn a_phantom_made_of_two_overlaid_telegrams_should_not_hide_the_real_meters() {
        // 250 meters: among the collisions some overlays pass the 8-bit checksum and read as
        // a meter that does not exist (seven with this seed before the exact-address check).
        let mut seg = Segment::many(250, 42);
        let want: BTreeSet<[u8; 4]> = seg.slaves.iter().map(|s| s.identity.id).collect();
        let r = drive(
            &mut seg,
            Mode::Secondary {
                start: SecondaryMask::ANY,
            },
        );
        let got: BTreeSet<[u8; 4]> = r.meters.iter().map(|m| m.identity.unwrap().id).collect();
        assert_eq!(got, want);
        assert_eq!(r.meters.len(), 250, "each once");
        assert!(r.collisions.is_empty());
    }

    #[test]
    fn secondary_search_should_find_every_meter_of_a_large_segment() {
        let mut seg = Segment::many(60, 7);
        let r = drive(
            &mut seg,
            Mode::Secondary {
                start: SecondaryMask::ANY,
            },
        );
        assert_eq!(r.meters.len(), 60);
        assert!(r.collisions.is_empty());
    }

    #[test]
    fn two_meters_with_one_id_should_be_an_unresolved_collision() {
        let mut seg = Segment::new(vec![
            Slave::heat(0, "11111111"),
            Slave::water(0, "11111111"),
        ]);
        let r = drive(
            &mut seg,
            Mode::Secondary {
                start: SecondaryMask::ANY,
            },
        );
        assert!(r.meters.is_empty());
        assert_eq!(r.collisions.len(), 1);
    }

    #[test]
    fn found_meters_should_render_as_meter_blocks_that_parse() {
        let mut seg = Segment::demo();
        let r = drive(
            &mut seg,
            Mode::Secondary {
                start: SecondaryMask::ANY,
            },
        );
        let block = r.meters[0].to_toml("mbus-1");
        assert!(
            block.contains("mbus = { secondary = \"12345678\" }"),
            "{block}"
        );
        assert!(block.contains("id = \"KAM-12345678\""), "{block}");
        let v: toml::Table = toml::from_str(&block).unwrap();
        let m = &v["meter"].as_array().unwrap()[0];
        assert_eq!(m["bus"].as_str(), Some("mbus-1"));
        assert_eq!(m["reads"]["daily"].as_str(), Some("all"));
        let p = FoundMeter {
            via: Via::Primary(5),
            identity: None,
            primary: 5,
        };
        assert!(p.to_toml("b").contains("mbus = { primary = 5 }"));
    }
}
