//! `amr-edge scan --config FILE METER`: a DLMS meter's object list, for commissioning.

use std::path::PathBuf;
use std::process::ExitCode;

use amr_edge::lock::DirLock;
use amr_edge::meter::Protocol;
use amr_edge::meter::link::Slot;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// The meter (a DLMS meter's id from the config).
    meter: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = super::load(&args.config)?;
    let _lock = DirLock::acquire(&config.gateway.data_dir)
        .map_err(|e| anyhow::anyhow!("{e}\n(the running agent owns the buses)"))?;
    let Some(meter) = config.meters.iter().find(|m| m.id == args.meter) else {
        anyhow::bail!("no meter `{}` in {}", args.meter, args.config.display());
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
