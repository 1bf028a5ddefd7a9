//! The configuration file: TOML, `deny_unknown_fields` everywhere, validated before anything
//! starts.
//!
//! Each component's section lives next to the component ([`crate::store::StoreConfig`],
//! [`crate::drain::AmqpConfig`], [`crate::bus::BusConfig`], …); this module holds the top
//! level, the value types they share ([`Duration`], [`ByteSize`], [`Secret`]) and the error
//! type, which names the file, line, column and key of every problem.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer};

use crate::beat::BeatConfig;
use crate::bus::BusConfig;
use crate::control::MqttConfig;
use crate::drain::AmqpConfig;
use crate::meter::MeterConfig;
use crate::meter::modbus::profile::Profiles;
use crate::store::StoreConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    /// Modbus register maps in files, besides the built-in ones; relative paths are relative
    /// to the config file.
    #[serde(default)]
    pub modbus_profiles: Vec<PathBuf>,
    /// Where the file came from, for messages; not part of the TOML.
    #[serde(skip)]
    pub source: PathBuf,
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

impl GatewayConfig {
    /// The configured zone. Only valid after [`Config::validate`] has passed.
    pub fn tz(&self) -> TimeZone {
        zone(&self.timezone).unwrap_or(TimeZone::UTC)
    }
}

impl Config {
    /// Reads, parses and validates `path`.
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

    /// Parses and validates `text`, naming `path` in errors.
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
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| line_col(text, s.start))
                .or_else(|| locate(text, &key));
            err(vec![Located {
                line,
                key: if key == "." { String::new() } else { key },
                message: inner.message().to_owned(),
            }])
        })?;
        config.source = path.to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut config.modbus_profiles {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(err(problems
                .into_iter()
                .map(|p| Located {
                    line: locate(text, &p.key),
                    key: p.key,
                    message: p.message,
                })
                .collect()));
        }
        Ok(config)
    }

    /// Every problem in the file, not just the first.
    pub fn validate(&self) -> Vec<Problem> {
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
        if let Err(e) = zone(&g.timezone) {
            p.push("gateway.timezone", e);
        }
        if g.data_dir.as_os_str().is_empty() {
            p.push("gateway.data_dir", "must not be empty");
        }
        self.store.validate("store", &mut p);
        self.amqp.validate("amqp", &mut p);
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate("mqtt", &mut p);
        }
        self.beat.validate("beat", &mut p);

        let mut buses = HashSet::new();
        for (i, bus) in self.bus.iter().enumerate() {
            let at = format!("bus[{i}]");
            if !buses.insert(bus.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("bus `{}` is defined twice", bus.name),
                );
            }
            bus.validate(&at, &mut p);
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
        let mut meters = HashSet::new();
        for (i, meter) in self.meter.iter().enumerate() {
            let at = format!("meter[{i}]");
            if !meters.insert(meter.id.as_str()) {
                p.push(
                    format!("{at}.id"),
                    format!("meter `{}` is defined twice", meter.id),
                );
            }
            match self.bus.iter().find(|b| b.name == meter.bus) {
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
                Some(bus) => meter.validate(&at, bus, &profiles, &mut p),
            }
        }
        p.0
    }

    /// The meters on `bus`, in file order.
    pub fn meters_on<'a>(&'a self, bus: &'a str) -> impl Iterator<Item = &'a MeterConfig> + 'a {
        self.meter.iter().filter(move |m| m.bus == bus)
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

/// A problem found by validation, before it is located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path: `meter[1].modbus.unit`.
    pub key: String,
    pub message: String,
}

/// Collects problems; each component's `validate` pushes into it.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// A problem with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// 1-based line and column, where the key could be found.
    pub line: Option<(usize, usize)>,
    pub key: String,
    pub message: String,
}

/// Why a config file cannot be used. Displays one line per problem:
/// `FILE:LINE:COL: KEY: MESSAGE`.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Located>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some((line, col)) = p.line {
                write!(f, ":{line}:{col}")?;
            }
            if !p.key.is_empty() {
                write!(f, ": {}", p.key)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Finds where a dotted key path (`meter[1].modbus.unit`) is written, or its deepest parent
/// that is. Paths of problems with no place of their own (a missing key) point at their table.
fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
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

/// A duration written as humans do: `1s`, `500ms`, `15m`, `90d`, `1h 30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Duration).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration such as `1s`, `15m` or `90d`: {e}"
            ))
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size in bytes: `256MiB`, `1GB`, `512KiB`, or a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as `256MiB`"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KB" | "kB" => 1000,
            "KiB" => 1 << 10,
            "M" | "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "G" | "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            u => {
                return Err(format!(
                    "`{u}` in `{s}` is not a size unit (B, kB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        Ok(ByteSize((num * mult as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b % (1 << 20) == 0 {
            write!(f, "{:.1}GiB", b as f64 / (1u64 << 30) as f64)
        } else if b >= 1 << 20 {
            write!(f, "{:.1}MiB", b as f64 / (1u64 << 20) as f64)
        } else if b >= 1 << 10 {
            write!(f, "{:.1}KiB", b as f64 / 1024.0)
        } else {
            write!(f, "{b}B")
        }
    }
}

/// A credential-bearing string (a broker URL with a password). `Debug` and `Display` never
/// show the password; use [`Secret::expose`] only to hand it to the client library.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`: safe for logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// `amqp://user:pw@host/vhost` → `amqp://user:***@host/vhost`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "***".to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***@{}", &url[..scheme_end + 3], user, &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Reads a secret from a file, trimming the trailing newline editors add.
pub fn read_secret_file(path: &Path) -> std::io::Result<Secret> {
    let s = std::fs::read_to_string(path)?;
    Ok(Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
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
    fn byte_sizes_should_parse_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("256MiB").unwrap(), ByteSize(256 << 20));
        assert_eq!(ByteSize::parse("1GB").unwrap(), ByteSize(1_000_000_000));
        assert_eq!(ByteSize::parse("512").unwrap(), ByteSize(512));
        assert!(ByteSize::parse("12 parsecs").is_err());
    }

    #[test]
    fn redacted_urls_should_hide_the_password_only() {
        assert_eq!(
            redact_url("amqps://user:s3cret@broker:5671/vh"),
            "amqps://user:***@broker:5671/vh"
        );
        assert_eq!(redact_url("amqp://broker"), "amqp://broker");
        assert_eq!(
            format!("{:?}", Secret::new("amqp://u:p@h")),
            "Secret(amqp://u:***@h)"
        );
    }
}
