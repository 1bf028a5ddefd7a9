//! Meters: what to read from each, and the protocol drivers that read them.
//!
//! A meter is configured with one protocol section (`modbus` or `iec62056_21`) and which
//! series to read at each cadence (`reads`). [`MeterConfig`] is the file's shape;
//! [`MeterConfig::resolve`] turns it, once, into a [`Meter`] whose [`Protocol`] holds the
//! driver's settings parsed and checked (profiles loaded, read plans built, time zones
//! looked up). Nothing downstream parses a string of the config again.
//!
//! # The driver interface
//!
//! [`Meter::read`] is the one entry point the bus worker calls: given a [`Request`] (what to
//! read), the bus's [`link::Slot`] (the transport the bus owns) and the bus's [`Timing`], it
//! returns one [`Outcome`]: values, or a typed [`Failure`], the requests the meter refused,
//! and whether the link must be reopened. Retrying, reopening and "another unit answered"
//! are decided inside the driver; the bus worker knows nothing about any protocol.
//!
//! The interface is an enum ([`Protocol`]) whose arms call each driver, not a trait: the set
//! of drivers is closed and compiled in, each driver's `read` is an `async fn` that a trait
//! object could only call boxed (one allocation per poll on every meter), and an exhaustive
//! `match` makes the compiler point at every place a new protocol must be handled (`check`,
//! link compatibility, the demo).
//!
//! # Adding a protocol
//!
//! 1. A folder under `meter/` with the sans-IO codec and state machine, a thin transport
//!    over [`link::Slot`] (or any `AsyncRead + AsyncWrite`), its file section
//!    (`XxxMeterConfig`, `deny_unknown_fields`) with a `resolve` into its typed settings, and
//!    a `read` that returns an [`Outcome`].
//! 2. A field for the section on [`MeterConfig`], a variant in [`Protocol`], and its arms in
//!    [`MeterConfig::resolve`] (which links can carry it) and [`Meter::read`].
//! 3. Its simulator in `sim/`, used by the tests and the demo.

pub mod dlms;
pub mod iec62056_21;
pub mod link;
pub mod mbus;
pub mod modbus;
pub mod rows;

use std::time::Duration;

use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer};

use crate::primitives::Problems;
use crate::reading::{Cadence, Decimal, Obis, Stamp};
use link::{Link, Slot};

/// `[[meter]]`, as written in the file.
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
    pub dlms: Option<dlms::driver::DlmsMeterConfig>,
    pub mbus: Option<mbus::MbusMeterConfig>,
    /// Which series to read at each cadence. A cadence not listed is not read.
    #[serde(default)]
    pub reads: Reads,
    /// How far back a profile-based read goes for a new meter or a wiped store (its
    /// high-water mark unknown): `history = "7d"`. Default: one chunk's worth is never
    /// asked for; only the last boundary's interval.
    pub history: Option<crate::primitives::HumanDuration>,
    /// This meter's own pauses, where they differ from the bus's (see [`Timing`]).
    pub turnaround: Option<crate::primitives::HumanDuration>,
    pub connect_delay: Option<crate::primitives::HumanDuration>,
    pub inter_request: Option<crate::primitives::HumanDuration>,
}

fn default_id_type() -> String {
    "name".into()
}

/// A meter, resolved: its protocol's settings parsed and checked.
#[derive(Debug)]
pub struct Meter {
    pub id: String,
    pub id_type: String,
    pub bus: String,
    pub protocol: Protocol,
    pub reads: Reads,
    /// `history`: how far back a profile-based read without a high-water mark goes.
    pub history: Option<Duration>,
    /// Pauses that differ from the bus's.
    pub pauses: Pauses,
}

/// The protocol of a meter with its driver's settings, resolved. One variant per driver.
#[derive(Debug)]
pub enum Protocol {
    Modbus(modbus::ModbusMeter),
    Iec62056_21(iec62056_21::IecMeter),
    Dlms(dlms::driver::DlmsMeter),
    Mbus(mbus::MbusMeter),
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Modbus(_) => "modbus",
            Protocol::Iec62056_21(_) => "iec62056_21",
            Protocol::Dlms(_) => "dlms",
            Protocol::Mbus(_) => "mbus",
        }
    }
}

/// What resolving every meter of a file shares: the register maps, and read plans (1,000
/// SDM630s read the same way hold one plan).
pub struct Resolver<'a> {
    pub profiles: &'a modbus::profile::Profiles,
    pub gateway_tz: &'a TimeZone,
    /// The gateway's id and data dir: DLMS derives its client system title from the one and
    /// keeps its invocation counters in the other.
    pub gateway_id: String,
    pub data_dir: std::path::PathBuf,
    plans: modbus::PlanCache,
}

impl<'a> Resolver<'a> {
    pub fn new(profiles: &'a modbus::profile::Profiles, gateway_tz: &'a TimeZone) -> Self {
        Resolver {
            profiles,
            gateway_tz,
            gateway_id: String::new(),
            data_dir: std::path::PathBuf::from("."),
            plans: modbus::PlanCache::default(),
        }
    }

    /// The gateway's id and data dir, for drivers that keep state (DLMS counters).
    pub fn with_gateway(mut self, id: &str, data_dir: &std::path::Path) -> Self {
        self.gateway_id = id.to_owned();
        self.data_dir = data_dir.to_owned();
        self
    }
}

impl MeterConfig {
    /// Checks the meter against its bus's link and resolves its protocol. Every problem goes
    /// to `p` under `at` (`meter[3]`); `None` if there were any.
    pub fn resolve(
        &self,
        at: &str,
        bus: &str,
        link: &Link,
        r: &mut Resolver<'_>,
        p: &mut Problems,
    ) -> Option<Meter> {
        let before = p.0.len();
        if self.id.is_empty() || self.id.len() > 128 {
            p.push(format!("{at}.id"), "must be 1-128 characters");
        }
        check_pause(format!("{at}.turnaround"), self.turnaround, link, p);
        check_pause(format!("{at}.connect_delay"), self.connect_delay, link, p);
        check_pause(format!("{at}.inter_request"), self.inter_request, link, p);
        self.check_profile_reads(at, p);
        let set = [
            self.modbus.is_some(),
            self.iec62056_21.is_some(),
            self.dlms.is_some(),
            self.mbus.is_some(),
        ];
        let protocol = match set.iter().filter(|s| **s).count() {
            0 => {
                p.push(
                    at.to_owned(),
                    "no protocol: add `modbus = { unit = …, profile = … }`, `iec62056_21 = { … }`, `dlms = { … }` or `mbus = { primary = … }`",
                );
                None
            }
            1 => {
                if let Some(m) = &self.modbus {
                    m.resolve(&format!("{at}.modbus"), link, &self.reads, r, p)
                        .map(Protocol::Modbus)
                } else if let Some(i) = &self.iec62056_21 {
                    if !link.is_serial() {
                        p.push(
                            format!("{at}.iec62056_21"),
                            format!("IEC 62056-21 needs a serial bus; `{bus}` is a TCP bus"),
                        );
                    }
                    i.resolve(&format!("{at}.iec62056_21"), r.gateway_tz, p)
                        .map(Protocol::Iec62056_21)
                } else if let Some(d) = &self.dlms {
                    let cx = dlms::driver::Context {
                        meter: &self.id,
                        gateway_id: &r.gateway_id,
                        data_dir: &r.data_dir,
                        gateway_tz: r.gateway_tz,
                    };
                    d.resolve(&format!("{at}.dlms"), link, &cx, p)
                        .map(Protocol::Dlms)
                } else if let Some(m) = &self.mbus {
                    m.resolve(&format!("{at}.mbus"), bus, link, r.gateway_tz, p)
                        .map(Protocol::Mbus)
                } else {
                    None
                }
            }
            _ => {
                p.push(
                    at.to_owned(),
                    "set one protocol: `modbus`, `iec62056_21`, `dlms` or `mbus`",
                );
                None
            }
        };
        match protocol {
            Some(protocol) if p.0.len() == before => Some(Meter {
                id: self.id.clone(),
                id_type: self.id_type.clone(),
                bus: self.bus.clone(),
                protocol,
                reads: self.reads.clone(),
                history: self.history.map(|h| h.0),
                pauses: Pauses {
                    turnaround: self.turnaround.map(|d| d.0),
                    connect_delay: self.connect_delay.map(|d| d.0),
                    inter_request: self.inter_request.map(|d| d.0),
                },
            }),
            _ => None,
        }
    }
}

impl MeterConfig {
    /// Profile-based reads: only protocols with a load profile, each profile read by one
    /// cadence (two would race for its high-water mark), a sane `history`.
    fn check_profile_reads(&self, at: &str, p: &mut Problems) {
        let mut seen: Vec<Obis> = Vec::new();
        for c in self.reads.cadences() {
            let Some(read) = self.reads.profile(c) else {
                continue;
            };
            if self.modbus.is_some() || self.mbus.is_some() {
                p.push(
                    format!("{at}.reads.{c}"),
                    "only DLMS/COSEM and IEC 62056-21 meters keep a load profile to read from; read registers (`\"all\"` or a list of OBIS codes)",
                );
            }
            if seen.contains(&read.profile) {
                p.push(
                    format!("{at}.reads.{c}"),
                    format!(
                        "profile {} is already read by another cadence; read each profile at one cadence",
                        read.profile
                    ),
                );
            }
            seen.push(read.profile);
        }
        if let Some(h) = self.history {
            if h.0 > MAX_HISTORY {
                p.push(
                    format!("{at}.history"),
                    "must be at most 400d (no meter keeps a load profile longer)",
                );
            }
            if h.0.is_zero() {
                p.push(format!("{at}.history"), "must be more than 0s");
            }
        }
    }
}

/// The furthest back `history` may reach.
pub const MAX_HISTORY: Duration = Duration::from_secs(400 * 86_400);

/// What one poll asks of a meter.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub cadence: Cadence,
    /// Only these series (an on-demand command that names them); `None`: what the meter's
    /// `reads` say for the cadence.
    pub series: Option<&'a [Obis]>,
}

/// How a bus runs its requests: the bus's settings, with a meter's own pauses where it has
/// them ([`Meter::timing_on`]).
///
/// The three pauses are kept by the link, not by the drivers: [`link::Slot::begin`] waits
/// out `turnaround` before each read (from the end of the last read on the slot), the slot's
/// TCP connect waits `connect_delay` before handing out a new connection, and between the
/// requests of one read the Modbus tap ([`modbus::wire::pace`]) keeps `turnaround` and
/// `inter_request` from the end of the last answer. The pauses are outside the request's
/// `timeout`. The other drivers' reads are one exchange (IEC 62056-21 readout) or paced by
/// their protocol's own timing (DLMS, M-Bus): for them the knobs apply between reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Per request (per frame exchange).
    pub timeout: Duration,
    /// Further attempts of a request before the poll counts as failed.
    pub retries: u32,
    pub turnaround: Duration,
    pub connect_delay: Duration,
    pub inter_request: Duration,
}

impl Timing {
    /// The pauses that are set, for `check`: `, turnaround 20ms, connect_delay 1s`.
    pub fn describe_pauses(&self) -> String {
        Pauses {
            turnaround: Some(self.turnaround),
            connect_delay: Some(self.connect_delay),
            inter_request: Some(self.inter_request),
        }
        .describe()
    }
}

/// A meter's own pauses, where they differ from its bus's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pauses {
    pub turnaround: Option<Duration>,
    pub connect_delay: Option<Duration>,
    pub inter_request: Option<Duration>,
}

impl Pauses {
    /// The pauses that are set (and not zero), each after `, `.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (name, d) in [
            ("turnaround", self.turnaround),
            ("connect_delay", self.connect_delay),
            ("inter_request", self.inter_request),
        ] {
            if let Some(d) = d.filter(|d| !d.is_zero()) {
                s.push_str(&format!(", {name} {}", crate::primitives::HumanDuration(d)));
            }
        }
        s
    }
}

/// The longest pause a timing knob takes: longer is a typo, not a slow meter.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// Checks a timing knob (`turnaround`, `connect_delay`, `inter_request`) at `key`.
pub fn check_pause(
    key: String,
    d: Option<crate::primitives::HumanDuration>,
    link: &Link,
    p: &mut Problems,
) {
    let Some(d) = d else { return };
    if d.0 > MAX_PAUSE {
        p.push(key.clone(), format!("must be at most {MAX_PAUSE:?}"));
    }
    if key.ends_with("connect_delay") && link.is_serial() {
        p.push(
            key,
            "applies to TCP links only (a serial port has no connection to open)",
        );
    }
}

/// What a driver's read produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The values read; empty when `failure` is set.
    pub values: Vec<Value>,
    /// Why the read failed: the meter or the link did not answer properly. No values then.
    pub failure: Option<Failure>,
    /// Requests the meter refused (an exception, a baud switch it would not make): the rest
    /// of the read is still good.
    pub refused: Vec<Failure>,
    /// The link is out of step or gone: the bus must close it before the next poll.
    pub reopen: bool,
    /// Data the meter sent that could not be mapped to a series (logged at debug with the
    /// raw text; counted for `inspect`).
    pub unmapped: usize,
}

impl Outcome {
    pub fn failed(failure: Failure) -> Self {
        Outcome {
            failure: Some(failure),
            ..Outcome::default()
        }
    }
}

/// One value a driver read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub series: Obis,
    pub value: Decimal,
    pub unit: String,
    /// The meter's own time for the value, where the protocol gives one.
    pub meter_time: Option<Stamp>,
}

impl Meter {
    /// The bus's timing with this meter's own pauses where it has them.
    pub fn timing_on(&self, bus: &Timing) -> Timing {
        Timing {
            turnaround: self.pauses.turnaround.unwrap_or(bus.turnaround),
            connect_delay: self.pauses.connect_delay.unwrap_or(bus.connect_delay),
            inter_request: self.pauses.inter_request.unwrap_or(bus.inter_request),
            ..*bus
        }
    }

    /// Reads the meter on `slot`: the one driver entry point (see the module doc).
    pub async fn read(&self, slot: &mut Slot, request: &Request<'_>, timing: &Timing) -> Outcome {
        match &self.protocol {
            Protocol::Modbus(m) => m.read(slot, &self.id, request, timing).await,
            Protocol::Iec62056_21(m) => {
                let selection = self.selection(request);
                m.read(slot, &self.id, &selection, timing).await
            }
            Protocol::Dlms(m) => {
                let selection = self.selection(request);
                m.read(slot, &self.id, &selection, timing).await
            }
            Protocol::Mbus(m) => {
                let selection = self.selection(request);
                m.read(slot, &self.id, &selection, timing).await
            }
        }
    }

    /// Reads rows of the meter's own load profile (see [`rows`]): DLMS/COSEM by selective
    /// access by range, IEC 62056-21 by `P.01(from;to)` in programming mode.
    pub async fn read_rows(
        &self,
        slot: &mut Slot,
        request: &rows::RowsRequest,
        timing: &Timing,
    ) -> Result<rows::Rows, Failure> {
        match &self.protocol {
            Protocol::Dlms(m) => m.read_rows(slot, &self.id, request, timing).await,
            Protocol::Iec62056_21(m) => m.read_rows(slot, &self.id, request, timing).await,
            Protocol::Modbus(_) | Protocol::Mbus(_) => Err(Failure::Refused(format!(
                "{} meters keep no load profile to read",
                self.protocol.name()
            ))),
        }
    }

    /// The profile read of `cadence`, when its `reads` name one.
    pub fn profile_read(&self, cadence: Cadence) -> Option<&ProfileRead> {
        self.reads.profile(cadence)
    }

    /// What `request` selects: the series it names, else the meter's `reads` for the
    /// cadence, else everything.
    pub fn selection(&self, request: &Request<'_>) -> Selection {
        match request.series {
            Some(series) => Selection::Series(series.to_vec()),
            None => self
                .reads
                .get(request.cadence)
                .cloned()
                .unwrap_or(Selection::All),
        }
    }
}

/// `reads = { quarterly = ["1-0:1.8.0"], daily = { profile = "1-0:99.2.0" }, monthly = "all" }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reads {
    pub quarterly: Option<CadenceRead>,
    pub hourly: Option<CadenceRead>,
    pub daily: Option<CadenceRead>,
    pub monthly: Option<CadenceRead>,
    pub yearly: Option<CadenceRead>,
}

/// What one cadence reads: registers, or the rows of a load profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CadenceRead {
    Registers(Selection),
    Profile(ProfileRead),
}

/// `{ profile = "1-0:99.1.0" }`, optionally with its own `history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRead {
    pub profile: Obis,
    /// How far back a read without a high-water mark goes, for this cadence (else the
    /// meter's `history`).
    pub history: Option<Duration>,
}

impl Reads {
    fn read(&self, cadence: Cadence) -> Option<&CadenceRead> {
        match cadence {
            Cadence::Quarterly => self.quarterly.as_ref(),
            Cadence::Hourly => self.hourly.as_ref(),
            Cadence::Daily => self.daily.as_ref(),
            Cadence::Monthly => self.monthly.as_ref(),
            Cadence::Yearly => self.yearly.as_ref(),
            Cadence::OnDemand => None,
        }
    }

    /// The registers a cadence reads; `None` for a cadence not read, or read from a profile.
    pub fn get(&self, cadence: Cadence) -> Option<&Selection> {
        match (cadence, self.read(cadence)) {
            // An on-demand poll reads everything unless the command names series.
            (Cadence::OnDemand, _) => Some(&Selection::All),
            (_, Some(CadenceRead::Registers(s))) => Some(s),
            _ => None,
        }
    }

    /// The profile a cadence reads from, if it does.
    pub fn profile(&self, cadence: Cadence) -> Option<&ProfileRead> {
        match self.read(cadence) {
            Some(CadenceRead::Profile(p)) => Some(p),
            _ => None,
        }
    }

    /// The scheduled cadences this meter is read at (registers or profile).
    pub fn cadences(&self) -> impl Iterator<Item = Cadence> + '_ {
        Cadence::SCHEDULED
            .into_iter()
            .filter(|c| self.read(*c).is_some())
    }
}

impl<'de> Deserialize<'de> for CadenceRead {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            profile: String,
            history: Option<crate::primitives::HumanDuration>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Profile(Raw),
            Registers(serde_value_registers::Registers),
        }
        let what = "expected \"all\", a list of OBIS codes such as [\"1-0:1.8.0\"], or a load profile such as { profile = \"1-0:99.1.0\" }";
        match Either::deserialize(d).map_err(|_| serde::de::Error::custom(what))? {
            Either::Registers(r) => {
                r.0.map(CadenceRead::Registers)
                    .map_err(serde::de::Error::custom)
            }
            Either::Profile(raw) => {
                let profile = raw
                    .profile
                    .parse::<Obis>()
                    .map_err(serde::de::Error::custom)?;
                Ok(CadenceRead::Profile(ProfileRead {
                    profile,
                    history: raw.history.map(|h| h.0),
                }))
            }
        }
    }
}

/// The register forms of a cadence's read, parsed leniently so that the untagged enum above
/// can tell them from a profile table and still give [`Selection`]'s own error message.
mod serde_value_registers {
    use serde::{Deserialize, Deserializer};

    pub struct Registers(pub Result<super::Selection, String>);

    impl<'de> Deserialize<'de> for Registers {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum Raw {
                Word(String),
                List(Vec<String>),
            }
            let raw = Raw::deserialize(d)?;
            Ok(Registers(super::Selection::from_raw(match raw {
                Raw::Word(w) => Err(w),
                Raw::List(l) => Ok(l),
            })))
        }
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

impl Selection {
    /// `"all"` (a word) or a list of OBIS codes, with the message a person needs otherwise.
    fn from_raw(raw: Result<Vec<String>, String>) -> Result<Selection, String> {
        match raw {
            Err(w) if w == "all" => Ok(Selection::All),
            Err(w) => Err(format!(
                "expected \"all\" or a list of OBIS codes, not \"{w}\""
            )),
            Ok(list) => list
                .iter()
                .map(|s| s.parse::<Obis>())
                .collect::<Result<Vec<_>, _>>()
                .map(Selection::Series)
                .map_err(|e| e.to_string()),
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
        Selection::from_raw(match raw {
            Raw::Word(w) => Err(w),
            Raw::List(l) => Ok(l),
        })
        .map_err(serde::de::Error::custom)
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
    /// The meter would not let us in: association rejected, wrong password or key, a
    /// ciphered answer that fails its tag, an invocation counter it refuses.
    #[error("security: {0}")]
    Security(String),
    /// The meter's clock is off from the gateway's by more than the configured limit (a
    /// refusal: the values read are still good).
    #[error("meter clock off by {offset_s} s (limit {limit:?})")]
    ClockDeviation { offset_s: i64, limit: Duration },
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
            Failure::Security(_) => K::SecurityError,
            Failure::ClockDeviation { .. } => K::ClockProblem,
        }
    }
}

/// As `{"kind": "meter_not_answering", "message": "no answer within 1s"}`: the event kind the
/// centre knows, and the words for a person.
impl serde::Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Failure", 2)?;
        st.serialize_field("kind", self.event_kind().as_str())?;
        st.serialize_field("message", &self.to_string())?;
        st.end()
    }
}
