//! Arbitrary bytes, in arbitrary chunks, into the DLMS/COSEM decoders: the HDLC and wrapper
//! splitters, A-XDR data, the answer APDUs and AARE, the HDLC negotiation parameters.
//! Checks: no panic; the splitters' memory stays bounded by what was fed; every frame and
//! APDU the splitters accept encodes back to bytes that split to the same thing; decoded
//! data encodes to bytes that decode to the same encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod dlms;

use dlms::{apdu, axdr, hdlc, wrapper};

fuzz_target!(|data: &[u8]| {
    let (step, bytes) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 64).max(1), rest),
        None => (1, data),
    };

    let mut frames = hdlc::Splitter::new();
    let mut apdus = wrapper::Splitter::new(4096);
    for chunk in bytes.chunks(step) {
        frames.push(chunk);
        while let Some(r) = frames.next_frame() {
            if let Ok(f) = r {
                let mut again = hdlc::Splitter::new();
                again.push(&f.encode());
                assert_eq!(again.next_frame(), Some(Ok(f.clone())));
                let _ = hdlc::Parameters::decode(&f.info);
            }
        }
        assert!(frames.buffered() <= bytes.len());
        apdus.push(chunk);
        while let Some(r) = apdus.next_apdu() {
            if let Ok(w) = r {
                let mut again = wrapper::Splitter::new(4096);
                again.push(&wrapper::encode(w.source, w.destination, &w.apdu));
                assert_eq!(again.next_apdu(), Some(Ok(w.clone())));
                let _ = apdu::Response::decode(&w.apdu);
            }
        }
    }

    if let Ok(d) = axdr::Data::from_bytes(bytes) {
        let encoded = d.to_bytes();
        let back = axdr::Data::from_bytes(&encoded).expect("re-encoded data decodes");
        assert_eq!(back.to_bytes(), encoded);
        if let Some(dt) = d.as_date_time() {
            let _ = dt.to_timestamp(&jiff::tz::TimeZone::UTC);
        }
    }
    let _ = apdu::Response::decode(bytes);
    let _ = apdu::Aare::decode(bytes);
    let _ = apdu::InitiateResponse::decode(bytes);
    let _ = apdu::decode_result_list(bytes);
    let _ = hdlc::Parameters::decode(bytes);
});
