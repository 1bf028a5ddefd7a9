//! Records to series: an OBIS code (IEC 62056-61, `A-B-C-D-E-F`) for each record, the
//! standard one where EN 13757-1 / OMS give one, else a documented private one; and the
//! values the future driver turns into readings ([`values`]).
//!
//! # The standard codes
//!
//! A is the medium's group (1 electricity, 6 heat, 5 cooling, 7 gas, 8 cold water, 9 hot
//! water, 4 heat cost allocator, 0 abstract), B the record's subunit, E its tariff, F its
//! storage number (255 for storage 0, the current value: "no billing period"; storage n is
//! billing period n). The table of C.D per quantity is in `docs/mbus.md`; the main ones:
//! energy `C.D = 1.8` (heat `6-0:1.8.0`, electricity `1-0:1.8.0`), volume `1.0` of water
//! (`8-0:1.0.0`), `3.0` of gas (`7-0:3.0.0`), `2.8` of heat meters, power `8.0` (heat) or
//! `1.7.0` (electricity), flow `9.0`, flow and return temperature `10.0`, `11.0`,
//! difference `12.0`. A maximum is D = 6, a minimum D = 3.
//!
//! # The private scheme
//!
//! A record with no standard code (or one whose combinable VIFE makes it a limit, a rate, a
//! manufacturer-specific value) gets `A-B-C-D-E-F` with A, B, E, F as above and
//! C = 128 + 8·table + function, where table is 0 for the
//! primary VIF, 1 for `FB`, 2 for `FD`, 3 for plain text, 4 for a manufacturer-specific VIF,
//! and function 0–3 (instantaneous, maximum, minimum, during error); D is the VIF (or
//! extension VIFE) code without its extension bit, plus 128 when a combinable VIFE modifies
//! it. C 128–199 is OBIS's manufacturer-specific range. The code depends only on the record's
//! DIB/VIB, so it is the same on every read.

use std::collections::BTreeMap;

use super::app::{Function, Record, Telegram, Value};
use super::vif::Quantity;
use crate::reading::{Decimal, Obis};

/// The OBIS medium group (A) of an M-Bus medium byte.
pub fn medium_group(medium: Option<u8>) -> u8 {
    match medium {
        Some(0x02) | Some(0x20) => 1,
        Some(0x04) | Some(0x0C) | Some(0x0D) => 6,
        Some(0x0A) | Some(0x0B) => 5,
        Some(0x03) => 7,
        Some(0x07) | Some(0x16) => 8,
        Some(0x06) | Some(0x15) => 9,
        Some(0x08) => 4,
        _ => 0,
    }
}

fn clamp(v: u64) -> u8 {
    v.min(254) as u8
}

/// The record's series (before any per-meter override).
pub fn series(r: &Record<'_>, medium: Option<u8>) -> Obis {
    let a = medium_group(medium);
    let b = clamp(u64::from(r.subunit));
    let e = clamp(u64::from(r.tariff));
    let f = if r.storage == 0 {
        255
    } else {
        clamp(r.storage)
    };
    if let Some((a, c, d)) = standard(r, a) {
        return Obis([a, b, c, d, e, f]);
    }
    let table = match r.vib.first().copied() {
        Some(0xFB) => 1,
        Some(0xFD) => 2,
        Some(0x7C) | Some(0xFC) => 3,
        Some(0x7F) | Some(0xFF) => 4,
        _ => 0,
    };
    let function = match r.function {
        Function::Instantaneous => 0,
        Function::Maximum => 1,
        Function::Minimum => 2,
        Function::DuringError => 3,
    };
    let code = match table {
        1 | 2 => r.vib.get(1).copied().unwrap_or(0),
        3 => 0,
        4 => r.vib.get(1).copied().unwrap_or(0),
        _ => r.vib.first().copied().unwrap_or(0),
    } & 0x7F;
    let modified = r.meaning.modifier.is_some() || r.meaning.manufacturer_vife;
    let c = 128 + 8 * table + function;
    let d = code + if modified { 128 } else { 0 };
    Obis([a, b, c, d, e, f])
}

/// `(A, C, D)` where the standard gives a code.
fn standard(r: &Record<'_>, a: u8) -> Option<(u8, u8, u8)> {
    let m = r.meaning;
    if m.modifier.is_some() || m.manufacturer_vife {
        return None;
    }
    let extreme = |d: u8| match r.function {
        Function::Instantaneous => Some(d),
        Function::Maximum => Some(6),
        Function::Minimum => Some(3),
        Function::DuringError => None,
    };
    use Quantity::*;
    let (a, c, d) = match (a, m.quantity) {
        (_, Date) | (_, DateTime) if r.function == Function::Instantaneous => {
            // The meter's clock, or the time stamp of a billing period.
            return Some(if r.storage == 0 { (0, 1, 0) } else { (0, 1, 2) });
        }
        (1, Energy) => (1, 1, extreme(8)?),
        (1, Power) => (1, 1, extreme(7)?),
        (1, Voltage) => (1, 12, extreme(7)?),
        (1, Current) => (1, 11, extreme(7)?),
        (4, HcaUnits) => (4, 1, extreme(0)?),
        (5 | 6, Energy) => (a, 1, extreme(8)?),
        (5 | 6, Volume) => (a, 2, extreme(8)?),
        (5 | 6, Power) => (a, 8, extreme(0)?),
        (5 | 6, VolumeFlow) => (a, 9, extreme(0)?),
        (5 | 6, FlowTemperature) => (a, 10, extreme(0)?),
        (5 | 6, ReturnTemperature) => (a, 11, extreme(0)?),
        (5 | 6, TemperatureDifference) => (a, 12, extreme(0)?),
        (7, Volume) => (7, 3, extreme(0)?),
        (7, VolumeFlow) => (7, 43, extreme(0)?),
        (8 | 9, Volume) => (a, 1, extreme(0)?),
        (8 | 9, VolumeFlow) => (a, 2, extreme(0)?),
        (8 | 9, FlowTemperature) | (8 | 9, ExternalTemperature) => (a, 3, extreme(0)?),
        _ => return None,
    };
    Some((a, c, d))
}

/// Per-meter overrides: default series → the series to use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides(pub BTreeMap<Obis, Obis>);

impl Overrides {
    /// From the config's `series = { "6-0-1-8-0-255" = "6-0:1.8.1" }`; unparsable entries
    /// are skipped (`MbusMeterConfig::validate` reports them).
    pub fn from_config(map: &BTreeMap<String, String>) -> Self {
        Overrides(
            map.iter()
                .filter_map(|(k, v)| {
                    Some((
                        Obis::parse_with(k, [0, 0]).ok()?,
                        Obis::parse_with(v, [0, 0]).ok()?,
                    ))
                })
                .collect(),
        )
    }

    pub fn apply(&self, o: Obis) -> Obis {
        self.0.get(&o).copied().unwrap_or(o)
    }
}

/// One value for the driver to make a reading of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesValue {
    pub series: Obis,
    pub value: Decimal,
    pub unit: String,
    pub storage: u64,
    /// The date of this storage number's date record, if the telegram has one: the
    /// readings' timestamp (in the meter's time zone).
    pub time: Option<jiff::civil::DateTime>,
}

/// The numeric values of all telegrams of a read, with series and per-storage dates. Text,
/// raw bytes and BCD with error digits are not values (they are not numbers) and are left
/// out; dates become timestamps (and the clock `0-0:1.0.0` is not a number either).
pub fn values<'a>(
    telegrams: impl IntoIterator<Item = Telegram<'a>> + Clone,
    overrides: &Overrides,
) -> Vec<SeriesValue> {
    let mut dates: BTreeMap<(u64, u32), jiff::civil::DateTime> = BTreeMap::new();
    for t in telegrams.clone() {
        for r in t.records() {
            if r.function != Function::Instantaneous {
                continue;
            }
            if let Value::Time(dt) = r.value() {
                if let Some(c) = dt.civil() {
                    // A date-time wins over a date of the same storage number.
                    let key = (r.storage, r.subunit);
                    if r.meaning.quantity == Quantity::DateTime || !dates.contains_key(&key) {
                        dates.insert(key, c);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for t in telegrams {
        let medium = t.identity().map(|i| i.medium).or_else(|| t.fixed_medium());
        for r in t.records() {
            let value = r.value();
            let Some(d) = value.to_decimal() else {
                continue;
            };
            out.push(SeriesValue {
                series: overrides.apply(series(&r, medium)),
                value: d,
                unit: r.unit.to_string(),
                storage: r.storage,
                time: dates.get(&(r.storage, r.subunit)).copied(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(records: &[u8], medium: u8) -> Vec<u8> {
        let mut d = vec![
            0x78, 0x56, 0x34, 0x12, 0x2D, 0x2C, 0x01, medium, 0x05, 0x00, 0, 0,
        ];
        d.extend_from_slice(records);
        d
    }

    fn first(data: &[u8], medium: u8) -> Obis {
        let tel = Telegram::parse(0x72, data).unwrap();
        let r = tel.records().next().unwrap();
        series(&r, Some(medium))
    }

    #[test]
    fn heat_energy_should_be_6_0_1_8_0() {
        assert_eq!(
            first(&t(&[0x04, 0x06, 1, 0, 0, 0], 0x04), 0x04).to_string(),
            "6-0-1-8-0-255"
        );
    }

    #[test]
    fn volume_should_follow_the_medium() {
        let rec = [0x04, 0x13, 1, 0, 0, 0];
        assert_eq!(first(&t(&rec, 7), 7).to_string(), "8-0-1-0-0-255");
        assert_eq!(first(&t(&rec, 3), 3).to_string(), "7-0-3-0-0-255");
    }

    #[test]
    fn storage_and_tariff_should_go_to_f_and_e() {
        // DIF 0xC4: storage bit; DIFE 0x10: tariff 1.
        assert_eq!(
            first(&t(&[0xC4, 0x10, 0x06, 1, 0, 0, 0], 4), 4).to_string(),
            "6-0-1-8-1-1"
        );
    }

    #[test]
    fn records_without_a_code_should_get_a_stable_private_series() {
        // FD 17: error flags.
        let data = t(&[0x01, 0xFD, 0x17, 0x00], 4);
        assert_eq!(first(&data, 4).to_string(), "6-0-144-23-0-255");
        assert_eq!(first(&data, 4), first(&data, 4));
    }

    #[test]
    fn storage_dates_should_become_timestamps_and_overrides_apply() {
        let data = t(
            &[
                0x44, 0x06, 5, 0, 0, 0, // storage 1 energy
                0x42, 0x6C, 0x5F, 0x1C, // storage 1 date 2010-12-31
                0x04, 0x06, 7, 0, 0, 0, // current energy
            ],
            4,
        );
        let tel = Telegram::parse(0x72, &data).unwrap();
        let mut o = Overrides::default();
        o.0.insert(
            Obis::parse_with("6-0-1-8-0-255", [0, 0]).unwrap(),
            Obis::parse_with("6-0:1.8.1", [0, 0]).unwrap(),
        );
        let v = values([tel], &o);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].series.to_string(), "6-0-1-8-0-1");
        assert_eq!(v[0].time.unwrap().to_string(), "2010-12-31T00:00:00");
        assert_eq!(v[1].series.to_string(), "6-0-1-8-1-255");
        assert_eq!(v[1].value.as_str(), "7000");
        assert_eq!(v[1].time, None);
    }
}
