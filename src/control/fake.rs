//! A broker for the orchestration tests: records what control publishes, acknowledges and
//! subscribes to; its request queue can be made full.

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::link::{Delivery, Mqtt, MqttError};

#[derive(Default)]
pub struct Broker {
    /// (topic, retained, document), in order.
    pub published: Vec<(String, bool, Value)>,
    /// Packet ids acknowledged, in order.
    pub acked: Vec<u16>,
    pub subscribed: Vec<String>,
    /// The client's request queue is full: `try_*` fail.
    pub full: bool,
}

#[derive(Clone, Default)]
pub struct FakeMqtt(Arc<Mutex<Broker>>);

impl FakeMqtt {
    pub fn broker(&self) -> MutexGuard<'_, Broker> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything published on a topic ending in `suffix` (`/replies`, `/status`).
    pub fn on(&self, suffix: &str) -> Vec<Value> {
        self.broker()
            .published
            .iter()
            .filter(|(t, _, _)| t.ends_with(suffix))
            .map(|(_, _, v)| v.clone())
            .collect()
    }

    /// The replies to `request_id`.
    pub fn replies_to(&self, request_id: &str) -> Vec<Value> {
        self.on("/replies")
            .into_iter()
            .filter(|r| r["request_id"] == request_id)
            .collect()
    }

    fn push(&self, topic: &str, retain: bool, payload: &[u8]) {
        let v = serde_json::from_slice(payload).unwrap_or(Value::Null);
        self.broker().published.push((topic.to_owned(), retain, v));
    }
}

impl Mqtt for FakeMqtt {
    async fn subscribe(&self, topic: &str) -> Result<(), MqttError> {
        self.broker().subscribed.push(topic.to_owned());
        Ok(())
    }
    async fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), MqttError> {
        self.push(topic, retain, &payload);
        Ok(())
    }
    fn try_publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), MqttError> {
        if self.broker().full {
            return Err(MqttError::Full);
        }
        self.push(topic, retain, &payload);
        Ok(())
    }
    async fn ack(&self, delivery: &Delivery) -> Result<(), MqttError> {
        self.broker().acked.push(delivery.pkid());
        Ok(())
    }
    fn try_ack(&self, delivery: &Delivery) -> Result<(), MqttError> {
        if self.broker().full {
            return Err(MqttError::Full);
        }
        self.broker().acked.push(delivery.pkid());
        Ok(())
    }
}
