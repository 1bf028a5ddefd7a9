//! Profile-based reads on a DLMS meter: a [`RowsRequest`] becomes one association with a
//! range read of the profile generic's buffer (selector 1 on the clock column), and its rows
//! become [`Rows`]: each non-clock column a value scaled by its register's scaler, the row's
//! clock status and AMR profile status as flags.

use std::time::Duration;

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
        let profile = self
            .read_profile(slot, request.profile, request.from, request.to, timing)
            .await?;
        let rows = rows_of(&profile, &self.tz);
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
    for row in &profile.rows {
        let Some(ts) = row.timestamp else {
            out.unmapped += row.values.len();
            continue;
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
        out.rows.push(Row {
            at: Stamp::in_zone(ts, tz),
            flags,
            values,
        });
    }
    out
}
