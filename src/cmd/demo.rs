//! `amr-edge demo`: the whole agent on simulated meters, with no config, hardware or broker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use amr_edge::agent::{self, BeatMode, Options};
use amr_edge::config::{Config, redact_url};
use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::dlms;
use amr_edge::sim::iec::{Clock, SimBus, SimMeter, spawn_pty};
use amr_edge::sim::mbus::Segment;
use amr_edge::sim::modbus::{Meters, Unit, spawn_tcp};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the store here (default: a temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The broker to drain to.
    #[arg(long, default_value = "amqp://guest:guest@localhost:5672/%2f")]
    amqp: String,
    /// The queue to drain to (declared if missing).
    #[arg(long, default_value = "utilitarian.tasks.commits.meter_readings")]
    queue: String,
    /// The queue for system events (declared if missing).
    #[arg(long, default_value = "utilitarian.tasks.commits.meter_system_events")]
    events_queue: String,
    /// How often every meter is read.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profiles = Profiles::built_in();
    let meters = Meters::new();
    for (unit, profile) in [
        (1u8, "eastron-sdm630"),
        (2, "eastron-sdm120"),
        (3, "carlo-gavazzi-em24"),
    ] {
        let mut u = Unit::new(profiles.get(profile).expect("built-in profile").clone());
        // A busy meter in fast forward: 0.5 kWh a second.
        u.energy_rate = 0.5;
        meters.insert(unit, u);
    }
    let addr = spawn_tcp(meters).await?;

    // A DLMS/COSEM meter on the IEC 62056-47 wrapper, read by the public client: registers,
    // its clock, and a 15-minute load profile.
    let dlms_addr = dlms::spawn_wrapper(dlms::Meter::new(dlms::MeterSpec::new(17))).await?;
    let lp_addr = dlms::spawn_wrapper(dlms::Meter::new(dlms::MeterSpec::new(18))).await?;

    // An IEC 62056-21 meter behind a pseudo-terminal, as behind an optical probe: signed on
    // at 300 Bd, read at the 9600 Bd it offers.
    let iec = SimBus::new();
    let mut lgz = SimMeter::landis_gyr(None, "61234567");
    lgz.clock = Some(Clock::Live(jiff::tz::TimeZone::UTC));
    lgz.energy_rate = 0.5;
    let ident = String::from_utf8_lossy(&amr_edge::meter::iec62056_21::codec::identification(
        &lgz.identification,
    ))
    .trim_end()
    .to_owned();
    iec.add(lgz);
    let pty = spawn_pty(iec)?;

    // An M-Bus segment behind a pseudo-terminal, as behind a level converter at 2400 8E1:
    // a heat meter (primary 1), a water meter (secondary 23456789), an electricity meter.
    let mbus = amr_edge::sim::mbus::spawn_pty(std::sync::Arc::new(std::sync::Mutex::new(
        Segment::demo(),
    )))?;
    let mbus_path = mbus
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_default();

    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("amr-edge-demo-")
                .tempdir()?,
        ),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_owned()))
        .expect("one of them is set");
    let text = format!(
        r#"
[gateway]
id = "demo-gw"
timezone = "UTC"
data_dir = "{data_dir}"

[amqp]
url = "{amqp}"
queue = "{queue}"
events_queue = "{events_queue}"
declare_queues = true
max_backoff = "10s"

[beat]
every = "{every}"

[[bus]]
name = "lan"
tcp = {{ host = "{host}", port = {port}, concurrency = 2 }}

[[meter]]
id = "demo-sdm630"
bus = "lan"
modbus = {{ unit = 1, profile = "eastron-sdm630" }}
reads = {{ quarterly = "all" }}

[[meter]]
id = "demo-sdm120"
bus = "lan"
modbus = {{ unit = 2, profile = "eastron-sdm120" }}
reads = {{ quarterly = ["1-0:1.8.0", "1-0:32.7.0"] }}

[[meter]]
id = "demo-em24"
bus = "lan"
modbus = {{ unit = 3, profile = "carlo-gavazzi-em24" }}
reads = {{ quarterly = ["1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"] }}

[[bus]]
name = "lan-dlms"
tcp = {{ host = "{dlms_host}", port = {dlms_port} }}

[[meter]]
id = "demo-dlms"
bus = "lan-dlms"
dlms = {{ client = 16, logical = 1 }}
reads = {{ quarterly = "all" }}

[[bus]]
name = "lan-dlms-lp"
tcp = {{ host = "{dlms_host}", port = {lp_port} }}

[[meter]]
id = "demo-dlms-lp"
bus = "lan-dlms-lp"
dlms = {{ client = 16, logical = 1 }}
reads = {{ quarterly = {{ profile = "1-0:99.1.0" }} }}
history = "6h"

[[bus]]
name = "optical"
serial = {{ device = "{pty}" }}
timeout = "2s"

[[meter]]
id = "demo-lgz"
bus = "optical"
iec62056_21 = {{ max_baud = 9600 }}
reads = {{ quarterly = "all" }}

[[bus]]
name = "mbus-1"
serial = {{ device = "{mbus_path}", baud = 2400, parity = "even" }}
timeout = "2s"

[[meter]]
id = "demo-heat"
bus = "mbus-1"
mbus = {{ primary = 1 }}
reads = {{ quarterly = "all" }}

[[meter]]
id = "demo-water"
bus = "mbus-1"
mbus = {{ secondary = "23456789" }}
reads = {{ quarterly = "all" }}

[[meter]]
id = "demo-electricity"
bus = "mbus-1"
mbus = {{ primary = 3 }}
reads = {{ quarterly = "all" }}
"#,
        data_dir = data_dir.display(),
        amqp = args.amqp,
        every = humantime::format_duration(args.every),
        queue = args.queue,
        events_queue = args.events_queue,
        host = addr.ip(),
        port = addr.port(),
        dlms_host = dlms_addr.ip(),
        dlms_port = dlms_addr.port(),
        lp_port = lp_addr.port(),
        pty = pty.path().display(),
    );
    std::fs::create_dir_all(&data_dir)?;
    let config_path = data_dir.join("demo.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::from_toml(&text, &config_path)
        .map_err(|e| anyhow::anyhow!("the demo config is invalid (a bug):\n{e}"))?;
    eprintln!("amr-edge demo");
    eprintln!(
        "  meters  3 simulated Modbus TCP meters on {addr}: SDM630 (unit 1), SDM120 (unit 2), EM24 (unit 3)"
    );
    eprintln!(
        "          1 simulated DLMS/COSEM meter on {dlms_addr} (IEC 62056-47 wrapper, public client): energy, voltages, currents, power, clock"
    );
    eprintln!(
        "          1 simulated DLMS/COSEM meter on {lp_addr} read from its 15-minute load profile: the last 6 h of rows, then each new row as the meter closes it"
    );
    eprintln!(
        "          1 simulated IEC 62056-21 meter on {} (optical probe, plain sign-on): {ident}, 300 → 9600 Bd, read `all`",
        pty.path().display()
    );
    eprintln!(
        "          3 simulated M-Bus meters on {mbus_path} (2400 8E1): heat (primary 1), water (secondary 23456789), electricity (primary 3, 3 telegrams)"
    );
    eprintln!(
        "  beat    every meter every {}",
        humantime::format_duration(args.every)
    );
    eprintln!(
        "  store   {}{}",
        data_dir.display(),
        if temp.is_some() { " (temporary)" } else { "" }
    );
    eprintln!(
        "  drain   {} → queue {} (declared), whenever the broker answers",
        redact_url(&args.amqp),
        config.amqp.queue
    );
    eprintln!(
        "  config  {} (try: amr-edge status --config {})",
        config_path.display(),
        config_path.display()
    );
    eprintln!("  Ctrl-C to stop.\n");
    agent::run(
        config,
        Options {
            beat: BeatMode::Schedule,
            config_path: None,
            summary_every: Duration::from_secs(10),
            stop_after: args.run_for,
        },
    )
    .await?;
    drop(pty);
    drop(mbus);
    drop(temp);
    Ok(ExitCode::SUCCESS)
}
