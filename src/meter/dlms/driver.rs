//! The DLMS/COSEM driver: the `dlms = { … }` section, its resolution, and [`DlmsMeter::read`],
//! which runs one association per poll over the bus's link (wrapper on TCP, HDLC on serial,
//! mode E on an optical probe), reads the selected registers and the clock, and releases.
//!
//! * `reads = "all"`: the registers (classes 1, 3, 4, 5) of the association's object list.
//!   The list and the registers' scalers and units are read once per meter and cached in
//!   `{data_dir}/dlms/{meter}.objects` ([`ObjectCache`]); read again when a GET says an object
//!   is undefined or a value does not fit its cached scaler. A poll is then association, one
//!   GET (with list: every value and the clock) and release. A list of OBIS codes takes each
//!   one's class from the same list.
//! * Profile reads ([`DlmsMeter::read_profile`]): the profile's header (columns, capture
//!   period, the columns' scalers) is cached in the same file, per profile, so a read is
//!   association, the buffer GET by range (and its blocks) and release; read again, in the
//!   same association, when the meter says the profile is undefined or the rows do not fit.
//! * The clock (0-0:1.0.0.255) is read on every poll. A deviation from the gateway clock
//!   above `clock_limit` is reported as a [`Failure::ClockDeviation`] among the *refused*
//!   requests of the [`Outcome`]: the bus turns every refusal into a system event
//!   (`clock_problem`) and keeps the values, which is exactly what a wrong meter clock needs —
//!   so `Outcome` needed no new field.
//! * Failures: no answer → timeout, HCS/FCS → checksum, rejected association, failed HLS,
//!   ciphering and counter errors → `security_error`; objects refused → refusals.

use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Deserialize;

use super::apdu::AccessError;
use super::association::{AssociationConfig, Error, LinkConfig, SecurityConfig};
use super::cosem::{self, ObjectListEntry, class};
use super::counter::FileCounter;
use super::objects::{Known, ObjectCache};
use super::reads::{Object, Target, ValueError};
use super::security::{InvocationCounter, Keys};
use super::transport::{Client, TransportError};
use crate::meter::link::{Framing, Link, Parity, Slot};
use crate::meter::{Failure, Outcome, Selection, Timing, Value};
use crate::primitives::{HumanDuration, Problems};
use crate::reading::{Obis, Stamp};

mod config;
mod rows;

pub use config::{DlmsMeterConfig, SecurityName, default_system_title};

/// What resolving a DLMS meter needs beyond its section.
pub struct Context<'a> {
    pub meter: &'a str,
    pub gateway_id: &'a str,
    pub data_dir: &'a Path,
    pub gateway_tz: &'a TimeZone,
}

/// How the association reaches the meter, from the bus's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Wrapper,
    /// HDLC on the port in the bus's own framing (8N1 expected).
    Hdlc(Framing),
    /// Mode E sign-on at 300 7E1, then HDLC 8N1 at the agreed rate.
    ModeE {
        max_baud: u32,
    },
}

/// A DLMS meter, resolved.
#[derive(Debug, Clone)]
pub struct DlmsMeter {
    pub client: u16,
    pub logical: u16,
    pub physical: Option<u16>,
    pub security: SecurityConfig,
    pub transport: Transport,
    pub clock_limit: Duration,
    pub max_info: u16,
    pub tz: TimeZone,
    /// The client invocation counter (HLS-GMAC), durable under the data dir.
    pub counter: FileCounter,
    /// The association's object list and the registers' scalers, read once, kept on disk.
    objects: ObjectCache,
}

const REGISTER_CLASSES: [u16; 4] = [
    class::DATA,
    class::REGISTER,
    class::EXTENDED_REGISTER,
    class::DEMAND_REGISTER,
];

/// Why a read stopped, before it becomes a [`Failure`].
struct Stop(Failure, bool);

impl From<TransportError> for Stop {
    fn from(e: TransportError) -> Self {
        let f = failure(&e);
        Stop(f, true)
    }
}

/// The failure the centre hears about.
pub fn failure(e: &TransportError) -> Failure {
    match e {
        TransportError::Io(e) => Failure::Link(format!("connection: {e}")),
        TransportError::Dlms(d) => match d {
            Error::NoAnswer { after, .. } => Failure::Timeout(*after),
            Error::Checksum(_) => Failure::Checksum(d.to_string()),
            Error::Rejected { .. }
            | Error::InitiateRefused { .. }
            | Error::AuthenticationFailed(_)
            | Error::Crypto(_)
            | Error::Replay { .. }
            | Error::Unprotected
            | Error::Counter(_) => Failure::Security(d.to_string()),
            Error::Malformed { reason, raw } => {
                let mut h = hex::encode(&raw[..raw.len().min(64)]);
                if raw.len() > 64 {
                    h.push('…');
                }
                Failure::Malformed(format!("{reason}: {h}"))
            }
            Error::Exception {
                state_error,
                service_error,
            } => Failure::Exception {
                code: *service_error,
                name: "dlms exception",
                detail: format!("state error {state_error}: {d}"),
            },
            _ => Failure::Link(d.to_string()),
        },
        TransportError::Unexpected | TransportError::Cosem(_) => Failure::Malformed(e.to_string()),
        TransportError::Refused { .. } => Failure::Refused(e.to_string()),
    }
}

impl DlmsMeter {
    fn association(&self, timing: &Timing) -> AssociationConfig {
        let link = match self.transport {
            Transport::Wrapper => LinkConfig::Wrapper {
                client: self.client,
                server: self.logical,
            },
            Transport::Hdlc(_) | Transport::ModeE { .. } => LinkConfig::Hdlc {
                client: self.client as u8,
                server_logical: self.logical,
                server_physical: self.physical,
                max_info: self.max_info,
            },
        };
        let mut cfg = AssociationConfig::new(link, self.security.clone());
        cfg.answer_timeout = timing.timeout;
        cfg.retries = timing.retries.min(255) as u8;
        cfg
    }

    /// Reads the meter on `slot`: one association, released at the end.
    pub async fn read(
        &self,
        slot: &mut Slot,
        meter: &str,
        selection: &Selection,
        timing: &Timing,
    ) -> Outcome {
        let out = self.read_once(slot, meter, selection, timing).await;
        if !matches!(out.failure, Some(Failure::Security(_)))
            || !matches!(self.security, SecurityConfig::HlsGmac { .. })
        {
            return out;
        }
        // The meter may expect a higher invocation counter than ours (a restored gateway, a
        // counter file lost): one resync attempt — its frame counter over the public client,
        // jump past it — then the security error stands.
        slot.reset();
        match self.public_frame_counter(slot, timing).await {
            Some(fc) if self.counter.jump_to(fc.saturating_add(1)).is_ok() => {
                tracing::warn!(
                    meter,
                    frame_counter = fc,
                    "Invocation counter resynchronised from the meter"
                );
                slot.reset();
                self.read_once(slot, meter, selection, timing).await
            }
            _ => out,
        }
    }

    /// 0-0:43.1.0.255 read over the public client (SAP 16, no security).
    async fn public_frame_counter(&self, slot: &mut Slot, timing: &Timing) -> Option<u32> {
        let mut public = self.clone();
        public.client = 16;
        public.security = SecurityConfig::None;
        let cfg = public.association(timing);
        let obj = [Object {
            class: class::DATA,
            obis: Obis([0, 0, 43, 1, 0, 255]),
        }];
        let counter = super::security::MemoryCounter::default();
        let v = match self.transport {
            Transport::Wrapper => {
                let io = slot.tcp().await.ok()?;
                frame_counter_on(io, cfg, counter, &obj).await
            }
            Transport::Hdlc(f) => {
                let io = slot.port(f).ok()?;
                frame_counter_on(io, cfg, counter, &obj).await
            }
            Transport::ModeE { .. } => None,
        }?;
        v.to_string().parse().ok()
    }

    async fn read_once(
        &self,
        slot: &mut Slot,
        meter: &str,
        selection: &Selection,
        timing: &Timing,
    ) -> Outcome {
        let cfg = self.association(timing);
        let r = match self.transport {
            Transport::Wrapper => match slot.tcp().await {
                Ok(s) => self.session(s, cfg, meter, selection).await,
                Err(f) => Err(Stop(f, true)),
            },
            Transport::Hdlc(framing) => match slot.port(framing) {
                Ok(s) => self.session(s, cfg, meter, selection).await,
                Err(f) => Err(Stop(f, true)),
            },
            Transport::ModeE { max_baud } => {
                self.mode_e(slot, cfg, meter, selection, max_baud, timing)
                    .await
            }
        };
        match r {
            Ok(o) => o,
            Err(Stop(f, reopen)) => Outcome {
                reopen,
                ..Outcome::failed(f)
            },
        }
    }

    /// The association's object list, for commissioning (`amr-edge scan METER`).
    pub async fn scan(
        &self,
        slot: &mut Slot,
        timing: &Timing,
    ) -> Result<Vec<ObjectListEntry>, Failure> {
        let cfg = self.association(timing);
        match self.transport {
            Transport::Wrapper => scan_on(slot.tcp().await?, cfg, self.counter.clone()).await,
            Transport::Hdlc(framing) => {
                scan_on(slot.port(framing)?, cfg, self.counter.clone()).await
            }
            Transport::ModeE { max_baud } => {
                let port = mode_e_port(slot, max_baud, timing).await?;
                scan_on(port, cfg, self.counter.clone()).await
            }
        }
    }

    async fn mode_e(
        &self,
        slot: &mut Slot,
        cfg: AssociationConfig,
        meter: &str,
        selection: &Selection,
        max_baud: u32,
        timing: &Timing,
    ) -> Result<Outcome, Stop> {
        let port = mode_e_port(slot, max_baud, timing)
            .await
            .map_err(|f| Stop(f, true))?;
        self.session(port, cfg, meter, selection).await
    }

    /// Rows of a load profile captured in `from ..= to` (the meter's selective access by
    /// range on the clock column), for `amr-edge poll --profile` and profile-based reads:
    /// one association, released. The profile's header (columns, capture period, scalers)
    /// is cached with the object list, so a read after the first is the buffer GET alone.
    pub async fn read_profile(
        &self,
        slot: &mut Slot,
        profile: Obis,
        from: Timestamp,
        to: Timestamp,
        timing: &Timing,
    ) -> Result<super::reads::Profile, Failure> {
        self.read_profile_at(slot, profile, (from, to), timing, None)
            .await
    }

    /// [`DlmsMeter::read_profile`], and with `clock` the meter's clock, read in the same GET
    /// as the buffer (profile-based reads check it against `clock_limit`).
    pub async fn read_profile_at(
        &self,
        slot: &mut Slot,
        profile: Obis,
        range: (Timestamp, Timestamp),
        timing: &Timing,
        clock: Option<&mut Option<Timestamp>>,
    ) -> Result<super::reads::Profile, Failure> {
        let cfg = self.association(timing);
        let range = Some(range);
        match self.transport {
            Transport::Wrapper => {
                self.profile_on(slot.tcp().await?, cfg, profile, range, clock)
                    .await
            }
            Transport::Hdlc(framing) => {
                self.profile_on(slot.port(framing)?, cfg, profile, range, clock)
                    .await
            }
            Transport::ModeE { max_baud } => {
                let port = mode_e_port(slot, max_baud, timing).await?;
                self.profile_on(port, cfg, profile, range, clock).await
            }
        }
    }

    async fn profile_on<S>(
        &self,
        io: S,
        cfg: AssociationConfig,
        profile: Obis,
        range: Option<(Timestamp, Timestamp)>,
        clock: Option<&mut Option<Timestamp>>,
    ) -> Result<super::reads::Profile, Failure>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut client = Client::new(io, cfg, self.counter.clone());
        client.connect().await.map_err(|e| failure(&e))?;
        let cached = self.objects.profile(profile);
        let mut header = cached.clone();
        let p = client
            .read_profile_and_clock(profile, range, &self.tz, &mut header, clock)
            .await;
        if header != cached {
            self.objects.set_profile(profile, header);
        }
        let p = p.map_err(|e| failure(&e))?;
        if let Err(e) = client.release().await {
            tracing::debug!(error = %e, "DLMS release failed");
        }
        Ok(p)
    }

    /// One association on `io`: connect, object list if needed, values and clock, release.
    async fn session<S>(
        &self,
        io: S,
        cfg: AssociationConfig,
        meter: &str,
        selection: &Selection,
    ) -> Result<Outcome, Stop>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut client = Client::new(io, cfg, self.counter.clone());
        client.connect().await?;
        let r = self.read_in(&mut client, meter, selection).await;
        match r {
            Ok(out) => {
                // Released on every read; a meter that does not answer the release still gave
                // its values, but the link is out of step.
                match client.release().await {
                    Ok(()) => Ok(out),
                    Err(e) => {
                        tracing::debug!(meter, error = %e, "DLMS release failed");
                        Ok(Outcome {
                            reopen: true,
                            ..out
                        })
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn read_in<S, C>(
        &self,
        client: &mut Client<S, C>,
        meter: &str,
        selection: &Selection,
    ) -> Result<Outcome, Stop>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        C: InvocationCounter,
    {
        let mut refresh = false;
        loop {
            let cached = if refresh { None } else { self.objects.get() };
            let (mut list, mut changed) = match cached {
                Some(l) => (l, false),
                None => {
                    let l: Vec<Known> = client
                        .object_list()
                        .await?
                        .into_iter()
                        .map(Known::from)
                        .collect();
                    (l, true)
                }
            };
            let mut out = Outcome::default();
            // Indexes into `list`, one per target.
            let mut chosen = Vec::new();
            match selection {
                Selection::All => chosen.extend(
                    (0..list.len()).filter(|i| REGISTER_CLASSES.contains(&list[*i].entry.class)),
                ),
                Selection::Series(wanted) => {
                    for w in wanted {
                        match list.iter().position(|k| k.entry.obis == *w) {
                            Some(i) => chosen.push(i),
                            None => out.refused.push(Failure::Refused(format!(
                                "{w} is not in the meter's object list"
                            ))),
                        }
                    }
                }
            }
            let clock = Obis(cosem::CLOCK_OBIS);
            if let Some(i) = list
                .iter()
                .position(|k| k.entry.obis == clock && k.entry.class == class::CLOCK)
            {
                chosen.push(i);
            }
            let targets: Vec<Target> = chosen
                .iter()
                .map(|&i| Target {
                    object: Object {
                        class: list[i].entry.class,
                        obis: list[i].entry.obis,
                    },
                    scaler: list[i].scaler,
                })
                .collect();
            let reads = client.read_targets(&targets).await?;
            let undefined = reads.iter().any(|r| {
                matches!(
                    r.value,
                    Err(ValueError::Access(AccessError(
                        AccessError::OBJECT_UNDEFINED
                    )))
                )
            });
            // A value its cached scaler cannot scale: the meter was reconfigured.
            let stale = reads
                .iter()
                .zip(&targets)
                .any(|(r, t)| t.scaler.is_some() && matches!(r.value, Err(ValueError::Shape(_))));
            if (undefined || stale) && !refresh {
                // The meter's object list changed (a firmware update, a reconfiguration).
                tracing::info!(
                    meter,
                    undefined,
                    stale_scaler = stale,
                    "Reading the object list and scalers again"
                );
                refresh = true;
                continue;
            }
            for (r, &i) in reads.iter().zip(&chosen) {
                if r.scaler.is_some() && list[i].scaler != r.scaler {
                    list[i].scaler = r.scaler;
                    changed = true;
                }
            }
            if changed {
                self.objects.set(list);
            }
            let results = reads.into_iter().map(|r| (r.obis, r.value));
            let now = Timestamp::now();
            for (obis, r) in results {
                match r {
                    Ok(v) if obis == clock => {
                        if let Some(t) = v.time.and_then(|t| t.to_timestamp(&self.tz)) {
                            let off = now.as_millisecond() - t.as_millisecond();
                            if off.unsigned_abs() > self.clock_limit.as_millis() as u64 {
                                out.refused.push(Failure::ClockDeviation {
                                    offset_s: off / 1000,
                                    limit: self.clock_limit,
                                });
                            }
                        }
                    }
                    Ok(v) => out.values.push(Value {
                        series: obis,
                        value: v.value,
                        unit: v.unit.unwrap_or("").to_owned(),
                        meter_time: v
                            .time
                            .and_then(|t| t.to_timestamp(&self.tz))
                            .map(|t| Stamp::in_zone(t, &self.tz)),
                    }),
                    Err(ValueError::Access(e)) => out.refused.push(Failure::Refused(format!(
                        "{obis}: {}",
                        ValueError::Access(e)
                    ))),
                    Err(e) => {
                        tracing::debug!(meter, %obis, error = %e, "DLMS value not mapped");
                        out.unmapped += 1;
                    }
                }
            }
            return Ok(out);
        }
    }
}

/// The mode E opening on the optical probe (300 Bd 7E1), then the port at the agreed rate in
/// 8N1 for HDLC.
async fn mode_e_port<'a>(
    slot: &'a mut Slot,
    max_baud: u32,
    timing: &Timing,
) -> Result<&'a mut tokio_serial::SerialStream, Failure> {
    let port = slot.port(Framing::IEC_SIGN_ON)?;
    let switch = super::transport::mode_e_sign_on(
        port,
        max_baud,
        timing.timeout.max(Duration::from_millis(1500)),
    )
    .await
    .map_err(|e| match e {
        super::transport::ModeEFailure::NoAnswer(d) => Failure::Timeout(d),
        super::transport::ModeEFailure::Io(e) => Failure::Link(e.to_string()),
        super::transport::ModeEFailure::Refused(e) => Failure::Refused(e.to_string()),
    })?;
    slot.port(Framing {
        baud: switch.baud,
        parity: Parity::None,
        data_bits: 8,
        stop_bits: 1,
    })
}

async fn scan_on<S>(
    io: S,
    cfg: AssociationConfig,
    counter: FileCounter,
) -> Result<Vec<ObjectListEntry>, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = Client::new(io, cfg, counter);
    client.connect().await.map_err(|e| failure(&e))?;
    let list = client.object_list().await.map_err(|e| failure(&e))?;
    if let Err(e) = client.release().await {
        tracing::debug!(error = %e, "DLMS release failed");
    }
    Ok(list)
}

async fn frame_counter_on<S>(
    io: S,
    cfg: AssociationConfig,
    counter: super::security::MemoryCounter,
    obj: &[Object],
) -> Option<crate::reading::Decimal>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = Client::new(io, cfg, counter);
    client.connect().await.ok()?;
    let v = client.read_values(obj).await.ok()?;
    let _ = client.release().await;
    v.into_iter().next()?.1.ok().map(|v| v.value)
}

#[cfg(test)]
mod tests;
