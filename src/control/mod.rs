//! Central control over MQTT: on-demand polls, inspect, ping, cancel, remote configuration
//! (confirm-or-revert); a retained status.
//!
//! Topics, under `{topic_prefix}/{gateway}/`:
//!
//! * `commands` — subscribed at QoS 1 on a persistent session (fixed client id, clean
//!   session off), so commands sent while the uplink is down arrive when it is back. The
//!   subscription is renewed on every connection the broker did not keep a session for.
//! * `replies` — QoS 1: `accepted` at once, then `done` (with per-meter results for a poll),
//!   or `rejected` with a reason. Every reply carries the command's `request_id`.
//! * `status` — retained: `online` (version, start, buffer depth, last drain) on connect and
//!   every `status_interval`; `offline` as the last will, and on a clean stop.
//!
//! A command is acknowledged to the broker (manual acks) only once it is accepted: recorded
//! durably in the store with what it is, and its polls queued. Dying before the record, the
//! broker delivers it again; dying after it, the next start runs it to its `done`. Arriving
//! twice (same `request_id`, across restarts too), it runs once and the second gets the
//! first one's outcome ([`handler`] has the steps).
//!
//! Layout, from the wire inwards:
//!
//! * [`config`] — `[mqtt]`: URL, topics, credentials, TLS, the rumqttc options.
//! * [`link`] — the [`Mqtt`] trait, its rumqttc implementation and the thin I/O loop.
//! * [`session`] — admission (flood limits), the command loop, subscription and status.
//! * [`handler`] — running one command: parse, verify, record, poll, reply.
//! * [`command`] — parsing and signatures, sans-IO.
//! * [`remote`] — `get_config`, `configure`, `confirm`: the confirm window ([`remote::window`],
//!   sans-IO) and the [`remote::Keeper`] the agent's main loop owns.
//! * [`reply`] — the typed reply and status documents.
//! * [`tasks`] — every task control starts, tracked; their panics reported.

pub mod command;
pub mod config;
pub mod handler;
pub mod link;
pub mod remote;
pub mod reply;
pub mod session;
pub mod tasks;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rumqttc::{AsyncClient, MqttOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{ControlError, MqttConfig, Topics};
pub use link::Mqtt;

use crate::beat::BeatConfig;
use crate::bus::Router;
use crate::clock::SharedClock;
use crate::drain::DrainStatus;
use crate::store::Store;
use handler::{Context, Handler};
use link::RumqttLink;
use remote::RemoteLink;
use reply::{StatusDoc, to_json};
use session::Session;
use tasks::Tasks;

/// The long-lived MQTT control task.
pub struct Control {
    config: MqttConfig,
    options: MqttOptions,
    context: Arc<Context>,
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: MqttConfig,
        gateway: &str,
        router: Router,
        store: Arc<dyn Store>,
        drain: watch::Receiver<DrainStatus>,
        clock: SharedClock,
        tz: TimeZone,
        beat: BeatConfig,
        meters: Vec<String>,
        started_at: Timestamp,
        remote: Option<RemoteLink>,
    ) -> Result<Control, ControlError> {
        let will = StatusDoc::offline(gateway, "connection lost", None);
        let options = config.options(gateway, String::from_utf8_lossy(&to_json(&will)).into())?;
        let context = Arc::new(Context {
            router,
            store,
            drain,
            clock,
            tz,
            beat,
            meters,
            gateway: gateway.to_owned(),
            started_at,
            topics: config.topics(gateway),
            poll_timeout: config.poll_timeout.0,
            max_backfill: config.max_backfill.0,
            key: config.hmac_key()?,
            max_payload: config.max_payload.0 as usize,
            signature_window: config.signature_window.0,
            remote_config: config.remote_config,
            config_requests: remote.as_ref().map(|r| r.requests.clone()),
            notices: remote.map(|r| r.notices).unwrap_or_default(),
        });
        Ok(Control {
            config,
            options,
            context,
        })
    }

    /// Runs until `shutdown`; then stops every task it started, says `offline` and
    /// disconnects. A panic in any of its tasks ends it with a panic, which the agent notices
    /// as it does for its other tasks.
    pub async fn run(self, shutdown: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 256);
        let link = RumqttLink(client);
        let topics = self.context.topics.clone();
        let stop = shutdown.child_token();
        let (tasks, mut panics) = Tasks::new();
        let handler = Handler::new(
            self.context.clone(),
            link.clone(),
            tasks.clone(),
            stop.clone(),
        );
        let (session, gate) = Session::new(
            handler.clone(),
            self.config.max_pending,
            self.config.status_interval.0,
        );
        tasks.spawn("command", session.run(stop.clone()));
        let panicked = tokio::select! {
            () = link::drive(&mut eventloop, &gate, &topics.commands, self.config.max_backoff.0, &stop) => None,
            why = panics.recv() => why,
        };
        stop.cancel();
        // Polled meanwhile, so replies queued by tasks finishing can still leave.
        if link::poll_while(&mut eventloop, tasks.close(), tasks::STOP_WITHIN)
            .await
            .is_none()
        {
            tracing::warn!(
                remaining = tasks.len(),
                "Control tasks did not stop in time"
            );
        }
        let reason = if panicked.is_some() {
            "failure"
        } else {
            "shutdown"
        };
        let goodbye = to_json(&handler.offline(reason));
        link::say_goodbye(&link, &mut eventloop, &topics.status, goodbye).await;
        if let Some(why) = panicked {
            panic!("{why}");
        }
    }
}
