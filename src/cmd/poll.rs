//! `amr-edge poll --config FILE [METER…]`: read meters once, print the values.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use amr_edge::bus::{BusWorker, PollReport, PollRequest, Router};
use amr_edge::clock::SystemClock;
use amr_edge::lock::DirLock;
use amr_edge::reading::Cadence;
use amr_edge::store::MemoryStore;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// Meters to read (ids from the config); all if none.
    meters: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = super::load(&args.config)?;
    // The agent owns the ports while it runs; reading them behind its back would garble
    // frames on a half-duplex bus.
    let _lock = DirLock::acquire(&config.gateway.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(the running agent owns the buses: ask it with an MQTT `poll` command instead)"
        )
    })?;
    let unknown: Vec<&String> = args
        .meters
        .iter()
        .filter(|m| !config.meters.iter().any(|c| &&c.id == m))
        .collect();
    if !unknown.is_empty() {
        anyhow::bail!(
            "no meter {} in {}",
            unknown
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            args.config.display()
        );
    }
    let wanted: Vec<String> = if args.meters.is_empty() {
        config.meter_ids()
    } else {
        args.meters.clone()
    };
    // Values are printed, not buffered: this is a field engineer's check, not a read.
    let store = Arc::new(MemoryStore::new());
    let shutdown = CancellationToken::new();
    let mut router = Router::default();
    let mut workers = Vec::new();
    for bus in &config.buses {
        let meters: Vec<_> = config.meters_on(&bus.name).cloned().collect();
        let ids = meters.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        let (w, h) = BusWorker::new(
            bus.clone(),
            meters,
            store.clone(),
            Arc::new(Notify::new()),
            Arc::new(SystemClock),
            config.gateway.tz.clone(),
            wanted.len().max(1),
        );
        workers.push(tokio::spawn(w.run(shutdown.clone())));
        router.add_bus(h, ids);
    }
    let mut pending = Vec::new();
    for m in &wanted {
        let (tx, rx) = oneshot::channel();
        let mut req = PollRequest::new(m.clone(), Cadence::OnDemand);
        req.reply = Some(tx);
        if router.poll(req).await.is_err() {
            anyhow::bail!("cannot queue a read of {m}");
        }
        pending.push(rx);
    }
    let mut reports: Vec<PollReport> = Vec::new();
    for rx in pending {
        if let Ok(r) = rx.await {
            reports.push(r);
        }
    }
    shutdown.cancel();
    for w in workers {
        let _ = w.await;
    }
    let failed = reports
        .iter()
        .any(|r| r.readings.is_empty() && !r.errors.is_empty());
    if args.json {
        let out: Vec<_> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "meter": r.meter,
                    "values": r.readings.iter().map(|x| serde_json::json!({
                        "series": x.series.to_string(),
                        "value": x.value.as_str(),
                        "unit": x.unit,
                        "timestamp": x.timestamp.rfc3339(),
                    })).collect::<Vec<_>>(),
                    "errors": r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<24} {:<16} {:>20} {:<6} timestamp",
            "meter", "series", "value", "unit"
        );
        for r in &reports {
            for x in &r.readings {
                println!(
                    "{:<24} {:<16} {:>20} {:<6} {}",
                    r.meter,
                    x.series.to_string(),
                    x.value.as_str(),
                    x.unit,
                    x.timestamp.rfc3339()
                );
            }
            for e in &r.errors {
                println!("{:<24} error: {e}", r.meter);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
