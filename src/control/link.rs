//! The broker, as control sees it: the small [`Mqtt`] trait (what the orchestration may ask
//! of the connection), [`RumqttLink`], the real one, and [`drive`], the thin I/O loop that
//! turns rumqttc's events into calls on the [`Gate`].
//!
//! The event loop is never blocked by our publishes: they go through rumqttc's bounded
//! request channel from other tasks. Reconnection uses [`crate::backoff`], since rumqttc
//! itself retries in a tight loop.

use std::future::Future;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use tokio_util::sync::CancellationToken;

use super::session::Gate;
use crate::backoff::Backoff;

/// A command as the broker delivered it; [`Mqtt::ack`] it once it may be forgotten.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub payload: Vec<u8>,
    /// The packet id to acknowledge (0 and `at_least_once` false for QoS 0: nothing to ack).
    pkid: u16,
    at_least_once: bool,
}

impl Delivery {
    pub fn new(pkid: u16, payload: impl Into<Vec<u8>>) -> Self {
        Delivery {
            payload: payload.into(),
            pkid,
            at_least_once: true,
        }
    }

    pub fn pkid(&self) -> u16 {
        self.pkid
    }

    fn from_publish(p: Publish) -> Self {
        Delivery {
            payload: p.payload.to_vec(),
            pkid: p.pkid,
            at_least_once: p.qos != QoS::AtMostOnce,
        }
    }

    /// What rumqttc needs to build the PUBACK.
    fn as_publish(&self) -> Publish {
        let qos = if self.at_least_once {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let mut p = Publish::new("", qos, Vec::new());
        p.pkid = self.pkid;
        p
    }
}

/// Why a request to the broker was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// The request queue is full (the uplink is down or slow): try later, or drop it if a
    /// newer one will come (status).
    #[error("the MQTT request queue is full")]
    Full,
    /// The connection's I/O loop has stopped (shutting down).
    #[error("the MQTT client is closed")]
    Closed,
}

/// The connection to the broker. Publishes are QoS 1 on the topic given; "queued" means the
/// client has it and delivers it once connected (again after a reconnect).
pub trait Mqtt: Clone + Send + Sync + 'static {
    fn subscribe(&self, topic: &str) -> impl Future<Output = Result<(), MqttError>> + Send;
    /// Queues a publish, waiting for room.
    fn publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<(), MqttError>> + Send;
    /// Queues a publish if there is room now.
    fn try_publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), MqttError>;
    /// The broker may forget the delivery (PUBACK), waiting for room.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), MqttError>> + Send;
    fn try_ack(&self, delivery: &Delivery) -> Result<(), MqttError>;
}

/// [`Mqtt`] on rumqttc's client.
#[derive(Clone)]
pub struct RumqttLink(pub AsyncClient);

impl Mqtt for RumqttLink {
    async fn subscribe(&self, topic: &str) -> Result<(), MqttError> {
        self.0
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .map_err(|_| MqttError::Closed)
    }
    async fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), MqttError> {
        self.0
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| MqttError::Closed)
    }
    fn try_publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), MqttError> {
        self.0
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|_| MqttError::Full)
    }
    async fn ack(&self, delivery: &Delivery) -> Result<(), MqttError> {
        self.0
            .ack(&delivery.as_publish())
            .await
            .map_err(|_| MqttError::Closed)
    }
    fn try_ack(&self, delivery: &Delivery) -> Result<(), MqttError> {
        self.0
            .try_ack(&delivery.as_publish())
            .map_err(|_| MqttError::Full)
    }
}

/// Polls the event loop until `shutdown`: connections go to [`Gate::connected`], commands to
/// [`Gate::offer`], failures are logged (once per kind) and retried after a backoff.
pub async fn drive<M: Mqtt>(
    eventloop: &mut EventLoop,
    gate: &Gate<M>,
    commands_topic: &str,
    max_backoff: Duration,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), max_backoff);
    let mut last_error: Option<String> = None;
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            () = shutdown.cancelled() => return,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "Connected to the MQTT broker"
                );
                backoff.reset();
                last_error = None;
                gate.connected(ack.session_present);
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == commands_topic => {
                gate.offer(Delivery::from_publish(p));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Not ours (a stale subscription): the broker may forget it.
                let _ = gate.mqtt().try_ack(&Delivery::from_publish(p));
            }
            Ok(_) => {}
            Err(e) => {
                // A TLS refusal is described without the timestamps rustls puts in some of its
                // messages, so it is logged once, not on every retry.
                let refusal = crate::tls::rejection(&e);
                let msg = match &refusal {
                    Some(why) => format!("TLS: {why}"),
                    None => e.to_string(),
                };
                let delay = backoff.next_delay();
                if last_error.as_deref() != Some(msg.as_str()) {
                    if refusal.is_some() {
                        tracing::error!(error = %msg, retry_in = ?delay, "TLS with the MQTT broker failed (see mqtt.ca_file, client_cert_file); commands are not received until this is fixed");
                    } else if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)) {
                        tracing::error!(error = %msg, retry_in = ?delay, "The MQTT broker refuses this gateway; commands are not received until this is fixed");
                    } else {
                        tracing::warn!(error = %msg, retry_in = ?delay, "MQTT broker not available; polling and buffering go on");
                    }
                    last_error = Some(msg);
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// Polls the event loop while `done` runs (so publishes made meanwhile can leave), then
/// returns `done`'s output; `None` if it took longer than `within`.
pub async fn poll_while<T>(
    eventloop: &mut EventLoop,
    done: impl Future<Output = T>,
    within: Duration,
) -> Option<T> {
    tokio::pin!(done);
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            out = &mut done => return Some(out),
            () = &mut deadline => return None,
            r = eventloop.poll() => if r.is_err() {
                // Not connected: publishes wait in the queue; do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
        }
    }
}

/// A clean stop: queues `goodbye` (the retained `offline` status) and a DISCONNECT, and lets
/// the event loop send both, for at most 3 s.
pub async fn say_goodbye(
    link: &RumqttLink,
    eventloop: &mut EventLoop,
    status_topic: &str,
    goodbye: Vec<u8>,
) {
    let _ = link.try_publish(status_topic, true, goodbye);
    let _ = link.0.try_disconnect();
    let flush = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), flush).await;
}
