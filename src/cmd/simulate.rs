//! `amr-edge simulate`: serve simulated Modbus and DLMS/COSEM meters, to test a gateway's path
//! to the centre without meters, or to load an agent in a benchmark. Runs until Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::dlms;
use amr_edge::sim::modbus::{Meters, Unit, serve_rtu, serve_tcp};
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct Args {
    /// Serve Modbus TCP on this address (repeatable).
    #[arg(long)]
    tcp: Vec<String>,
    /// Serve Modbus RTU on this serial device (repeatable).
    #[arg(long)]
    serial: Vec<PathBuf>,
    /// Unit ids, e.g. `1-250` or `1,2,7`.
    #[arg(long, default_value = "1")]
    units: String,
    /// The register map every unit holds (a built-in profile or one from --profile-file).
    #[arg(long, default_value = "eastron-sdm630")]
    profile: String,
    /// Extra profile files.
    #[arg(long)]
    profile_file: Vec<PathBuf>,
    /// kWh added per second to energy registers.
    #[arg(long, default_value_t = 0.0)]
    energy_rate: f64,
    /// Serve a simulated DLMS/COSEM meter over the IEC 62056-47 wrapper on this address
    /// (repeatable; port 4059 is the standard's).
    #[arg(long)]
    dlms_wrapper: Vec<String>,
    /// Serve simulated DLMS/COSEM meters over HDLC on this serial device (repeatable), one per
    /// --dlms-physical address.
    #[arg(long)]
    dlms_hdlc: Vec<PathBuf>,
    /// HDLC physical addresses of the DLMS meters (the wrapper meter uses the first).
    #[arg(long, default_value = "17")]
    dlms_physical: String,
}

fn parse_units(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.trim().parse::<u8>()?..=b.trim().parse::<u8>()?),
            None => out.push(part.trim().parse()?),
        }
    }
    Ok(out)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profiles = Profiles::load(&args.profile_file)?;
    let profile = profiles
        .get(&args.profile)
        .ok_or_else(|| anyhow::anyhow!("no profile `{}`", args.profile))?
        .clone();
    let units =
        parse_units(&args.units).map_err(|e| anyhow::anyhow!("--units {}: {e}", args.units))?;
    let physical: Vec<u16> = parse_units(&args.dlms_physical)
        .map_err(|e| anyhow::anyhow!("--dlms-physical {}: {e}", args.dlms_physical))?
        .into_iter()
        .map(u16::from)
        .collect();
    if args.tcp.is_empty()
        && args.serial.is_empty()
        && args.dlms_wrapper.is_empty()
        && args.dlms_hdlc.is_empty()
    {
        anyhow::bail!(
            "nothing to serve: give --tcp ADDRESS, --serial DEVICE, --dlms-wrapper ADDRESS or --dlms-hdlc DEVICE"
        );
    }
    let dlms: Vec<dlms::Meter> = physical
        .iter()
        .map(|p| dlms::Meter::new(dlms::MeterSpec::new(*p)))
        .collect();
    for addr in &args.dlms_wrapper {
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "serving a DLMS/COSEM meter (physical {}) on the wrapper {}: SAP 16 public, 17 LLS, 1 HLS-GMAC",
            physical[0],
            listener.local_addr()?
        );
        tokio::spawn(dlms::serve_wrapper(listener, dlms[0].clone()));
    }
    for dev in &args.dlms_hdlc {
        let port =
            tokio_serial::SerialStream::open(&tokio_serial::new(dev.to_string_lossy(), 9600))?;
        eprintln!(
            "serving {} DLMS/COSEM meter(s) on HDLC {} (physical {:?})",
            dlms.len(),
            dev.display(),
            physical
        );
        tokio::spawn(dlms::serve_hdlc(port, dlms.clone()));
    }
    let meters = Meters::new();
    for u in &units {
        let mut unit = Unit::new(profile.clone());
        unit.energy_rate = args.energy_rate;
        meters.insert(*u, unit);
    }
    for addr in &args.tcp {
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "serving {} {} meter(s) on Modbus TCP {}",
            units.len(),
            profile.name,
            listener.local_addr()?
        );
        tokio::spawn(serve_tcp(listener, meters.clone()));
    }
    for dev in &args.serial {
        let port =
            tokio_serial::SerialStream::open(&tokio_serial::new(dev.to_string_lossy(), 9600))?;
        eprintln!(
            "serving {} {} meter(s) on Modbus RTU {}",
            units.len(),
            profile.name,
            dev.display()
        );
        tokio::spawn(serve_rtu(port, meters.clone()));
    }
    tokio::signal::ctrl_c().await?;
    eprintln!("answered {} requests", meters.requests());
    Ok(ExitCode::SUCCESS)
}
