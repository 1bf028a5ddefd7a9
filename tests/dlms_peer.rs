//! The simulated DLMS/COSEM meter (tests/dlms/meter.py, on Gurux's gurux-dlms server) proved
//! against an independent client, Gurux's own GXDLMSClient: every object over the TCP
//! wrapper and over HDLC on a pty (two meters on one line) at each security level (lowest,
//! LLS, HLS-GMAC), the load profile whole, by range and by entry against its formula, and
//! each injected fault (tests/dlms/selftest.py). Tests of the DLMS driver lean on this peer:
//! when it breaks, this test says so before they do.

mod common;

use std::path::Path;
use std::process::Command;

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
