//! A loopback TCP proxy the test controls: in front of RabbitMQ (or Mosquitto) it can refuse
//! connections, cut the live ones, or stall them, to play a flaky cellular uplink.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Up = 0,
    /// Accept and close at once: the service is down.
    Down = 1,
    /// Accept and never answer: a link that swallows packets.
    Stall = 2,
}

struct State {
    mode: AtomicU8,
    live: Mutex<Vec<AbortHandle>>,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: &str, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            mode: AtomicU8::new(mode as u8),
            live: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                match st.mode.load(Ordering::SeqCst) {
                    0 => {
                        let upstream = upstream.clone();
                        let h = tokio::spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(&upstream).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                        st.live.lock().unwrap().push(h.abort_handle());
                    }
                    1 => {
                        let _ = client.shutdown().await;
                    }
                    _ => {
                        let h = tokio::spawn(async move {
                            let _keep = client;
                            std::future::pending::<()>().await;
                        });
                        st.live.lock().unwrap().push(h.abort_handle());
                    }
                }
            }
        })
        .abort_handle();
        Proxy {
            port,
            state,
            accept,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Drops every live connection, mid-frame if one is in flight.
    pub fn cut(&self) {
        for h in self.state.live.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// The AMQP URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
