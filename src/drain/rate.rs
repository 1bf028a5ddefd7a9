//! Celery-style rate limits (`200/s`, `10/m`, `1000/h`) and the pacer that honours them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio::time::Instant;

/// At most `count` messages per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// The spacing between two messages.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a rate limit such as `200/s`, `10/m` or `1000/h`");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!(
                "`{s}`: a rate limit of zero would never send anything"
            ));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(RateLimit { count, per })
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Spaces messages evenly, without bursts: after an outage the backlog leaves at the limit,
/// not all at once.
#[derive(Debug)]
pub struct Pacer {
    interval: Option<Duration>,
    next: Option<Instant>,
}

impl Pacer {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Pacer {
            interval: limit.map(|l| l.interval()),
            next: None,
        }
    }

    /// When the next message may go, if that is later than now.
    pub fn holds_until(&self) -> Option<Instant> {
        self.next.filter(|n| *n > Instant::now())
    }

    /// Waits until the next message may go.
    pub async fn ready(&mut self) {
        let Some(interval) = self.interval else {
            return;
        };
        let now = Instant::now();
        let at = self.next.map_or(now, |n| n.max(now));
        tokio::time::sleep_until(at).await;
        self.next = Some(at + interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_rate_limits_should_parse() {
        assert_eq!(
            "200/s".parse::<RateLimit>().unwrap().interval(),
            Duration::from_millis(5)
        );
        assert_eq!(
            "10/m".parse::<RateLimit>().unwrap().interval(),
            Duration::from_secs(6)
        );
        for bad in ["200", "0/s", "x/s", "5/d", ""] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_should_space_messages_without_a_burst() {
        let mut p = Pacer::new(Some("10/s".parse().unwrap()));
        let start = Instant::now();
        for _ in 0..11 {
            p.ready().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_should_never_wait() {
        let mut p = Pacer::new(None);
        let start = Instant::now();
        for _ in 0..1000 {
            p.ready().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
