//! The configuration file: TOML, `deny_unknown_fields` everywhere, validated before anything
//! starts.
//!
//! Each component's section lives next to the component ([`crate::store::StoreConfig`],
//! [`crate::drain::AmqpConfig`], [`crate::bus::BusConfig`], …); this module holds the top
//! level, the value types they share ([`Duration`], [`ByteSize`], [`Secret`]) and the error
//! type, which names the file, line, column and key of every problem.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::tz::TimeZone;
use serde::Deserialize;

use crate::beat::BeatConfig;
use crate::bus::{Bus, BusConfig};
use crate::control::MqttConfig;
use crate::drain::AmqpConfig;
use crate::meter::modbus::profile::Profiles;
use crate::meter::{Meter, MeterConfig, Resolver};
use crate::metrics::MetricsConfig;
use crate::store::StoreConfig;

pub use crate::primitives::{
    ByteSize, ConfigError, HumanDuration, Located, Problem, Problems, Secret, read_secret_file,
    redact_url,
};

/// The whole file, as written: serde's view of it. [`ConfigFile::resolve`] turns it into a
/// [`Config`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub amqp: AmqpConfig,
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub beat: BeatConfig,
    #[serde(default)]
    pub bus: Vec<BusConfig>,
    #[serde(default)]
    pub meter: Vec<MeterConfig>,
    /// Prometheus metrics and health endpoints; absent: off.
    pub metrics: Option<MetricsConfig>,
    /// Modbus register maps in files, besides the built-in ones; relative paths are relative
    /// to the config file.
    #[serde(default)]
    pub modbus_profiles: Vec<PathBuf>,
}

/// `[gateway]`: who this agent is and where it keeps its data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// In MQTT topics, message origins and reading ids: letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// IANA time zone: the boundaries of daily, monthly and yearly reads.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    pub data_dir: PathBuf,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

/// The configuration as the agent runs it: checked, with every string that carries meaning
/// parsed once (zones, links, protocols, profiles, read plans). `run`, `check`, `poll`,
/// `demo`, reload and `status` all take this; nothing downstream parses the file again.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: Gateway,
    pub store: StoreConfig,
    pub amqp: AmqpConfig,
    pub mqtt: Option<MqttConfig>,
    pub beat: BeatConfig,
    /// In file order.
    pub buses: Vec<Bus>,
    /// In file order; shared with the bus workers.
    pub meters: Vec<Arc<Meter>>,
    pub metrics: Option<MetricsConfig>,
    /// Where the file came from, for messages.
    pub source: PathBuf,
}

/// `[gateway]`, resolved.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub id: String,
    /// The zone's name as configured, for people.
    pub timezone: String,
    pub tz: TimeZone,
    pub data_dir: PathBuf,
}

impl Config {
    /// Reads, parses and resolves `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Located {
                line: None,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and resolves `text`, naming `path` in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |problems| ConfigError {
            file: path.to_owned(),
            problems,
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| {
            err(vec![Located {
                line: e.span().map(|s| line_col(text, s.start)),
                key: String::new(),
                message: e.message().to_owned(),
            }])
        })?;
        let mut file = ConfigFile::deserialize(de).map_err(|e| {
            let mut key = e.span().map(|s| key_at(text, &s)).unwrap_or_default();
            let mut line = e.span().map(|s| line_col(text, s.start));
            // toml may place an unknown key at its table's header: name and place the key itself.
            let unknown = e.message().strip_prefix("unknown field `");
            let name = unknown.and_then(|m| m.split('`').next());
            if let Some(name) = name.filter(|n| key != *n && !key.ends_with(&format!(".{n}"))) {
                let inner = if key.is_empty() {
                    name.to_owned()
                } else {
                    format!("{key}.{name}")
                };
                if let Some(at) = locate(text, &inner) {
                    (key, line) = (inner, Some(at));
                }
            }
            err(vec![Located {
                line,
                key,
                message: e.message().to_owned(),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut file.modbus_profiles {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        file.resolve(path).map_err(|problems| {
            err(problems
                .into_iter()
                .map(|p| Located {
                    line: locate(text, &p.key),
                    key: p.key,
                    message: p.message,
                })
                .collect())
        })
    }

    /// The meters on `bus`, in file order.
    pub fn meters_on<'a>(&'a self, bus: &'a str) -> impl Iterator<Item = &'a Arc<Meter>> + 'a {
        self.meters.iter().filter(move |m| m.bus == bus)
    }

    /// Every meter's id, in file order.
    pub fn meter_ids(&self) -> Vec<String> {
        self.meters.iter().map(|m| m.id.clone()).collect()
    }
}

impl ConfigFile {
    /// Checks everything and resolves it; every problem, not just the first.
    pub fn resolve(self, source: &Path) -> Result<Config, Vec<Problem>> {
        let mut p = Problems::default();
        let g = &self.gateway;
        if g.id.is_empty()
            || g.id.len() > 64
            || !g
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            p.push(
                "gateway.id",
                format!(
                    "`{}` must be 1-64 letters, digits, `-`, `_` or `.` (it goes into MQTT topics and reading ids)",
                    g.id
                ),
            );
        }
        let tz = zone(&g.timezone).unwrap_or_else(|e| {
            p.push("gateway.timezone", e);
            TimeZone::UTC
        });
        if g.data_dir.as_os_str().is_empty() {
            p.push("gateway.data_dir", "must not be empty");
        }
        self.store.validate("store", &mut p);
        self.amqp.validate("amqp", &mut p);
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate("mqtt", &mut p);
        }
        self.beat.validate("beat", &mut p);
        if let Some(m) = &self.metrics {
            m.validate("metrics", &mut p);
        }

        let mut names = HashSet::new();
        let mut buses: Vec<Option<Bus>> = Vec::new();
        for (i, bus) in self.bus.iter().enumerate() {
            let at = format!("bus[{i}]");
            if !names.insert(bus.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("bus `{}` is defined twice", bus.name),
                );
            }
            buses.push(bus.resolve(&at, &mut p));
        }
        let profiles = match Profiles::load(&self.modbus_profiles) {
            Ok(p) => p,
            Err(e) => {
                let i = self
                    .modbus_profiles
                    .iter()
                    .position(|f| e.source_name == f.display().to_string())
                    .unwrap_or(0);
                p.push(format!("modbus_profiles[{i}]"), e.to_string());
                Profiles::built_in()
            }
        };
        let mut resolver = Resolver::new(&profiles, &tz).with_gateway(&g.id, &g.data_dir);
        let mut ids = HashSet::new();
        let mut meters = Vec::new();
        for (i, meter) in self.meter.iter().enumerate() {
            let at = format!("meter[{i}]");
            if !ids.insert(meter.id.as_str()) {
                p.push(
                    format!("{at}.id"),
                    format!("meter `{}` is defined twice", meter.id),
                );
            }
            match self.bus.iter().position(|b| b.name == meter.bus) {
                None => {
                    let names: Vec<&str> = self.bus.iter().map(|b| b.name.as_str()).collect();
                    p.push(
                        format!("{at}.bus"),
                        format!(
                            "no bus named `{}` (buses: {})",
                            meter.bus,
                            if names.is_empty() {
                                "none defined".to_owned()
                            } else {
                                names.join(", ")
                            }
                        ),
                    );
                }
                // A bus with problems of its own has been reported; its meters are checked
                // once it is fixed.
                Some(b) => {
                    if let Some(bus) = &buses[b] {
                        if let Some(m) =
                            meter.resolve(&at, &bus.name, &bus.link, &mut resolver, &mut p)
                        {
                            meters.push(Arc::new(m));
                        }
                    }
                }
            }
        }
        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Config {
            gateway: Gateway {
                id: g.id.clone(),
                timezone: g.timezone.clone(),
                tz,
                data_dir: g.data_dir.clone(),
            },
            store: self.store,
            amqp: self.amqp,
            mqtt: self.mqtt,
            beat: self.beat,
            buses: buses.into_iter().flatten().collect(),
            meters,
            metrics: self.metrics,
            source: source.to_owned(),
        })
    }
}

/// The IANA time zone `name`, from the system's time zone database (Debian's `tzdata`). UTC
/// needs none.
pub fn zone(name: &str) -> Result<TimeZone, String> {
    if matches!(name, "UTC" | "Etc/UTC") {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|e| {
        let hint = if Path::new("/usr/share/zoneinfo").exists() {
            ""
        } else {
            " (this system has no time zone database: install the `tzdata` package)"
        };
        format!("`{name}` is not an IANA time zone such as `Europe/Stockholm`: {e}{hint}")
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The dotted key path (`meter[1].modbus.unit`) of the innermost key, value or table header
/// whose text holds `span`: what a deserialization error located there is about. Empty for
/// the top level.
fn key_at(text: &str, span: &Range<usize>) -> String {
    use toml::de::{DeTable, DeValue};
    /// Every key and array element under `v`, with the text it spans (a table's span is its
    /// header; a key's is the key and its value).
    fn walk(v: &DeValue, path: &str, out: &mut Vec<(String, Range<usize>)>) {
        match v {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    let p = if path.is_empty() {
                        k.get_ref().to_string()
                    } else {
                        format!("{path}.{}", k.get_ref())
                    };
                    let (ks, vs) = (k.span(), v.span());
                    out.push((p.clone(), ks.start.min(vs.start)..ks.end.max(vs.end)));
                    walk(v.get_ref(), &p, out);
                }
            }
            DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.push((p.clone(), e.span()));
                    walk(e.get_ref(), &p, out);
                }
            }
            _ => {}
        }
    }
    // The top level's span is empty (it has no header).
    let Some(root) = DeTable::parse(text).ok().filter(|_| !span.is_empty()) else {
        return String::new();
    };
    let mut all = Vec::new();
    walk(&DeValue::Table(root.into_inner()), "", &mut all);
    // The narrowest; of equal ones the deepest (listed after its parent).
    all.into_iter()
        .filter(|(_, r)| r.start <= span.start && span.end <= r.end)
        .min_by_key(|(p, r)| (r.len(), usize::MAX - p.len()))
        .map(|(p, _)| p)
        .unwrap_or_default()
}

/// Finds where a dotted key path (`meter[1].modbus.unit`) is written, or its deepest parent
/// that is. Paths of problems with no place of their own (a missing key) point at their table.
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut span = None;
    let mut table = Some(root.get_ref());
    let mut value: Option<&DeValue> = None;
    for seg in key.split('.').filter(|s| !s.is_empty()) {
        let (name, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            let t = match value {
                Some(DeValue::Table(t)) => t,
                Some(_) => break,
                None => match table.take() {
                    Some(t) => t,
                    None => break,
                },
            };
            let Some((k, v)) = t.get_key_value(name) else {
                break;
            };
            span = Some(k.span());
            value = Some(v.get_ref());
        }
        for idx in indices
            .split(['[', ']'])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse::<usize>().ok())
        {
            let Some(DeValue::Array(a)) = value else {
                break;
            };
            let Some(item) = a.get(idx) else { break };
            span = Some(item.span());
            value = Some(item.get_ref());
        }
    }
    span.map(|s| line_col(text, s.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
timezone = "Europe/Stockholm"
data_dir = "/tmp/x"

[amqp]
url = "amqp://guest:guest@localhost"
"#;

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    fn load(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_should_load_with_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.amqp.queue, "utilitarian.tasks.commits.meter_readings");
        assert_eq!(c.store.max_bytes, ByteSize(256 << 20));
    }

    #[test]
    fn unknown_key_should_name_file_line_and_key() {
        let text = format!("{MINIMAL}\n[store]\nmax_bytez = \"1MiB\"\n");
        let e = load(&text).unwrap_err().to_string();
        assert!(e.starts_with("test.toml:11:1: store"), "{e}");
        assert!(e.contains("max_bytez"), "{e}");
    }

    #[test]
    fn bad_value_should_name_the_key_path() {
        let text = format!(
            "{MINIMAL}\n[[bus]]\nname = \"b\"\ntcp = {{ host = \"h\", port = 502 }}\n\n[[meter]]\nid = \"m\"\nbus = \"b\"\nmodbus = {{ unit = 300, profile = \"eastron-sdm630\" }}\n"
        );
        let line = line_of(&text, "unit = 300");
        let e = load(&text).unwrap_err().to_string();
        assert!(
            e.contains(&format!(":{line}:19: meter[0].modbus.unit")),
            "{e}"
        );
    }

    #[test]
    fn validation_problems_should_all_be_reported_with_lines() {
        let text = MINIMAL
            .replace("gw-1", "gw 1")
            .replace("Europe/Stockholm", "Mars/Olympus");
        let e = load(&text).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        let s = e.to_string();
        assert!(s.contains("test.toml:3:1: gateway.id"), "{s}");
        assert!(s.contains("test.toml:4:1: gateway.timezone"), "{s}");
    }

    #[test]
    fn meter_on_unknown_bus_should_list_the_buses() {
        let text = format!(
            "{MINIMAL}\n[[bus]]\nname = \"lan\"\ntcp = {{ host = \"h\", port = 502 }}\n\n[[meter]]\nid = \"m\"\nbus = \"rs485\"\nmodbus = {{ unit = 1, profile = \"eastron-sdm630\" }}\n"
        );
        let line = line_of(&text, "bus = \"rs485\"");
        let s = load(&text).unwrap_err().to_string();
        assert!(
            s.contains(&format!(
                ":{line}:1: meter[0].bus: no bus named `rs485` (buses: lan)"
            )),
            "{s}"
        );
    }

    #[test]
    fn syntax_error_should_give_a_line() {
        let s = load("[gateway\nid=1").unwrap_err().to_string();
        assert!(s.starts_with("test.toml:1:"), "{s}");
    }

    #[test]
    fn profile_reads_should_load_and_be_refused_where_no_profile_can_be_read() {
        let lan = "\n[[bus]]\nname = \"lan\"\ntcp = { host = \"h\", port = 4059 }\n";
        let ok = format!(
            "{MINIMAL}{lan}\n[[meter]]\nid = \"e450\"\nbus = \"lan\"\ndlms = {{ client = 16, logical = 1 }}\nhistory = \"7d\"\nreads = {{ quarterly = {{ profile = \"1-0:99.1.0\" }}, daily = {{ profile = \"1-0:99.2.0\", history = \"62d\" }}, monthly = \"all\" }}\n"
        );
        let c = load(&ok).unwrap();
        let m = &c.meters[0].reads;
        assert_eq!(
            m.profile(crate::reading::Cadence::Daily).unwrap().history,
            Some(std::time::Duration::from_secs(62 * 86_400))
        );
        assert!(m.get(crate::reading::Cadence::Quarterly).is_none());
        assert_eq!(m.cadences().count(), 3);
        for (reads, why) in [
            (
                "modbus = { unit = 1, profile = \"eastron-sdm630\" }\nreads = { quarterly = { profile = \"1-0:99.1.0\" } }",
                "meter[0].reads.quarterly: only DLMS/COSEM and IEC 62056-21 meters keep a load profile",
            ),
            (
                "dlms = { client = 16, logical = 1 }\nreads = { quarterly = { profile = \"1-0:99.1.0\" }, hourly = { profile = \"1-0:99.1.0\" } }",
                "meter[0].reads.hourly: profile 1-0-99-1-0-255 is already read by another cadence",
            ),
            (
                "dlms = { client = 16, logical = 1 }\nreads = { quarterly = { profile = \"99.1\" } }",
                "not an OBIS code",
            ),
            (
                "dlms = { client = 16, logical = 1 }\nreads = { quarterly = { profil = \"1-0:99.1.0\" } }",
                "or a load profile such as { profile = \"1-0:99.1.0\" }",
            ),
            (
                "dlms = { client = 16, logical = 1 }\nhistory = \"900d\"\nreads = { quarterly = { profile = \"1-0:99.1.0\" } }",
                "meter[0].history: must be at most 400d",
            ),
        ] {
            let text = format!("{MINIMAL}{lan}\n[[meter]]\nid = \"m\"\nbus = \"lan\"\n{reads}\n");
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains(why), "{reads}: {e}");
        }
    }
}
