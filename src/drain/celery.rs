//! Celery protocol v2 task messages, sans-IO: records in, headers and a JSON body out.
//!
//! A stock Celery 5 worker consuming the queue runs these as
//! `task(gateway=…, readings=[…])` (or `events=[…]`). The layout follows Celery's "Message
//! Protocol" document, version 2: the task's metadata in the AMQP headers, and a body of
//! `[args, kwargs, embed]`.
//!
//! The task id is a UUID v5 of the gateway and the sequence numbers the message carries, so a
//! message that is sent again after a lost confirmation has the same id as the first copy.

use serde::Serialize;
use uuid::Uuid;

use crate::reading::{Reading, Stamp, SystemEvent};

/// The namespace of amr-edge's task ids: a fixed random UUID, never to change (task ids of
/// re-sent messages must stay the same across versions).
const NAMESPACE: Uuid = Uuid::from_u128(0x6f2d_8d9c_0c5a_5b4e_9d1e_3a7b_2c4f_8e10);

/// A header value, in the few AMQP field types Celery's headers use.
#[derive(Clone, Debug, PartialEq)]
pub enum Header {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    Array(Vec<Header>),
}

/// Everything needed to publish one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskMessage {
    pub id: String,
    pub headers: Vec<(&'static str, Header)>,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub content_encoding: &'static str,
}

impl TaskMessage {
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// The task names and the sender's identity.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub gateway: String,
    /// Celery's `origin`: who sent the task.
    pub origin: String,
}

// The fields in alphabetical order: serialized straight from these structs, the body is
// byte for byte what it was when it went through a `serde_json::Value` (whose maps sort their
// keys), without building one.
// Text fields that are written by their `Display` straight into the body, with no string
// of their own in between.
#[derive(Serialize)]
struct ReadingJson<'a> {
    cadence: &'static str,
    flags: Vec<&'static str>,
    id_type: &'a str,
    meter: &'a str,
    read_at: Shown<&'a Stamp>,
    reading_id: Shown<RecordId<'a>>,
    series: Shown<&'a crate::reading::Obis>,
    timestamp: Shown<&'a Stamp>,
    unit: &'a str,
    value: &'a str,
}

/// Serializes as the string its `Display` writes.
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// [`record_id`], written where it goes.
struct RecordId<'a>(&'a str, u64);

impl std::fmt::Display for RecordId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

#[derive(Serialize)]
struct EventJson<'a> {
    at: String,
    bus: Option<&'a str>,
    details: serde_json::Map<String, serde_json::Value>,
    event_id: String,
    kind: &'static str,
    message: &'a str,
    meter: Option<&'a str>,
}

/// A task's kwargs: `{"gateway": …, kind: items}`, its two keys in sorted order.
struct Kwargs<'a, T> {
    gateway: &'a str,
    kind: &'a str,
    items: &'a T,
}

impl<T: Serialize> Serialize for Kwargs<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        if self.kind < "gateway" {
            m.serialize_entry(self.kind, self.items)?;
            m.serialize_entry("gateway", self.gateway)?;
        } else {
            m.serialize_entry("gateway", self.gateway)?;
            m.serialize_entry(self.kind, self.items)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct Embed {
    callbacks: Option<()>,
    errbacks: Option<()>,
    chain: Option<()>,
    chord: Option<()>,
}

const EMBED: Embed = Embed {
    callbacks: None,
    errbacks: None,
    chain: None,
    chord: None,
};

/// `{gateway}-{sequence}`: the id the centre de-duplicates on.
pub fn record_id(gateway: &str, seq: u64) -> String {
    format!("{gateway}-{seq}")
}

/// One task carrying `readings` (sequence number, reading), oldest first.
pub fn readings_task(env: &Envelope, task: &str, readings: &[(u64, &Reading)]) -> TaskMessage {
    let items: Vec<ReadingJson> = readings
        .iter()
        .map(|(seq, r)| ReadingJson {
            reading_id: Shown(RecordId(&env.gateway, *seq)),
            meter: &r.meter,
            id_type: &r.id_type,
            series: Shown(&r.series),
            value: r.value.as_str(),
            unit: &r.unit,
            timestamp: Shown(&r.timestamp),
            read_at: Shown(&r.read_at),
            cadence: r.cadence.as_str(),
            flags: r.flags.names(),
        })
        .collect();
    let seqs: Vec<u64> = readings.iter().map(|(s, _)| *s).collect();
    build(env, task, "readings", &seqs, &items)
}

/// One task carrying system `events`, oldest first.
pub fn events_task(env: &Envelope, task: &str, events: &[(u64, &SystemEvent)]) -> TaskMessage {
    let items: Vec<EventJson> = events
        .iter()
        .map(|(seq, e)| EventJson {
            event_id: record_id(&env.gateway, *seq),
            kind: e.kind.as_str(),
            meter: e.meter.as_deref(),
            bus: e.bus.as_deref(),
            at: e.at.rfc3339(),
            message: &e.message,
            details: e
                .details
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        })
        .collect();
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    build(env, task, "events", &seqs, &items)
}

/// The deterministic task id: same gateway and sequence numbers, same id.
pub fn task_id(gateway: &str, kind: &str, seqs: &[u64]) -> Uuid {
    let mut name = format!("{gateway}/{kind}/");
    for (i, s) in seqs.iter().enumerate() {
        if i > 0 {
            name.push(',');
        }
        name.push_str(&s.to_string());
    }
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

fn build<T: Serialize>(
    env: &Envelope,
    task: &str,
    kind: &str,
    seqs: &[u64],
    items: &T,
) -> TaskMessage {
    let id = task_id(&env.gateway, kind, seqs).to_string();
    let kwargs = Kwargs {
        gateway: &env.gateway,
        kind,
        items,
    };
    let body = serde_json::to_vec(&(Vec::<()>::new(), &kwargs, &EMBED)).unwrap_or_default();
    let kwargsrepr = format!(
        "{{'gateway': '{}', '{kind}': <{} {kind}>}}",
        env.gateway,
        seqs.len()
    );
    TaskMessage {
        headers: vec![
            ("lang", Header::Str("py".into())),
            ("task", Header::Str(task.into())),
            ("id", Header::Str(id.clone())),
            ("shadow", Header::Null),
            ("eta", Header::Null),
            ("expires", Header::Null),
            ("group", Header::Null),
            ("group_index", Header::Null),
            ("retries", Header::Int(0)),
            ("timelimit", Header::Array(vec![Header::Null, Header::Null])),
            ("root_id", Header::Str(id.clone())),
            ("parent_id", Header::Null),
            ("argsrepr", Header::Str("()".into())),
            ("kwargsrepr", Header::Str(kwargsrepr)),
            ("origin", Header::Str(env.origin.clone())),
            ("ignore_result", Header::Bool(true)),
        ],
        id,
        body,
        content_type: "application/json",
        content_encoding: "utf-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Cadence, Decimal, EventKind, Flags, Obis};

    fn env() -> Envelope {
        Envelope {
            gateway: "gw-0042".into(),
            origin: "amr-edge@gw-0042".into(),
        }
    }

    fn reading() -> Reading {
        Reading {
            meter: "SDM630-0001".into(),
            id_type: "name".into(),
            series: Obis([1, 0, 1, 8, 0, 255]),
            value: Decimal::parse("14567.125").unwrap(),
            unit: "kWh".into(),
            timestamp: Stamp {
                ms: 1_763_680_500_000,
                offset: 3600,
            },
            read_at: Stamp {
                ms: 1_763_680_501_250,
                offset: 3600,
            },
            cadence: Cadence::Quarterly,
            flags: Flags::LATE,
        }
    }

    #[test]
    fn the_body_should_be_args_kwargs_embed_with_exact_values() {
        let r = reading();
        let m = readings_task(&env(), "utilitarian.commits.meter_readings", &[(7, &r)]);
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!([
                [],
                {"gateway": "gw-0042", "readings": [{
                    "reading_id": "gw-0042-7",
                    "meter": "SDM630-0001",
                    "id_type": "name",
                    "series": "1-0-1-8-0-255",
                    "value": "14567.125",
                    "unit": "kWh",
                    "timestamp": "2025-11-21T00:15:00+01:00",
                    "read_at": "2025-11-21T00:15:01.250+01:00",
                    "cadence": "quarterly",
                    "flags": ["late"],
                }]},
                {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
            ])
        );
    }

    #[test]
    fn the_body_should_be_the_bytes_a_json_value_would_give() {
        // Serialized straight from structs, the kwargs must still be byte for byte what going
        // through `serde_json::Value` gave (sorted keys), for readings and for events.
        let r = reading();
        let e = SystemEvent::new(EventKind::Overrun, Stamp { ms: 0, offset: 0 }, "late")
            .meter("m1")
            .detail("b", 2)
            .detail("a", 1);
        for m in [
            readings_task(&env(), "t", &[(7, &r), (8, &r)]),
            events_task(&env(), "t", &[(9, &e)]),
        ] {
            // The kwargs, that is: the embed was always serialized from its struct.
            let value: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            let kwargs = serde_json::to_string(&value[1]).unwrap();
            let body = String::from_utf8(m.body).unwrap();
            assert!(body.starts_with(&format!("[[],{kwargs},")), "{body}");
        }
    }

    #[test]
    fn headers_should_carry_what_a_celery_worker_needs() {
        let r = reading();
        let m = readings_task(&env(), "utilitarian.commits.meter_readings", &[(7, &r)]);
        assert_eq!(m.header("lang"), Some(&Header::Str("py".into())));
        assert_eq!(
            m.header("task"),
            Some(&Header::Str("utilitarian.commits.meter_readings".into()))
        );
        assert_eq!(m.header("id"), Some(&Header::Str(m.id.clone())));
        assert_eq!(m.header("root_id"), Some(&Header::Str(m.id.clone())));
        assert_eq!(
            m.header("timelimit"),
            Some(&Header::Array(vec![Header::Null, Header::Null]))
        );
        assert_eq!(m.content_type, "application/json");
        for h in [
            "parent_id",
            "group",
            "retries",
            "eta",
            "expires",
            "argsrepr",
            "kwargsrepr",
            "origin",
        ] {
            assert!(m.header(h).is_some(), "{h}");
        }
    }

    #[test]
    fn the_same_records_should_give_the_same_task_id_and_others_another() {
        let r = reading();
        let a = readings_task(&env(), "t", &[(7, &r), (8, &r)]);
        let b = readings_task(&env(), "t", &[(7, &r), (8, &r)]);
        let c = readings_task(&env(), "t", &[(7, &r)]);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(Uuid::parse_str(&a.id).unwrap().get_version_num(), 5);
    }

    #[test]
    fn events_should_carry_kind_meter_and_details() {
        let e = SystemEvent::new(
            EventKind::ExceptionResponse,
            Stamp { ms: 0, offset: 0 },
            "Meter answered with exception 2 (illegal data address)",
        )
        .meter("m1")
        .bus("rs485-1")
        .detail("code", 2);
        let m = events_task(
            &env(),
            "utilitarian.commits.meter_system_events",
            &[(9, &e)],
        );
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        let ev = &body[1]["events"][0];
        assert_eq!(ev["event_id"], "gw-0042-9");
        assert_eq!(ev["kind"], "exception_response");
        assert_eq!(ev["meter"], "m1");
        assert_eq!(ev["details"]["code"], "2");
    }
}
