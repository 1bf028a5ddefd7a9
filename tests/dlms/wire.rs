//! A TCP proxy in front of a wrapper meter that counts what crosses it: each APDU the client
//! sends (one round trip each, as every one is answered), its tag, and the bytes each way;
//! and a DLMS meter on a wrapper bus, resolved as the agent resolves it, to read through it.
//! Shared by the round-trip tests (tests/dlms_sim.rs) and the bench (benches/dlms.rs):
//!
//! ```ignore
//! #[path = "dlms/wire.rs"]
//! mod wire;
//! ```
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use amr_edge::bus::{Bus, BusConfig};
use amr_edge::meter::dlms::wrapper;
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::meter::{Meter, MeterConfig, Resolver};
use amr_edge::primitives::Problems;
use jiff::tz::TimeZone;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// AARQ, RLRQ, get-request, glo-get-request (ciphered), glo-action-request (HLS pass 3).
pub const AARQ: u8 = 0x60;
pub const RLRQ: u8 = 0x62;
pub const GET: u8 = 0xC0;
pub const GLO_GET: u8 = 0xC8;
pub const GLO_ACTION: u8 = 0xCB;

#[derive(Default, Debug, Clone)]
pub struct Wire {
    /// The first byte of each APDU the client sent, in order.
    pub tags: Vec<u8>,
    pub to_meter: u64,
    pub from_meter: u64,
}

impl Wire {
    /// APDUs the client sent: each one is answered, so one round trip each.
    pub fn round_trips(&self) -> usize {
        self.tags.len()
    }
}

/// A proxy on loopback in front of `target`, and what it counts (reset it between reads).
pub async fn counting_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Wire>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Arc::new(Mutex::new(Wire::default()));
    let w = wire.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(meter) = TcpStream::connect(target).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut mr, mut mw) = meter.into_split();
            let up = w.clone();
            tokio::spawn(async move {
                let mut split = wrapper::Splitter::new(1 << 16);
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    split.push(&buf[..n]);
                    {
                        let mut g = up.lock().unwrap();
                        while let Some(Ok(w)) = split.next_apdu() {
                            g.tags.push(w.apdu.first().copied().unwrap_or(0));
                        }
                        g.to_meter += n as u64;
                    }
                    if mw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let down = w.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = mr.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    down.lock().unwrap().from_meter += n as u64;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, wire)
}

/// Meter `id` (`dlms = { dlms }`, `reads = { quarterly = reads }`) on a wrapper bus to
/// `127.0.0.1:port`, its counter and object list under `data_dir`.
pub fn meter(port: u16, id: &str, dlms: &str, reads: &str, data_dir: &Path) -> (Bus, Meter) {
    let bus: BusConfig = toml::from_str(&format!(
        "name = \"lan\"\ntcp = {{ host = \"127.0.0.1\", port = {port} }}\ntimeout = \"3s\""
    ))
    .unwrap();
    let m: MeterConfig = toml::from_str(&format!(
        "id = \"{id}\"\nbus = \"lan\"\ndlms = {{ {dlms} }}\nreads = {{ quarterly = {reads} }}"
    ))
    .unwrap();
    let mut p = Problems::default();
    let bus = bus.resolve("bus", &mut p).unwrap();
    let profiles = Profiles::built_in();
    let tz = TimeZone::UTC;
    let mut r = Resolver::new(&profiles, &tz).with_gateway("gw-test", data_dir);
    let m = m
        .resolve("meter[0]", "lan", &bus.link, &mut r, &mut p)
        .unwrap_or_else(|| panic!("{:?}", p.0));
    (bus, m)
}
