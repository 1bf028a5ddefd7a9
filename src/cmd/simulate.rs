//! `amr-edge simulate`: serve simulated Modbus, DLMS/COSEM, M-Bus and IEC 62056-21 meters, to
//! test a gateway's path to the centre without meters, or to load an agent in a benchmark.
//! Runs until Ctrl-C.
//!
//! What it serves is said on stderr, for people. The pseudo-terminals it opens itself
//! (`--mbus-pty`, `--iec-pty`, `--dlms-hdlc-pty`) are also printed on stdout, one line each,
//! for scripts and benchmarks: the kind, the slave side's path, then `key=value` fields,
//! lists comma-separated:
//!
//! ```text
//! mbus-pty /dev/pts/3 baud=2400 parity=even primary=1-8 secondary=00471104,…
//! iec-pty /dev/pts/4 max_baud=9600 addresses=70000001,70000002
//! dlms-hdlc-pty /dev/pts/5 baud=9600 physical=17,18
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::{Arc, Mutex};

use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::iec::{Clock, SimBus, SimMeter};
use amr_edge::sim::mbus::Segment;
use amr_edge::sim::modbus::{Meters, Unit, serve_rtu, serve_tcp};
use amr_edge::sim::{dlms, iec, mbus};
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
    /// Serve the --dlms-physical meters over HDLC on a pseudo-terminal of their own, at
    /// 9600 Bd, as --dlms-hdlc does on a device (repeatable: a pty each).
    #[arg(long, action = clap::ArgAction::Count)]
    dlms_hdlc_pty: u8,
    /// HDLC physical addresses of the DLMS meters (the wrapper meter uses the first).
    #[arg(long, default_value = "17")]
    dlms_physical: String,
    /// Serve this many simulated M-Bus heat meters on a pseudo-terminal of their own, a
    /// segment at 2400 8E1 taking the line's time: primary addresses 1 to N, each meter its
    /// own secondary address (repeatable: a segment and a pty each).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=250))]
    mbus_pty: Vec<u8>,
    /// Serve this many simulated IEC 62056-21 meters (Landis+Gyr-like) on a pseudo-terminal
    /// of their own, each answering its own device address, signed on at 300 Bd and read at
    /// 9600 Bd, taking the line's time (repeatable: a line and a pty each).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=32))]
    iec_pty: Vec<u8>,
}

/// `1-8` for 1 to 8.
fn range(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// `--mbus-pty N` number `line`: heat meters at primary 1 to `n`, with secondary addresses
/// drawn from a seed of the line's number (so the same command serves the same meters).
fn mbus_segment(line: usize, n: u8) -> Segment {
    let mut segment = Segment::many(usize::from(n), 0x6d62_7573 + line as u64);
    for (slave, primary) in segment.slaves.iter_mut().zip(1u8..) {
        slave.primary = primary;
    }
    segment.wire_baud = Some(2400);
    segment
}

/// `--iec-pty N` number `line`: device addresses `7LLLNNNN` (line, meter, from 1), each
/// meter's serial number its address.
fn iec_addresses(line: usize, n: u8) -> Vec<String> {
    (1..=u32::from(n))
        .map(|m| format!("7{:03}{m:04}", line + 1))
        .collect()
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
    if physical.is_empty() {
        anyhow::bail!("--dlms-physical {}: no address", args.dlms_physical);
    }
    if let Some(p) = physical.iter().find(|p| **p < 16) {
        anyhow::bail!(
            "--dlms-physical {}: {p} is not a physical address (HDLC's are 16 and up; below are reserved)",
            args.dlms_physical
        );
    }
    if args.tcp.is_empty()
        && args.serial.is_empty()
        && args.dlms_wrapper.is_empty()
        && args.dlms_hdlc.is_empty()
        && args.dlms_hdlc_pty == 0
        && args.mbus_pty.is_empty()
        && args.iec_pty.is_empty()
    {
        anyhow::bail!(
            "nothing to serve: give --tcp ADDRESS, --serial DEVICE, --dlms-wrapper ADDRESS, --dlms-hdlc DEVICE, --dlms-hdlc-pty, --mbus-pty N or --iec-pty N"
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
    // The ptys' simulators run on threads of their own until these are dropped, at the end.
    let mut ptys: Vec<Box<dyn std::any::Any>> = Vec::new();
    let physical_list = physical
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for _ in 0..args.dlms_hdlc_pty {
        let pty = dlms::spawn_hdlc_pty(dlms.clone())
            .map_err(|e| anyhow::anyhow!("--dlms-hdlc-pty: cannot open a pty: {e}"))?;
        let path = pty.path().display().to_string();
        eprintln!(
            "serving {} DLMS/COSEM meter(s) on HDLC {path} (a pty, 9600 Bd; physical {physical_list})",
            dlms.len()
        );
        println!("dlms-hdlc-pty {path} baud=9600 physical={physical_list}");
        ptys.push(Box::new(pty));
    }
    for (line, n) in args.mbus_pty.iter().enumerate() {
        let segment = mbus_segment(line, *n);
        let secondary: Vec<String> = segment
            .slaves
            .iter()
            .map(|s| s.identity.id_string())
            .collect();
        let pty = mbus::spawn_pty(Arc::new(Mutex::new(segment)))
            .map_err(|e| anyhow::anyhow!("--mbus-pty {n}: cannot open a pty: {e}"))?;
        let path = pty
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        eprintln!(
            "serving {n} M-Bus heat meter(s) on {path} (a pty, 2400 8E1, at the line's pace): primary {}, secondary {}",
            range(1, u64::from(*n)),
            secondary.join(",")
        );
        println!(
            "mbus-pty {path} baud=2400 parity=even primary={} secondary={}",
            range(1, u64::from(*n)),
            secondary.join(",")
        );
        ptys.push(Box::new(pty));
    }
    for (line, n) in args.iec_pty.iter().enumerate() {
        let addresses = iec_addresses(line, *n);
        let bus = SimBus::new();
        bus.set_wire_time(true);
        for a in &addresses {
            let mut m = SimMeter::landis_gyr(Some(a), a);
            m.clock = Some(Clock::Live(jiff::tz::TimeZone::UTC));
            m.energy_rate = args.energy_rate;
            bus.add(m);
        }
        let pty = iec::spawn_pty(bus)
            .map_err(|e| anyhow::anyhow!("--iec-pty {n}: cannot open a pty: {e}"))?;
        let path = pty.path().display().to_string();
        eprintln!(
            "serving {n} IEC 62056-21 meter(s) on {path} (a pty, 300 then 9600 Bd, at the line's pace): addresses {}",
            addresses.join(",")
        );
        println!(
            "iec-pty {path} max_baud=9600 addresses={}",
            addresses.join(",")
        );
        ptys.push(Box::new(pty));
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
    drop(ptys);
    Ok(ExitCode::SUCCESS)
}
