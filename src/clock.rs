//! The wall clock, behind a trait so tests can move it.
//!
//! Waiting is done on tokio's monotonic clock (which tests pause and advance); only *what time
//! it is* comes from here. Gateways without an RTC boot in 1970 and jump when NTP syncs, and
//! operators set clocks by hand: the beat asks this clock on every wake-up instead of trusting
//! that the wall clock advanced as long as it slept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use jiff::Timestamp;

pub trait Clock: Send + Sync + 'static {
    /// The wall clock.
    fn now(&self) -> Timestamp;
    /// Whether the kernel considers the clock synchronised (NTP, PTP, GPS). `None` where it
    /// cannot tell.
    fn synchronized(&self) -> Option<bool>;

    fn now_ms(&self) -> i64 {
        self.now().as_millisecond()
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// The system's clock; synchronisation from `adjtimex(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn synchronized(&self) -> Option<bool> {
        kernel_clock_synchronized()
    }
}

/// `adjtimex` with no modes only reads the kernel's NTP state: `TIME_ERROR` (or the
/// `STA_UNSYNC` status bit) means nobody has disciplined the clock, as on a Pi that booted
/// without network.
#[cfg(target_os = "linux")]
fn kernel_clock_synchronized() -> Option<bool> {
    // SAFETY: a zeroed timex with modes == 0 is a read-only query.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}

#[cfg(not(target_os = "linux"))]
fn kernel_clock_synchronized() -> Option<bool> {
    None
}

/// A clock that tests set and move by hand.
#[derive(Debug)]
pub struct ManualClock {
    ms: AtomicI64,
    synced: AtomicBool,
}

impl ManualClock {
    pub fn new(at: Timestamp) -> Arc<Self> {
        Arc::new(ManualClock {
            ms: AtomicI64::new(at.as_millisecond()),
            synced: AtomicBool::new(true),
        })
    }
    pub fn set(&self, at: Timestamp) {
        self.ms.store(at.as_millisecond(), Ordering::SeqCst);
    }
    pub fn advance(&self, by: std::time::Duration) {
        self.ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
    pub fn set_synchronized(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millisecond(self.ms.load(Ordering::SeqCst)).unwrap_or(Timestamp::UNIX_EPOCH)
    }
    fn synchronized(&self) -> Option<bool> {
        Some(self.synced.load(Ordering::SeqCst))
    }
}
