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
    /// Its first two bytes: for a plain get-request (0xC0) the tag and the kind, 1 normal,
    /// 2 next (a block of a long answer), 3 with list.
    pub heads: Vec<[u8; 2]>,
    pub to_meter: u64,
    pub from_meter: u64,
}

impl Wire {
    /// APDUs the client sent: each one is answered, so one round trip each.
    pub fn round_trips(&self) -> usize {
        self.tags.len()
    }

    /// The GETs among them (plain or ciphered, blocks included).
    pub fn gets(&self) -> usize {
        self.tags
            .iter()
            .filter(|t| [GET, GLO_GET].contains(t))
            .count()
    }

    /// The APDUs by tag, runs counted: `AARQ, GET ×3, RLRQ`.
    pub fn apdus(&self) -> String {
        let name = |t: u8| match t {
            AARQ => "AARQ".to_owned(),
            RLRQ => "RLRQ".to_owned(),
            GET => "GET".to_owned(),
            GLO_GET => "glo-GET".to_owned(),
            GLO_ACTION => "glo-ACTION".to_owned(),
            t => format!("0x{t:02X}"),
        };
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < self.tags.len() {
            let n = self.tags[i..]
                .iter()
                .take_while(|t| **t == self.tags[i])
                .count();
            out.push(if n > 1 {
                format!("{} ×{n}", name(self.tags[i]))
            } else {
                name(self.tags[i])
            });
            i += n;
        }
        out.join(", ")
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
                            let head = [
                                w.apdu.first().copied().unwrap_or(0),
                                w.apdu.get(1).copied().unwrap_or(0),
                            ];
                            g.tags.push(head[0]);
                            g.heads.push(head);
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

/// Yesterday's 96 quarter-hour rows (UTC, 00:00 to 23:45) of the simulator's load profile
/// (1-0:99.1.0), read through the proxy as the bus reads rows: the rows, and what crossed.
pub async fn read_day(
    bus: &Bus,
    m: &Meter,
    wire: &Mutex<Wire>,
) -> (amr_edge::meter::rows::Rows, Wire) {
    use amr_edge::meter::link::Slot;
    use amr_edge::meter::rows::RowsRequest;
    use amr_edge::reading::Obis;
    let day = 86_400;
    let today = jiff::Timestamp::now().as_second().div_euclid(day) * day;
    let request = RowsRequest {
        profile: Obis(amr_edge::sim::dlms::PROFILE_OBIS),
        from: jiff::Timestamp::from_second(today - day).unwrap(),
        to: jiff::Timestamp::from_second(today - 900).unwrap(),
    };
    *wire.lock().unwrap() = Wire::default();
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let rows = m.read_rows(&mut slot, &request, &bus.timing).await;
    drop(slot);
    let rows = rows.unwrap_or_else(|f| panic!("profile read failed: {f:?}"));
    assert_eq!(rows.rows.len(), 96, "one day of quarter hours");
    assert!(
        rows.rows.iter().all(|r| r.values.len() == 2),
        "{:?}",
        rows.rows[0]
    );
    assert_eq!(rows.unmapped, 0);
    // Let the proxy count the RLRQ.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let w = wire.lock().unwrap().clone();
    (rows, w)
}
