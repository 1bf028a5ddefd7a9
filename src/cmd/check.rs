//! `amr-edge check --config FILE`: validate and print the resolved plan.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use amr_edge::config::Config;
use amr_edge::meter::Protocol;
use amr_edge::primitives::HumanDuration;
use amr_edge::reading::Cadence;

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} problem(s), see above",
                path.display(),
                e.problems.len()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", plan(&config)?);
    Ok(ExitCode::SUCCESS)
}

/// The resolved plan, as `check` prints it.
pub fn plan(config: &Config) -> anyhow::Result<String> {
    let mut s = String::new();
    let g = &config.gateway;
    writeln!(s, "config     {}: valid", config.source.display())?;
    writeln!(
        s,
        "gateway    {} ({}), data in {}",
        g.id,
        g.timezone,
        g.data_dir.display()
    )?;
    let st = &config.store;
    writeln!(
        s,
        "store      at most {}, records kept at most {}, cache {}",
        st.max_bytes, st.max_age, st.cache
    )?;
    let a = &config.amqp;
    let url = match a.resolve_url() {
        Ok(u) => u.redacted(),
        Err(e) => format!("(not resolvable now: {e})"),
    };
    writeln!(s, "amqp       {url}")?;
    writeln!(
        s,
        "           readings → queue {} as task {}",
        a.queue, a.task
    )?;
    writeln!(
        s,
        "           events   → queue {} as task {}",
        a.events_queue, a.events_task
    )?;
    writeln!(
        s,
        "           {} readings/message, {} unconfirmed, rate {}, queues {}",
        a.readings_per_message,
        a.max_unconfirmed,
        a.rate_limit
            .map(|r| r.to_string())
            .unwrap_or_else(|| "unlimited".into()),
        if a.declare_queues {
            "declared by the agent"
        } else {
            "must exist"
        }
    )?;
    match &config.mqtt {
        Some(m) => {
            writeln!(
                s,
                "mqtt       {} on {}/{}/{{commands,replies,status}}",
                m.url, m.topic_prefix, g.id
            )?;
            writeln!(
                s,
                "           remote configuration {}",
                if m.remote_config {
                    "on (configure, confirm-or-revert)"
                } else {
                    "off"
                }
            )?;
        }
        None => writeln!(s, "mqtt       off (no [mqtt] section)")?,
    }
    // Whether this file came from the centre, and whether it still waits for its confirm.
    if let Some(remote) = amr_edge::control::remote::summary(&config.source, &g.data_dir) {
        writeln!(s, "source     {}", remote.render())?;
    }
    if let Some(m) = &config.metrics {
        let mut on = Vec::new();
        if let Some(l) = &m.listen {
            on.push(format!("http://{l}/metrics, /healthz, /readyz"));
        }
        if let Some(t) = &m.textfile {
            on.push(format!("textfile {} every {}", t.display(), m.interval));
        }
        let per_meter = if m.per_meter { ", per meter" } else { "" };
        writeln!(s, "metrics    {}{per_meter}", on.join("; "))?;
    }
    for bus in &config.buses {
        writeln!(s)?;
        writeln!(
            s,
            "bus {}: {}; timeout {}, {} retries{}",
            bus.name,
            bus.link,
            HumanDuration(bus.timing.timeout),
            bus.timing.retries,
            bus.timing.describe_pauses()
        )?;
        for m in config.meters_on(&bus.name) {
            match &m.protocol {
                Protocol::Modbus(mc) => {
                    writeln!(
                        s,
                        "  meter {:<24} modbus unit {}, profile {}",
                        m.id, mc.unit, mc.profile.name
                    )?;
                    for c in m.reads.cadences() {
                        let Some(p) = mc.plans.get(&c) else { continue };
                        writeln!(
                            s,
                            "    {:<10} {} series in {} request(s): {}",
                            c.as_str(),
                            p.registers.len(),
                            p.requests.len(),
                            p.requests
                                .iter()
                                .map(|r| format!(
                                    "fc{:02} {}+{}",
                                    r.function.code(),
                                    r.start,
                                    r.count
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )?;
                    }
                }
                Protocol::Iec62056_21(ic) => {
                    writeln!(
                        s,
                        "  meter {:<24} IEC 62056-21 {}, up to {} baud",
                        m.id,
                        ic.address
                            .as_deref()
                            .map(|a| format!("address {a}"))
                            .unwrap_or_else(|| "unaddressed".into()),
                        ic.max_baud
                    )?;
                    for c in m.reads.cadences() {
                        writeln!(s, "    {:<10} {}", c.as_str(), describe(m, c))?;
                    }
                }
                Protocol::Dlms(dc) => {
                    writeln!(
                        s,
                        "  meter {:<24} DLMS/COSEM {:?}, client {}, logical {}{}, security {}",
                        m.id,
                        dc.transport,
                        dc.client,
                        dc.logical,
                        dc.physical
                            .map(|p| format!(", physical {p}"))
                            .unwrap_or_default(),
                        match dc.security {
                            amr_edge::meter::dlms::association::SecurityConfig::None => "none",
                            amr_edge::meter::dlms::association::SecurityConfig::Lls { .. } => "lls",
                            amr_edge::meter::dlms::association::SecurityConfig::HlsGmac {
                                ..
                            } => "hls-gmac",
                        }
                    )?;
                    for c in m.reads.cadences() {
                        writeln!(s, "    {:<10} {}", c.as_str(), describe(m, c))?;
                    }
                }
                Protocol::Mbus(mb) => {
                    let address = match (mb.config.primary, &mb.config.secondary) {
                        (Some(a), _) => format!("primary {a}"),
                        (None, Some(s)) => format!("secondary {s}"),
                        (None, None) => "unaddressed".into(),
                    };
                    writeln!(s, "  meter {:<24} M-Bus {address}", m.id)?;
                    for c in m.reads.cadences() {
                        writeln!(s, "    {:<10} {}", c.as_str(), describe(m, c))?;
                    }
                }
            }
            if m.reads.cadences().next().is_none() {
                writeln!(s, "    read on demand only")?;
            }
            let own = m.pauses.describe();
            if !own.is_empty() {
                writeln!(s, "    pauses     {}", own.trim_start_matches(", "))?;
            }
        }
    }
    writeln!(s)?;
    let tz = config.gateway.tz.clone();
    if let Some(every) = config.beat.every {
        writeln!(
            s,
            "beat       every {every}, every meter (beat.every: commissioning and tests, not the wall-clock boundaries)"
        )?;
        return Ok(s);
    }
    writeln!(s, "next reads ({})", g.timezone)?;
    let used: Vec<Cadence> = config
        .meters
        .iter()
        .flat_map(|m| m.reads.cadences())
        .collect();
    for (c, boundary, fire) in amr_edge::beat::next_fires(&config.beat, &tz, jiff::Timestamp::now())
    {
        let n = config
            .meters
            .iter()
            .filter(|m| m.reads.get(c).is_some() && c != Cadence::OnDemand)
            .count();
        let when = boundary
            .to_zoned(tz.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string();
        let delay = if fire != boundary {
            format!(
                ", read at {}",
                fire.to_zoned(tz.clone()).strftime("%H:%M:%S")
            )
        } else {
            String::new()
        };
        if used.contains(&c) {
            writeln!(s, "  {:<10} {when}{delay}: {n} meter(s)", c.as_str())?;
        } else {
            writeln!(s, "  {:<10} {when}: no meter reads it", c.as_str())?;
        }
    }
    Ok(s)
}

fn describe(m: &amr_edge::meter::Meter, c: Cadence) -> String {
    if let Some(p) = m.reads.profile(c) {
        let history = p
            .history
            .or(m.history)
            .map(|h| format!(", history {}", HumanDuration(h)))
            .unwrap_or_default();
        return format!(
            "load profile {} (rows after the last one buffered{history})",
            p.profile
        );
    }
    match m.reads.get(c) {
        Some(amr_edge::meter::Selection::All) => "all data sets".into(),
        Some(amr_edge::meter::Selection::Series(v)) => v
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        None => "-".into(),
    }
}
