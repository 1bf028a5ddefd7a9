//! A plain AMQP client on the test side: declare, count, fetch and delete queues.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::AMQP_URL;

pub struct Rabbit {
    _conn: Connection,
    ch: Channel,
}

/// One message as it sits in the queue.
#[derive(Debug, Clone)]
pub struct Msg {
    pub body: serde_json::Value,
    pub headers: FieldTable,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
}

impl Msg {
    /// The readings (or events) the task carries.
    pub fn items(&self, kind: &str) -> Vec<serde_json::Value> {
        self.body[1][kind].as_array().cloned().unwrap_or_default()
    }
}

impl Rabbit {
    pub async fn connect() -> Rabbit {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let conn = Connection::connect(AMQP_URL, props)
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (guest/guest); .ci/run starts it");
        let ch = conn.create_channel().await.expect("channel");
        Rabbit { _conn: conn, ch }
    }

    /// Declares a durable queue, as Celery would.
    pub async fn declare(&self, queue: &str) {
        self.declare_durable(queue).await.expect("queue_declare");
    }

    async fn declare_durable(&self, queue: &str) -> lapin::Result<lapin::Queue> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.ch
            .queue_declare(queue, options, FieldTable::default())
            .await
    }

    pub async fn delete(&self, queue: &str) {
        let _ = self
            .ch
            .queue_delete(queue, QueueDeleteOptions::default())
            .await;
    }

    /// Messages ready in `queue`.
    pub async fn count(&self, queue: &str) -> u32 {
        self.declare_durable(queue)
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    /// Takes (and acks) every message now in `queue`.
    pub async fn take_all(&self, queue: &str) -> Vec<Msg> {
        self.take_up_to(queue, usize::MAX).await
    }

    /// Takes at most `max` messages from `queue`: returns even while the agent keeps
    /// publishing faster than a busy test machine consumes.
    pub async fn take_up_to(&self, queue: &str, max: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        while out.len() < max {
            let Ok(Some(m)) = self.ch.basic_get(queue, BasicGetOptions::default()).await else {
                break;
            };
            let d = &m.delivery;
            let p = &d.properties;
            out.push(Msg {
                body: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
                headers: p.headers().clone().unwrap_or_default(),
                correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
                content_type: p.content_type().as_ref().map(|s| s.to_string()),
                delivery_mode: *p.delivery_mode(),
            });
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        out
    }
}

impl Rabbit {
    /// Takes every message from `queue` until every id in `want` has arrived (copies already
    /// in `got` count), adding each reading copy to `got` in arrival order.
    pub async fn collect_ids(
        &self,
        queue: &str,
        got: &mut Vec<serde_json::Value>,
        want: &std::collections::BTreeSet<String>,
        timeout: std::time::Duration,
    ) {
        let start = std::time::Instant::now();
        loop {
            for m in self.take_all(queue).await {
                got.extend(m.items("readings"));
            }
            let have: std::collections::HashSet<&str> = got
                .iter()
                .filter_map(|r| r["reading_id"].as_str())
                .collect();
            let missing = want.iter().filter(|w| !have.contains(w.as_str())).count();
            if missing == 0 {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{missing} of {} buffered readings never arrived in {queue}",
                want.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// A test's queue and its events queue (`{name}.events`), deleted from the shared broker
/// when the guard drops: at the end of the test, and also when it panics.
#[must_use = "the queues are deleted when the guard drops"]
pub struct ScratchQueues(Vec<String>);

/// A unique queue name for a test (see [`super::unique`]) and the guard that deletes it and
/// its events queue afterwards.
pub fn scratch_queue(prefix: &str) -> (String, ScratchQueues) {
    let name = super::unique(prefix);
    let guard = ScratchQueues(vec![name.clone(), format!("{name}.events")]);
    (name, guard)
}

impl Drop for ScratchQueues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Drop cannot await, and may run inside the test's runtime: delete from a thread
        // of its own with a runtime of its own, and wait for it.
        let deleting = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let rabbit = Rabbit::connect().await;
                for name in &names {
                    rabbit.delete(name).await;
                }
            });
        });
        let _ = deleting.join();
    }
}
