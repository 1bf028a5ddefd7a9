//! Value types the config sections share, and the errors that locate a problem in the file:
//! human durations and sizes, secrets, problems. A leaf: it imports nothing from the crate,
//! so every component can use it without depending on the config as a whole.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// A duration written as humans do: `1s`, `500ms`, `15m`, `90d`, `1h 30m`. Printed the same
/// way, in the largest units that divide it (`90d`, not `2months 29days 2h 52m 48s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub std::time::Duration);

impl HumanDuration {
    pub const fn from_secs(s: u64) -> Self {
        HumanDuration(std::time::Duration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(std::time::Duration::from_millis(ms))
    }
    /// Parses `1s`, `500ms`, `1h 30m`, `90d` (humantime's grammar).
    pub fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("`{s}` is not a duration such as `1s`, `15m` or `90d`: {e}"))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u128); 5] = [
            ("d", 86_400_000_000_000),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
        ];
        let mut left = self.0.as_nanos();
        if left == 0 {
            return f.write_str("0s");
        }
        let mut first = true;
        for (name, size) in UNITS {
            let n = left / size;
            if n > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{n}{name}")?;
                left %= size;
                first = false;
            }
        }
        if left > 0 {
            if !first {
                f.write_str(" ")?;
            }
            write!(f, "{left}ns")?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_should_print_the_way_people_write_them() {
        for (text, shown) in [
            ("90d", "90d"),
            ("1h 30m", "1h 30m"),
            ("500ms", "500ms"),
            ("10s", "10s"),
            ("90m", "1h 30m"),
            ("0s", "0s"),
        ] {
            assert_eq!(HumanDuration::parse(text).unwrap().to_string(), shown);
        }
        let d = HumanDuration::parse("2d 3h 4m 5s 6ms").unwrap();
        assert_eq!(HumanDuration::parse(&d.to_string()).unwrap(), d);
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
