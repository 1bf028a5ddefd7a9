//! What the gateway says on `replies` and `status`, as typed documents (sans-IO: built here,
//! serialised once, published by the I/O layer).
//!
//! Every reply carries the command's `request_id` and a `status`: `accepted` (a poll is
//! queued; its `done` follows), `done` (with the result, or per-meter results for a poll) or
//! `rejected` (with a reason, and for a config that does not validate, its `problems`). A
//! `configure` is `accepted`, then `applied` (sent from the new configuration), then, unless
//! confirmed in time, `reverted`. A reply that repeats an earlier one, for a command delivered
//! again, says `"duplicate": true`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bus::BusSnapshot;
use crate::status::{BufferReport, DrainReport, MeterReport};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Done,
    Rejected,
    Applied,
    Reverted,
}

/// `{"request_id", "status": "rejected", "reason"}`.
#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    pub request_id: Option<String>,
    pub status: Status,
    pub reason: String,
    /// A `configure` whose config does not validate: every problem, located.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ConfigProblem>,
}

impl Rejected {
    pub fn new(request_id: Option<&str>, reason: impl Into<String>) -> Self {
        Rejected {
            request_id: request_id.map(str::to_owned),
            status: Status::Rejected,
            reason: reason.into(),
            problems: Vec::new(),
        }
    }
}

/// One problem of a config, as `check` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigProblem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: String,
    pub message: String,
}

/// `{"request_id", "status": "applied", "command": "configure", …}`: the new config runs;
/// `confirm` it by `confirm_by` or it is reverted.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigApplied {
    pub request_id: String,
    pub status: Status,
    pub command: &'static str,
    pub sha256: String,
    pub previous_sha256: String,
    pub confirm_within: String,
    pub confirm_by: String,
}

/// `{"request_id", "status": "reverted", "command": "configure", …}`: the gateway went back to
/// the configuration `sha256`.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigReverted {
    pub request_id: String,
    pub status: Status,
    pub command: &'static str,
    /// The configuration now active (the previous one).
    pub sha256: String,
    /// The one given up.
    pub reverted_sha256: String,
    pub reason: String,
    pub at: String,
}

/// What `get_config` answers: the active configuration and where it came from.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigDoc {
    pub path: String,
    /// SHA-256 of the file's bytes, hex: the `base` of the next `configure`.
    pub sha256: String,
    /// The file's text, with inline secrets (`amqp.url`'s password) replaced by `***`.
    pub text: String,
    /// The keys whose values `text` does not show.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
    /// `local` (the file as an operator wrote it) or `remote` (a `configure`).
    pub source: &'static str,
    /// The `configure` it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// When it took effect (for a local file: when this agent loaded it).
    pub applied_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<String>,
    /// It waits for its `confirm` until this time, else it is reverted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_by: Option<String>,
    pub remote_config: bool,
}

/// What `confirm` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Confirmed {
    pub target: String,
    pub sha256: String,
    /// It had been confirmed before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
}

/// `{"request_id", "status": "accepted", "command": "poll", "meters"}`: queued, `done` follows.
#[derive(Clone, Debug, Serialize)]
pub struct Accepted {
    pub request_id: String,
    pub status: Status,
    pub command: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub meters: Vec<String>,
    /// This command had been accepted before (same `request_id`) and is still running.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// When it was first accepted, for a duplicate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<String>,
}

/// `{"request_id", "status": "done", "command", …}`, with what the command found.
#[derive(Clone, Debug, Serialize)]
pub struct Done {
    pub request_id: String,
    pub status: Status,
    pub command: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Done {
    pub fn new(request_id: &str, outcome: Outcome) -> Self {
        Done {
            request_id: request_id.to_owned(),
            status: Status::Done,
            command: outcome.command(),
            outcome,
        }
    }
}

/// What a command found: `results` (per meter) for a poll, `result` for the others.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Poll { results: Vec<MeterResult> },
    Backfill { results: Vec<MeterResult> },
    Ping { result: Pong },
    Inspect { result: Box<Inspection> },
    Cancel { result: Cancelled },
    GetConfig { result: Box<ConfigDoc> },
    Confirm { result: Confirmed },
}

impl Outcome {
    pub fn command(&self) -> &'static str {
        match self {
            Outcome::Poll { .. } => "poll",
            Outcome::Backfill { .. } => "backfill",
            Outcome::Ping { .. } => "ping",
            Outcome::Inspect { .. } => "inspect",
            Outcome::Cancel { .. } => "cancel",
            Outcome::GetConfig { .. } => "get_config",
            Outcome::Confirm { .. } => "confirm",
        }
    }
}

/// One meter of a poll: its values, or why there are none.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeterResult {
    pub meter: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Value>>,
    /// Whether the readings are in the store (they will reach the centre by AMQP too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A backfill's rows: how many, the first and last row's time, ranges the meter could
    /// not give.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub rows: Option<RowsResult>,
}

/// What a backfill read of one meter: `rows`, `readings`, `first`, `last`, `gaps`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowsResult {
    pub rows: u64,
    pub readings: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<[String; 2]>,
}

impl MeterResult {
    /// A meter that was not read at all.
    pub fn failed(meter: &str, error: impl Into<String>) -> Self {
        MeterResult {
            meter: meter.to_owned(),
            ok: false,
            values: None,
            stored: None,
            error: Some(error.into()),
            rows: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Value {
    pub series: String,
    pub value: String,
    pub unit: String,
    pub timestamp: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Pong {
    pub pong: bool,
    pub gateway: String,
    pub version: &'static str,
    pub uptime_s: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cancelled {
    pub target: String,
    pub cancelled: usize,
}

/// What `inspect` shows, like `celery inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub gateway: String,
    pub version: &'static str,
    pub started_at: String,
    pub buses: Vec<BusSnapshot>,
    /// Cadence → the next read, RFC 3339 in the gateway's zone.
    pub next_reads: BTreeMap<String, String>,
    pub store: BufferReport,
    pub drain: Option<DrainReport>,
    pub meters: Vec<MeterReport>,
}

/// The retained document on `status`.
#[derive(Clone, Debug, Serialize)]
pub struct StatusDoc {
    pub state: State,
    pub gateway: String,
    pub version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    pub at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer: Option<Buffer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_drain: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_connected: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Online,
    Offline,
}

#[derive(Clone, Debug, Serialize)]
pub struct Buffer {
    pub readings: u64,
    pub events: u64,
    pub bytes: u64,
    pub oldest_unsent: Option<String>,
    pub evictions: u64,
}

impl StatusDoc {
    /// `offline`: the last will (`reason` "connection lost", no time) or a clean stop.
    pub fn offline(gateway: &str, reason: &'static str, at: Option<String>) -> Self {
        StatusDoc {
            state: State::Offline,
            gateway: gateway.to_owned(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: None,
            at,
            reason: Some(reason),
            buffer: None,
            last_drain: None,
            broker_connected: None,
        }
    }
}

/// The JSON of a document. Our own types always serialise.
pub fn to_json(doc: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(doc: &impl Serialize) -> serde_json::Value {
        serde_json::from_slice(&to_json(doc)).unwrap()
    }

    #[test]
    fn replies_should_have_the_documented_shape() {
        assert_eq!(
            json(&Rejected::new(Some("r1"), "busy")),
            serde_json::json!({"request_id": "r1", "status": "rejected", "reason": "busy"})
        );
        let done = Done::new(
            "r2",
            Outcome::Poll {
                results: vec![MeterResult::failed("m1", "cancelled")],
            },
        );
        assert_eq!(
            json(&done),
            serde_json::json!({"request_id": "r2", "status": "done", "command": "poll",
                "results": [{"meter": "m1", "ok": false, "error": "cancelled"}]})
        );
        let pong = Done::new(
            "r3",
            Outcome::Ping {
                result: Pong {
                    pong: true,
                    gateway: "gw".into(),
                    version: "1",
                    uptime_s: 5,
                },
            },
        );
        assert_eq!(json(&pong)["result"]["uptime_s"], 5);
        assert_eq!(json(&pong)["command"], "ping");
    }

    #[test]
    fn the_last_will_should_say_offline_and_why() {
        let v = json(&StatusDoc::offline("gw", "connection lost", None));
        assert_eq!(v["state"], "offline");
        assert_eq!(v["reason"], "connection lost");
        assert!(v["at"].is_null());
        assert!(v.get("buffer").is_none());
    }
}
