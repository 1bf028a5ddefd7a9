//! The orchestration between the broker and the [`Handler`]: admission (flood limits), the
//! command loop (one command at a time, in arrival order), the subscription, and the
//! retained status. No I/O of its own: the broker is an [`Mqtt`], fed by the I/O loop
//! through the [`Gate`].

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::command::request_id_of;
use super::handler::Handler;
use super::link::{Delivery, Mqtt};
use super::reply::{Rejected, to_json};

/// Where the I/O loop hands over what the broker sent. Never blocks.
pub struct Gate<M: Mqtt> {
    commands: mpsc::Sender<Delivery>,
    /// Counts connections, and whether the broker kept our session on the last one.
    connection: watch::Sender<(u64, bool)>,
    mqtt: M,
    replies: String,
}

impl<M: Mqtt> Gate<M> {
    pub fn mqtt(&self) -> &M {
        &self.mqtt
    }

    pub fn connected(&self, session_present: bool) {
        self.connection
            .send_modify(|(n, present)| (*n, *present) = (*n + 1, session_present));
    }

    /// A command from the broker: queued for the command loop, or — more than `max_pending`
    /// waiting — answered `busy` and acknowledged at once, so a flood is told, not lost. If
    /// even that reply cannot be queued, the command is left unacknowledged: the broker
    /// delivers it again after the next reconnect.
    pub fn offer(&self, delivery: Delivery) {
        let delivery = match self.commands.try_send(delivery) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(d)) => d,
            // Stopping: not acknowledged, so it comes again.
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        let id = request_id_of(&delivery.payload);
        tracing::warn!(request_id = ?id, "Command rejected: too many pending");
        let busy = Rejected::new(
            id.as_deref(),
            "busy: too many commands pending, try again later",
        );
        match self.mqtt.try_publish(&self.replies, false, to_json(&busy)) {
            Ok(()) => {
                let _ = self.mqtt.try_ack(&delivery);
            }
            Err(e) => {
                tracing::warn!(request_id = ?id, error = %e, "Command left for the broker to deliver again: no room to answer it")
            }
        }
    }
}

/// The long-lived control session: `new`, then `run` until shutdown.
pub struct Session<M: Mqtt> {
    handler: Handler<M>,
    inbox: mpsc::Receiver<Delivery>,
    connection: watch::Receiver<(u64, bool)>,
    status_every: Duration,
}

impl<M: Mqtt> Session<M> {
    /// `max_pending`: commands that may wait for the command loop.
    pub fn new(handler: Handler<M>, max_pending: usize, status_every: Duration) -> (Self, Gate<M>) {
        let (commands, inbox) = mpsc::channel(max_pending.max(1));
        let (connection, connection_rx) = watch::channel((0, false));
        let gate = Gate {
            commands,
            connection,
            mqtt: handler.mqtt().clone(),
            replies: handler.context().topics.replies.clone(),
        };
        (
            Session {
                handler,
                inbox,
                connection: connection_rx,
                status_every,
            },
            gate,
        )
    }

    /// Finishes what a restart interrupted, then takes commands one at a time until
    /// `shutdown`; the status loop runs beside it (a tracked task).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let status = Status {
            handler: self.handler.clone(),
            connection: self.connection.clone(),
            every: self.status_every,
        };
        self.handler
            .tasks()
            .spawn("status", status.run(shutdown.clone()));
        self.handler.announce().await;
        self.handler.resume().await;
        loop {
            let delivery = tokio::select! {
                d = self.inbox.recv() => match d { Some(d) => d, None => return },
                () = shutdown.cancelled() => return,
            };
            self.handler.handle(delivery).await;
        }
    }
}

/// Subscribes on every connection the broker kept no session for, and publishes the
/// retained `online` status then and every `every`.
struct Status<M: Mqtt> {
    handler: Handler<M>,
    connection: watch::Receiver<(u64, bool)>,
    every: Duration,
}

impl<M: Mqtt> Status<M> {
    async fn run(mut self, shutdown: CancellationToken) {
        let topics = self.handler.context().topics.clone();
        let mut tick = tokio::time::interval(self.every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = self.connection.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (_, session_present) = *self.connection.borrow_and_update();
                    if !session_present {
                        // A new session (or the broker forgot ours): subscribe again.
                        match self.handler.mqtt().subscribe(&topics.commands).await {
                            Ok(()) => tracing::debug!(topic = %topics.commands, "Subscribed to commands"),
                            Err(e) => tracing::warn!(error = %e, "Could not subscribe to commands"),
                        }
                    }
                }
                () = shutdown.cancelled() => return,
            }
            let Some(doc) = self.handler.online().await else {
                continue;
            };
            // Never wait here: a full queue means we are offline; the next tick will do.
            let _ = self
                .handler
                .mqtt()
                .try_publish(&topics.status, true, to_json(&doc));
        }
    }
}
