//! Arbitrary bytes into the M-Bus link-layer splitter and the EN 13757-3 decoder, as a port
//! delivers them. Checks: no panic; the splitter always makes progress (a frame, more input,
//! or bytes to skip); every frame it accepts parses; every record of a telegram that decodes
//! yields a value, a unit and a series, and its number converts to a decimal.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/reading.rs"]
mod reading;

/// The sans-IO part of `src/meter/mbus/`, compiled from its files (see Cargo.toml); the
/// mask type is all `link` needs from the module root.
#[allow(dead_code)]
mod mbus {
    #[path = "../../../src/meter/mbus/app.rs"]
    pub mod app;
    #[path = "../../../src/meter/mbus/link.rs"]
    pub mod link;
    #[path = "../../../src/meter/mbus/series.rs"]
    pub mod series;
    #[path = "../../../src/meter/mbus/vif.rs"]
    pub mod vif;
    pub use app::Identity;
    pub struct SecondaryMask;
    impl SecondaryMask {
        pub fn to_bytes(&self) -> [u8; 8] {
            [0xFF; 8]
        }
    }
}

use mbus::link::{self, Split};
use mbus::{app, series};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match link::split(&data[at..]) {
            Split::Frame(n) => {
                assert!(n > 0);
                let frame = &data[at..at + n];
                assert!(link::parse(frame).is_ok());
                decode(frame);
                at += n;
            }
            Split::Invalid { skip, .. } => {
                assert!(skip > 0);
                at += skip;
            }
            Split::Incomplete { need } => {
                assert!(need > data.len() - at);
                break;
            }
        }
    }
    // The bytes as user data under each CI, skipping the link layer's checksum.
    if let Some((ci, rest)) = data.split_first() {
        if let Ok(t) = app::Telegram::parse(*ci, rest) {
            walk(&t);
        }
    }
});

fn decode(frame: &[u8]) {
    if let Ok(t) = app::decode(frame) {
        walk(&t);
    }
}

fn walk(t: &app::Telegram<'_>) {
    let medium = t.identity().map(|i| i.medium);
    for r in t.records() {
        let v = r.value();
        let _ = v.to_decimal();
        let _ = v.text();
        if let app::Value::Time(dt) = v {
            let _ = dt.civil();
            let _ = dt.to_string();
        }
        let _ = r.unit.to_string();
        let _ = series::series(&r, medium);
    }
    let _ = series::values([*t], &series::Overrides::default());
}
