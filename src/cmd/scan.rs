//! `amr-edge scan --config FILE --bus NAME [--primary | --secondary]`: finds the M-Bus meters
//! on a serial bus and prints each as a ready `[[meter]]` block.
//!
//! The meter argument is optional and positional so that a per-meter scan (`scan METER`, for
//! DLMS) fits beside the bus scan.

use std::path::PathBuf;
use std::process::ExitCode;

use amr_edge::lock::DirLock;
use amr_edge::meter::link::{Link, open_serial};
use amr_edge::meter::mbus::scan::{Collision, Mode, Scan, ScanConfig};
use amr_edge::meter::mbus::{SecondaryMask, Timing, transport};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// The serial bus to scan for M-Bus meters.
    #[arg(long)]
    bus: Option<String>,
    /// Probe primary addresses 0-250 (the default).
    #[arg(long, conflicts_with = "secondary")]
    primary: bool,
    /// The secondary-address wildcard search (meters sharing a primary address).
    #[arg(long)]
    secondary: bool,
    /// A meter to scan (a protocol's per-meter scan); none: scan `--bus`.
    meter: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = super::load(&args.config)?;
    if let Some(m) = &args.meter {
        anyhow::bail!("no per-meter scan for `{m}`: scan an M-Bus bus with `--bus NAME`");
    }
    let Some(name) = &args.bus else {
        anyhow::bail!("name the bus to scan: `--bus NAME`");
    };
    let Some(bus) = config.buses.iter().find(|b| &b.name == name) else {
        anyhow::bail!("no bus `{name}` in {}", args.config.display());
    };
    let Link::Serial(serial) = &bus.link else {
        anyhow::bail!("bus `{name}` is a TCP bus; M-Bus scans need a serial bus");
    };
    // The agent owns the ports while it runs.
    let _lock = DirLock::acquire(&config.gateway.data_dir)
        .map_err(|e| anyhow::anyhow!("{e}\n(stop the agent before scanning its buses)"))?;
    let framing = serial.framing();
    let mut port = open_serial(serial, framing).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mode = if args.secondary {
        Mode::Secondary {
            start: SecondaryMask::ANY,
        }
    } else {
        Mode::Primary { from: 0, to: 250 }
    };
    eprintln!(
        "scanning {name} ({} Bd) by {} address…",
        framing.baud,
        if args.secondary {
            "secondary"
        } else {
            "primary"
        }
    );
    let report = transport::scan(
        &mut port,
        Scan::new(ScanConfig {
            mode,
            timing: Timing::new(framing.baud),
            retries: 0,
        }),
    )
    .await?;
    for m in &report.meters {
        println!("{}", m.to_toml(name));
    }
    for c in &report.collisions {
        match c {
            Collision::Primary(a) => {
                eprintln!("several meters answer at primary address {a}: scan with --secondary")
            }
            Collision::Secondary(m) => eprintln!(
                "several meters match secondary {}: they cannot be told apart",
                m.id_string()
            ),
        }
    }
    eprintln!(
        "{} meter(s) found in {} probes",
        report.meters.len(),
        report.probes
    );
    Ok(ExitCode::SUCCESS)
}
