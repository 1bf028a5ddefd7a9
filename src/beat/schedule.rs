//! Boundary arithmetic, sans-IO: which instants are quarter-hours, hours, days, months and
//! years in a time zone.
//!
//! * Quarterly boundaries are the instants at :00, :15, :30 and :45 of the local clock. Every
//!   UTC offset in use is a multiple of 15 minutes, so these are the 15-minute grid of UTC
//!   itself: a repeated hour in autumn has four more, a skipped hour in spring four fewer,
//!   and no boundary is ever the same instant twice.
//! * Hourly boundaries are the quarter-hours whose local minute is 0 (in India, :30 UTC).
//!   The repeated hour in autumn is read twice (it is two hours of energy); the skipped hour
//!   in spring not at all.
//! * Daily, monthly and yearly boundaries are the start of the local day (00:00, or the first
//!   instant of the day where a DST change skips midnight), of the 1st of the month, and of
//!   1 January.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::reading::Cadence;

const QUARTER_S: i64 = 15 * 60;

/// The last boundary of `cadence` at or before `t`.
pub fn at_or_before(cadence: Cadence, t: Timestamp, tz: &TimeZone) -> Timestamp {
    match cadence {
        Cadence::Quarterly | Cadence::OnDemand => quarter_floor(t),
        Cadence::Hourly => {
            let mut q = quarter_floor(t);
            // At most four quarter-hours back (a few more in zones with odd DST shifts).
            for _ in 0..8 {
                if local_minute(q, tz) == 0 {
                    return q;
                }
                q = quarter_back(q);
            }
            q
        }
        Cadence::Daily | Cadence::Monthly | Cadence::Yearly => {
            let date = t.to_zoned(tz.clone()).date();
            let first = period_start(cadence, date);
            let start = start_of(first, tz);
            if start <= t {
                start
            } else {
                // `t` is in a day whose local start comes after it (cannot happen for real
                // zones, but a boundary must never be in the future).
                start_of(step(cadence, first, -1), tz)
            }
        }
    }
}

/// The first boundary of `cadence` strictly after `t`.
pub fn after(cadence: Cadence, t: Timestamp, tz: &TimeZone) -> Timestamp {
    match cadence {
        Cadence::Quarterly | Cadence::OnDemand => quarter_forward(quarter_floor(t)),
        Cadence::Hourly => {
            let mut q = quarter_forward(quarter_floor(t));
            for _ in 0..8 {
                if local_minute(q, tz) == 0 {
                    return q;
                }
                q = quarter_forward(q);
            }
            q
        }
        Cadence::Daily | Cadence::Monthly | Cadence::Yearly => {
            let current = at_or_before(cadence, t, tz);
            let first = period_start(cadence, current.to_zoned(tz.clone()).date());
            start_of(step(cadence, first, 1), tz)
        }
    }
}

/// Every boundary of `cadence` in `(from, to]`, oldest first.
pub fn between(cadence: Cadence, from: Timestamp, to: Timestamp, tz: &TimeZone) -> Vec<Timestamp> {
    let mut out = Vec::new();
    let mut t = from;
    loop {
        let b = after(cadence, t, tz);
        if b > to {
            return out;
        }
        out.push(b);
        t = b;
    }
}

fn quarter_floor(t: Timestamp) -> Timestamp {
    let s = t.as_second().div_euclid(QUARTER_S) * QUARTER_S;
    Timestamp::from_second(s).unwrap_or(t)
}

fn quarter_forward(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second() + QUARTER_S).unwrap_or(t)
}

fn quarter_back(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second() - QUARTER_S).unwrap_or(t)
}

fn local_minute(t: Timestamp, tz: &TimeZone) -> i8 {
    t.to_zoned(tz.clone()).minute()
}

/// The first day of the period of `cadence` that contains `date`.
fn period_start(cadence: Cadence, date: Date) -> Date {
    match cadence {
        Cadence::Monthly => date.first_of_month(),
        Cadence::Yearly => date.first_of_year(),
        _ => date,
    }
}

fn step(cadence: Cadence, first: Date, n: i64) -> Date {
    let span = match cadence {
        Cadence::Monthly => n.months(),
        Cadence::Yearly => n.years(),
        _ => n.days(),
    };
    first.checked_add(span).unwrap_or(first)
}

/// The first instant of `date` in `tz`.
fn start_of(date: Date, tz: &TimeZone) -> Timestamp {
    date.to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz() -> TimeZone {
        TimeZone::get("Europe/Stockholm").unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn local(t: Timestamp) -> String {
        t.to_zoned(tz()).strftime("%Y-%m-%d %H:%M %Z").to_string()
    }

    #[test]
    fn quarter_hours_should_follow_the_local_clock() {
        let b = after(Cadence::Quarterly, ts("2026-11-21T10:07:00Z"), &tz());
        assert_eq!(local(b), "2026-11-21 11:15 CET");
        assert_eq!(at_or_before(Cadence::Quarterly, b, &tz()), b);
    }

    #[test]
    fn the_repeated_autumn_hour_should_have_its_own_boundaries() {
        // 2026-10-25: 03:00 CEST becomes 02:00 CET.
        let from = ts("2026-10-24T23:00:00Z"); // 01:00 CEST
        let to = ts("2026-10-25T02:00:00Z"); // 03:00 CET
        let hours: Vec<String> = between(Cadence::Hourly, from, to, &tz())
            .into_iter()
            .map(local)
            .collect();
        assert_eq!(
            hours,
            [
                "2026-10-25 02:00 CEST",
                "2026-10-25 02:00 CET",
                "2026-10-25 03:00 CET"
            ]
        );
        assert_eq!(between(Cadence::Quarterly, from, to, &tz()).len(), 12);
    }

    #[test]
    fn the_skipped_spring_hour_should_have_no_boundaries() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST.
        let from = ts("2026-03-29T00:00:00Z"); // 01:00 CET
        let to = ts("2026-03-29T02:00:00Z"); // 04:00 CEST
        let hours: Vec<String> = between(Cadence::Hourly, from, to, &tz())
            .into_iter()
            .map(local)
            .collect();
        assert_eq!(hours, ["2026-03-29 03:00 CEST", "2026-03-29 04:00 CEST"]);
        let days = between(
            Cadence::Daily,
            ts("2026-03-28T00:00:00Z"),
            ts("2026-03-30T12:00:00Z"),
            &tz(),
        );
        let days: Vec<String> = days.into_iter().map(local).collect();
        assert_eq!(days, ["2026-03-29 00:00 CET", "2026-03-30 00:00 CEST"]);
    }

    #[test]
    fn month_ends_leap_days_and_year_ends_should_be_boundaries() {
        let t = ts("2028-02-28T22:59:00Z"); // 23:59 on 28 Feb 2028, a leap year
        assert_eq!(
            local(after(Cadence::Daily, t, &tz())),
            "2028-02-29 00:00 CET"
        );
        assert_eq!(
            local(after(Cadence::Monthly, t, &tz())),
            "2028-03-01 00:00 CET"
        );
        let t = ts("2026-12-31T22:59:00Z");
        for c in [
            Cadence::Quarterly,
            Cadence::Hourly,
            Cadence::Daily,
            Cadence::Monthly,
            Cadence::Yearly,
        ] {
            assert_eq!(local(after(c, t, &tz())), "2027-01-01 00:00 CET", "{c}");
        }
        assert_eq!(
            local(at_or_before(Cadence::Yearly, t, &tz())),
            "2026-01-01 00:00 CET"
        );
    }

    #[test]
    fn hourly_in_a_half_hour_zone_should_be_on_the_local_hour() {
        let india = TimeZone::get("Asia/Kolkata").unwrap();
        let b = after(Cadence::Hourly, ts("2026-11-21T10:07:00Z"), &india);
        assert_eq!(b, ts("2026-11-21T10:30:00Z"));
    }

    #[test]
    fn a_day_whose_midnight_does_not_exist_should_start_at_its_first_instant() {
        // Cuba moves its clocks at midnight: 2026-03-08 starts at 01:00 CDT.
        let havana = TimeZone::get("America/Havana").unwrap();
        let b = after(Cadence::Daily, ts("2026-03-08T03:00:00Z"), &havana); // 22:00 the day before
        let local = b.to_zoned(havana.clone());
        assert_eq!(
            local.strftime("%Y-%m-%d %H:%M").to_string(),
            "2026-03-08 01:00"
        );
        let start = at_or_before(Cadence::Daily, ts("2026-03-08T12:00:00Z"), &havana);
        assert_eq!(start, b);
    }

    #[test]
    fn after_should_always_move_forward_and_at_or_before_never_forward() {
        let mut t = ts("2026-01-01T00:00:00Z");
        for _ in 0..2000 {
            for c in Cadence::SCHEDULED {
                let a = after(c, t, &tz());
                assert!(a > t);
                assert!(at_or_before(c, t, &tz()) <= t);
                assert_eq!(at_or_before(c, a, &tz()), a);
            }
            t = Timestamp::from_second(t.as_second() + 7 * 3600 + 13 * 60 + 7).unwrap();
        }
    }
}
