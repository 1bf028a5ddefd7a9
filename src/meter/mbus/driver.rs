//! The driver: an `mbus` section resolved into an [`MbusMeter`], and its read over the bus's
//! serial port in the bus's own framing (2400 Bd 8E1 usually).

use jiff::tz::TimeZone;

use super::master::{self, ReadError};
use super::series::{self, Overrides};
use super::{MbusMeterConfig, transport};
use crate::meter::link::{Link, Slot};
use crate::meter::{Failure, Outcome, Selection, Timing, Value};
use crate::primitives::Problems;
use crate::reading::Stamp;

/// An M-Bus meter, resolved.
#[derive(Debug, Clone)]
pub struct MbusMeter {
    pub config: MbusMeterConfig,
    pub overrides: Overrides,
    /// The zone of the meter's clock (the gateway's), for its record dates.
    pub tz: TimeZone,
}

impl MbusMeterConfig {
    /// Checks the section against its bus and resolves it; problems go under `at`
    /// (`meter[3].mbus`).
    pub fn resolve(
        &self,
        at: &str,
        bus: &str,
        link: &Link,
        gateway_tz: &TimeZone,
        p: &mut Problems,
    ) -> Option<MbusMeter> {
        let before = p.0.len();
        if !link.is_serial() {
            p.push(
                at.to_owned(),
                format!("M-Bus needs a serial bus (a level converter); `{bus}` is a TCP bus"),
            );
        }
        for problem in self.validate() {
            p.push(format!("{at}.{}", problem.key), problem.message);
        }
        (p.0.len() == before).then(|| MbusMeter {
            config: self.clone(),
            overrides: Overrides::from_config(&self.series),
            tz: gateway_tz.clone(),
        })
    }
}

impl MbusMeter {
    /// Reads the meter on `slot`: the bus's port, in the bus's framing.
    pub async fn read(
        &self,
        slot: &mut Slot,
        meter: &str,
        selection: &Selection,
        timing: &Timing,
    ) -> Outcome {
        let framing = match slot {
            Slot::Serial { config, .. } => config.framing(),
            Slot::Tcp { addr, .. } => {
                return Outcome {
                    reopen: true,
                    ..Outcome::failed(Failure::Link(format!(
                        "M-Bus needs a serial port; {addr} is a TCP link"
                    )))
                };
            }
        };
        let port = match slot.port(framing) {
            Ok(port) => port,
            Err(f) => {
                return Outcome {
                    reopen: true,
                    ..Outcome::failed(f)
                };
            }
        };
        self.read_stream(port, meter, framing.baud, selection, timing)
            .await
    }

    /// Reads the meter on any byte stream at `baud`.
    pub async fn read_stream<S>(
        &self,
        io: &mut S,
        meter: &str,
        baud: u32,
        selection: &Selection,
        timing: &Timing,
    ) -> Outcome
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let retries = u8::try_from(timing.retries).unwrap_or(u8::MAX);
        let Some(config) = self.config.read_config(super::Timing::new(baud), retries) else {
            return Outcome::failed(Failure::Malformed("invalid mbus section".into()));
        };
        let out = match transport::read(io, master::Read::new(config)).await {
            Err(e) => {
                return Outcome {
                    reopen: true,
                    ..Outcome::failed(Failure::Link(format!("M-Bus line: {e}")))
                };
            }
            Ok(Err(e)) => {
                tracing::debug!(meter, error = %e, "M-Bus read failed");
                return Outcome::failed(failure(&e, super::Timing::new(baud).answer_window()));
            }
            Ok(Ok(out)) => out,
        };
        let telegrams: Vec<_> = out.telegrams().collect();
        let all = series::values(telegrams, &self.overrides);
        let total = all.len();
        let values: Vec<Value> = all
            .into_iter()
            .filter(|v| selection.wants(&v.series))
            .map(|v| Value {
                series: v.series,
                value: v.value,
                unit: v.unit,
                meter_time: v.time.and_then(|dt| {
                    let ts = self.tz.to_ambiguous_timestamp(dt).compatible().ok()?;
                    Some(Stamp::in_zone(ts, &self.tz))
                }),
            })
            .collect();
        tracing::debug!(
            meter,
            telegrams = out.frames.len(),
            values = values.len(),
            offered = total,
            "M-Bus read"
        );
        Outcome {
            values,
            ..Outcome::default()
        }
    }
}

/// The failure the centre hears about.
/// `window` is the answer window a silent meter was given.
pub fn failure(error: &ReadError, window: std::time::Duration) -> Failure {
    match error {
        ReadError::NoAnswer { .. } => Failure::Timeout(window),
        ReadError::Corrupt { .. } => Failure::Checksum(error.to_string()),
        ReadError::WrongSecondary { expected, got, .. } => Failure::WrongDevice {
            expected: expected.clone(),
            got: got.clone(),
        },
        ReadError::Garbled { .. }
        | ReadError::Unexpected { .. }
        | ReadError::Decode { .. }
        | ReadError::Truncated { .. }
        | ReadError::TooManyTelegrams { .. }
        | ReadError::OutOfOrder => Failure::Malformed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::mbus::master::Stage;
    use crate::reading::EventKind;

    #[test]
    fn read_errors_should_map_to_the_events_the_centre_knows() {
        let w = std::time::Duration::from_millis(190);
        let kind = |e: ReadError| failure(&e, w).event_kind();
        assert_eq!(
            failure(
                &ReadError::NoAnswer {
                    stage: Stage::Reset,
                    tries: 3
                },
                w
            ),
            Failure::Timeout(w)
        );
        assert_eq!(
            kind(ReadError::Garbled {
                stage: Stage::Reset,
                bytes: 4,
                tries: 1
            }),
            EventKind::MalformedResponse
        );
        assert_eq!(
            kind(ReadError::TooManyTelegrams { telegrams: 8 }),
            EventKind::MalformedResponse
        );
        assert_eq!(
            kind(ReadError::WrongSecondary {
                expected: "12345678".into(),
                got: "23456789".into(),
                manufacturer: "KAM".into()
            }),
            EventKind::WrongDeviceAnswered
        );
    }
}
