//! Profile-based reads on a DLMS meter: a [`RowsRequest`] becomes one association with a
//! range read of the profile generic's buffer (selector 1 on the clock column), and its rows
//! become [`Rows`]: each non-clock column a value scaled by its register's scaler, the row's
//! clock status and AMR profile status as flags.

use std::time::Duration;

use jiff::Timestamp;

use super::{DlmsMeter, Slot, Timing};
use crate::meter::dlms::cosem::{self, ScalerUnit, class};
use crate::meter::dlms::reads::Profile;
use crate::meter::rows::{Row, Rows, RowsRequest};
use crate::meter::{Failure, Value};
use crate::reading::{Flags, Obis, Stamp};

/// The AMR profile status (DLMS UA Blue Book, "AMR profile status", a Data object captured
/// in a load profile, usually 0-0:96.10.1.255): bit 1 clock invalid, 2 data not valid,
/// 3 daylight saving, 5 clock adjusted, 7 power down.
mod amr_status {
    pub const CLOCK_INVALID: u64 = 1 << 1;
    pub const DATA_NOT_VALID: u64 = 1 << 2;
    pub const DAYLIGHT_SAVING: u64 = 1 << 3;
    pub const CLOCK_ADJUSTED: u64 = 1 << 5;
    pub const POWER_DOWN: u64 = 1 << 7;
}

impl DlmsMeter {
    /// Rows captured in the request's range.
    pub async fn read_rows(
        &self,
        slot: &mut Slot,
        meter: &str,
        request: &RowsRequest,
        timing: &Timing,
    ) -> Result<Rows, Failure> {
        let mut clock = None;
        let range = (request.from, request.to);
        let profile = self
            .read_profile_at(slot, request.profile, range, timing, Some(&mut clock))
            .await?;
        let mut rows = rows_of(&profile, &self.tz);
        // The meter's clock against the gateway's, as register reads check it.
        if let Some(t) = clock {
            let off = Timestamp::now().as_millisecond() - t.as_millisecond();
            if off.unsigned_abs() > self.clock_limit.as_millis() as u64 {
                rows.refused.push(Failure::ClockDeviation {
                    offset_s: off / 1000,
                    limit: self.clock_limit,
                });
                for row in &mut rows.rows {
                    row.flags.insert(Flags::CLOCK_OFF);
                }
            }
        }
        tracing::debug!(meter, profile = %request.profile, rows = rows.rows.len(), "DLMS profile rows read");
        Ok(rows)
    }
}

/// Whether a column is an AMR status word rather than a value (a Data object of group C 96,
/// D 10: "status register" in OBIS).
fn is_status(obis: &Obis, class_id: u16) -> bool {
    class_id == class::DATA && obis.0[2] == 96 && obis.0[3] == 10
}

/// The rows of a profile as readings-to-be: times, flags, values.
pub fn rows_of(profile: &Profile, tz: &jiff::tz::TimeZone) -> Rows {
    let mut out = Rows {
        period: (profile.capture_period_s > 0)
            .then(|| Duration::from_secs(profile.capture_period_s.into())),
        ..Rows::default()
    };
    let clock = Profile::clock_column(&profile.columns);
    for row in &profile.rows {
        let Some(ts) = row.timestamp else {
            out.unmapped += row.values.len();
            continue;
        };
        // The row's time as the meter's clock gave it: with its deviation where it sends one
        // (UTC = local + deviation), else the meter's zone.
        let deviation = clock
            .and_then(|c| row.values.get(c))
            .and_then(|d| d.as_date_time())
            .map(|dt| dt.deviation)
            .filter(|d| *d != crate::meter::dlms::axdr::DEVIATION_UNSPECIFIED && d.abs() <= 840);
        let at = match deviation {
            Some(d) => Stamp {
                ms: ts.as_millisecond(),
                offset: -i32::from(d) * 60,
            },
            None => Stamp::in_zone(ts, tz),
        };
        let mut flags = Flags::empty();
        if crate::meter::dlms::reads::status_invalid(row.clock_status) {
            flags.insert(Flags::CLOCK_INVALID);
        }
        if row
            .clock_status
            .is_some_and(|s| s & crate::meter::dlms::axdr::clock_status::DAYLIGHT_SAVING != 0)
        {
            flags.insert(Flags::DST);
        }
        let mut values = Vec::new();
        for (i, d) in row.values.iter().enumerate() {
            let Some(col) = profile.columns.get(i) else {
                out.unmapped += 1;
                continue;
            };
            let a = col.attribute;
            if a.class == class::CLOCK {
                continue;
            }
            let obis = Obis(a.obis);
            if is_status(&obis, a.class) {
                if let Some(bits) = d.as_integer().and_then(|v| u64::try_from(v).ok()) {
                    for (bit, flag) in [
                        (amr_status::CLOCK_INVALID, Flags::CLOCK_INVALID),
                        (amr_status::DATA_NOT_VALID, Flags::DATA_INVALID),
                        (amr_status::DAYLIGHT_SAVING, Flags::DST),
                        (amr_status::CLOCK_ADJUSTED, Flags::CLOCK_ADJUSTED),
                        (amr_status::POWER_DOWN, Flags::POWER_DOWN),
                    ] {
                        if bits & bit != 0 {
                            flags.insert(flag);
                        }
                    }
                }
                continue;
            }
            let su = profile.scalers.get(i).copied().flatten();
            match cosem::scaled(d, su.unwrap_or(ScalerUnit::NONE)) {
                Ok(q) => values.push(Value {
                    series: obis,
                    value: q.value,
                    unit: q.unit.unwrap_or("").to_owned(),
                    meter_time: None,
                }),
                Err(_) => out.unmapped += 1,
            }
        }
        out.rows.push(Row { at, flags, values });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::dlms::apdu::{AttributeRef, CaptureObject};
    use crate::meter::dlms::axdr::{Data, Date, DateTime, Time};
    use crate::meter::dlms::cosem::ProfileRow;

    /// A local time with its deviation (minutes, UTC = local + deviation) and clock status.
    fn local(y: u16, mo: u8, d: u8, h: u8, mi: u8, deviation: i16, status: u8) -> Data {
        let dt = DateTime {
            date: Date {
                year: y,
                month: mo,
                day: d,
                weekday: 0xFF,
            },
            time: Time {
                hour: h,
                minute: mi,
                second: 0,
                hundredths: 0,
            },
            deviation,
            status,
        };
        Data::OctetString(dt.encode().to_vec())
    }

    fn profile(rows: Vec<(Data, u32, u8)>) -> Profile {
        let tz = jiff::tz::TimeZone::get("Europe/Stockholm").unwrap();
        let columns = vec![
            CaptureObject::CLOCK,
            CaptureObject {
                attribute: AttributeRef::new(class::DATA, [0, 0, 96, 10, 1, 255], 2),
                data_index: 0,
            },
            CaptureObject {
                attribute: AttributeRef::new(class::REGISTER, [1, 0, 1, 8, 0, 255], 2),
                data_index: 0,
            },
        ];
        let rows = rows
            .into_iter()
            .map(|(clock, energy, status)| {
                let dt = clock.as_date_time().unwrap();
                ProfileRow {
                    timestamp: dt.to_timestamp(&tz),
                    clock_status: (dt.status != 0xFF).then_some(dt.status),
                    values: vec![clock, Data::UInt8(status), Data::UInt32(energy)],
                }
            })
            .collect();
        Profile {
            columns,
            scalers: vec![
                None,
                None,
                Some(ScalerUnit {
                    scaler: -1,
                    unit: 30,
                }),
            ],
            capture_period_s: 900,
            rows,
        }
    }

    #[test]
    fn at_the_autumn_change_two_rows_of_the_same_local_time_should_stay_two_instants() {
        // Europe/Stockholm, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        let p = profile(vec![
            (local(2026, 10, 25, 2, 30, -120, 0x80), 100, 0x08),
            (local(2026, 10, 25, 2, 45, -120, 0x80), 101, 0x08),
            (local(2026, 10, 25, 2, 0, -60, 0x00), 102, 0x20),
            (local(2026, 10, 25, 2, 30, -60, 0x00), 103, 0x00),
        ]);
        let tz = jiff::tz::TimeZone::get("Europe/Stockholm").unwrap();
        let rows = rows_of(&p, &tz);
        let at: Vec<String> = rows.rows.iter().map(|r| r.at.rfc3339()).collect();
        assert_eq!(
            at,
            [
                "2026-10-25T02:30:00+02:00",
                "2026-10-25T02:45:00+02:00",
                "2026-10-25T02:00:00+01:00",
                "2026-10-25T02:30:00+01:00",
            ]
        );
        assert!(rows.rows[0].flags.contains(Flags::DST));
        assert!(rows.rows[2].flags.contains(Flags::CLOCK_ADJUSTED));
        assert!(!rows.rows[3].flags.contains(Flags::DST));
        assert_eq!(rows.rows[3].values[0].value.as_str(), "10.3");
        assert_eq!(
            rows.rows[3].values.len(),
            1,
            "the status column is flags, not a value"
        );
    }

    #[test]
    fn on_the_spring_change_the_rows_should_follow_each_other_by_fifteen_minutes() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST; there is no 02:30.
        let p = profile(vec![
            (local(2026, 3, 29, 1, 45, -60, 0x00), 1, 0),
            (local(2026, 3, 29, 3, 0, -120, 0x80), 2, 0x80),
            (local(2026, 3, 29, 3, 15, -120, 0x81), 3, 0x02),
        ]);
        let rows = rows_of(&p, &jiff::tz::TimeZone::UTC);
        let ms: Vec<i64> = rows.rows.iter().map(|r| r.at.ms).collect();
        assert_eq!(ms[1] - ms[0], 900_000);
        assert_eq!(ms[2] - ms[1], 900_000);
        assert!(rows.rows[1].flags.contains(Flags::POWER_DOWN));
        assert!(rows.rows[2].flags.contains(Flags::CLOCK_INVALID));
    }
}
