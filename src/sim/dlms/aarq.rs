//! The AARQ as the simulated meter reads it: its BER-coded fields.

#[allow(unused_imports)]
use super::*;

fn tlvs(body: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while !r.is_empty() {
        let tag = r.u8().ok()?;
        let n = r.length().ok()?;
        out.push((tag, r.take(n).ok()?));
    }
    Some(out)
}

/// An AARQ as the meter reads it.
#[derive(Debug, Default)]
pub(super) struct Aarq {
    pub(super) context: u8,
    pub(super) calling_title: Option<[u8; 8]>,
    pub(super) mechanism: u8,
    pub(super) authentication_value: Option<Vec<u8>>,
    pub(super) user_information: Vec<u8>,
}

impl Aarq {
    pub(super) fn decode(b: &[u8]) -> Option<Aarq> {
        let mut r = Reader::new(b);
        if r.u8().ok()? != 0x60 {
            return None;
        }
        let n = r.length().ok()?;
        let mut aarq = Aarq::default();
        for (tag, v) in tlvs(r.take(n).ok()?)? {
            match tag {
                0xA1 => aarq.context = *v.last()?,
                0xA6 => {
                    let (_, t) = *tlvs(v)?.first()?;
                    aarq.calling_title = t.try_into().ok();
                }
                0x8B => aarq.mechanism = *v.last()?,
                0xAC => aarq.authentication_value = Some(tlvs(v)?.first()?.1.to_vec()),
                0xBE => aarq.user_information = tlvs(v)?.first()?.1.to_vec(),
                _ => {}
            }
        }
        Some(aarq)
    }
}

pub(super) fn reject(result: u8, diagnostic: Diagnostic, context: u8) -> Vec<u8> {
    Aare {
        context,
        result,
        diagnostic,
        responding_ap_title: None,
        mechanism: None,
        authentication_value: None,
        // ConfirmedServiceError: initiate, initiate error, other.
        user_information: Some(vec![0x0E, 0x01, 0x06, 0x00]),
    }
    .encode()
}
