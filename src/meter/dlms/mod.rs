//! DLMS/COSEM meters (IEC 62056-5-3, -6-2, -46, -47): a sans-IO client.
//!
//! # Layout
//!
//! * [`wrapper`] — the IEC 62056-47 TCP wrapper header and stream splitter.
//! * [`hdlc`] — HDLC frames (IEC 62056-46, format type 3): addresses, CRCs, SNRM/UA parameters,
//!   a splitter that finds frames by their length (HDLC here does not byte-stuff).
//! * [`axdr`] — the A-XDR `Data` type, date-time, date and time.
//! * [`apdu`] — AARQ/AARE, RLRQ/RLRE, xDLMS initiate, GET (normal, next, with list),
//!   ACTION, exception and service-error APDUs, selective access.
//! * [`security`] — AES-GCM-128 glo-ciphering, HLS-GMAC, the invocation counter trait.
//! * [`cosem`] — the interface classes read here (register, extended and demand register,
//!   data, clock, profile generic, association object list) and the unit table.
//! * [`association`] — the association state machine over either link: bytes and events in,
//!   bytes to send and results out.
//! * [`transport`] — the thin async layer running an association on any byte stream, with a
//!   per-frame timeout; [`mode_e`] — the IEC 62056-21 mode E opening of an optical probe.
//! * [`reads`] — which attributes a read GETs and how the answers become values;
//!   [`objects`] — a meter's object list and its registers' scalers and units, cached in
//!   `{data_dir}/dlms/{meter}.objects` so that a poll reads only what changes.
//!
//! # How the driver uses it
//!
//! ```ignore
//! use amr_edge::meter::dlms::{association::*, reads, security, transport::Client};
//!
//! // Wrapper on TCP (port 4059), public client; HDLC: LinkConfig::Hdlc { client: 1,
//! // server_logical: 1, server_physical: Some(17), max_info: 128 } on the serial port.
//! let config = AssociationConfig::new(
//!     LinkConfig::Wrapper { client: 16, server: 1 },
//!     SecurityConfig::None, // or Lls { password } or HlsGmac { keys, client_system_title }
//! );
//! let mut client = Client::new(stream, config, counter /* impl InvocationCounter */);
//! client.connect().await?;
//! let values = client.read_values(&[reads::Object { class: 3, obis }]).await?;
//! let profile = client.read_profile(profile_obis, Some((from, to)), &tz).await?;
//! client.release().await?;
//! let (stream, counter) = client.into_parts();
//! ```
//!
//! * `read_values` returns, per object, `Ok(Value { obis, value: Decimal, unit, time })` or
//!   `Err(ValueError::Access(..))` when the meter refused or lacks that object; a failed link
//!   or a broken answer is the outer `Err(TransportError)`. `read_targets` is the same
//!   with scalers known from an earlier read ([`reads::Target`]): only the values are read.
//! * `read_profile` returns the columns, their scalers and the rows; `Profile::values()`
//!   flattens them into `(timestamp, obis, value, unit, clock status)`.
//! * `Client::object_list` is the commissioning scan (class, version, OBIS).
//! * **The invocation counter** is never kept here: each ciphered APDU takes a fresh value
//!   from the caller's [`security::InvocationCounter`], whose contract is to persist before it
//!   returns a value. The store implements it per meter; [`security::MemoryCounter`] is for
//!   tests.
//! * Mode E: [`transport::mode_e_sign_on`] on the probe's port at 300 Bd, then switch the
//!   port to 8N1 and run the client with an HDLC link on it.
//!
//! # Time
//!
//! A COSEM date-time's deviation is read as the Blue Book defines it, UTC = local +
//! deviation (a CET meter sends -60). Range reads send their bounds in UTC with deviation 0;
//! a meter that compares in local time ignoring the deviation needs its zone applied by the
//! caller.

pub mod apdu;
pub mod association;
pub mod axdr;
pub mod cosem;
pub mod counter;
pub mod driver;
pub mod hdlc;
pub mod mode_e;
pub mod objects;
pub mod reads;
pub mod security;
pub mod transport;
pub mod wrapper;

#[cfg(test)]
mod tests;
