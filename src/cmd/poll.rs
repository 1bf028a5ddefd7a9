//! `amr-edge poll --config FILE [METER…]`: read meters once, print the values.
//! `amr-edge poll --config FILE METER --profile OBIS --from T --to T`: a meter's load profile
//! rows in that range, read from the meter's own buffer through [`Meter::read_rows`] (DLMS
//! profile generics, IEC 62056-21 `P.01`).
//!
//! [`Meter::read_rows`]: amr_edge::meter::Meter::read_rows

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use amr_edge::bus::{BusWorker, PollReport, PollRequest, Router};
use amr_edge::clock::SystemClock;
use amr_edge::lock::DirLock;
use amr_edge::meter::Protocol;
use amr_edge::meter::link::Slot;
use amr_edge::meter::rows::RowsRequest;
use amr_edge::reading::{Cadence, Obis, Stamp};
use amr_edge::store::MemoryStore;
use jiff::Timestamp;
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
    /// Print the rows of this load profile (a DLMS profile generic, an IEC 62056-21 `P.01`:
    /// 1-0:99.1.0) of one meter instead of its registers.
    #[arg(long, requires_all = ["from", "to"])]
    profile: Option<String>,
    /// The first capture time of the range: RFC 3339 (`2026-12-01T00:00:00Z`,
    /// `…+01:00`) or a local time in the gateway's zone (`2026-12-01T00:00`).
    #[arg(long, requires = "profile")]
    from: Option<String>,
    /// The last capture time of the range (same forms as --from).
    #[arg(long, requires = "profile")]
    to: Option<String>,
}

/// A time on the command line: an instant, or a civil time in the gateway's zone.
fn parse_time(flag: &str, s: &str, tz: &jiff::tz::TimeZone) -> anyhow::Result<Timestamp> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    s.parse::<jiff::civil::DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(tz.clone()).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{flag} `{s}` is not a time: give RFC 3339 (2026-12-01T00:00:00Z) or a local time in the gateway's zone (2026-12-01T00:00)"
            )
        })
}

async fn profile(
    config: &amr_edge::config::Config,
    args: &Args,
    profile: &str,
) -> anyhow::Result<ExitCode> {
    let tz = &config.gateway.tz;
    let obis: Obis = profile
        .parse()
        .map_err(|e| anyhow::anyhow!("--profile `{profile}`: {e}"))?;
    let from = parse_time("--from", args.from.as_deref().unwrap_or_default(), tz)?;
    let to = parse_time("--to", args.to.as_deref().unwrap_or_default(), tz)?;
    if from > to {
        anyhow::bail!("--from {from} is after --to {to}");
    }
    let [name] = args.meters.as_slice() else {
        anyhow::bail!(
            "--profile reads one meter: name it (e.g. `poll --config F METER --profile …`)"
        );
    };
    let Some(meter) = config.meters.iter().find(|m| &m.id == name) else {
        anyhow::bail!("no meter `{name}` in {}", args.config.display());
    };
    if !matches!(meter.protocol, Protocol::Dlms(_) | Protocol::Iec62056_21(_)) {
        anyhow::bail!(
            "`{}` is a {} meter; --profile reads DLMS/COSEM load profiles and IEC 62056-21 ones (P.01)",
            meter.id,
            meter.protocol.name()
        );
    }
    let Some(bus) = config.buses.iter().find(|b| b.name == meter.bus) else {
        anyhow::bail!("no bus `{}`", meter.bus);
    };
    let mut slot = Slot::for_link(&bus.link, bus.timing.timeout).remove(0);
    let request = RowsRequest {
        profile: obis,
        from,
        to,
    };
    let p = match meter
        .read_rows(&mut slot, &request, &meter.timing_on(&bus.timing))
        .await
    {
        Ok(p) => p,
        Err(f) => {
            eprintln!("{}: {f}", meter.id);
            return Ok(ExitCode::FAILURE);
        }
    };
    let period_s = p.period.map(|d| d.as_secs());
    // Times as the gateway's zone shows them, whatever offset the meter's clock wrote.
    let shown = |r: &amr_edge::meter::rows::Row| {
        Timestamp::from_millisecond(r.at.ms)
            .map_or_else(|_| r.at.rfc3339(), |t| Stamp::in_zone(t, tz).rfc3339())
    };
    if args.json {
        let out = serde_json::json!({
            "meter": meter.id,
            "profile": obis.to_string(),
            "from": Stamp::in_zone(from, tz).rfc3339(),
            "to": Stamp::in_zone(to, tz).rfc3339(),
            "capture_period_s": period_s,
            "unmapped": p.unmapped,
            "rows": p.rows.iter().map(|r| serde_json::json!({
                "timestamp": shown(r),
                "flags": r.flags.names(),
                "values": r.values.iter().map(|v| serde_json::json!({
                    "series": v.series.to_string(),
                    "value": v.value.as_str(),
                    "unit": v.unit,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut header = format!("{:<26}", "timestamp");
        if let Some(r) = p.rows.first() {
            for v in &r.values {
                let col = format!("{} [{}]", v.series, v.unit);
                header.push_str(&format!(" {col:>24}"));
            }
        }
        header.push_str(" flags");
        println!("{header}");
        for r in &p.rows {
            let mut line = format!("{:<26}", shown(r));
            for v in &r.values {
                line.push_str(&format!(" {:>24}", v.value.as_str()));
            }
            line.push(' ');
            line.push_str(&r.flags.names().join(","));
            println!("{}", line.trim_end());
        }
        eprintln!(
            "{} row(s) of {} from {} (capture period {})",
            p.rows.len(),
            obis,
            meter.id,
            period_s.map_or("not given".to_owned(), |s| format!("{s} s"))
        );
    }
    Ok(ExitCode::SUCCESS)
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
    if let Some(p) = &args.profile {
        return profile(&config, &args, p).await;
    }
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
