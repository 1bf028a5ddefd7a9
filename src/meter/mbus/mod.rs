//! M-Bus (EN 13757-2/-3) meters on a wired M-Bus segment: heat, water, gas and electricity
//! meters behind an M-Bus level converter on a serial port (2400 Bd 8E1 usually).
//!
//! # Layout
//!
//! Everything here is sans-IO — bytes in, frames and events out:
//!
//! * [`link`] — frames (E5, short, control, long), checksums, the master's builders
//!   (SND_NKE, REQ_UD2, SND_UD, selection), the FCB rule, a splitter for a byte stream.
//! * [`app`] — the RSP_UD's data: CI field, header, records (DIF/DIFE/VIF/VIFE, every data
//!   type, dates), values as exact decimals, borrowing the frame.
//! * [`vif`] — the VIF tables: quantities, units, multipliers.
//! * [`series`] — records to OBIS codes (EN 13757-1 / OMS), with a documented scheme for the
//!   rest and a per-meter override hook.
//! * [`master`] — reading one meter as a state machine: addressing, FCB, retries,
//!   multi-telegram answers, answer windows.
//! * [`scan`] — a bus scan for commissioning: primary addresses and the secondary wildcard
//!   search, found meters rendered as `[[meter]]` blocks.
//! * [`transport`] — the thin I/O layer: drives a [`master::Read`] or a [`scan::Scan`] over
//!   any `AsyncRead + AsyncWrite`.
//!
//! The details, the OBIS table and the timing are in `docs/mbus.md`.

pub mod app;
pub mod driver;
pub mod link;
pub mod master;
pub mod scan;
pub mod series;
pub mod transport;
pub mod vif;

use std::time::Duration;

use serde::Deserialize;

pub use app::Identity;
pub use driver::MbusMeter;

/// A secondary address to select, with wildcards: an `F` digit of the id matches any digit,
/// `0xFFFF` any manufacturer, `0xFF` any version or medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SecondaryMask {
    /// 8 digits, most significant first; `0xF` is a wildcard.
    pub digits: [u8; 8],
    pub manufacturer: u16,
    pub version: u8,
    pub medium: u8,
}

impl SecondaryMask {
    /// Everything wildcard.
    pub const ANY: SecondaryMask = SecondaryMask {
        digits: [0xF; 8],
        manufacturer: 0xFFFF,
        version: 0xFF,
        medium: 0xFF,
    };

    /// `"12345678"`, optionally with `F` wildcards (`"1234FFFF"`), other fields wildcard.
    pub fn parse(id: &str) -> Option<Self> {
        let b = id.as_bytes();
        if b.len() != 8 {
            return None;
        }
        let mut digits = [0u8; 8];
        for (d, c) in digits.iter_mut().zip(b) {
            *d = match c {
                b'0'..=b'9' => c - b'0',
                b'F' | b'f' => 0xF,
                _ => return None,
            };
        }
        Some(SecondaryMask {
            digits,
            ..SecondaryMask::ANY
        })
    }

    /// The mask that matches exactly `identity`.
    pub fn exact(identity: &Identity) -> Self {
        let mut digits = [0u8; 8];
        for (i, b) in identity.id.iter().rev().enumerate() {
            digits[2 * i] = b >> 4;
            digits[2 * i + 1] = b & 0x0F;
        }
        SecondaryMask {
            digits,
            manufacturer: identity.manufacturer,
            version: identity.version,
            medium: identity.medium,
        }
    }

    /// The 8 bytes of a CI 52 selection: id (BCD, least significant byte first),
    /// manufacturer (little endian), version, medium.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut id = [0u8; 4];
        for (i, byte) in id.iter_mut().enumerate() {
            let hi = self.digits[6 - 2 * i];
            let lo = self.digits[7 - 2 * i];
            *byte = (hi << 4) | (lo & 0x0F);
        }
        let m = self.manufacturer.to_le_bytes();
        [
            id[0],
            id[1],
            id[2],
            id[3],
            m[0],
            m[1],
            self.version,
            self.medium,
        ]
    }

    /// The mask of selection bytes (what a slave compares).
    pub fn from_bytes(b: [u8; 8]) -> Self {
        let mut digits = [0u8; 8];
        for i in 0..4 {
            digits[6 - 2 * i] = b[i] >> 4;
            digits[7 - 2 * i] = b[i] & 0x0F;
        }
        SecondaryMask {
            digits,
            manufacturer: u16::from_le_bytes([b[4], b[5]]),
            version: b[6],
            medium: b[7],
        }
    }

    /// Whether a slave of `identity` matches.
    pub fn matches(&self, identity: &Identity) -> bool {
        let own = SecondaryMask::exact(identity);
        self.digits
            .iter()
            .zip(own.digits)
            .all(|(m, d)| *m == 0xF || *m == d)
            && (self.manufacturer == 0xFFFF || self.manufacturer == identity.manufacturer)
            && (self.version == 0xFF || self.version == identity.version)
            && (self.medium == 0xFF || self.medium == identity.medium)
    }

    /// The id with wildcards as written (`"1234FFFF"`).
    pub fn id_string(&self) -> String {
        self.digits
            .iter()
            .map(|&d| char::from_digit(u32::from(d), 16).unwrap_or('?'))
            .collect::<String>()
            .to_ascii_uppercase()
    }
}

/// How a meter is addressed on its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address {
    /// Primary address 0–250.
    Primary(u8),
    /// Selected by secondary address, then read at 253.
    Secondary(SecondaryMask),
}

/// `mbus = { secondary = "12345678" }` or `mbus = { primary = 5 }`: the per-meter section,
/// resolved by [`MbusMeterConfig::resolve`] into a [`MbusMeter`] (see [`driver`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MbusMeterConfig {
    pub primary: Option<u8>,
    /// 8 digits; `F` digits are wildcards (the selection must still match one meter).
    pub secondary: Option<String>,
    /// Also match the manufacturer (three letters) when selecting.
    pub manufacturer: Option<String>,
    /// Send SND_UD CI 50 (application reset) before reading: some meters need it to start
    /// their telegram sequence from the first one. Off by default.
    #[serde(default)]
    pub application_reset: bool,
    /// The longest multi-telegram answer to follow.
    #[serde(default = "default_max_telegrams")]
    pub max_telegrams: u8,
    /// Per-record series overrides: the key is the record's default series (as
    /// [`series::series`] gives it, `A-B-C-D-E-F`), the value the OBIS code to use instead.
    #[serde(default)]
    pub series: std::collections::BTreeMap<String, String>,
}

fn default_max_telegrams() -> u8 {
    master::DEFAULT_MAX_TELEGRAMS
}

/// A problem with an `mbus` section, for the config's problem list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: &'static str,
    pub message: String,
}

impl MbusMeterConfig {
    /// Checks the section; each problem names its key.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        let mut push = |key, message: &str| {
            p.push(ConfigProblem {
                key,
                message: message.to_owned(),
            })
        };
        match (self.primary, &self.secondary) {
            (Some(_), Some(_)) => push("primary", "give `primary` or `secondary`, not both"),
            (None, None) => push(
                "primary",
                "give `primary = 0..250` or `secondary = \"12345678\"`",
            ),
            (Some(a), None) if a > link::MAX_PRIMARY => {
                push("primary", "must be 0-250 (251-255 are reserved)")
            }
            (None, Some(s)) if SecondaryMask::parse(s).is_none() => push(
                "secondary",
                "must be 8 digits (F for a wildcard digit), e.g. \"12345678\"",
            ),
            _ => {}
        }
        if let Some(m) = &self.manufacturer {
            if m.len() != 3 || !m.bytes().all(|c| c.is_ascii_alphabetic()) {
                push("manufacturer", "must be three letters, e.g. \"KAM\"");
            }
        }
        if self.max_telegrams == 0 {
            push("max_telegrams", "must be at least 1");
        }
        for (from, to) in &self.series {
            if crate::reading::Obis::parse_with(from, [0, 0]).is_err()
                || crate::reading::Obis::parse_with(to, [0, 0]).is_err()
            {
                push("series", "keys and values must be OBIS codes");
            }
        }
        p
    }

    /// The master's configuration for this meter on a bus of `baud` with `timing`.
    pub fn read_config(&self, timing: Timing, retries: u8) -> Option<master::ReadConfig> {
        let address = match (self.primary, &self.secondary) {
            (Some(a), None) => Address::Primary(a),
            (None, Some(s)) => {
                let mut mask = SecondaryMask::parse(s)?;
                if let Some(m) = &self.manufacturer {
                    let b = m.as_bytes();
                    mask.manufacturer = app::manufacturer_code([b[0], b[1], b[2]]);
                }
                Address::Secondary(mask)
            }
            _ => return None,
        };
        Some(master::ReadConfig {
            address,
            application_reset: self.application_reset,
            max_telegrams: self.max_telegrams.max(1),
            retries,
            timing,
        })
    }
}

/// The answer window (EN 13757-2, 5.4): a slave answers no earlier than 11 bit times after
/// the request and no later than 330 bit times + 50 ms; the master then waits at least 33
/// bit times before its next request. `extra` widens the window for level converters and
/// radio bridges that add latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub baud: u32,
    /// Added to the standard's window (default 0).
    pub extra: Duration,
    /// Longest pause between two bytes of one answer before it counts as ended.
    pub gap: Duration,
}

impl Timing {
    pub fn new(baud: u32) -> Self {
        Timing {
            baud,
            extra: Duration::ZERO,
            gap: Duration::from_millis(100).max(link::bit_time(2 * 11, baud)),
        }
    }

    /// How long after the request's last byte the answer must have started.
    pub fn answer_window(&self) -> Duration {
        link::bit_time(330, self.baud) + Duration::from_millis(50) + self.extra
    }

    /// The pause the master keeps before its next request (33 bit times).
    pub fn idle(&self) -> Duration {
        link::bit_time(33, self.baud)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_should_round_trip_through_selection_bytes() {
        let m = SecondaryMask::parse("1234FFFF").unwrap();
        let b = m.to_bytes();
        assert_eq!(b, [0xFF, 0xFF, 0x34, 0x12, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(SecondaryMask::from_bytes(b), m);
        assert_eq!(m.id_string(), "1234FFFF");
    }

    #[test]
    fn mask_should_match_with_wildcards() {
        let id = Identity {
            id: [0x78, 0x56, 0x34, 0x12],
            manufacturer: app::manufacturer_code(*b"KAM"),
            version: 1,
            medium: 4,
        };
        assert!(SecondaryMask::parse("12345678").unwrap().matches(&id));
        assert!(SecondaryMask::parse("1FFFFFF8").unwrap().matches(&id));
        assert!(!SecondaryMask::parse("12345679").unwrap().matches(&id));
        let mut m = SecondaryMask::ANY;
        m.medium = 7;
        assert!(!m.matches(&id));
    }

    #[test]
    fn answer_window_should_follow_the_standard() {
        let t = Timing::new(2400);
        assert_eq!(t.answer_window().as_micros(), 137_500 + 50_000);
    }

    #[test]
    fn config_should_reject_both_addresses_and_bad_ids() {
        let c: MbusMeterConfig = toml::from_str("primary = 5\nsecondary = \"12345678\"").unwrap();
        assert_eq!(c.validate().len(), 1);
        let c: MbusMeterConfig = toml::from_str("secondary = \"1234567\"").unwrap();
        assert_eq!(c.validate()[0].key, "secondary");
        let c: MbusMeterConfig = toml::from_str("primary = 251").unwrap();
        assert_eq!(c.validate()[0].key, "primary");
        let c: MbusMeterConfig = toml::from_str("secondary = \"12345678\"").unwrap();
        assert!(c.validate().is_empty());
        assert!(toml::from_str::<MbusMeterConfig>("unit = 1").is_err());
    }
}
