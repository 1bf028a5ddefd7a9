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
    /// Log filter, RUST_LOG style (`info`, `amr_edge=debug`); RUST_LOG works too. The AMQP
    /// client's own log repeats what the drain says about the broker, so it is off unless the
    /// filter names it (`info,lapin=warn`).
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
    /// Commissioning: a DLMS meter's object list (`scan METER`), or the M-Bus meters on a bus
    /// as ready `[[meter]]` blocks (`scan --bus NAME`).
    Scan(cmd::scan::Args),
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

/// The log filter: `target=level` directives (`info,amr_edge::bus=debug`), enough for
/// operators and lighter than a regex-based filter on a gateway's flash. lapin is off unless
/// the filter names it: every connection problem it logs (at ERROR, even a dropped uplink)
/// reaches the drain as an error too, and the drain logs it once, at the level it deserves.
fn log_filter(spec: &str) -> (Targets, Option<String>) {
    let (filter, problem) = match spec.parse::<Targets>() {
        Ok(f) => (f, None),
        Err(e) => (
            Targets::new().with_default(tracing::Level::INFO),
            Some(format!(
                "log filter `{spec}` is invalid ({e}); using `info`"
            )),
        ),
    };
    let names_lapin = spec.split(',').any(|d| {
        let target = d.split('=').next().unwrap_or("").trim();
        target == "lapin" || target.starts_with("lapin::")
    });
    if names_lapin {
        (filter, problem)
    } else {
        (
            filter.with_target("lapin", tracing::level_filters::LevelFilter::OFF),
            problem,
        )
    }
}

fn main() -> ExitCode {
    amr_edge::alloc::tune();
    let cli = Cli::parse();
    let (filter, problem) = log_filter(&cli.log);
    if let Some(problem) = problem {
        eprintln!("warning: {problem}");
    }
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
            Command::Scan(args) => cmd::scan::run(args).await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn lapin_should_be_off_unless_the_filter_names_it() {
        for spec in ["info", "warn", "debug,amr_edge=trace", "trace"] {
            let (f, problem) = log_filter(spec);
            assert!(problem.is_none());
            assert!(!f.would_enable("lapin::io_loop", &Level::ERROR), "{spec}");
            assert!(f.would_enable("amr_edge::drain", &Level::ERROR), "{spec}");
        }
        let (f, _) = log_filter("info,lapin=warn");
        assert!(f.would_enable("lapin::io_loop", &Level::WARN));
        assert!(!f.would_enable("lapin::io_loop", &Level::INFO));
        let (f, _) = log_filter("warn,lapin::channels=debug");
        assert!(f.would_enable("lapin::channels", &Level::DEBUG));
    }

    #[test]
    fn an_invalid_filter_should_fall_back_to_info_and_say_so() {
        let (f, problem) = log_filter("amr_edge=loud");
        assert!(problem.unwrap().contains("amr_edge=loud"));
        assert!(f.would_enable("amr_edge::bus", &Level::INFO));
        assert!(!f.would_enable("amr_edge::bus", &Level::DEBUG));
        assert!(!f.would_enable("lapin", &Level::ERROR));
    }

    #[test]
    fn off_should_stay_off() {
        let (f, _) = log_filter("off");
        assert!(!f.would_enable("amr_edge::drain", &Level::ERROR));
        assert!(!f.would_enable("lapin", &Level::ERROR));
    }
}
