//! Arbitrary bytes, in arbitrary chunks, into the IEC 62056-21 decoder and the data-set parser.
//! Checks: no panic; memory bounded by the frame limit; every identification, request and
//! option select the decoder accepts encodes back to bytes that decode to the same frame; a
//! data message that parses as a readout, or as a load profile answer (`R5` `P.01`),
//! survives writing and parsing again.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/meter/iec62056_21/codec.rs"]
mod codec;
#[allow(dead_code)]
#[path = "../../src/meter/iec62056_21/dataset.rs"]
mod dataset;
#[allow(dead_code)]
#[path = "../../src/meter/iec62056_21/profile.rs"]
mod profile;

use codec::{Decoder, Frame};

const MAX_BLOCK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so one input is fed in pieces as a port delivers it.
    let (step, bytes) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 64).max(1), rest),
        None => (1, data),
    };
    let mut d = Decoder::new(MAX_BLOCK);
    for chunk in bytes.chunks(step) {
        for frame in d.feed(chunk) {
            check(frame);
        }
        assert!(d.buffered() <= MAX_BLOCK + 1);
    }
});

fn check(frame: Result<Frame, codec::DecodeError>) {
    let encoded = match &frame {
        Ok(Frame::Identification(id)) => codec::identification(id),
        Ok(Frame::Request { address }) => codec::request(Some(address)),
        Ok(Frame::OptionSelect {
            protocol,
            baud,
            mode,
        }) => codec::option_select(*protocol, *baud, *mode),
        Ok(Frame::Data {
            text,
            complete: true,
        }) => {
            if let Ok(sets) = dataset::parse_readout(text) {
                let again = dataset::write_readout(&sets);
                assert_eq!(dataset::parse_readout(&again).as_ref(), Ok(&sets));
            }
            if let Ok(p) = profile::parse(text) {
                let again = profile::write(&p);
                assert_eq!(profile::parse(&again), Ok(p));
            }
            codec::data_message(text.as_bytes())
        }
        _ => return,
    };
    let back = Decoder::new(MAX_BLOCK).feed(&encoded);
    assert_eq!(back.as_slice(), std::slice::from_ref(&frame), "{encoded:?}");
}
