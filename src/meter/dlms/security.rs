//! Security suite 0 (AES-GCM-128) for DLMS/COSEM: glo-ciphering of APDUs, the HLS-GMAC
//! authentication tag, and the client invocation counter.
//!
//! # Ciphering (IEC 62056-5-3, 5.3.4.6; the Green Book's examples)
//!
//! * IV = the sender's system title (8 bytes) ‖ invocation counter (4 bytes, big endian).
//! * The security control byte: 0x10 authenticated, 0x20 encrypted, 0x30 both; suite 0 in the
//!   low nibble.
//! * Authenticated and encrypted: AAD = SC ‖ AK; the output is ciphertext ‖ 12-byte tag.
//!   Authenticated only: AAD = SC ‖ AK ‖ plaintext; the output is plaintext ‖ tag.
//! * A ciphered APDU is `tag length SC IC output`, e.g. glo-get-request 0xC8.
//!
//! # The invocation counter
//!
//! A counter value used twice with the same key breaks GCM outright (the keystream repeats and
//! the authentication key can be recovered). So the association never keeps or increments a
//! counter of its own: every APDU it ciphers takes a fresh value from an [`InvocationCounter`],
//! which the caller implements over durable storage. The contract is on the trait: a value it
//! hands out is never handed out again, even after a crash — persist (or reserve a block of
//! values ahead) before returning.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aes::Aes128;
use aes_gcm::{AesGcm, KeyInit};

/// AES-GCM-128 with DLMS's 96-bit IV and 96-bit tag.
type Gcm = AesGcm<Aes128, aes_gcm::aead::consts::U12, aes_gcm::aead::consts::U12>;

pub const TAG_LEN: usize = 12;
pub const SC_AUTHENTICATED: u8 = 0x10;
pub const SC_ENCRYPTED: u8 = 0x20;
pub const SC_AUTHENTICATED_ENCRYPTED: u8 = 0x30;

/// The global unicast encryption key and the authentication key.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub encryption: [u8; 16],
    pub authentication: [u8; 16],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys never reach a log.
        f.write_str("Keys { .. }")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The tag does not match: wrong keys, a tampered or corrupted APDU.
    #[error("authentication tag does not match (wrong key or tampered APDU)")]
    Tag,
    #[error(
        "security control {0:#04x} is not supported (suite 0 only, no compression or broadcast)"
    )]
    Unsupported(u8),
    #[error("ciphered APDU too short")]
    Short,
}

fn iv(system_title: &[u8; 8], ic: u32) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[..8].copy_from_slice(system_title);
    iv[8..].copy_from_slice(&ic.to_be_bytes());
    iv
}

fn check_sc(sc: u8) -> Result<(), CryptoError> {
    if sc & 0x0F != 0 || sc & 0xC0 != 0 || sc & 0x30 == 0 {
        return Err(CryptoError::Unsupported(sc));
    }
    Ok(())
}

/// Ciphers `plain` as security control `sc` asks; returns what follows SC and IC in the APDU.
pub fn encrypt(
    sc: u8,
    system_title: &[u8; 8],
    ic: u32,
    keys: &Keys,
    plain: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    check_sc(sc)?;
    let gcm = Gcm::new(&keys.encryption.into());
    let nonce = iv(system_title, ic).into();
    let mut aad = vec![sc];
    aad.extend_from_slice(&keys.authentication);
    let mut buf = plain.to_vec();
    if sc & SC_ENCRYPTED == 0 {
        aad.extend_from_slice(plain);
        let tag = gcm
            .encrypt_inout_detached(&nonce, &aad, (&mut [][..]).into())
            .map_err(|_| CryptoError::Short)?;
        buf.extend_from_slice(&tag);
        return Ok(buf);
    }
    let aad: &[u8] = if sc & SC_AUTHENTICATED != 0 {
        &aad
    } else {
        &[]
    };
    let tag = gcm
        .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
        .map_err(|_| CryptoError::Short)?;
    if sc & SC_AUTHENTICATED != 0 {
        buf.extend_from_slice(&tag);
    }
    Ok(buf)
}

/// Deciphers what follows SC and IC in a ciphered APDU, checking its tag.
pub fn decrypt(
    sc: u8,
    system_title: &[u8; 8],
    ic: u32,
    keys: &Keys,
    text: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    check_sc(sc)?;
    let gcm = Gcm::new(&keys.encryption.into());
    let nonce = iv(system_title, ic).into();
    let mut aad = vec![sc];
    aad.extend_from_slice(&keys.authentication);
    if sc & SC_AUTHENTICATED == 0 {
        // Encrypted only: GCM without a tag is CTR mode; decrypting is encrypting.
        let mut buf = text.to_vec();
        let _ = gcm
            .encrypt_inout_detached(&nonce, &[], buf.as_mut_slice().into())
            .map_err(|_| CryptoError::Short)?;
        return Ok(buf);
    }
    if text.len() < TAG_LEN {
        return Err(CryptoError::Short);
    }
    let (body, tag) = text.split_at(text.len() - TAG_LEN);
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Short)?;
    if sc & SC_ENCRYPTED == 0 {
        aad.extend_from_slice(body);
        gcm.decrypt_inout_detached(&nonce, &aad, (&mut [][..]).into(), &tag.into())
            .map_err(|_| CryptoError::Tag)?;
        return Ok(body.to_vec());
    }
    let mut buf = body.to_vec();
    gcm.decrypt_inout_detached(&nonce, &aad, buf.as_mut_slice().into(), &tag.into())
        .map_err(|_| CryptoError::Tag)?;
    Ok(buf)
}

/// The HLS-GMAC value f(challenge): SC 0x10 ‖ IC ‖ GMAC over SC ‖ AK ‖ challenge, with the
/// sender's system title and counter.
pub fn hls_gmac(system_title: &[u8; 8], ic: u32, keys: &Keys, challenge: &[u8]) -> Vec<u8> {
    let gcm = Gcm::new(&keys.encryption.into());
    let nonce = iv(system_title, ic).into();
    let mut aad = vec![SC_AUTHENTICATED];
    aad.extend_from_slice(&keys.authentication);
    aad.extend_from_slice(challenge);
    let mut out = vec![SC_AUTHENTICATED];
    out.extend_from_slice(&ic.to_be_bytes());
    // Infallible: the lengths are far below GCM's limits.
    if let Ok(tag) = gcm.encrypt_inout_detached(&nonce, &aad, (&mut [][..]).into()) {
        out.extend_from_slice(&tag);
    }
    out
}

/// `tag length SC IC text`: a glo-ciphered APDU.
pub fn wrap(tag: u8, sc: u8, ic: u32, text: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    super::axdr::put_length(&mut out, 5 + text.len());
    out.push(sc);
    out.extend_from_slice(&ic.to_be_bytes());
    out.extend_from_slice(text);
    out
}

/// Splits a ciphered APDU's content (after tag and length) into SC, IC and text.
pub fn split(content: &[u8]) -> Result<(u8, u32, &[u8]), CryptoError> {
    if content.len() < 5 {
        return Err(CryptoError::Short);
    }
    let ic = u32::from_be_bytes([content[1], content[2], content[3], content[4]]);
    Ok((content[0], ic, &content[5..]))
}

/// The source of client invocation counter values, implemented by the caller over durable
/// storage.
///
/// **Contract**: a value returned by [`next`](InvocationCounter::next) is never returned again
/// for the same key, not even after a crash or power cut. Persist the new high-water mark (or
/// a reservation of a block of values) before returning it. Return an error rather than a
/// value that may have been used.
pub trait InvocationCounter {
    fn next(&mut self) -> Result<u32, CounterError>;
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    /// Every value has been used: the key must be changed.
    #[error("invocation counter exhausted: the meter's keys must be renewed")]
    Exhausted,
    /// The store could not record the value; it must not be used.
    #[error("invocation counter could not be persisted: {0}")]
    Store(String),
}

/// A counter in memory: for tests, and for a caller that persists [`MemoryCounter::last`]
/// itself after each association (acceptable only where a repeat cannot happen, e.g. a
/// meter that resets its expectations; not for the field).
#[derive(Clone, Debug, Default)]
pub struct MemoryCounter {
    last: Option<u32>,
}

impl MemoryCounter {
    /// Continues after `last`, the highest value already used.
    pub fn after(last: u32) -> Self {
        MemoryCounter { last: Some(last) }
    }
    pub fn last(&self) -> Option<u32> {
        self.last
    }
}

impl InvocationCounter for MemoryCounter {
    fn next(&mut self) -> Result<u32, CounterError> {
        let v = match self.last {
            None => 0,
            Some(u32::MAX) => return Err(CounterError::Exhausted),
            Some(v) => v + 1,
        };
        self.last = Some(v);
        Ok(v)
    }
}

/// A random HLS challenge of `len` bytes (8-64) from the operating system's generator.
pub fn challenge(len: usize) -> Result<Vec<u8>, CounterError> {
    let mut b = vec![0u8; len.clamp(8, 64)];
    getrandom::fill(&mut b).map_err(|e| CounterError::Store(format!("no randomness: {e}")))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    /// The Green Book's example keys and server system title.
    pub(crate) fn green_book_keys() -> Keys {
        Keys {
            encryption: hex("000102030405060708090A0B0C0D0E0F").try_into().unwrap(),
            authentication: hex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF").try_into().unwrap(),
        }
    }
    const ST: [u8; 8] = [0x4D, 0x4D, 0x4D, 0x00, 0x00, 0xBC, 0x61, 0x4E];

    #[test]
    fn green_book_glo_get_request_should_match() {
        // Green Book example (as reproduced in the dlms-cosem tests): GET of the clock's
        // time, authenticated and encrypted, IC 0x01234567.
        let plain = hex("C0010000080000010000FF0200");
        let text = encrypt(0x30, &ST, 0x0123_4567, &green_book_keys(), &plain).unwrap();
        assert_eq!(
            text,
            hex("411312FF935A47566827C467BC7D825C3BE4A77C3FCC056B6B")
        );
        let apdu = wrap(0xC8, 0x30, 0x0123_4567, &text);
        assert_eq!(
            apdu,
            hex("C81E3001234567411312FF935A47566827C467BC7D825C3BE4A77C3FCC056B6B")
        );
        let (sc, ic, t) = split(&apdu[2..]).unwrap();
        assert_eq!(decrypt(sc, &ST, ic, &green_book_keys(), t).unwrap(), plain);
    }

    #[test]
    fn green_book_glo_initiate_request_should_decipher() {
        let apdu = hex(
            "21303001234567801302FF8A7874133D414CED25B42534D28DB0047720606B175BD52211BE6841DB204D39EE6FDB8E356855",
        );
        let (sc, ic, t) = split(&apdu[2..]).unwrap();
        let plain = decrypt(sc, &ST, ic, &green_book_keys(), t).unwrap();
        let ir = super::super::apdu::InitiateRequest::decode(&plain).unwrap();
        assert_eq!(
            ir.dedicated_key.unwrap(),
            hex("00112233445566778899AABBCCDDEEFF")
        );
        assert_eq!(ir.max_receive_pdu, 1200);
        // And ciphering it again gives the published bytes.
        assert_eq!(
            wrap(
                0x21,
                sc,
                ic,
                &encrypt(sc, &ST, ic, &green_book_keys(), &plain).unwrap()
            ),
            apdu
        );
    }

    #[test]
    fn hls_gmac_should_match_published_tag() {
        // Client system title 4D4D4D0000000001, IC 1, server challenge "P6wRJ21F".
        let st = hex("4D4D4D0000000001").try_into().unwrap();
        let f = hls_gmac(&st, 1, &green_book_keys(), &hex("503677524A323146"));
        assert_eq!(f, hex("10 00000001 1A52FE7DD3E72748973C1E28"));
    }

    #[test]
    fn tampered_apdu_should_fail_the_tag() {
        let mut text = encrypt(0x30, &ST, 7, &green_book_keys(), b"hello").unwrap();
        text[0] ^= 1;
        assert_eq!(
            decrypt(0x30, &ST, 7, &green_book_keys(), &text),
            Err(CryptoError::Tag)
        );
        let mut auth = encrypt(0x10, &ST, 7, &green_book_keys(), b"hello").unwrap();
        assert_eq!(&auth[..5], b"hello");
        auth[1] ^= 1;
        assert_eq!(
            decrypt(0x10, &ST, 7, &green_book_keys(), &auth),
            Err(CryptoError::Tag)
        );
    }

    #[test]
    fn memory_counter_should_never_repeat_and_stop_at_the_end() {
        let mut c = MemoryCounter::after(u32::MAX - 1);
        assert_eq!(c.next(), Ok(u32::MAX));
        assert_eq!(c.next(), Err(CounterError::Exhausted));
    }
}
