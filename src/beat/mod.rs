//! The local beat: when each meter is read.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{Duration as HumanDuration, Problems};

/// `[beat]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeatConfig {
    #[serde(default)]
    pub quarterly: CadenceConfig,
    #[serde(default)]
    pub hourly: CadenceConfig,
    #[serde(default)]
    pub daily: CadenceConfig,
    #[serde(default)]
    pub monthly: CadenceConfig,
    #[serde(default)]
    pub yearly: CadenceConfig,
}

/// `quarterly = { delay = "10s" }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CadenceConfig {
    /// How long after the boundary to read (meters that close their registers late).
    pub delay: Option<HumanDuration>,
}

impl BeatConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        for (name, c, max) in [
            ("quarterly", &self.quarterly, 10 * 60),
            ("hourly", &self.hourly, 45 * 60),
            ("daily", &self.daily, 12 * 3600),
            ("monthly", &self.monthly, 12 * 3600),
            ("yearly", &self.yearly, 12 * 3600),
        ] {
            if let Some(d) = c.delay {
                if d.0 > Duration::from_secs(max) {
                    p.push(
                        format!("{at}.{name}.delay"),
                        format!(
                            "must be at most {}",
                            humantime::format_duration(Duration::from_secs(max))
                        ),
                    );
                }
            }
        }
    }
}

/// The demo's fast beat: every `interval`, on multiples of it on the wall clock, one
/// `quarterly` read of every meter. (The real beat reads on real quarter-hours.)
pub async fn demo_ticker(
    router: crate::bus::Router,
    interval: Duration,
    clock: crate::clock::SharedClock,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let step = interval.as_millis().max(1) as i64;
    loop {
        let now = clock.now_ms();
        let next = (now / step + 1) * step;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis((next - now) as u64)) => {}
            () = shutdown.cancelled() => return,
        }
        let boundary = jiff::Timestamp::from_millisecond(next).ok();
        for meter in router.meters() {
            let mut req =
                crate::bus::PollRequest::new(meter.clone(), crate::reading::Cadence::Quarterly);
            req.boundary = boundary;
            if let Err(e) = router.try_poll(req) {
                tracing::warn!(meter = %meter, error = ?e, "Could not queue demo read");
            }
        }
    }
}
