//! IEC 62056-21 (mode C) meters on a serial bus or an optical probe.
//!
//! # Protocol rules (IEC 62056-21:2002, clause 6)
//!
//! * Characters are 7E1: 7 data bits, even parity, one stop bit — 10 bits on the wire each.
//!   Every exchange starts at 300 Bd.
//! * The agent signs on with `/?address!CR LF`. On an RS-485 bus each meter has an address and
//!   only the addressed one answers; an optical probe sees one meter and sends `/?!`.
//! * The meter answers `/XXXZ[\W]ident CR LF`: its manufacturer (three letters; a lower-case
//!   third letter says it can react within 20 ms instead of 200 ms), the highest rate it offers
//!   (`Z`: `0`-`6` for 300-19200 Bd in mode C; `A`-`F` mode B; anything else mode A), an
//!   optional enhanced-capability escape `\W` (`\2`: it also speaks HDLC, mode E), and its
//!   type.
//! * The agent picks a rate no faster than the meter's offer and its own `max_baud`, and
//!   answers `ACK 0 Z 0 CR LF` (normal procedure, rate Z, data readout). Both sides then switch
//!   to Z; the timing of that switch is explained in [`session`].
//! * The meter sends its readout, `STX data ! CR LF ETX BCC`, the BCC being the XOR of every
//!   byte after STX up to and including ETX. The data are lines of data sets,
//!   `address(value*unit)` ([`dataset`]).
//! * The agent ends the session with the break message `SOH B 0 ETX BCC`.
//!
//! # Load profiles (programming mode)
//!
//! [`IecMeter::read_rows`] reads the meter's load profile (`P.01`, OBIS `1-0:99.1.0`):
//!
//! ```text
//! /?address! CR LF            ──►
//!                             ◄──   /XXXZ\W ident CR LF
//! ACK 0 Z 1 CR LF             ──►                                  (1: programming mode)
//!                             ◄──   SOH P0 STX (operand) ETX BCC   (at Z Bd)
//! SOH P1 STX (password) ETX BCC ──►                                (only with a password)
//!                             ◄──   ACK                            (NAK, B0, an error: refused)
//! SOH R5 STX P.01(YYMMDDhhmm;YYMMDDhhmm) ETX BCC ──►
//!                             ◄──   STX P.01(…)(…)… CR LF (…)(…) CR LF … ETX BCC
//!                                   (or partial blocks ending in EOT, each acknowledged)
//! SOH B0 ETX BCC              ──►
//! ```
//!
//! The range is asked in the meter's local time (its `timezone`), whole minutes, widened to
//! cover the instants asked for; rows outside them are dropped. A meter with no rows there
//! answers `(ERROR)`: no rows, not a failure. The answer's text is [`profile`]; its times,
//! status flags and values are [`mapping::rows`]. A refused password is a security failure and
//! is not retried (meters lock a port after a few wrong passwords).
//!
//! # Layout
//!
//! The protocol is sans-IO: [`codec`] turns bytes into frames and back, [`dataset`] the
//! readout's text into data sets, [`profile`] a load profile answer's into blocks of rows,
//! [`session`] is the exchange as a state machine that says what
//! to send, when to switch the rate and what to wait for. [`transport`] is the thin I/O layer
//! that runs a session on a serial port (or a fake [`transport::Line`]); [`mapping`] turns the
//! data sets into values. [`read`], called by the bus worker, ties them together: retries,
//! and a second sign-on at 300 Bd when a meter does not follow the baud switch.
//!
//! The bus's port stays open in IEC framing across the IEC meters of a bus, each session
//! starting at 300 Bd with a clean input buffer; a Modbus meter on the same bus takes the port
//! over (see [`crate::meter::link::Slot`]).

pub mod codec;
pub mod dataset;
pub mod mapping;
pub mod profile;
pub mod session;
pub mod transport;

use std::time::Duration;

use jiff::tz::TimeZone;
use serde::Deserialize;

use crate::meter::link::{Framing, Slot};
use crate::meter::rows::{Rows, RowsRequest};
use crate::meter::{Failure, Outcome, Selection, Timing};
use crate::primitives::{HumanDuration, Problems, Secret};
use session::{Job, ProfileJob, Readout, Session, SessionConfig, SessionError};
use transport::Line;

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
    /// The longest a readout's data message may take, from the baud switch to its last byte.
    /// A readout of a few KiB takes seconds at 9600 Bd and minutes at 300 Bd.
    #[serde(default = "default_readout_timeout")]
    pub readout_timeout: HumanDuration,
    /// A file holding the P1 password sent in programming mode (load profile reads), for a
    /// meter that wants one. Read when the config is resolved; never logged.
    pub password_file: Option<std::path::PathBuf>,
}

fn default_max_baud() -> u32 {
    9600
}
fn default_medium() -> String {
    "1-0".into()
}
fn default_readout_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

impl IecMeterConfig {
    /// Checks the section and resolves it: the medium as OBIS A-B, the meter's zone (its
    /// own, else the gateway's).
    pub fn resolve(&self, at: &str, gateway_tz: &TimeZone, p: &mut Problems) -> Option<IecMeter> {
        let before = p.0.len();
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
        let ab = match crate::reading::Obis::parse_with(&format!("{}:1.8.0", self.medium), [0, 0]) {
            Ok(o) => [o.0[0], o.0[1]],
            Err(_) => {
                p.push(
                    format!("{at}.medium"),
                    format!(
                        "`{}` is not an OBIS medium and channel such as `1-0`",
                        self.medium
                    ),
                );
                crate::reading::Obis::DEFAULT_AB
            }
        };
        if self.readout_timeout.0 < Duration::from_secs(1)
            || self.readout_timeout.0 > Duration::from_secs(3600)
        {
            p.push(format!("{at}.readout_timeout"), "must be between 1s and 1h");
        }
        let tz = match &self.timezone {
            None => gateway_tz.clone(),
            Some(tz) => match crate::config::zone(tz) {
                Ok(z) => z,
                Err(e) => {
                    p.push(format!("{at}.timezone"), e);
                    TimeZone::UTC
                }
            },
        };
        let password = self
            .password_file
            .as_ref()
            .and_then(|f| match crate::primitives::read_secret_file(f) {
                Ok(s) if s.expose().is_empty() => {
                    p.push(
                        format!("{at}.password_file"),
                        format!("{} is empty", f.display()),
                    );
                    None
                }
                Ok(s)
                    if s.expose().len() > 32
                        || !s
                            .expose()
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'(' && b != b')') =>
                {
                    p.push(
                        format!("{at}.password_file"),
                        format!(
                            "the password in {} must be 1-32 printable characters without `(` or `)`",
                            f.display()
                        ),
                    );
                    None
                }
                Ok(s) => Some(s),
                Err(e) => {
                    p.push(
                        format!("{at}.password_file"),
                        format!("cannot read {}: {e}", f.display()),
                    );
                    None
                }
            });
        (p.0.len() == before).then(|| IecMeter {
            address: self.address.clone(),
            max_baud: self.max_baud,
            ab,
            tz,
            readout_timeout: self.readout_timeout.0,
            password,
        })
    }
}

/// An IEC 62056-21 meter, resolved.
#[derive(Debug, Clone)]
pub struct IecMeter {
    /// `/?address!`; `None`: `/?!` (a single meter on an optical probe).
    pub address: Option<String>,
    pub max_baud: u32,
    /// OBIS medium and channel for data-set addresses written without them.
    pub ab: [u8; 2],
    /// The zone of the meter's clock, for its time and date registers.
    pub tz: TimeZone,
    pub readout_timeout: Duration,
    /// The P1 password for programming mode (`Secret`: Debug shows `***`).
    pub password: Option<Secret>,
}

impl IecMeter {
    /// Rows of the meter's load profile (`P.01`) in the request's range (see the module
    /// doc), on `slot`: the bus's port, in IEC framing.
    pub async fn read_rows(
        &self,
        slot: &mut Slot,
        meter: &str,
        request: &RowsRequest,
        timing: &Timing,
    ) -> Result<Rows, Failure> {
        let port = slot.port(Framing::IEC_SIGN_ON)?;
        let rows = read_rows_line(port, meter, self, request, timing).await;
        if let Err(Failure::Link(_)) = &rows {
            // The port failed (a converter unplugged): the next read opens it again.
            slot.reset();
        }
        rows
    }

    /// Reads the meter on `slot`: the bus's port, in IEC framing.
    pub async fn read(
        &self,
        slot: &mut Slot,
        meter: &str,
        selection: &Selection,
        timing: &Timing,
    ) -> Outcome {
        match slot.port(Framing::IEC_SIGN_ON) {
            Ok(port) => read_line(port, meter, self, selection, timing).await,
            Err(f) => Outcome {
                reopen: true,
                ..Outcome::failed(f)
            },
        }
    }
}

/// Reads a meter on any [`Line`]: sign-on, retries, fallback to 300 Bd, mapping.
pub async fn read_line<L: Line>(
    line: &mut L,
    meter: &str,
    config: &IecMeter,
    selection: &Selection,
    timing: &Timing,
) -> Outcome {
    let Exchanged { readout, refused } =
        match exchange(line, meter, config, Job::Readout, timing).await {
            Ok(x) => x,
            Err(Failed {
                failure,
                reopen,
                refused,
            }) => {
                return Outcome {
                    reopen,
                    refused,
                    ..Outcome::failed(failure)
                };
            }
        };
    let mapped = mapping::values(&readout.sets, config.ab, selection, &config.tz);
    if let Selection::Series(wanted) = selection {
        let missing: Vec<String> = wanted
            .iter()
            .filter(|w| !mapped.values.iter().any(|v| v.series == **w))
            .map(|w| w.to_string())
            .collect();
        if !missing.is_empty() {
            tracing::warn!(meter, missing = %missing.join(", "), "Series asked for are not in the meter's readout");
        }
    }
    tracing::debug!(
        meter,
        manufacturer = %readout.identification.manufacturer,
        ident = %readout.identification.ident,
        baud = readout.baud,
        sets = readout.sets.len(),
        values = mapped.values.len(),
        left_out = mapped.left_out.len(),
        meter_time = ?mapped.meter_time.map(|t| t.rfc3339()),
        "IEC readout"
    );
    Outcome {
        values: mapped.values,
        failure: None,
        refused: refused.into_iter().collect(),
        reopen: false,
        unmapped: mapped.left_out.len(),
    }
}

/// Reads rows of the load profile on any [`Line`]: programming mode, `R5`, mapping.
pub async fn read_rows_line<L: Line>(
    line: &mut L,
    meter: &str,
    config: &IecMeter,
    request: &RowsRequest,
    timing: &Timing,
) -> Result<Rows, Failure> {
    // `1-0:99.1.0` is P.01, `1-0:99.2.0` P.02: group C 99 ("P") and the profile's number.
    let [_, _, c, number, _, _] = request.profile.0;
    if c != 99 || !(1..=99).contains(&number) {
        return Err(Failure::Refused(format!(
            "{} is not an IEC 62056-21 load profile (those are 1-0:99.D.0, read as P.0D)",
            request.profile
        )));
    }
    // Whole minutes in the meter's clock, widened to cover the instants asked for (the rows
    // outside them are dropped after). In the autumn fold the meter answers the 02:xx rows
    // of both seasons; their season digits tell them apart.
    let local = |t: jiff::Timestamp| t.to_zoned(config.tz.clone()).datetime();
    let floor = |dt: jiff::civil::DateTime| dt.with().second(0).subsec_nanosecond(0).build().ok();
    let ceil = |dt: jiff::civil::DateTime| {
        let f = floor(dt)?;
        if f == dt {
            Some(f)
        } else {
            f.checked_add(jiff::SignedDuration::from_mins(1)).ok()
        }
    };
    let (Some(from), Some(to)) = (floor(local(request.from)), ceil(local(request.to))) else {
        return Err(Failure::Refused(
            "the range is out of the meter's calendar".into(),
        ));
    };
    let job = Job::Profile(ProfileJob {
        password: config.password.clone(),
        request: profile::request(number, from, to),
    });
    let Exchanged { readout, refused } = exchange(line, meter, config, job, timing)
        .await
        .map_err(|f| f.failure)?;
    if let Some(f) = refused {
        tracing::warn!(meter, refusal = %f, "Load profile read at 300 Bd");
    }
    let profile = readout.profile.unwrap_or_default();
    let rows = mapping::rows(&profile, config.ab, &config.tz, request.from, request.to);
    tracing::debug!(
        meter,
        profile = %request.profile,
        baud = readout.baud,
        blocks = profile.blocks.len(),
        rows = rows.rows.len(),
        unmapped = rows.unmapped,
        "IEC load profile rows read"
    );
    Ok(rows)
}

/// A session that ended well, and a refused baud switch worth reporting beside it.
struct Exchanged {
    readout: Readout,
    refused: Option<Failure>,
}

/// A session that failed for good: the failure, whether the port must be reopened, and a
/// refused baud switch worth reporting beside it.
struct Failed {
    failure: Failure,
    reopen: bool,
    refused: Vec<Failure>,
}

/// Runs sessions for `job` until one succeeds: the bus's retries, and a second sign-on at
/// 300 Bd when a meter does not follow the baud switch. A refused password is not retried.
async fn exchange<L: Line>(
    line: &mut L,
    meter: &str,
    config: &IecMeter,
    job: Job,
    timing: &Timing,
) -> Result<Exchanged, Failed> {
    let mut session = SessionConfig {
        address: config.address.clone(),
        max_baud: config.max_baud,
        switch_baud: config.max_baud > 300,
        answer_timeout: transport::answer_timeout(timing.timeout),
        gap_timeout: session::TR_MAX,
        readout_timeout: config.readout_timeout,
        max_block: codec::DEFAULT_MAX_BLOCK,
        job,
    };
    let mut refused: Option<(SessionError, Failure)> = None;
    let mut failed = 0;
    loop {
        let error = match transport::run(line, Session::new(session.clone())).await {
            Err(e) => {
                return Err(Failed {
                    failure: Failure::Link(format!("serial line: {e}")),
                    reopen: true,
                    refused: Vec::new(),
                });
            }
            Ok(Ok(readout)) => {
                return Ok(Exchanged {
                    readout,
                    refused: refused.map(|(_, f)| f),
                });
            }
            Ok(Err(e)) => e,
        };
        if let SessionError::SwitchRefused { baud, how } = &error {
            if session.switch_baud {
                // Sign on again and stay at 300 Bd. This does not count as a retry: the meter
                // answers, just not at the rate it offered.
                tracing::warn!(meter, baud, how = %how, "Meter did not follow the baud switch, reading at 300 Bd");
                let f = Failure::Refused(format!(
                    "{error}; read at 300 Bd instead (set max_baud = 300 to skip the attempt)"
                ));
                refused = Some((error, f));
                session.switch_baud = false;
                continue;
            }
        }
        failed += 1;
        if failed > timing.retries || matches!(error, SessionError::Security(_)) {
            let mut out = Failed {
                failure: failure(&error),
                reopen: false,
                refused: Vec::new(),
            };
            // Only a refusal the meter made plain is worth reporting beside the failure;
            // silence after the switch may as well have been a meter that went away.
            if let Some((SessionError::SwitchRefused { how, .. }, f)) = refused {
                if how != session::Refusal::Silence {
                    out.refused.push(f);
                }
            }
            return Err(out);
        }
        tracing::debug!(meter, failed, error = %error, "IEC session failed, retrying");
    }
}

/// The failure the centre hears about.
pub fn failure(error: &SessionError) -> Failure {
    match error {
        SessionError::NoAnswer { after, .. } => Failure::Timeout(*after),
        SessionError::Decode {
            error: codec::DecodeError::Bcc { .. },
            ..
        } => Failure::Checksum(error.to_string()),
        SessionError::SwitchRefused { .. } | SessionError::NoProgrammingMode(_) => {
            Failure::Refused(error.to_string())
        }
        SessionError::Security(_) => Failure::Security(error.to_string()),
        SessionError::OutOfOrder(_) => Failure::Link(error.to_string()),
        SessionError::Stalled { .. }
        | SessionError::Overdue { .. }
        | SessionError::Noise { .. }
        | SessionError::Decode { .. }
        | SessionError::Data(_)
        | SessionError::Profile(_)
        | SessionError::Unexpected { .. }
        | SessionError::ReservedBaud(_) => Failure::Malformed(error.to_string()),
    }
}

#[cfg(test)]
mod tests;
