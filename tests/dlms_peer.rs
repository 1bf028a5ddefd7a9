//! The simulated DLMS/COSEM meter (tests/dlms/meter.py, on Gurux's gurux-dlms server) proved
//! against an independent client, Gurux's own GXDLMSClient: every object over the TCP
//! wrapper and over HDLC on a pty (two meters on one line) at each security level (lowest,
//! LLS, HLS-GMAC), the load profile whole, by range and by entry against its formula, and
//! each injected fault (tests/dlms/selftest.py). Tests of the DLMS driver lean on this peer:
//! when it breaks, this test says so before they do.

mod common;
#[path = "dlms/peer.rs"]
mod dlms_peer;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dlms_peer::DlmsMeter;

#[test]
fn gurux_client_should_read_every_object_of_the_simulated_meter_exactly() {
    let venv = common::celery::venv();
    let out = Command::new(venv.join("bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dlms/selftest.py"))
        .output()
        .expect("run tests/dlms/selftest.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "selftest.py failed (socat installed?):\n{stdout}\n{stderr}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.ends_with(" passed, 0 failed"),
        "selftest.py ended with {summary:?}"
    );
}

/// One APDU over the wrapper from the public client (wPort 16) to the management logical
/// device (wPort 1), and the APDU of the answer.
fn exchange(stream: &mut TcpStream, apdu: &[u8]) -> Vec<u8> {
    let mut frame = vec![0, 1, 0, 16, 0, 1];
    frame.extend_from_slice(&(apdu.len() as u16).to_be_bytes());
    frame.extend_from_slice(apdu);
    stream.write_all(&frame).unwrap();
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(&header[..6], &[0, 1, 0, 1, 0, 16], "wrapper header");
    let mut reply = vec![0; u16::from_be_bytes([header[6], header[7]]) as usize];
    stream.read_exact(&mut reply).unwrap();
    reply
}

#[test]
fn wrapper_meter_should_serve_what_its_dump_says_to_a_rust_test() {
    let meter = DlmsMeter::start(&["--wrapper", "--port", "0"]);
    let dump = DlmsMeter::dump(&[]);
    let import = dump["meters"][0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["obis"] == "1-0:1.8.0.255")
        .unwrap()["attributes"]["2"]["value"]
        .as_u64()
        .unwrap() as u32;
    let mut stream = TcpStream::connect(("127.0.0.1", meter.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // AARQ: LN referencing, no security, conformance get + selective access + block transfer.
    let aarq = [
        0x60, 0x1d, 0xa1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xbe, 0x10,
        0x04, 0x0e, 0x01, 0x00, 0x00, 0x00, 0x06, 0x5f, 0x1f, 0x04, 0x00, 0x40, 0x1e, 0x5d, 0xff,
        0xff,
    ];
    let aare = exchange(&mut stream, &aarq);
    assert_eq!(aare[0], 0x61, "an AARE: {aare:02x?}");
    assert!(
        aare.windows(5).any(|w| w == [0xa2, 0x03, 0x02, 0x01, 0x00]),
        "association accepted: {aare:02x?}"
    );
    // get-request-normal 1-0:1.8.0.255 (register) attribute 2
    let get = [0xc0, 0x01, 0xc1, 0x00, 0x03, 1, 0, 1, 8, 0, 255, 0x02, 0x00];
    let mut want = vec![0xc4, 0x01, 0xc1, 0x00, 0x06];
    want.extend_from_slice(&import.to_be_bytes());
    assert_eq!(exchange(&mut stream, &get), want);
}
