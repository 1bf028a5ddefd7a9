//! `amr-edge scan`, for commissioning:
//!
//! * `scan --config FILE METER`: a DLMS meter's object list (OBIS, class, version).
//! * `scan --config FILE --bus NAME [--primary | --secondary]`: finds the M-Bus meters on a
//!   serial bus and prints each as a ready `[[meter]]` block.

use std::path::PathBuf;
use std::process::ExitCode;

use amr_edge::lock::DirLock;
use amr_edge::meter::Protocol;
use amr_edge::meter::link::{Link, Slot, open_serial};
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
    /// A DLMS meter to scan (its id in the config); none: scan the M-Bus bus `--bus`.
    meter: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = super::load(&args.config)?;
    if let Some(meter) = &args.meter {
        return scan_meter(&config, &args, meter).await;
    }
    let Some(name) = &args.bus else {
        anyhow::bail!("name a DLMS meter to scan, or the M-Bus bus: `--bus NAME`");
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

/// A DLMS meter's object list.
async fn scan_meter(
    config: &amr_edge::config::Config,
    args: &Args,
    name: &str,
) -> anyhow::Result<ExitCode> {
    let _lock = DirLock::acquire(&config.gateway.data_dir)
        .map_err(|e| anyhow::anyhow!("{e}\n(the running agent owns the buses)"))?;
    let Some(meter) = config.meters.iter().find(|m| m.id == name) else {
        anyhow::bail!("no meter `{name}` in {}", args.config.display());
    };
    let Protocol::Dlms(d) = &meter.protocol else {
        anyhow::bail!(
            "`{}` is a {} meter; scan reads DLMS object lists",
            meter.id,
            meter.protocol.name()
        );
    };
    let Some(bus) = config.buses.iter().find(|b| b.name == meter.bus) else {
        anyhow::bail!("no bus `{}`", meter.bus);
    };
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    match d.scan(&mut slot, &bus.timing).await {
        Ok(list) => {
            println!("{:<20} {:>5} {:>7}", "OBIS", "class", "version");
            for e in list {
                println!("{:<20} {:>5} {:>7}", e.obis.to_string(), e.class, e.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            eprintln!("{}: {f}", meter.id);
            Ok(ExitCode::FAILURE)
        }
    }
}
