//! Reads as requests and results: which attributes to GET for a set of registers or a
//! profile range, and how the answers become values with units and times. Sans-IO; the
//! transport's [`Client`](super::transport::Client) runs them.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::apdu::{AccessError, AttributeRef, CaptureObject, GetResult, Selector};
use super::association::Request;
use super::axdr::{Data, DateTime, clock_status};
use super::cosem::{self, CosemError, ProfileRow, Quantity, ScalerUnit, class};
use crate::reading::{Decimal, Obis};

/// An object to read: its interface class and logical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    pub class: u16,
    pub obis: Obis,
}

/// A value read from an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub obis: Obis,
    pub value: Decimal,
    pub unit: Option<&'static str>,
    /// The meter's own time for the value: an extended or demand register's capture time,
    /// the clock's time.
    pub time: Option<DateTime>,
}

/// Why one object gave no value while the others did.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The meter refused or does not have it (object-undefined, read-write-denied …).
    #[error("meter refused: {0}")]
    Access(AccessError),
    /// It answered something this client cannot turn into a value.
    #[error("unexpected value: {0}")]
    Shape(#[from] CosemError),
    #[error("class {0} is not read as a value")]
    Class(u16),
}

/// An object to read, with its scaler and unit when an earlier read gave them: they are
/// static per object, so a poll reads only what changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub object: Object,
    pub scaler: Option<ScalerUnit>,
}

impl From<Object> for Target {
    fn from(object: Object) -> Self {
        Target {
            object,
            scaler: None,
        }
    }
}

/// One object's answer: its value or why not, and the scaler and unit in effect (`None` for
/// classes without one, or when the meter did not give it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub obis: Obis,
    pub value: Result<Value, ValueError>,
    pub scaler: Option<ScalerUnit>,
}

/// What changes of `obj`, read on every poll: a register's value; an extended register's
/// value and capture time (5); a demand register's last average value (3, the completed
/// period's demand) and its capture time (6); a data object's or clock's value.
pub fn value_attributes(obj: Object) -> Vec<AttributeRef> {
    let a = |n| AttributeRef::new(obj.class, obj.obis.0, n);
    match obj.class {
        class::EXTENDED_REGISTER => vec![a(2), a(5)],
        class::DEMAND_REGISTER => vec![a(3), a(6)],
        _ => vec![a(2)],
    }
}

/// The scaler_unit attribute of a register (3 of classes 3 and 4, 4 of class 5).
pub fn scaler_unit_attribute(obj: Object) -> Option<AttributeRef> {
    let a = |n| AttributeRef::new(obj.class, obj.obis.0, n);
    match obj.class {
        class::REGISTER | class::EXTENDED_REGISTER => Some(a(3)),
        class::DEMAND_REGISTER => Some(a(4)),
        _ => None,
    }
}

/// The attributes read for `t`, in the order [`value_of`] expects: what changes, then the
/// scaler_unit unless it is known.
pub fn attributes(t: Target) -> Vec<AttributeRef> {
    let mut v = value_attributes(t.object);
    if t.scaler.is_none() {
        v.extend(scaler_unit_attribute(t.object));
    }
    v
}

/// The requests for `targets`, flattened (one GET-with-list where the meter allows).
pub fn requests(targets: &[Target]) -> Vec<Request> {
    targets
        .iter()
        .flat_map(|t| attributes(*t))
        .map(Request::from)
        .collect()
}

/// Turns the results of [`requests`] back into one [`Read`] per target.
pub fn values(targets: &[Target], results: &[GetResult]) -> Vec<Read> {
    let mut out = Vec::with_capacity(targets.len());
    let mut at = 0;
    for t in targets {
        let n = attributes(*t).len();
        let slice = results.get(at..at + n).unwrap_or(&[]);
        at += n;
        out.push(value_of(*t, slice));
    }
    out
}

fn ok(r: Option<&GetResult>) -> Result<&Data, ValueError> {
    match r {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(ValueError::Access(*e)),
        None => Err(ValueError::Access(AccessError(AccessError::OTHER_REASON))),
    }
}

/// One object's value from its attributes' results ([`attributes`]).
pub fn value_of(t: Target, r: &[GetResult]) -> Read {
    let obj = t.object;
    let n = value_attributes(obj).len();
    let scaler = match (t.scaler, scaler_unit_attribute(obj)) {
        (Some(su), _) => Some(Ok(su)),
        (None, Some(_)) => {
            Some(ok(r.get(n)).and_then(|d| ScalerUnit::from_data(d).map_err(ValueError::Shape)))
        }
        (None, None) => None,
    };
    let value = value_with(obj, scaler.clone(), r);
    Read {
        obis: obj.obis,
        value,
        scaler: scaler.and_then(Result::ok),
    }
}

fn value_with(
    obj: Object,
    scaler: Option<Result<ScalerUnit, ValueError>>,
    r: &[GetResult],
) -> Result<Value, ValueError> {
    let v = |q: Quantity, time| Value {
        obis: obj.obis,
        value: q.value,
        unit: q.unit,
        time,
    };
    // The value's refusal comes before the scaler's: it is what the centre hears about.
    let su = || scaler.clone().unwrap_or(Ok(ScalerUnit::NONE));
    match obj.class {
        class::REGISTER => {
            let d = ok(r.first())?;
            let reg = cosem::RegisterValue::with_scaler(d, su()?, None)?;
            Ok(v(reg.quantity, None))
        }
        class::EXTENDED_REGISTER => {
            let d = ok(r.first())?;
            let time = ok(r.get(1))?;
            let reg = cosem::RegisterValue::with_scaler(d, su()?, Some(time))?;
            Ok(v(reg.quantity, reg.capture_time))
        }
        class::DEMAND_REGISTER => {
            let d = ok(r.first())?;
            let q = cosem::scaled(d, su()?)?;
            Ok(v(q, ok(r.get(1)).ok().and_then(Data::as_date_time)))
        }
        class::CLOCK => {
            let c = cosem::ClockValue::new(ok(r.first())?, None, None)?;
            // The clock as a value: seconds since the epoch are of no use to the centre, so
            // a clock read is only its time.
            Ok(Value {
                obis: obj.obis,
                value: Decimal::from_scaled(0, 0).map_err(|e| CosemError::Decimal {
                    what: "clock",
                    error: e,
                })?,
                unit: None,
                time: Some(c.time),
            })
        }
        class::DATA => match cosem::DataValue::new(ok(r.first())?) {
            cosem::DataValue::Number(n) => Ok(Value {
                obis: obj.obis,
                value: n,
                unit: None,
                time: None,
            }),
            _ => Err(ValueError::Shape(CosemError::Shape {
                what: "data value",
                expected: "a number",
                got: "non-numeric data",
            })),
        },
        c => Err(ValueError::Class(c)),
    }
}

/// The first step of a profile read: its columns and capture period.
pub fn profile_header_requests(profile: Obis) -> Vec<Request> {
    vec![
        AttributeRef::new(class::PROFILE_GENERIC, profile.0, 3).into(),
        AttributeRef::new(class::PROFILE_GENERIC, profile.0, 4).into(),
    ]
}

/// The scaler_unit attribute of a column, where the column is a scaled register value.
pub fn scaler_attribute(col: &CaptureObject) -> Option<AttributeRef> {
    let a = col.attribute;
    match (a.class, a.attribute) {
        (class::REGISTER | class::EXTENDED_REGISTER, 2) => {
            Some(AttributeRef::new(a.class, a.obis, 3))
        }
        (class::DEMAND_REGISTER, 2 | 3) => Some(AttributeRef::new(a.class, a.obis, 4)),
        _ => None,
    }
}

/// The buffer request for rows captured in `from ..= to` (selector 1 on the clock column),
/// or every row.
pub fn profile_buffer_request(
    profile: Obis,
    clock: Option<CaptureObject>,
    range: Option<(Timestamp, Timestamp)>,
) -> Request {
    Request {
        attribute: AttributeRef::new(class::PROFILE_GENERIC, profile.0, 2),
        access: range.map(|(from, to)| Selector::Range {
            restricting: clock.unwrap_or(CaptureObject::CLOCK),
            from: DateTime::from_timestamp_utc(from, 0xFF),
            to: DateTime::from_timestamp_utc(to, 0xFF),
            columns: vec![],
        }),
    }
}

/// The buffer request for entries `from ..= to` (selector 2), all columns.
pub fn profile_entries_request(profile: Obis, from: u32, to: u32) -> Request {
    Request {
        attribute: AttributeRef::new(class::PROFILE_GENERIC, profile.0, 2),
        access: Some(Selector::Entry {
            from_entry: from,
            to_entry: to,
            from_column: 1,
            to_column: 0,
        }),
    }
}

/// What a profile read needs before its buffer, and static per profile (it changes with a
/// reconfiguration of the meter): the columns, the capture period, and each register
/// column's scaler and unit. Cached with the object list ([`ObjectCache`]), so a profile
/// read is the buffer GET alone.
///
/// [`ObjectCache`]: super::objects::ObjectCache
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfileHeader {
    pub columns: Vec<CaptureObject>,
    pub capture_period_s: u32,
    /// Per column: its scaler and unit, for register values.
    pub scalers: Vec<Option<ScalerUnit>>,
}

impl ProfileHeader {
    /// The header from the answers to [`profile_header_requests`] and the scalers read for
    /// the columns' [`scaler_attribute`]s.
    pub fn new(
        capture_objects: &Data,
        capture_period: &Data,
        scalers: Vec<Option<ScalerUnit>>,
    ) -> Result<ProfileHeader, CosemError> {
        let columns = cosem::capture_objects(capture_objects)?;
        let capture_period_s = match capture_period.as_integer() {
            Some(p) => u32::try_from(p).unwrap_or(0),
            None => 0,
        };
        Ok(ProfileHeader {
            columns,
            capture_period_s,
            scalers,
        })
    }

    /// The clock column, the one a range read restricts by.
    pub fn clock(&self) -> Option<CaptureObject> {
        Profile::clock_column(&self.columns).map(|i| self.columns[i])
    }
}

/// A profile read: its columns with their scalers, and its rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub columns: Vec<CaptureObject>,
    /// Per column: its scaler and unit, for register values.
    pub scalers: Vec<Option<ScalerUnit>>,
    pub capture_period_s: u32,
    pub rows: Vec<ProfileRow>,
}

/// One value of a profile row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileValue {
    pub timestamp: Timestamp,
    pub obis: Obis,
    pub value: Decimal,
    pub unit: Option<&'static str>,
    /// The row's clock status bits ([`clock_status`]).
    pub clock_status: Option<u8>,
}

impl Profile {
    /// The column holding the clock's time, if captured.
    pub fn clock_column(columns: &[CaptureObject]) -> Option<usize> {
        columns
            .iter()
            .position(|c| c.attribute.class == class::CLOCK && c.attribute.attribute == 2)
    }

    /// Builds the profile from its header's and the buffer's answers.
    pub fn new(
        capture_objects: &Data,
        capture_period: &Data,
        scalers: Vec<Option<ScalerUnit>>,
        buffer: &Data,
        tz: &TimeZone,
    ) -> Result<Profile, CosemError> {
        let header = ProfileHeader::new(capture_objects, capture_period, scalers)?;
        Profile::with_header(header, buffer, tz)
    }

    /// Decodes the buffer with a header read before (or cached). Rows are not checked
    /// against the columns here: see [`Profile::fits`].
    pub fn with_header(
        header: ProfileHeader,
        buffer: &Data,
        tz: &TimeZone,
    ) -> Result<Profile, CosemError> {
        let ProfileHeader {
            columns,
            capture_period_s,
            scalers,
        } = header;
        let rows = cosem::profile_rows(buffer, Self::clock_column(&columns), capture_period_s, tz)?;
        Ok(Profile {
            columns,
            scalers,
            capture_period_s,
            rows,
        })
    }

    /// Whether every row has one value per column: a buffer decoded with a cached header that
    /// does not fit was captured with other columns (the meter was reconfigured).
    pub fn fits(&self) -> bool {
        self.rows
            .iter()
            .all(|r| r.values.len() == self.columns.len())
    }

    /// Every numeric value of every row with a known time; other columns (the clock, status
    /// words) are left out. Rows without a time cannot become readings and are skipped.
    pub fn values(&self) -> Vec<ProfileValue> {
        let mut out = Vec::new();
        for row in &self.rows {
            let Some(ts) = row.timestamp else { continue };
            for (i, d) in row.values.iter().enumerate() {
                let Some(col) = self.columns.get(i) else {
                    continue;
                };
                if col.attribute.class == class::CLOCK {
                    continue;
                }
                let su = self.scalers.get(i).copied().flatten();
                let Ok(q) = cosem::scaled(d, su.unwrap_or(ScalerUnit::NONE)) else {
                    continue;
                };
                out.push(ProfileValue {
                    timestamp: ts,
                    obis: Obis(col.attribute.obis),
                    value: q.value,
                    unit: q.unit,
                    clock_status: row.clock_status,
                });
            }
        }
        out
    }
}

/// Whether a row's clock status says its time is not to be trusted.
pub fn status_invalid(status: Option<u8>) -> bool {
    status.is_some_and(|s| s & (clock_status::INVALID | clock_status::DOUBTFUL) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(q: u8) -> Object {
        Object {
            class: 3,
            obis: Obis([1, 0, q, 8, 0, 255]),
        }
    }

    #[test]
    fn register_reads_should_pair_values_with_scalers_and_keep_refusals_apart() {
        let objs = [register(1).into(), register(2).into()];
        assert_eq!(requests(&objs).len(), 4);
        let su = Data::Structure(vec![Data::Int8(-1), Data::Enum(30)]);
        let results = vec![
            Ok(Data::UInt32(123_456)),
            Ok(su),
            Err(AccessError(AccessError::OBJECT_UNDEFINED)),
            Err(AccessError(AccessError::OBJECT_UNDEFINED)),
        ];
        let v = values(&objs, &results);
        let first = v[0].value.as_ref().unwrap();
        assert_eq!((first.value.as_str(), first.unit), ("12345.6", Some("Wh")));
        assert_eq!(
            v[0].scaler,
            Some(ScalerUnit {
                scaler: -1,
                unit: 30
            })
        );
        assert_eq!(
            v[1].value,
            Err(ValueError::Access(AccessError(
                AccessError::OBJECT_UNDEFINED
            )))
        );
        assert_eq!(v[1].scaler, None);
    }

    #[test]
    fn known_scalers_should_leave_only_what_changes_to_read() {
        let su = ScalerUnit {
            scaler: 3,
            unit: 30,
        };
        let known = |object| Target {
            object,
            scaler: Some(su),
        };
        let extended = Object {
            class: class::EXTENDED_REGISTER,
            obis: Obis([1, 0, 1, 6, 0, 255]),
        };
        let demand = Object {
            class: class::DEMAND_REGISTER,
            obis: Obis([1, 0, 1, 4, 0, 255]),
        };
        let targets = [known(register(1)), known(extended), known(demand)];
        let attrs: Vec<i8> = requests(&targets)
            .iter()
            .map(|r| r.attribute.attribute)
            .collect();
        assert_eq!(attrs, [2, 2, 5, 3, 6]);
        let time = Data::OctetString(vec![0x07, 0xEA, 12, 2, 3, 4, 30, 0, 0, 0x80, 0x00, 0x00]);
        let results = vec![
            Ok(Data::UInt32(7)),
            Ok(Data::UInt32(8)),
            Ok(time.clone()),
            Ok(Data::UInt16(9)),
            Ok(time),
        ];
        let v = values(&targets, &results);
        let got: Vec<_> = v
            .iter()
            .map(|r| r.value.as_ref().unwrap().value.as_str().to_owned())
            .collect();
        assert_eq!(got, ["7000", "8000", "9000"]);
        assert!(v[1].value.as_ref().unwrap().time.is_some());
        assert!(v.iter().all(|r| r.scaler == Some(su)));
    }
}
