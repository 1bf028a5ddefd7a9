//! Commands from the centre, sans-IO: bytes in, a command or a reason to reject it out.
//!
//! ```json
//! {"request_id": "r-1", "command": "poll", "meters": ["SDM630-0001"], "series": ["1-0:1.8.0"]}
//! {"request_id": "r-2", "command": "inspect"}
//! {"request_id": "r-3", "command": "ping"}
//! {"request_id": "r-4", "command": "cancel", "target": "r-1"}
//! ```
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
//! (absent fields are empty strings). The request id makes a replay within the window a
//! duplicate, which is not run twice.

use std::collections::HashSet;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::reading::Obis;

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
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Poll { .. } => "poll",
            Command::Inspect => "inspect",
            Command::Ping => "ping",
            Command::Cancel { .. } => "cancel",
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
    pub meters: &'a HashSet<String>,
    /// The HMAC key, when commands must be signed.
    pub key: Option<&'a [u8]>,
    pub now_s: i64,
    pub window_s: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    request_id: String,
    command: String,
    meters: Option<Vec<String>>,
    series: Option<Vec<String>>,
    target: Option<String>,
    ts: Option<i64>,
    sig: Option<String>,
}

pub fn parse(payload: &[u8], rules: &Rules<'_>) -> Result<Request, Rejection> {
    let reject = |request_id: Option<&str>, reason: String| Rejection {
        request_id: request_id.map(str::to_owned),
        reason,
    };
    if payload.len() > rules.max_payload {
        return Err(reject(
            None,
            format!(
                "payload of {} bytes is over the limit of {} bytes",
                payload.len(),
                rules.max_payload
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
        other => {
            return Err(reject(
                id,
                format!("unknown command `{other}` (poll, inspect, ping, cancel)"),
            ));
        }
    };
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
        let mut mac = mac(key);
        mac.update(canonical(&raw, ts).as_bytes());
        if mac.verify_slice(&sig).is_err() {
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

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length")
}

fn canonical(raw: &Raw, ts: i64) -> String {
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        raw.request_id,
        raw.command,
        ts,
        raw.meters.as_deref().unwrap_or_default().join(","),
        raw.series.as_deref().unwrap_or_default().join(","),
        raw.target.as_deref().unwrap_or_default()
    )
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
        ts: Some(ts),
        sig: None,
    };
    let mut mac = mac(key);
    mac.update(canonical(&raw, ts).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> HashSet<String> {
        ["m1", "m2"].iter().map(|s| s.to_string()).collect()
    }

    fn parse_with(payload: &str, key: Option<&[u8]>) -> Result<Request, Rejection> {
        let m = meters();
        parse(
            payload.as_bytes(),
            &Rules {
                max_payload: 4096,
                meters: &m,
                key,
                now_s: 1_800_000_000,
                window_s: 300,
            },
        )
    }

    fn reason(payload: &str) -> String {
        parse_with(payload, None).unwrap_err().reason
    }

    #[test]
    fn good_commands_should_parse() {
        let r = parse_with(
            r#"{"request_id":"a","command":"poll","meters":["m1"],"series":["1-0:1.8.0"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            r.command,
            Command::Poll {
                meters: Some(vec!["m1".into()]),
                series: Some(vec!["1-0:1.8.0".parse().unwrap()])
            }
        );
        assert_eq!(
            parse_with(r#"{"request_id":"b","command":"poll"}"#, None)
                .unwrap()
                .command,
            Command::Poll {
                meters: None,
                series: None
            }
        );
        assert_eq!(
            parse_with(r#"{"request_id":"c","command":"ping"}"#, None)
                .unwrap()
                .command,
            Command::Ping
        );
        assert_eq!(
            parse_with(r#"{"request_id":"d","command":"inspect"}"#, None)
                .unwrap()
                .command,
            Command::Inspect
        );
        assert_eq!(
            parse_with(
                r#"{"request_id":"e","command":"cancel","target":"a"}"#,
                None
            )
            .unwrap()
            .command,
            Command::Cancel { target: "a".into() }
        );
    }

    #[test]
    fn malformed_commands_should_be_rejected_with_a_reason() {
        let cases = [
            ("not json", "not JSON"),
            ("[1,2]", "expected a JSON object"),
            (r#"{"command":"poll"}"#, "missing field `request_id`"),
            (r#"{"request_id":7,"command":"poll"}"#, "invalid type"),
            (
                r#"{"request_id":"","command":"poll"}"#,
                "request_id must be",
            ),
            (
                r#"{"request_id":"x","command":"reboot"}"#,
                "unknown command `reboot`",
            ),
            (
                r#"{"request_id":"x","command":"poll","meters":["m9"]}"#,
                "unknown meter `m9`",
            ),
            (
                r#"{"request_id":"x","command":"poll","meters":[]}"#,
                "`meters` is empty",
            ),
            (
                r#"{"request_id":"x","command":"poll","meters":"m1"}"#,
                "invalid type",
            ),
            (
                r#"{"request_id":"x","command":"poll","series":["1-0:1.8"]}"#,
                "not an OBIS code",
            ),
            (
                r#"{"request_id":"x","command":"poll","colour":"red"}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"request_id":"x","command":"ping","meters":["m1"]}"#,
                "`meters` does not apply to `ping`",
            ),
            (r#"{"request_id":"x","command":"cancel"}"#, "needs `target`"),
        ];
        for (payload, want) in cases {
            let r = reason(payload);
            assert!(r.contains(want), "{payload}: `{r}` lacks `{want}`");
        }
        // Where the request id could be read, the rejection carries it.
        assert_eq!(
            parse_with(r#"{"request_id":"x","command":"reboot"}"#, None)
                .unwrap_err()
                .request_id
                .as_deref(),
            Some("x")
        );
    }

    #[test]
    fn an_oversized_payload_should_be_rejected_before_parsing() {
        let big = format!(
            r#"{{"request_id":"x","command":"ping","pad":"{}"}}"#,
            "x".repeat(5000)
        );
        assert!(reason(&big).contains("over the limit of 4096 bytes"));
    }

    #[test]
    fn signed_commands_should_verify_and_everything_else_be_refused() {
        let key = b"gateway-secret";
        let ts = 1_800_000_010;
        let sig = sign(key, "s1", "poll", ts, &["m1"], &[], "");
        let ok = format!(
            r#"{{"request_id":"s1","command":"poll","meters":["m1"],"ts":{ts},"sig":"{sig}"}}"#
        );
        assert!(parse_with(&ok, Some(key)).is_ok());
        let unsigned = r#"{"request_id":"s1","command":"poll","meters":["m1"]}"#;
        assert!(
            parse_with(unsigned, Some(key))
                .unwrap_err()
                .reason
                .contains("unsigned")
        );
        let tampered = ok.replace(r#"["m1"]"#, r#"["m2"]"#);
        assert!(
            parse_with(&tampered, Some(key))
                .unwrap_err()
                .reason
                .contains("does not match")
        );
        let old = format!(
            r#"{{"request_id":"s1","command":"poll","meters":["m1"],"ts":{},"sig":"{}"}}"#,
            ts - 3600,
            sign(key, "s1", "poll", ts - 3600, &["m1"], &[], "")
        );
        assert!(
            parse_with(&old, Some(key))
                .unwrap_err()
                .reason
                .contains("from the gateway's clock")
        );
        assert!(
            parse_with(&ok, Some(b"another key"))
                .unwrap_err()
                .reason
                .contains("does not match")
        );
    }
}
