//! amr-edge's own simulated DLMS/COSEM meter (src/sim/dlms/) proved against an independent
//! client, Gurux's GXDLMSClient (tests/dlms/check_sim.py): every register, scaler and unit,
//! the clock, the object list, get-with-list, and the load profile whole, by range and by
//! entry, at each security level over the TCP wrapper, and the refusals. The simulator is
//! what `amr-edge demo` reads; this keeps it from being checked only by our own client.
//!
//! And the round-trip budgets against that simulator, counted on the wire: a register poll
//! after the first is association + one GET + release (issue #13); a day of quarter-hour
//! profile rows after the first read is association + the buffer GET and its two blocks +
//! release (issue #14).

mod common;
#[path = "dlms/wire.rs"]
mod wire;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amr_edge::meter::Request;
use amr_edge::meter::link::Slot;
use amr_edge::reading::{Cadence, Obis};
use amr_edge::sim::dlms::{Meter, MeterSpec, spawn_wrapper};
use wire::{AARQ, GET, GLO_ACTION, GLO_GET, RLRQ};

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

/// One `reads = "all"` poll through the proxy: the APDU tags the client sent.
async fn poll(
    bus: &amr_edge::bus::Bus,
    m: &amr_edge::meter::Meter,
    wire: &std::sync::Mutex<wire::Wire>,
) -> Vec<u8> {
    *wire.lock().unwrap() = wire::Wire::default();
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let req = Request {
        cadence: Cadence::Quarterly,
        series: None,
    };
    let out = m.read(&mut slot, &req, &bus.timing).await;
    drop(slot);
    assert!(out.failure.is_none(), "{:?}", out.failure);
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    // The simulator's 9 registers and its numeric data object (the serial is text).
    assert_eq!(out.values.len(), 10, "{:?}", out.values);
    let energy: Obis = "1-0:1.8.0".parse().unwrap();
    let e = out.values.iter().find(|v| v.series == energy).unwrap();
    assert_eq!(e.unit, "Wh");
    // Let the proxy count the RLRQ.
    tokio::time::sleep(Duration::from_millis(50)).await;
    wire.lock().unwrap().tags.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_after_the_first_should_be_association_one_get_and_release() {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let hls = format!(
        "client = 1, logical = 1, security = \"hls-gmac\", block_key_file = {ek:?}, auth_key_file = {ak:?}"
    );
    for (level, section, association, get) in [
        (
            "public",
            "client = 16, logical = 1".to_owned(),
            vec![AARQ],
            GET,
        ),
        ("HLS-GMAC", hls, vec![AARQ, GLO_ACTION], GLO_GET),
    ] {
        let data = tempfile::tempdir().unwrap();
        let (bus, m) = wire::meter(proxy.port(), "rt", &section, "\"all\"", data.path());
        let once = |gets: usize| {
            let mut v = association.clone();
            v.extend(std::iter::repeat_n(get, gets));
            v.push(RLRQ);
            v
        };
        // The first poll reads the object list, then the values with their scalers.
        assert_eq!(poll(&bus, &m, &wire).await, once(2), "{level}, first poll");
        // Then only the values and the clock, in one GET-with-list.
        assert_eq!(poll(&bus, &m, &wire).await, once(1), "{level}, second poll");
        // A restart (a new meter on the same data dir) finds list and scalers on disk.
        let (bus, m) = wire::meter(proxy.port(), "rt", &section, "\"all\"", data.path());
        assert_eq!(
            poll(&bus, &m, &wire).await,
            once(1),
            "{level}, after a restart"
        );
        // A cache file that does not decode is read again from the meter, with no error.
        let file = data.path().join("dlms/rt.objects");
        std::fs::write(&file, b"{ not the object list").unwrap();
        let (bus, m) = wire::meter(proxy.port(), "rt", &section, "\"all\"", data.path());
        assert_eq!(
            poll(&bus, &m, &wire).await,
            once(2),
            "{level}, cache garbled"
        );
        assert_eq!(
            poll(&bus, &m, &wire).await,
            once(1),
            "{level}, cache rewritten"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_gone_from_the_meter_should_read_list_and_scalers_again() {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let data = tempfile::tempdir().unwrap();
    let section = "client = 16, logical = 1";
    let (bus, m) = wire::meter(proxy.port(), "rt", section, "\"all\"", data.path());
    poll(&bus, &m, &wire).await;
    // The cached list names a register the meter no longer has (a firmware update).
    let file = data.path().join("dlms/rt.objects");
    let mut cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    cache["objects"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "class": 3, "version": 0, "obis": [1, 0, 3, 8, 0, 255],
            "scaler": { "scaler": 0, "unit": 32 }
        }));
    std::fs::write(&file, serde_json::to_vec(&cache).unwrap()).unwrap();
    let (bus, m) = wire::meter(proxy.port(), "rt", section, "\"all\"", data.path());
    // The GET says undefined: the list, then the values with their scalers, no refusal.
    assert_eq!(poll(&bus, &m, &wire).await, [AARQ, GET, GET, GET, RLRQ]);
    assert_eq!(poll(&bus, &m, &wire).await, [AARQ, GET, RLRQ]);
    let cache: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(
        !cache.to_string().contains("[1,0,3,8,0,255]"),
        "the file is rewritten without it: {cache}"
    );
}

/// `[tag, kind]` of a get-request: next block, with list.
const NEXT: [u8; 2] = [GET, 2];
const LIST: [u8; 2] = [GET, 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_reads_after_the_first_should_be_the_buffer_get_and_its_blocks() {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let data = tempfile::tempdir().unwrap();
    let section = "client = 16, logical = 1";
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    // The first read: the header (capture objects and period), the register columns'
    // scalers, then the buffer by range, ~2.5 KB in three blocks of the meter's 1024-byte PDU.
    let (first, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(
        w.tags,
        [AARQ, GET, GET, GET, GET, GET, RLRQ],
        "{}",
        w.apdus()
    );
    assert_eq!(w.heads[1..6], [LIST, LIST, LIST, NEXT, NEXT]);
    // Then the buffer alone (with the meter's clock in the same GET, a list, for the clock
    // check): association, one GET and its two blocks, release.
    let (warm, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(w.tags, [AARQ, GET, GET, GET, RLRQ], "{}", w.apdus());
    assert_eq!(w.heads[1..4], [LIST, NEXT, NEXT]);
    assert_eq!(warm, first, "the cached header decodes the same rows");
    // A restart finds the header on disk, beside the object list.
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    let (_, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(
        w.tags,
        [AARQ, GET, GET, GET, RLRQ],
        "after a restart: {}",
        w.apdus()
    );
    // A register poll rewrites the file with the list; the profile's header stays in it.
    poll(&bus, &m, &wire).await;
    let (_, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(
        w.tags,
        [AARQ, GET, GET, GET, RLRQ],
        "after a poll: {}",
        w.apdus()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_do_not_fit_the_cached_columns_should_read_the_header_again() {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let data = tempfile::tempdir().unwrap();
    let section = "client = 16, logical = 1";
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    let (first, _) = wire::read_day(&bus, &m, &wire).await;
    // The cached header lost a column (the meter was reconfigured since it was read).
    let file = data.path().join("dlms/lp.objects");
    let mut cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let p = &mut cache["profiles"][0];
    p["columns"].as_array_mut().unwrap().pop();
    p["scalers"].as_array_mut().unwrap().pop();
    std::fs::write(&file, serde_json::to_vec(&cache).unwrap()).unwrap();
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    // The buffer, then the header and scalers in the same association; the same buffer is
    // decoded with them (not read again).
    let (rows, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(
        w.heads[1..6],
        [LIST, NEXT, NEXT, LIST, LIST],
        "{}",
        w.apdus()
    );
    assert_eq!(w.tags.last(), Some(&RLRQ));
    assert_eq!(rows, first);
    // The file has the meter's header again.
    let (_, w) = wire::read_day(&bus, &m, &wire).await;
    assert_eq!(w.tags, [AARQ, GET, GET, GET, RLRQ], "{}", w.apdus());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_profile_the_meter_no_longer_has_should_read_its_header_and_be_forgotten() {
    let sim = spawn_wrapper(Meter::new(MeterSpec::new(17))).await.unwrap();
    let (proxy, wire) = wire::counting_proxy(sim).await;
    let data = tempfile::tempdir().unwrap();
    let section = "client = 16, logical = 1";
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    wire::read_day(&bus, &m, &wire).await;
    // The cached header is filed under a profile the meter does not have (gone with a
    // firmware update).
    let file = data.path().join("dlms/lp.objects");
    let mut cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    cache["profiles"][0]["obis"] = serde_json::json!([1, 0, 99, 2, 0, 255]);
    std::fs::write(&file, serde_json::to_vec(&cache).unwrap()).unwrap();
    let (bus, m) = wire::meter(proxy.port(), "lp", section, "\"all\"", data.path());
    *wire.lock().unwrap() = wire::Wire::default();
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let now = jiff::Timestamp::now();
    let request = amr_edge::meter::rows::RowsRequest {
        profile: "1-0:99.2.0".parse().unwrap(),
        from: now - jiff::SignedDuration::from_hours(1),
        to: now,
    };
    let r = m.read_rows(&mut slot, &request, &bus.timing).await;
    drop(slot);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The buffer is undefined: the header is read again, and refused too.
    assert!(
        matches!(r, Err(amr_edge::meter::Failure::Refused(_))),
        "{r:?}"
    );
    let w = wire.lock().unwrap().clone();
    assert_eq!(w.heads[1..], [LIST, LIST], "{}", w.apdus());
    let cache: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(cache.get("profiles").is_none(), "forgotten: {cache}");
}
