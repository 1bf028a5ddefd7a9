//! The `amr-edge` command line: `run`, `demo`, `poll`, `check`, `status`.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "amr-edge",
    version,
    about = "Reads meters, buffers every reading, drains to the central AMR system"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, RUST_LOG style (`info`, `amr_edge=debug`); RUST_LOG works too. lapin's own
    /// warnings repeat what the drain says about the broker, so lapin logs errors only unless
    /// the filter names it (`warn,lapin=warn`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: beat, bus workers, store, drain, MQTT control.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a self-contained demo: simulated meters, a fast beat, a store in a temporary
    /// directory, and a drain to amqp://localhost whenever a broker answers.
    Demo(cmd::demo::Args),
    /// Read meters once and print the values (all meters if none are named).
    Poll(cmd::poll::Args),
    /// Validate the config and print the resolved plan.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve simulated Modbus meters (for tests and benchmarks without hardware).
    Simulate(cmd::simulate::Args),
    /// Buffer depth, age of the oldest unsent reading, evictions, last drain, meter health.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    amr_edge::alloc::tune();
    let cli = Cli::parse();
    // `target=level` directives (`info,amr_edge::bus=debug`): enough for operators, and
    // lighter than a regex-based filter on a gateway's flash.
    let filter: Targets = cli.log.parse().unwrap_or_else(|e| {
        eprintln!(
            "warning: log filter `{}` is invalid ({e}); using `info`",
            cli.log
        );
        Targets::new().with_default(tracing::Level::INFO)
    });
    let quiet_lapin = !cli.log.contains("lapin")
        && filter
            .default_level()
            .is_some_and(|l| l > tracing::level_filters::LevelFilter::ERROR);
    let filter = if quiet_lapin {
        filter.with_target("lapin", tracing::Level::ERROR)
    } else {
        filter
    };
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => cmd::run::run(&config).await,
            Command::Demo(args) => cmd::demo::run(args).await,
            Command::Poll(args) => cmd::poll::run(args).await,
            Command::Check { config } => cmd::check::run(&config),
            Command::Status { config, json } => cmd::status::run(&config, json).await,
            Command::Simulate(args) => cmd::simulate::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
