//! IEC 62056-21 (mode C) meters on a serial bus or an optical probe.

pub mod codec;
pub mod dataset;

use serde::Deserialize;

use crate::config::Problems;

/// `iec62056_21 = { address = "61234567", max_baud = 9600 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IecMeterConfig {
    /// Device address for several meters on one RS-485 bus (`/?61234567!`); absent for a
    /// single meter on an optical probe (`/?!`).
    pub address: Option<String>,
    /// The fastest baud rate to switch to after sign-on (the meter may offer less).
    #[serde(default = "default_max_baud")]
    pub max_baud: u32,
    /// OBIS medium and channel (A-B) for data-set addresses written without them.
    #[serde(default = "default_medium")]
    pub medium: String,
    /// The zone of the meter's own clock, for its time and date registers (0.9.1, 0.9.2).
    /// Defaults to the gateway's.
    pub timezone: Option<String>,
}

fn default_max_baud() -> u32 {
    9600
}
fn default_medium() -> String {
    "1-0".into()
}

impl IecMeterConfig {
    pub fn validate(&self, at: &str, p: &mut Problems) {
        if let Some(a) = &self.address {
            if a.is_empty()
                || a.len() > 32
                || !a
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'!' && b != b'/' && b != b'?')
            {
                p.push(
                    format!("{at}.address"),
                    "must be 1-32 printable characters, without `/`, `?` or `!`",
                );
            }
        }
        if ![300, 600, 1200, 2400, 4800, 9600, 19200].contains(&self.max_baud) {
            p.push(
                format!("{at}.max_baud"),
                "must be one of 300, 600, 1200, 2400, 4800, 9600, 19200",
            );
        }
        if crate::reading::Obis::parse_with(&format!("{}:1.8.0", self.medium), [0, 0]).is_err() {
            p.push(
                format!("{at}.medium"),
                format!(
                    "`{}` is not an OBIS medium and channel such as `1-0`",
                    self.medium
                ),
            );
        }
        if let Some(tz) = &self.timezone {
            if jiff::tz::TimeZone::get(tz).is_err() {
                p.push(
                    format!("{at}.timezone"),
                    format!("`{tz}` is not an IANA time zone"),
                );
            }
        }
    }
}

/// Reads an IEC 62056-21 meter on `slot`.
pub async fn read(
    _slot: &mut crate::bus::link::Slot,
    _meter: &crate::meter::MeterConfig,
    _timeout: std::time::Duration,
) -> Result<Vec<crate::bus::Value>, crate::meter::Failure> {
    Err(crate::meter::Failure::Link(
        "IEC 62056-21 driver not built yet".into(),
    ))
}
