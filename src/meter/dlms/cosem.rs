//! The COSEM interface classes a reading client needs, as values the driver maps to readings:
//! Data (1), Register (3), Extended register (4), Demand register (5), Clock (8), Profile
//! generic (7), and the association's object list (class 15, attribute 2).
//!
//! Register values are exact decimals: an integer value × 10^scaler is written without any
//! float ([`Decimal::from_scaled`]); a float value is the shortest decimal that reads back as
//! the same float, then shifted by the scaler.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::apdu::{AttributeRef, CaptureObject};
use super::axdr::{Data, DateTime};
use crate::reading::{Decimal, DecimalError, Obis};

pub mod class {
    pub const DATA: u16 = 1;
    pub const REGISTER: u16 = 3;
    pub const EXTENDED_REGISTER: u16 = 4;
    pub const DEMAND_REGISTER: u16 = 5;
    pub const PROFILE_GENERIC: u16 = 7;
    pub const CLOCK: u16 = 8;
    pub const ASSOCIATION_LN: u16 = 15;
}

/// The current association (0-0:40.0.0.255).
pub const ASSOCIATION_OBIS: [u8; 6] = [0, 0, 40, 0, 0, 255];
/// The clock (0-0:1.0.0.255).
pub const CLOCK_OBIS: [u8; 6] = [0, 0, 1, 0, 0, 255];

/// The object list of the current association.
pub const OBJECT_LIST: AttributeRef = AttributeRef::new(class::ASSOCIATION_LN, ASSOCIATION_OBIS, 2);
/// The clock's time.
pub const CLOCK_TIME: AttributeRef = AttributeRef::new(class::CLOCK, CLOCK_OBIS, 2);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CosemError {
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{what}: {error}")]
    Decimal {
        what: &'static str,
        error: DecimalError,
    },
}

fn shape(what: &'static str, expected: &'static str, got: &Data) -> CosemError {
    CosemError::Shape {
        what,
        expected,
        got: got.type_name(),
    }
}

/// The DLMS unit enumeration (IEC 62056-6-2, table "Enumerated values for physical units").
pub fn unit_name(code: u8) -> Option<&'static str> {
    Some(match code {
        1 => "a",
        2 => "mo",
        3 => "wk",
        4 => "d",
        5 => "h",
        6 => "min",
        7 => "s",
        8 => "°",
        9 => "°C",
        10 => "currency",
        11 => "m",
        12 => "m/s",
        13 => "m³",
        14 => "m³",
        15 => "m³/h",
        16 => "m³/h",
        17 => "m³/d",
        18 => "m³/d",
        19 => "l",
        20 => "kg",
        21 => "N",
        22 => "Nm",
        23 => "Pa",
        24 => "bar",
        25 => "J",
        26 => "J/h",
        27 => "W",
        28 => "VA",
        29 => "var",
        30 => "Wh",
        31 => "VAh",
        32 => "varh",
        33 => "A",
        34 => "C",
        35 => "V",
        36 => "V/m",
        37 => "F",
        38 => "Ω",
        39 => "Ωm²/m",
        40 => "Wb",
        41 => "T",
        42 => "A/m",
        43 => "H",
        44 => "Hz",
        45 => "1/(Wh)",
        46 => "1/(varh)",
        47 => "1/(VAh)",
        48 => "V²h",
        49 => "A²h",
        50 => "kg/s",
        51 => "S",
        52 => "K",
        53 => "1/(V²h)",
        54 => "1/(A²h)",
        55 => "1/m³",
        56 => "%",
        57 => "Ah",
        60 => "Wh/m³",
        61 => "J/m³",
        62 => "Mol %",
        63 => "g/m³",
        64 => "Pa s",
        65 => "J/kg",
        66 => "g/cm²",
        67 => "atm",
        70 => "dBm",
        71 => "dBµV",
        72 => "dB",
        // 253 reserved, 254 other unit, 255 no unit (a count).
        _ => return None,
    })
}

/// A register's scaler and unit (attribute 3 of classes 3 and 4, 4 of class 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScalerUnit {
    pub scaler: i8,
    pub unit: u8,
}

impl ScalerUnit {
    /// What a Data object or a value without scaler_unit has: 10^0, no unit.
    pub const NONE: ScalerUnit = ScalerUnit {
        scaler: 0,
        unit: 255,
    };

    pub fn from_data(d: &Data) -> Result<Self, CosemError> {
        match d.as_list() {
            Some([s, Data::Enum(unit)]) => {
                let scaler = match s {
                    Data::Int8(v) => *v,
                    // Some meters send the scaler unsigned; it is a two's complement byte.
                    Data::UInt8(v) => *v as i8,
                    other => return Err(shape("scaler", "integer", other)),
                };
                Ok(ScalerUnit {
                    scaler,
                    unit: *unit,
                })
            }
            _ => Err(shape("scaler_unit", "structure { integer, enum }", d)),
        }
    }
}

/// A value with its unit, exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantity {
    pub value: Decimal,
    /// `None` for counts and units the table does not name.
    pub unit: Option<&'static str>,
}

impl Quantity {
    /// The value in the unit the centre uses for billing quantities: Wh, varh and VAh as kWh,
    /// kvarh and kVAh (exactly: the decimal point moves), W, var, VA as kW, kvar, kVA.
    pub fn in_kilo(&self) -> Result<Quantity, DecimalError> {
        let kilo = match self.unit {
            Some("Wh") => "kWh",
            Some("varh") => "kvarh",
            Some("VAh") => "kVAh",
            Some("W") => "kW",
            Some("var") => "kvar",
            Some("VA") => "kVA",
            _ => return Ok(self.clone()),
        };
        Ok(Quantity {
            value: self.value.clone().shift(-3)?,
            unit: Some(kilo),
        })
    }
}

/// `value × 10^scaler` in `unit`.
pub fn scaled(value: &Data, su: ScalerUnit) -> Result<Quantity, CosemError> {
    let what = "register value";
    let dec = |e| CosemError::Decimal { what, error: e };
    let v = if let Some(i) = value.as_integer() {
        Decimal::from_scaled(i, i32::from(su.scaler)).map_err(dec)?
    } else {
        match value {
            Data::Float32(f) => Decimal::from_f32(*f)
                .and_then(|d| d.shift(i32::from(su.scaler)))
                .map_err(dec)?,
            Data::Float64(f) => Decimal::from_f64(*f)
                .and_then(|d| d.shift(i32::from(su.scaler)))
                .map_err(dec)?,
            other => return Err(shape(what, "a number", other)),
        }
    };
    Ok(Quantity {
        value: v,
        unit: unit_name(su.unit),
    })
}

/// A register (class 3) or extended register (class 4): the value, and for class 4 when it
/// was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterValue {
    pub quantity: Quantity,
    pub capture_time: Option<DateTime>,
}

impl RegisterValue {
    /// From attribute 2 (value) and 3 (scaler_unit), and for an extended register 5
    /// (capture_time).
    pub fn new(
        value: &Data,
        scaler_unit: &Data,
        capture_time: Option<&Data>,
    ) -> Result<Self, CosemError> {
        Self::with_scaler(value, ScalerUnit::from_data(scaler_unit)?, capture_time)
    }

    /// From attribute 2 and, for an extended register, 5, with the scaler and unit known
    /// from an earlier read (they are static per object).
    pub fn with_scaler(
        value: &Data,
        su: ScalerUnit,
        capture_time: Option<&Data>,
    ) -> Result<Self, CosemError> {
        Ok(RegisterValue {
            quantity: scaled(value, su)?,
            capture_time: match capture_time {
                None => None,
                Some(d) => Some(
                    d.as_date_time()
                        .ok_or_else(|| shape("capture_time", "date-time", d))?,
                ),
            },
        })
    }
}

/// A demand register (class 5): attributes 2 (current average), 3 (last average), 4
/// (scaler_unit), 6 (capture time), 7 (start of the current period).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemandValue {
    pub current_average: Quantity,
    pub last_average: Quantity,
    pub capture_time: Option<DateTime>,
    pub start_time_current: Option<DateTime>,
}

impl DemandValue {
    pub fn new(
        current: &Data,
        last: &Data,
        scaler_unit: &Data,
        capture_time: &Data,
        start_time: &Data,
    ) -> Result<Self, CosemError> {
        let su = ScalerUnit::from_data(scaler_unit)?;
        Ok(DemandValue {
            current_average: scaled(current, su)?,
            last_average: scaled(last, su)?,
            capture_time: capture_time.as_date_time(),
            start_time_current: start_time.as_date_time(),
        })
    }
}

/// What a Data object (class 1) holds: a number (unscaled), text, a time, or other data.
#[derive(Clone, Debug, PartialEq)]
pub enum DataValue {
    Number(Decimal),
    Text(String),
    Time(DateTime),
    Other(Data),
}

impl DataValue {
    pub fn new(d: &Data) -> DataValue {
        if let Ok(q) = scaled(d, ScalerUnit::NONE) {
            return DataValue::Number(q.value);
        }
        if let Some(t) = d.as_date_time() {
            return DataValue::Time(t);
        }
        match d {
            Data::VisibleString(b) | Data::OctetString(b)
                if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') && !b.is_empty() =>
            {
                DataValue::Text(String::from_utf8_lossy(b).into_owned())
            }
            Data::Utf8String(s) => DataValue::Text(s.clone()),
            other => DataValue::Other(other.clone()),
        }
    }
}

/// The clock (class 8): attributes 2 (time), 3 (time zone, minutes), 4 (status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockValue {
    pub time: DateTime,
    pub time_zone: Option<i16>,
    pub status: Option<u8>,
}

impl ClockValue {
    pub fn new(
        time: &Data,
        time_zone: Option<&Data>,
        status: Option<&Data>,
    ) -> Result<Self, CosemError> {
        Ok(ClockValue {
            time: time
                .as_date_time()
                .ok_or_else(|| shape("clock time", "date-time", time))?,
            time_zone: match time_zone {
                Some(Data::Int16(v)) => Some(*v),
                _ => None,
            },
            status: match status {
                Some(Data::UInt8(v)) => Some(*v),
                _ => None,
            },
        })
    }
}

/// One entry of the association's object list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectListEntry {
    pub class: u16,
    pub version: u8,
    pub obis: Obis,
}

fn obis_of(d: &Data, what: &'static str) -> Result<[u8; 6], CosemError> {
    d.as_octets()
        .and_then(|b| <[u8; 6]>::try_from(b).ok())
        .ok_or_else(|| shape(what, "6-byte octet-string", d))
}

/// Attribute 2 of the association LN object: array of { class_id, version, logical_name,
/// access_rights }.
pub fn object_list(d: &Data) -> Result<Vec<ObjectListEntry>, CosemError> {
    let Data::Array(items) = d else {
        return Err(shape("object_list", "array", d));
    };
    items
        .iter()
        .map(|item| match item.as_list() {
            Some([Data::UInt16(class), Data::UInt8(version), ln, ..]) => Ok(ObjectListEntry {
                class: *class,
                version: *version,
                obis: Obis(obis_of(ln, "logical_name")?),
            }),
            _ => Err(shape(
                "object_list_element",
                "structure { long-unsigned, unsigned, octet-string, access }",
                item,
            )),
        })
        .collect()
}

/// Attribute 3 of a profile generic: the columns of its buffer.
pub fn capture_objects(d: &Data) -> Result<Vec<CaptureObject>, CosemError> {
    let Data::Array(items) = d else {
        return Err(shape("capture_objects", "array", d));
    };
    items
        .iter()
        .map(|item| match item.as_list() {
            Some(
                [
                    Data::UInt16(class),
                    ln,
                    Data::Int8(attr),
                    Data::UInt16(index),
                ],
            ) => Ok(CaptureObject {
                attribute: AttributeRef::new(*class, obis_of(ln, "logical_name")?, *attr),
                data_index: *index,
            }),
            _ => Err(shape(
                "capture_object_definition",
                "structure { long-unsigned, octet-string, integer, long-unsigned }",
                item,
            )),
        })
        .collect()
}

/// A row of a profile buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// The row's time: its clock column, or for a row whose clock column is null (meters
    /// compress regular rows so) the previous row's plus the capture period.
    pub timestamp: Option<Timestamp>,
    /// The clock status of the row's time, where it says one.
    pub clock_status: Option<u8>,
    /// The row's values, one per column (the clock column included).
    pub values: Vec<Data>,
}

/// Attribute 2 of a profile generic: the rows, read with the columns they were captured with.
/// `clock_column` is the index of the clock's time among the columns, if any; `tz` the zone
/// for times without a deviation.
pub fn profile_rows(
    buffer: &Data,
    clock_column: Option<usize>,
    capture_period_s: u32,
    tz: &TimeZone,
) -> Result<Vec<ProfileRow>, CosemError> {
    let Data::Array(rows) = buffer else {
        return Err(shape("buffer", "array", buffer));
    };
    let mut out = Vec::with_capacity(rows.len());
    let mut previous: Option<Timestamp> = None;
    for row in rows {
        let values = row
            .as_list()
            .ok_or_else(|| shape("buffer row", "structure", row))?
            .to_vec();
        let (timestamp, clock_status) = match clock_column.and_then(|c| values.get(c)) {
            Some(Data::Null) | None => (
                previous.and_then(|p| {
                    (capture_period_s > 0)
                        .then(|| {
                            p.checked_add(jiff::SignedDuration::from_secs(capture_period_s.into()))
                                .ok()
                        })
                        .flatten()
                }),
                None,
            ),
            Some(d) => match d.as_date_time() {
                Some(dt) => (
                    dt.to_timestamp(tz),
                    (dt.status != 0xFF).then_some(dt.status),
                ),
                None => return Err(shape("profile clock column", "date-time", d)),
            },
        };
        previous = timestamp;
        out.push(ProfileRow {
            timestamp,
            clock_status,
            values,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn su(scaler: i8, unit: u8) -> Data {
        Data::Structure(vec![Data::Int8(scaler), Data::Enum(unit)])
    }

    #[test]
    fn energy_register_should_scale_exactly() {
        let r = RegisterValue::new(&Data::UInt32(14_567_125), &su(-3, 30), None).unwrap();
        assert_eq!(r.quantity.value.as_str(), "14567.125");
        assert_eq!(r.quantity.unit, Some("Wh"));
        let k = r.quantity.in_kilo().unwrap();
        assert_eq!((k.value.as_str(), k.unit), ("14.567125", Some("kWh")));
    }

    #[test]
    fn positive_scaler_and_float_should_be_exact() {
        let r = scaled(
            &Data::Int16(-12),
            ScalerUnit {
                scaler: 2,
                unit: 27,
            },
        )
        .unwrap();
        assert_eq!(r.value.as_str(), "-1200");
        let f = scaled(
            &Data::Float32(230.1),
            ScalerUnit {
                scaler: 0,
                unit: 35,
            },
        )
        .unwrap();
        assert_eq!((f.value.as_str(), f.unit), ("230.1", Some("V")));
    }

    #[test]
    fn non_numeric_register_should_be_a_shape_error() {
        assert!(matches!(
            scaled(&Data::OctetString(vec![1]), ScalerUnit::NONE),
            Err(CosemError::Shape { .. })
        ));
    }

    #[test]
    fn object_list_should_decode_class_version_and_obis() {
        let d = Data::Array(vec![Data::Structure(vec![
            Data::UInt16(3),
            Data::UInt8(0),
            Data::OctetString(vec![1, 0, 1, 8, 0, 255]),
            Data::Structure(vec![]),
        ])]);
        assert_eq!(
            object_list(&d).unwrap(),
            [ObjectListEntry {
                class: 3,
                version: 0,
                obis: Obis([1, 0, 1, 8, 0, 255])
            }]
        );
    }

    #[test]
    fn profile_rows_with_null_times_should_follow_the_capture_period() {
        let t0 = DateTime::from_timestamp_utc("2024-01-01T00:00:00Z".parse().unwrap(), 0);
        let buffer = Data::Array(vec![
            Data::Structure(vec![
                Data::OctetString(t0.encode().to_vec()),
                Data::UInt32(1),
            ]),
            Data::Structure(vec![Data::Null, Data::UInt32(2)]),
        ]);
        let rows = profile_rows(&buffer, Some(0), 900, &TimeZone::UTC).unwrap();
        assert_eq!(
            rows[1].timestamp.unwrap().to_string(),
            "2024-01-01T00:15:00Z"
        );
        assert_eq!(rows[0].clock_status, Some(0));
    }
}
