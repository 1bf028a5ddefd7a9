//! Bus workers: one per configured bus, and the only owner of its port or connections.
//!
//! A worker takes poll requests from its inbox ([`BusHandle`]), queues them by priority
//! ([`queue`]), runs them on its link ([`crate::meter::link`]): one at a time on a serial bus
//! (RS-485 is half-duplex with a single master), up to `concurrency` at once on TCP. Each
//! poll's readings, its failure events and its boundary mark go to the store in one atomic
//! append; then the drain is woken and an on-demand requester gets its report.
//!
//! A meter that keeps failing is backed off: its scheduled polls are skipped until the backoff
//! expires, so a dead meter does not eat the bus. On-demand polls are always tried. Every
//! failure becomes a system event; none stops the worker or the other meters.
//!
//! The worker knows no protocol: it calls [`crate::meter::Meter::read`] and acts on the
//! [`crate::meter::Outcome`].
//!
//! * [`handle`] — what others send a worker and get back: requests, reports, snapshots, the
//!   router that finds a meter's bus.
//! * [`worker`] — the long-lived task: queue, slots, backoff, tracked side tasks.
//! * [`poll`] — one poll: the driver call, and the pure assembly of its store write.
//! * [`write`] — writes to the store, with the in-memory [`spill`] while it cannot write.

pub mod handle;
pub mod poll;
pub mod queue;
pub mod rows;
pub mod spill;
pub mod worker;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use serde::Deserialize;

use crate::meter::link::{Link, SerialConfig, TcpConfig};
use crate::meter::modbus::profile::Profiles;
use crate::meter::{Meter, MeterConfig, Resolver, Timing};
use crate::primitives::{HumanDuration, Problems};

pub use crate::meter::link::{Parity, Rs485Config};
pub use handle::{
    BusCommand, BusHandle, BusSnapshot, Busy, Health, MeterHealth, PollInfo, PollReport,
    PollRequest, RouteError, Router,
};
pub use worker::BusWorker;

/// `[[bus]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub name: String,
    pub serial: Option<SerialConfig>,
    pub tcp: Option<TcpConfig>,
    /// Per request.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Retries per request before the poll counts as failed.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest pause of a failing meter's scheduled polls.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Pause between the end of one answer and the next request on the bus.
    pub turnaround: Option<HumanDuration>,
    /// Pause after opening a TCP connection, before its first request.
    pub connect_delay: Option<HumanDuration>,
    /// Pause between the requests of one read.
    pub inter_request: Option<HumanDuration>,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

impl BusConfig {
    /// Checks the section and resolves its link. Every problem goes to `p` under `at`
    /// (`bus[0]`); `None` if there were any.
    pub fn resolve(&self, at: &str, p: &mut Problems) -> Option<Bus> {
        let before = p.0.len();
        if self.name.is_empty() {
            p.push(format!("{at}.name"), "must not be empty");
        }
        let link = match (&self.serial, &self.tcp) {
            (Some(_), Some(_)) => {
                p.push(at.to_owned(), "set either `serial` or `tcp`, not both");
                None
            }
            (None, None) => {
                p.push(
                    at.to_owned(),
                    "no link: add `serial = { device = … }` or `tcp = { host = … }`",
                );
                None
            }
            (Some(s), None) => {
                if ![
                    300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200,
                ]
                .contains(&s.baud)
                {
                    p.push(
                        format!("{at}.serial.baud"),
                        format!("{} is not a standard baud rate", s.baud),
                    );
                }
                if !(5..=8).contains(&s.data_bits) {
                    p.push(format!("{at}.serial.data_bits"), "must be 5-8");
                }
                if !(1..=2).contains(&s.stop_bits) {
                    p.push(format!("{at}.serial.stop_bits"), "must be 1 or 2");
                }
                Some(Link::Serial(s.clone()))
            }
            (None, Some(t)) => {
                if t.host.is_empty() {
                    p.push(format!("{at}.tcp.host"), "must not be empty");
                }
                if !(1..=256).contains(&t.concurrency) {
                    p.push(format!("{at}.tcp.concurrency"), "must be 1-256");
                }
                Some(Link::Tcp(t.clone()))
            }
        };
        if self.timeout.0 < Duration::from_millis(10) || self.timeout.0 > Duration::from_secs(120) {
            p.push(format!("{at}.timeout"), "must be between 10ms and 2m");
        }
        if self.retries > 10 {
            p.push(format!("{at}.retries"), "must be at most 10");
        }
        let link = link?;
        crate::meter::check_pause(format!("{at}.turnaround"), self.turnaround, &link, p);
        crate::meter::check_pause(format!("{at}.connect_delay"), self.connect_delay, &link, p);
        crate::meter::check_pause(format!("{at}.inter_request"), self.inter_request, &link, p);
        let zero = |d: Option<HumanDuration>| d.map_or(Duration::ZERO, |d| d.0);
        (p.0.len() == before).then(|| Bus {
            name: self.name.clone(),
            link,
            timing: Timing {
                timeout: self.timeout.0,
                retries: self.retries,
                turnaround: zero(self.turnaround),
                connect_delay: zero(self.connect_delay),
                inter_request: zero(self.inter_request),
            },
            backoff_max: self.backoff_max.0,
        })
    }
}

/// A bus, resolved.
#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub link: Link,
    pub timing: Timing,
    /// Longest pause of a failing meter's scheduled polls.
    pub backoff_max: Duration,
}

/// Resolves one bus and its meters outside a whole config file (tests, benchmarks, tools):
/// the same checks as [`crate::config::Config::load`].
pub fn resolve(
    bus: &BusConfig,
    meters: &[MeterConfig],
    profiles: &Profiles,
    gateway_tz: &TimeZone,
) -> Result<(Bus, Vec<Arc<Meter>>), Problems> {
    let mut p = Problems::default();
    let resolved = bus.resolve("bus", &mut p);
    let mut r = Resolver::new(profiles, gateway_tz);
    let mut out = Vec::new();
    if let Some(b) = &resolved {
        for (i, m) in meters.iter().enumerate() {
            if let Some(m) = m.resolve(&format!("meter[{i}]"), &b.name, &b.link, &mut r, &mut p) {
                out.push(Arc::new(m));
            }
        }
    }
    match resolved {
        Some(b) if p.0.is_empty() => Ok((b, out)),
        _ => Err(p),
    }
}

#[cfg(test)]
mod tests;
