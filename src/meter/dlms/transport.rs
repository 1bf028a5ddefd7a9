//! The thin I/O layer: runs an [`Association`] over any `AsyncRead + AsyncWrite` byte stream
//! — a TCP connection (wrapper), a serial port (HDLC), an in-memory duplex in tests — with a
//! per-frame answer timeout. The protocol lives in the machine; this only moves bytes.

use std::io;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::apdu::{AccessError, GetResult};
use super::association::{
    Association, AssociationConfig, Error, Event, Negotiated, Output, Request,
};
use super::axdr::Data;
use super::cosem::{self, CosemError, ObjectListEntry, ScalerUnit};
use super::reads::{self, Object, Profile, ProfileHeader, Read, Target, Value, ValueError};
use super::security::InvocationCounter;
use crate::reading::Obis;

/// Why a client call failed: the stream itself, or the DLMS exchange on it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Dlms(#[from] Error),
    #[error("the meter answered with something other than expected")]
    Unexpected,
    /// A profile or object list whose shape this client does not know.
    #[error("{0}")]
    Cosem(#[from] CosemError),
    /// The meter refused an attribute the read cannot do without (a profile's header).
    #[error("meter refused {what}: {error}")]
    Refused {
        what: &'static str,
        error: super::apdu::AccessError,
    },
}

/// Runs the machine from `first` until it reports an event or fails.
pub async fn drive<S, C>(
    io: &mut S,
    assoc: &mut Association<C>,
    first: Output,
) -> Result<Event, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: InvocationCounter,
{
    let mut out = first;
    let mut buf = vec![0u8; 2048];
    loop {
        match out {
            Output::Done(ev) => return Ok(ev),
            Output::Failed(e) => return Err(TransportError::Dlms(e)),
            Output::Send {
                bytes,
                answer_within,
            } => {
                tracing::trace!(bytes = %hex::encode(&bytes), "DLMS send");
                io.write_all(&bytes).await?;
                io.flush().await?;
                let deadline = Instant::now() + answer_within;
                out = loop {
                    match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
                        Err(_elapsed) => break assoc.timed_out(),
                        Ok(Ok(0)) => {
                            return Err(TransportError::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the meter closed the connection",
                            )));
                        }
                        Ok(Ok(n)) => {
                            tracing::trace!(bytes = %hex::encode(&buf[..n]), "DLMS received");
                            if let Some(o) = assoc.received(&buf[..n]) {
                                break o;
                            }
                        }
                        Ok(Err(e)) => return Err(e.into()),
                    }
                };
            }
        }
    }
}

/// A DLMS client on one stream: connect, read, release.
#[derive(Debug)]
pub struct Client<S, C: InvocationCounter> {
    io: S,
    assoc: Association<C>,
}

impl<S, C> Client<S, C>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: InvocationCounter,
{
    pub fn new(io: S, config: AssociationConfig, counter: C) -> Self {
        Client {
            io,
            assoc: Association::new(config, counter),
        }
    }

    pub fn association(&self) -> &Association<C> {
        &self.assoc
    }

    /// The stream and the counter back (the caller keeps the counter's store).
    pub fn into_parts(self) -> (S, C) {
        (self.io, self.assoc.into_counter())
    }

    pub async fn connect(&mut self) -> Result<Negotiated, TransportError> {
        let first = self.assoc.connect();
        match drive(&mut self.io, &mut self.assoc, first).await? {
            Event::Connected(n) => Ok(n),
            _ => Err(TransportError::Unexpected),
        }
    }

    /// Reads attributes: one result per request, a refusal of one not failing the others.
    pub async fn get(&mut self, requests: Vec<Request>) -> Result<Vec<GetResult>, TransportError> {
        let n = requests.len();
        let first = self.assoc.get(requests);
        match drive(&mut self.io, &mut self.assoc, first).await? {
            Event::Values(v) if v.len() == n => Ok(v),
            _ => Err(TransportError::Unexpected),
        }
    }

    pub async fn release(&mut self) -> Result<(), TransportError> {
        let first = self.assoc.release();
        drive(&mut self.io, &mut self.assoc, first)
            .await
            .map(|_| ())
    }

    /// Reads registers, extended and demand registers, data objects and clocks, each
    /// register with its scaler and unit.
    pub async fn read_values(
        &mut self,
        objects: &[Object],
    ) -> Result<Vec<(Obis, Result<Value, ValueError>)>, TransportError> {
        let targets: Vec<Target> = objects.iter().map(|o| Target::from(*o)).collect();
        let reads = self.read_targets(&targets).await?;
        Ok(reads.into_iter().map(|r| (r.obis, r.value)).collect())
    }

    /// Reads `targets` in one GET (with list, where the meter allows and its PDU size
    /// fits): what changes of each, and the scaler and unit of those not yet known.
    pub async fn read_targets(&mut self, targets: &[Target]) -> Result<Vec<Read>, TransportError> {
        let results = self.get(reads::requests(targets)).await?;
        Ok(reads::values(targets, &results))
    }

    /// The association's object list (for commissioning).
    pub async fn object_list(&mut self) -> Result<Vec<ObjectListEntry>, TransportError> {
        let d = self
            .get_one(cosem::OBJECT_LIST.into(), "the object list")
            .await?;
        Ok(cosem::object_list(&d)?)
    }

    async fn get_one(&mut self, r: Request, what: &'static str) -> Result<Data, TransportError> {
        let mut v = self.get(vec![r]).await?;
        match v.pop() {
            Some(Ok(d)) => Ok(d),
            Some(Err(error)) => Err(TransportError::Refused { what, error }),
            None => Err(TransportError::Unexpected),
        }
    }

    /// Reads a profile's rows captured in `range` (all rows without one): its columns and
    /// capture period, each register column's scaler and unit, then the buffer.
    pub async fn read_profile(
        &mut self,
        profile: Obis,
        range: Option<(Timestamp, Timestamp)>,
        tz: &TimeZone,
    ) -> Result<Profile, TransportError> {
        self.read_profile_cached(profile, range, tz, &mut None)
            .await
    }

    /// [`read_profile`](Self::read_profile) with the profile's header known from an earlier
    /// read (`header`): then only the buffer is read (the first GET and its blocks). The
    /// header is read again, in the same association, when there is none, when the meter
    /// says the profile or the range's column is undefined (the buffer is then read again),
    /// or when the buffer's rows do not fit the cached columns (the same buffer is then
    /// decoded with the new header). `header` is left as the meter has it now: the caller
    /// keeps it when it changed, and an error leaves it `None` when it was found stale.
    pub async fn read_profile_cached(
        &mut self,
        profile: Obis,
        range: Option<(Timestamp, Timestamp)>,
        tz: &TimeZone,
        header: &mut Option<ProfileHeader>,
    ) -> Result<Profile, TransportError> {
        self.read_profile_and_clock(profile, range, tz, header, None)
            .await
    }

    /// [`Client::read_profile_cached`], and with `clock` the meter's clock (0-0:1.0.0.255,
    /// attribute 2) in the same GET as the buffer (with list, where the meter allows): no
    /// round trip of its own. `clock` is left `None` when the meter does not give it.
    pub async fn read_profile_and_clock(
        &mut self,
        profile: Obis,
        range: Option<(Timestamp, Timestamp)>,
        tz: &TimeZone,
        header: &mut Option<ProfileHeader>,
        mut clock: Option<&mut Option<Timestamp>>,
    ) -> Result<Profile, TransportError> {
        let clock_request: Request =
            super::apdu::AttributeRef::new(cosem::class::CLOCK, cosem::CLOCK_OBIS, 2).into();
        let with_clock = clock.is_some();
        let mut put_clock = |results: &mut Vec<GetResult>| {
            if with_clock {
                let t = results
                    .pop()
                    .and_then(|r| r.ok())
                    .and_then(|d| d.as_date_time())
                    .and_then(|dt| dt.to_timestamp(tz));
                if let Some(c) = clock.as_deref_mut() {
                    *c = t;
                }
            }
        };
        let mut buffer = None;
        if let Some(h) = header.as_ref() {
            let mut requests = vec![reads::profile_buffer_request(profile, h.clock(), range)];
            if with_clock {
                requests.push(clock_request.clone());
            }
            let mut results = self.get(requests).await?;
            put_clock(&mut results);
            match results.pop() {
                Some(Ok(d)) => match Profile::with_header(h.clone(), &d, tz) {
                    Ok(p) if p.fits() => return Ok(p),
                    // Captured with other columns: the same rows, decoded with the header
                    // the meter has now.
                    _ => buffer = Some(d),
                },
                Some(Err(e)) if e.0 == AccessError::OBJECT_UNDEFINED => {}
                Some(Err(error)) => {
                    return Err(TransportError::Refused {
                        what: "the profile buffer",
                        error,
                    });
                }
                None => return Err(TransportError::Unexpected),
            }
            tracing::info!(%profile, "Reading the profile's columns and scalers again");
            *header = None;
        }
        let fresh = self.profile_header(profile).await?;
        let buffer = match buffer {
            Some(d) => d,
            None => {
                let mut requests =
                    vec![reads::profile_buffer_request(profile, fresh.clock(), range)];
                if with_clock {
                    requests.push(clock_request);
                }
                let mut results = self.get(requests).await?;
                put_clock(&mut results);
                match results.pop() {
                    Some(Ok(d)) => d,
                    Some(Err(error)) => {
                        return Err(TransportError::Refused {
                            what: "the profile buffer",
                            error,
                        });
                    }
                    None => return Err(TransportError::Unexpected),
                }
            }
        };
        *header = Some(fresh.clone());
        Ok(Profile::with_header(fresh, &buffer, tz)?)
    }

    /// A profile's columns and capture period (one GET with list), then each register
    /// column's scaler and unit (one more).
    pub async fn profile_header(&mut self, profile: Obis) -> Result<ProfileHeader, TransportError> {
        let header = self.get(reads::profile_header_requests(profile)).await?;
        let (capture_objects, period) = match (header.first(), header.get(1)) {
            (Some(Ok(c)), Some(p)) => (c.clone(), p.clone().unwrap_or(Data::Null)),
            (Some(Err(error)), _) => {
                return Err(TransportError::Refused {
                    what: "the profile's capture objects",
                    error: *error,
                });
            }
            _ => return Err(TransportError::Unexpected),
        };
        let columns = cosem::capture_objects(&capture_objects)?;
        let scaler_refs: Vec<_> = columns.iter().map(reads::scaler_attribute).collect();
        let wanted: Vec<Request> = scaler_refs.iter().flatten().map(|a| (*a).into()).collect();
        let mut got = self.get(wanted).await?.into_iter();
        let scalers = scaler_refs
            .iter()
            .map(|a| {
                a.and_then(|_| got.next())
                    .and_then(|r| r.ok())
                    .and_then(|d| ScalerUnit::from_data(&d).ok())
            })
            .collect();
        Ok(ProfileHeader::new(&capture_objects, &period, scalers)?)
    }
}

/// Why the mode E opening failed.
#[derive(Debug, thiserror::Error)]
pub enum ModeEFailure {
    #[error("serial line: {0}")]
    Io(#[from] io::Error),
    #[error("no identification within {0:?}")]
    NoAnswer(std::time::Duration),
    #[error(transparent)]
    Refused(#[from] super::mode_e::ModeEError),
}

/// The mode E opening on an optical probe: sign-on at 300 Bd, `ACK 2 Z 2`, then the line at
/// the agreed rate. Returns the rate. The caller must also switch the port's framing from
/// 7E1 to 8N1 before running HDLC on it: the IEC 62056-21 [`Line`] changes only the rate.
///
/// [`Line`]: crate::meter::iec62056_21::transport::Line
pub async fn mode_e_sign_on<L: crate::meter::iec62056_21::transport::Line>(
    line: &mut L,
    max_baud: u32,
    answer_timeout: std::time::Duration,
) -> Result<super::mode_e::Switch, ModeEFailure> {
    let mut m = super::mode_e::ModeE::new(max_baud);
    line.set_baud(300)?;
    line.discard_input()?;
    line.send(&m.request()).await?;
    let mut buf = [0u8; 128];
    let deadline = Instant::now() + answer_timeout;
    let switch = loop {
        match tokio::time::timeout_at(deadline, line.recv(&mut buf)).await {
            Err(_) => return Err(ModeEFailure::NoAnswer(answer_timeout)),
            Ok(Ok(0)) => {
                return Err(ModeEFailure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the serial line closed",
                )));
            }
            Ok(Ok(n)) => {
                if let Some(r) = m.received(&buf[..n]) {
                    break r?;
                }
            }
            Ok(Err(e)) => return Err(e.into()),
        }
    };
    // The meter's reaction time before the agent answers, as in mode C.
    tokio::time::sleep(switch.identification.reaction_time()).await;
    line.send(&switch.acknowledgement).await?;
    line.set_baud(switch.baud)?;
    Ok(switch)
}
