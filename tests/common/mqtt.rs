//! The centre's side of MQTT control, for the tests: sends commands, collects replies and
//! status documents. Talks to the real Mosquitto (or a private one a test starts).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use super::eventually;

pub struct Centre {
    client: AsyncClient,
    replies: Arc<Mutex<Vec<Value>>>,
    status: Arc<Mutex<Vec<Value>>>,
    prefix: String,
    _task: tokio::task::JoinHandle<()>,
}

impl Centre {
    /// Connects to the broker on `port` and listens to the gateway's replies and status.
    pub async fn connect(port: u16, prefix: &str, gateway: &str) -> Centre {
        let mut opts = MqttOptions::new(super::unique("centre"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let replies = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(Vec::new()));
        let base = format!("{prefix}/{gateway}");
        let (r, s, b) = (replies.clone(), status.clone(), base.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if p.topic == format!("{b}/replies") {
                            r.lock().unwrap().push(v);
                        } else if p.topic == format!("{b}/status") {
                            s.lock().unwrap().push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        client
            .subscribe_many([
                rumqttc::SubscribeFilter::new(format!("{base}/replies"), QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new(format!("{base}/status"), QoS::AtLeastOnce),
            ])
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        Centre {
            client,
            replies,
            status,
            prefix: base,
            _task: task,
        }
    }

    pub async fn send(&self, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                format!("{}/commands", self.prefix),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    pub fn replies(&self) -> Vec<Value> {
        self.replies.lock().unwrap().clone()
    }

    pub fn status(&self) -> Vec<Value> {
        self.status.lock().unwrap().clone()
    }

    /// Waits for the reply to `request_id` with `status`.
    pub async fn reply(&self, request_id: &str, status: &str, timeout: Duration) -> Value {
        eventually(
            timeout,
            &format!("a `{status}` reply to {request_id}"),
            || async {
                self.replies()
                    .into_iter()
                    .find(|r| r["request_id"] == request_id && r["status"] == status)
            },
        )
        .await
    }

    /// Waits for a status document whose `state` is `state`, after `after` of them.
    pub async fn state(&self, state: &str, after: usize, timeout: Duration) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self
                .status()
                .into_iter()
                .skip(after)
                .find(|s| s["state"] == state)
            {
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "no status `{state}` after the first {after} within {timeout:?}: {:#?}",
                    self.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A private Mosquitto on its own port, for tests that stop and restart the broker.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    conf: tempfile::NamedTempFile,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with("")
    }

    /// With more mosquitto.conf lines after the plain listener on `port` (more listeners).
    pub fn start_with(extra: &str) -> Broker {
        let port = super::free_port();
        let conf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            conf.path(),
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n{extra}"),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.conf.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not start on {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
