//! Meters: what to read from each, and the protocol drivers that read them.
//!
//! A meter is configured with one protocol section (`modbus` or `iec62056_21`) and which
//! series to read at each cadence (`reads`). The drivers ([`modbus`], [`iec62056_21`]) turn a
//! poll into requests on a transport the bus worker owns, and the answers into
//! [`Reading`](crate::reading::Reading)s.

pub mod iec62056_21;
pub mod mbus;
pub mod modbus;

use serde::{Deserialize, Deserializer};

use crate::bus::BusConfig;
use crate::config::Problems;
use crate::reading::{Cadence, Obis};

/// `[[meter]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// The meter's name at the centre.
    pub id: String,
    /// What kind of id `id` is, for the centre.
    #[serde(default = "default_id_type")]
    pub id_type: String,
    pub bus: String,
    pub modbus: Option<modbus::ModbusMeterConfig>,
    pub iec62056_21: Option<iec62056_21::IecMeterConfig>,
    /// Which series to read at each cadence. A cadence not listed is not read.
    #[serde(default)]
    pub reads: Reads,
}

fn default_id_type() -> String {
    "name".into()
}

/// `reads = { quarterly = ["1-0:1.8.0"], monthly = "all" }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reads {
    pub quarterly: Option<Selection>,
    pub hourly: Option<Selection>,
    pub daily: Option<Selection>,
    pub monthly: Option<Selection>,
    pub yearly: Option<Selection>,
}

impl Reads {
    pub fn get(&self, cadence: Cadence) -> Option<&Selection> {
        match cadence {
            Cadence::Quarterly => self.quarterly.as_ref(),
            Cadence::Hourly => self.hourly.as_ref(),
            Cadence::Daily => self.daily.as_ref(),
            Cadence::Monthly => self.monthly.as_ref(),
            Cadence::Yearly => self.yearly.as_ref(),
            // An on-demand poll reads everything unless the command names series.
            Cadence::OnDemand => Some(&Selection::All),
        }
    }

    /// The scheduled cadences this meter is read at.
    pub fn cadences(&self) -> impl Iterator<Item = Cadence> + '_ {
        Cadence::SCHEDULED
            .into_iter()
            .filter(|c| self.get(*c).is_some())
    }
}

/// Every series the meter offers, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selection {
    All,
    Series(Vec<Obis>),
}

impl Selection {
    pub fn wants(&self, series: &Obis) -> bool {
        match self {
            Selection::All => true,
            Selection::Series(s) => s.contains(series),
        }
    }
}

impl<'de> Deserialize<'de> for Selection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected \"all\" or a list of OBIS codes such as [\"1-0:1.8.0\"]",
            )
        })?;
        match raw {
            Raw::Word(w) if w == "all" => Ok(Selection::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected \"all\" or a list of OBIS codes, not \"{w}\""
            ))),
            Raw::List(list) => list
                .iter()
                .map(|s| s.parse::<Obis>())
                .collect::<Result<Vec<_>, _>>()
                .map(Selection::Series)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The protocol of a meter, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Modbus,
    Iec62056_21,
}

impl MeterConfig {
    pub fn protocol(&self) -> Protocol {
        if self.modbus.is_some() {
            Protocol::Modbus
        } else {
            Protocol::Iec62056_21
        }
    }

    pub fn validate(
        &self,
        at: &str,
        bus: &BusConfig,
        profiles: &modbus::profile::Profiles,
        p: &mut Problems,
    ) {
        if self.id.is_empty() || self.id.len() > 128 {
            p.push(format!("{at}.id"), "must be 1-128 characters");
        }
        match (&self.modbus, &self.iec62056_21) {
            (Some(_), Some(_)) => p.push(
                at.to_owned(),
                "set one protocol: either `modbus` or `iec62056_21`",
            ),
            (None, None) => p.push(
                at.to_owned(),
                "no protocol: add `modbus = { unit = …, profile = … }` or `iec62056_21 = { … }`",
            ),
            (Some(m), None) => {
                m.validate(&format!("{at}.modbus"), bus.serial.is_some(), profiles, p);
                if let Some(profile) = profiles.get(&m.profile) {
                    for c in self.reads.cadences() {
                        if let Some(sel) = self.reads.get(c) {
                            let missing = modbus::ReadPlan::missing(profile, sel);
                            if !missing.is_empty() {
                                p.push(
                                    format!("{at}.reads.{c}"),
                                    format!(
                                        "profile `{}` has no register for {}",
                                        m.profile,
                                        missing
                                            .iter()
                                            .map(|o| o.to_string())
                                            .collect::<Vec<_>>()
                                            .join(", ")
                                    ),
                                );
                            }
                        }
                    }
                }
            }
            (None, Some(i)) => {
                if bus.tcp.is_some() {
                    p.push(
                        format!("{at}.iec62056_21"),
                        format!(
                            "IEC 62056-21 needs a serial bus; `{}` is a TCP bus",
                            bus.name
                        ),
                    );
                }
                i.validate(&format!("{at}.iec62056_21"), p);
            }
        }
    }
}

/// Why a read failed, in terms the centre acts on. Each maps to one system event kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("checksum error: {0}")]
    Checksum(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("exception {code} ({name}) for {detail}")]
    Exception {
        code: u8,
        name: &'static str,
        detail: String,
    },
    #[error("device {got} answered instead of {expected}")]
    WrongDevice { expected: String, got: String },
    #[error("link error: {0}")]
    Link(String),
    /// The meter answered but would not do what was asked (IEC 62056-21 baud switch).
    #[error("meter refused: {0}")]
    Refused(String),
}

impl Failure {
    pub fn event_kind(&self) -> crate::reading::EventKind {
        use crate::reading::EventKind as K;
        match self {
            Failure::Timeout(_) => K::MeterNotAnswering,
            Failure::Checksum(_) => K::ChecksumError,
            Failure::Malformed(_) | Failure::Refused(_) => K::MalformedResponse,
            Failure::Exception { .. } => K::ExceptionResponse,
            Failure::WrongDevice { .. } => K::WrongDeviceAnswered,
            Failure::Link(_) => K::LinkError,
        }
    }
}
