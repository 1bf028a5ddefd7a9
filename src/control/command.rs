//! Commands from the centre, sans-IO: bytes in, a command or a reason to reject it out.
//!
//! ```json
//! {"request_id": "r-1", "command": "poll", "meters": ["SDM630-0001"], "series": ["1-0:1.8.0"]}
//! {"request_id": "r-2", "command": "inspect"}
//! {"request_id": "r-3", "command": "ping"}
//! {"request_id": "r-4", "command": "cancel", "target": "r-1"}
//! {"request_id": "r-5", "command": "get_config"}
//! {"request_id": "r-6", "command": "configure", "config": "<TOML>", "base": "<sha256>", "confirm_within": "10m"}
//! {"request_id": "r-7", "command": "confirm", "target": "r-6"}
//! {"request_id": "r-8", "command": "backfill", "meters": ["LGZ-E450-0001"], "profile": "1-0:99.1.0", "from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"}
//! ```
//!
//! `configure` and `confirm` are what [`super::remote`] runs; here they are only parsed. A
//! `configure` may be larger than `max_payload` (up to [`MAX_CONFIG_PAYLOAD`]) when remote
//! configuration is on: a config with a thousand meters does not fit in the 16 KiB that
//! keep a flood of small commands cheap.
//!
//! Everything else — not JSON, not an object, a field of the wrong type, an unknown field,
//! command or meter, a payload over the limit — is rejected with a reason.
//!
//! # Signed commands
//!
//! With `mqtt.hmac_key_file` set, every command must also carry `ts` (Unix seconds, within
//! `signature_window` of the gateway's clock) and `sig`: the hex HMAC-SHA256, under the key,
//! of these fields joined by newlines:
//!
//! ```text
//! request_id \n command \n ts \n meters joined by "," \n series joined by "," \n target
//! ```
//!
//! and, for `backfill` only, three more lines: `profile`, `from` and `to` as sent; for
//! `configure` only, three more lines, so the signature covers the configuration
//! itself (by its hash), what it replaces and its window:
//!
//! ```text
//! … \n target \n sha256 of config (hex) \n base \n confirm_within
//! ```
//!
//! (absent fields are empty strings). The request id makes a replay within the window a
//! duplicate, which is not run twice.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::primitives::HumanDuration;
use crate::reading::Obis;

/// The largest `configure` payload read at all (with remote configuration on); the config
/// text in it is bounded by [`super::remote::MAX_CONFIG_BYTES`].
pub const MAX_CONFIG_PAYLOAD: usize = 1 << 20;

/// What the centre asked for. Serialised (JSON) into the store's record of an accepted
/// command, to run it again after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Read these meters now (all if `None`), optionally only some series.
    Poll {
        meters: Option<Vec<String>>,
        series: Option<Vec<Obis>>,
    },
    /// Active and queued polls, next reads, store and meter health.
    Inspect,
    Ping,
    /// Drop the queued on-demand polls of another request.
    Cancel {
        target: String,
    },
    /// The active configuration: text, hash, where it came from.
    GetConfig,
    /// Replace the configuration with `config`, if the active one is still `base`; go back
    /// unless confirmed within `confirm_within_ms`.
    Configure {
        config: String,
        base: String,
        confirm_within_ms: u64,
    },
    /// Keep the configuration the `configure` `target` applied.
    Confirm {
        target: String,
    },
    /// Read `from ..= to` of these meters' load profile `profile` again.
    Backfill {
        meters: Vec<String>,
        profile: Obis,
        from_ms: i64,
        to_ms: i64,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Poll { .. } => "poll",
            Command::Inspect => "inspect",
            Command::Ping => "ping",
            Command::Cancel { .. } => "cancel",
            Command::GetConfig => "get_config",
            Command::Configure { .. } => "configure",
            Command::Confirm { .. } => "confirm",
            Command::Backfill { .. } => "backfill",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub request_id: String,
    pub command: Command,
}

/// Why a command is not run. `request_id` is there when the payload got that far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub request_id: Option<String>,
    pub reason: String,
}

/// What parsing needs to know about the gateway.
pub struct Rules<'a> {
    pub max_payload: usize,
    /// With remote configuration on: how large a `configure` may be.
    pub max_config_payload: Option<usize>,
    pub meters: &'a HashSet<String>,
    /// The HMAC key, when commands must be signed.
    pub key: Option<&'a [u8]>,
    pub now_s: i64,
    pub window_s: i64,
    /// The longest range a `backfill` may ask for (`[mqtt] max_backfill`).
    pub max_backfill: std::time::Duration,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    request_id: String,
    command: String,
    meters: Option<Vec<String>>,
    series: Option<Vec<String>>,
    target: Option<String>,
    config: Option<String>,
    base: Option<String>,
    confirm_within: Option<String>,
    profile: Option<String>,
    from: Option<String>,
    to: Option<String>,
    ts: Option<i64>,
    sig: Option<String>,
}

pub fn parse(payload: &[u8], rules: &Rules<'_>) -> Result<Request, Rejection> {
    let reject = |request_id: Option<&str>, reason: String| Rejection {
        request_id: request_id.map(str::to_owned),
        reason,
    };
    let limit = rules.max_payload.max(rules.max_config_payload.unwrap_or(0));
    if payload.len() > limit {
        return Err(reject(
            None,
            format!(
                "payload of {} bytes is over the limit of {} bytes",
                payload.len(),
                limit
            ),
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| reject(None, format!("not JSON: {e}")))?;
    let id = value
        .get("request_id")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let id = id.as_deref();
    if !value.is_object() {
        return Err(reject(None, "expected a JSON object".into()));
    }
    let raw: Raw = serde_json::from_value(value.clone()).map_err(|e| reject(id, e.to_string()))?;
    let id = Some(raw.request_id.as_str());
    if raw.request_id.is_empty() || raw.request_id.len() > 128 {
        return Err(reject(None, "request_id must be 1-128 characters".into()));
    }
    let only = |allowed: &[&str]| -> Result<(), Rejection> {
        for (name, present) in [
            ("meters", raw.meters.is_some()),
            ("series", raw.series.is_some()),
            ("target", raw.target.is_some()),
            ("config", raw.config.is_some()),
            ("base", raw.base.is_some()),
            ("confirm_within", raw.confirm_within.is_some()),
            ("profile", raw.profile.is_some()),
            ("from", raw.from.is_some()),
            ("to", raw.to.is_some()),
        ] {
            if present && !allowed.contains(&name) {
                return Err(reject(
                    id,
                    format!("`{name}` does not apply to `{}`", raw.command),
                ));
            }
        }
        Ok(())
    };
    let command = match raw.command.as_str() {
        "poll" => {
            only(&["meters", "series"])?;
            if let Some(m) = &raw.meters {
                if m.is_empty() {
                    return Err(reject(
                        id,
                        "`meters` is empty: leave it out to read every meter".into(),
                    ));
                }
                if let Some(unknown) = m.iter().find(|m| !rules.meters.contains(*m)) {
                    return Err(reject(id, format!("unknown meter `{unknown}`")));
                }
            }
            let series = match &raw.series {
                None => None,
                Some(s) if s.is_empty() => {
                    return Err(reject(
                        id,
                        "`series` is empty: leave it out to read everything".into(),
                    ));
                }
                Some(s) => Some(
                    s.iter()
                        .map(|x| x.parse::<Obis>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| reject(id, e.to_string()))?,
                ),
            };
            Command::Poll {
                meters: raw.meters.clone(),
                series,
            }
        }
        "inspect" => {
            only(&[])?;
            Command::Inspect
        }
        "ping" => {
            only(&[])?;
            Command::Ping
        }
        "cancel" => {
            only(&["target"])?;
            match &raw.target {
                Some(t) if !t.is_empty() => Command::Cancel { target: t.clone() },
                _ => {
                    return Err(reject(
                        id,
                        "`cancel` needs `target`: the request_id to cancel".into(),
                    ));
                }
            }
        }
        "get_config" => {
            only(&[])?;
            Command::GetConfig
        }
        "configure" => {
            only(&["config", "base", "confirm_within"])?;
            let (Some(config), Some(base)) = (&raw.config, &raw.base) else {
                return Err(reject(
                    id,
                    "`configure` needs `config` (the TOML) and `base` (the sha256 of the active config, from get_config)".into(),
                ));
            };
            let confirm_within = match &raw.confirm_within {
                None => super::remote::DEFAULT_CONFIRM_WITHIN,
                Some(s) => {
                    HumanDuration::parse(s)
                        .map_err(|e| reject(id, format!("`confirm_within`: {e}")))?
                        .0
                }
            };
            let (min, max) = (
                super::remote::MIN_CONFIRM_WITHIN,
                super::remote::MAX_CONFIRM_WITHIN,
            );
            if confirm_within < min || confirm_within > max {
                return Err(reject(
                    id,
                    format!(
                        "`confirm_within` must be between {} and {}",
                        HumanDuration(min),
                        HumanDuration(max)
                    ),
                ));
            }
            Command::Configure {
                config: config.clone(),
                base: base.clone(),
                confirm_within_ms: confirm_within.as_millis() as u64,
            }
        }
        "confirm" => {
            only(&["target"])?;
            match &raw.target {
                Some(t) if !t.is_empty() => Command::Confirm { target: t.clone() },
                _ => {
                    return Err(reject(
                        id,
                        "`confirm` needs `target`: the request_id of the `configure` to keep"
                            .into(),
                    ));
                }
            }
        }
        "backfill" => {
            only(&["meters", "profile", "from", "to"])?;
            let meters = match &raw.meters {
                Some(m) if !m.is_empty() => m.clone(),
                _ => {
                    return Err(reject(
                        id,
                        "`backfill` needs `meters`: the meters whose profile to read again".into(),
                    ));
                }
            };
            if let Some(unknown) = meters.iter().find(|m| !rules.meters.contains(*m)) {
                return Err(reject(id, format!("unknown meter `{unknown}`")));
            }
            let Some(profile) = &raw.profile else {
                return Err(reject(
                    id,
                    "`backfill` needs `profile`, e.g. \"1-0:99.1.0\"".into(),
                ));
            };
            let profile = profile
                .parse::<Obis>()
                .map_err(|e| reject(id, format!("`profile`: {e}")))?;
            let time = |name: &str, v: &Option<String>| -> Result<jiff::Timestamp, Rejection> {
                let v = v.as_deref().ok_or_else(|| {
                    reject(
                        id,
                        format!("`backfill` needs `{name}` (RFC 3339, e.g. 2026-11-01T00:00:00Z)"),
                    )
                })?;
                v.parse::<jiff::Timestamp>().map_err(|e| {
                    reject(
                        id,
                        format!("`{name}` is not an RFC 3339 time with an offset: {e}"),
                    )
                })
            };
            let (from, to) = (time("from", &raw.from)?, time("to", &raw.to)?);
            if from >= to {
                return Err(reject(id, "`from` must be before `to`".into()));
            }
            let span_ms = to.as_millisecond() - from.as_millisecond();
            if span_ms > rules.max_backfill.as_millis() as i64 {
                return Err(reject(
                    id,
                    format!(
                        "the range is longer than max_backfill ({}): ask for it in parts",
                        HumanDuration(rules.max_backfill)
                    ),
                ));
            }
            Command::Backfill {
                meters,
                profile,
                from_ms: from.as_millisecond(),
                to_ms: to.as_millisecond(),
            }
        }
        other => {
            return Err(reject(
                id,
                format!(
                    "unknown command `{other}` (poll, inspect, ping, cancel, get_config, configure, confirm, backfill)"
                ),
            ));
        }
    };
    let configure = matches!(command, Command::Configure { .. });
    if payload.len() > rules.max_payload && !(configure && rules.max_config_payload.is_some()) {
        return Err(reject(
            id,
            format!(
                "payload of {} bytes is over the limit of {} bytes",
                payload.len(),
                rules.max_payload
            ),
        ));
    }
    if let Some(key) = rules.key {
        let (Some(ts), Some(sig)) = (raw.ts, raw.sig.as_deref()) else {
            return Err(reject(
                id,
                "unsigned command: this gateway only runs commands with `ts` and `sig`".into(),
            ));
        };
        if (rules.now_s - ts).abs() > rules.window_s {
            return Err(reject(
                id,
                format!(
                    "`ts` {ts} is more than {} s from the gateway's clock ({})",
                    rules.window_s, rules.now_s
                ),
            ));
        }
        let sig = hex::decode(sig).map_err(|_| reject(id, "`sig` is not hex".into()))?;
        // In constant time.
        if ring::hmac::verify(&mac(key), canonical(&raw, ts).as_bytes(), &sig).is_err() {
            return Err(reject(id, "signature does not match".into()));
        }
    }
    // Without a key, `ts` and `sig` are tolerated: a centre may sign for every gateway.
    Ok(Request {
        request_id: raw.request_id,
        command,
    })
}

/// The `request_id` of a payload, if it has one (for the reply to a command not parsed).
pub fn request_id_of(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("request_id")?
        .as_str()
        .map(str::to_owned)
}

/// HMAC-SHA256 with `key` (any length). ring's, which TLS links in anyway.
fn mac(key: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key)
}

fn canonical(raw: &Raw, ts: i64) -> String {
    let mut s = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        raw.request_id,
        raw.command,
        ts,
        raw.meters.as_deref().unwrap_or_default().join(","),
        raw.series.as_deref().unwrap_or_default().join(","),
        raw.target.as_deref().unwrap_or_default()
    );
    if raw.command == "backfill" {
        s.push_str(&format!(
            "\n{}\n{}\n{}",
            raw.profile.as_deref().unwrap_or_default(),
            raw.from.as_deref().unwrap_or_default(),
            raw.to.as_deref().unwrap_or_default()
        ));
    }
    if raw.command == "configure" {
        s.push_str(&format!(
            "\n{}\n{}\n{}",
            super::remote::sha256_hex(raw.config.as_deref().unwrap_or_default().as_bytes()),
            raw.base.as_deref().unwrap_or_default(),
            raw.confirm_within.as_deref().unwrap_or_default()
        ));
    }
    s
}

/// The signature of `raw`, sent at `ts`.
fn signed(key: &[u8], raw: &Raw, ts: i64) -> String {
    hex::encode(ring::hmac::sign(&mac(key), canonical(raw, ts).as_bytes()))
}

/// The signature the centre puts in `sig` (for its tooling and the tests).
pub fn sign(
    key: &[u8],
    request_id: &str,
    command: &str,
    ts: i64,
    meters: &[&str],
    series: &[&str],
    target: &str,
) -> String {
    let raw = Raw {
        request_id: request_id.into(),
        command: command.into(),
        meters: (!meters.is_empty()).then(|| meters.iter().map(|s| s.to_string()).collect()),
        series: (!series.is_empty()).then(|| series.iter().map(|s| s.to_string()).collect()),
        target: (!target.is_empty()).then(|| target.to_owned()),
        ..Raw::default()
    };
    signed(key, &raw, ts)
}

/// The signature of a `backfill` (`profile`, `from` and `to` as sent).
pub fn sign_backfill(
    key: &[u8],
    request_id: &str,
    ts: i64,
    meters: &[&str],
    profile: &str,
    from: &str,
    to: &str,
) -> String {
    let raw = Raw {
        request_id: request_id.into(),
        command: "backfill".into(),
        meters: Some(meters.iter().map(|s| s.to_string()).collect()),
        profile: Some(profile.to_owned()),
        from: Some(from.to_owned()),
        to: Some(to.to_owned()),
        ..Raw::default()
    };
    signed(key, &raw, ts)
}

/// The signature of a `configure` (`confirm_within` as sent, empty if left out).
pub fn sign_configure(
    key: &[u8],
    request_id: &str,
    ts: i64,
    config: &str,
    base: &str,
    confirm_within: &str,
) -> String {
    let raw = Raw {
        request_id: request_id.into(),
        command: "configure".into(),
        config: Some(config.to_owned()),
        base: Some(base.to_owned()),
        confirm_within: (!confirm_within.is_empty()).then(|| confirm_within.to_owned()),
        ..Raw::default()
    };
    signed(key, &raw, ts)
}

#[cfg(test)]
mod tests;
