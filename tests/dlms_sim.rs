//! amr-edge's own simulated DLMS/COSEM meter (src/sim/dlms/) proved against an independent
//! client, Gurux's GXDLMSClient (tests/dlms/check_sim.py): every register, scaler and unit,
//! the clock, the object list, get-with-list, and the load profile whole, by range and by
//! entry, at each security level over the TCP wrapper, and the refusals. The simulator is
//! what `amr-edge demo` reads; this keeps it from being checked only by our own client.

mod common;

use std::path::Path;
use std::process::Command;

use amr_edge::sim::dlms::{Meter, MeterSpec, spawn_wrapper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gurux_client_should_read_the_rust_simulator_exactly() {
    let venv = common::celery::venv();
    let addr = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv.join("bin/python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dlms/check_sim.py"))
            .arg(addr.port().to_string())
            .output()
            .expect("run tests/dlms/check_sim.py")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_sim.py failed:\n{stdout}\n{stderr}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    eprintln!("check_sim.py: {summary}");
    assert!(
        summary.ends_with(" passed, 0 failed"),
        "check_sim.py ended with {summary:?}"
    );
}
