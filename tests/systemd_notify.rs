//! The agent under a fake systemd: `NOTIFY_SOCKET` is a datagram socket of the test and
//! `WATCHDOG_USEC` asks for a watchdog. The demo (simulated meters, no broker) must say
//! `READY=1` once it runs, feed the watchdog at half the interval while its liveness probe
//! passes, and say `STOPPING=1` before it exits.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_under_systemd_should_notify_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");

    let mut agent = Command::new(env!("CARGO_BIN_EXE_amr-edge"))
        .args(["demo", "--for", "4s", "--every", "1s", "--data-dir"])
        .arg(dir.path().join("data"))
        // Nothing listens on port 1: the demo buffers and never drains.
        .args(["--amqp", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start amr-edge demo");

    let started = Instant::now();
    let mut messages: Vec<(Duration, String)> = Vec::new();
    let mut buf = [0u8; 4096];
    let status = loop {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            for line in text.lines() {
                messages.push((started.elapsed(), line.to_owned()));
            }
        }
        if let Some(status) = agent.try_wait().expect("wait for the agent") {
            // Whatever was sent just before the exit.
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                messages.extend(text.lines().map(|l| (started.elapsed(), l.to_owned())));
            }
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = agent.kill();
            panic!("the demo did not stop by itself; notifications so far: {messages:?}");
        }
    };
    assert!(status.success(), "demo exited with {status}");

    let states: Vec<&str> = messages.iter().map(|(_, m)| m.as_str()).collect();
    let ready = states.iter().position(|m| *m == "READY=1");
    let stopping = states.iter().position(|m| *m == "STOPPING=1");
    let pings = states.iter().filter(|m| **m == "WATCHDOG=1").count();
    assert!(ready.is_some(), "no READY=1 in {states:?}");
    assert!(stopping.is_some(), "no STOPPING=1 in {states:?}");
    assert!(ready < stopping, "READY=1 after STOPPING=1: {states:?}");
    // 4 s with a 1 s watchdog: a ping every 0.5 s, the first at once.
    assert!(
        pings >= 5,
        "only {pings} watchdog pings in 4 s: {messages:?}"
    );
    let last_ping = states.iter().rposition(|m| *m == "WATCHDOG=1");
    assert!(
        last_ping < stopping,
        "a watchdog ping after STOPPING=1: {states:?}"
    );
}
