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

pub mod apdu;
pub mod association;
pub mod axdr;
pub mod cosem;
pub mod hdlc;
pub mod mode_e;
pub mod reads;
pub mod security;
pub mod transport;
pub mod wrapper;

#[cfg(test)]
mod tests;
