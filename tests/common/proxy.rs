//! A loopback TCP proxy the test controls: in front of RabbitMQ (or Mosquitto) it can refuse
//! connections, cut the live ones (mid-frame if asked), or stall them, to play a flaky
//! cellular uplink.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Up = 0,
    /// Accept and close at once: the service is down.
    Down = 1,
}

struct State {
    mode: AtomicU8,
    /// Nothing moves either way, on live connections and new ones: a link that swallows
    /// packets until it recovers.
    stalled: AtomicBool,
    /// The next chunk on any connection is forwarded halfway, then the connection dropped.
    cut_next: AtomicBool,
    live: Mutex<Vec<AbortHandle>>,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    accept: AbortHandle,
}

async fn wait_unstalled(state: &State) {
    while state.stalled.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies one direction; returns when it ends or a mid-frame cut was made.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_unstalled(&state).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_unstalled(&state).await;
        if state.cut_next.swap(false, Ordering::SeqCst) {
            let _ = to.write_all(&buf[..n.div_ceil(2)]).await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    pub async fn start(upstream: &str, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            mode: AtomicU8::new(mode as u8),
            stalled: AtomicBool::new(false),
            cut_next: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if st.mode.load(Ordering::SeqCst) == Mode::Down as u8 {
                    let _ = client.shutdown().await;
                    continue;
                }
                let upstream = upstream.clone();
                let st2 = st.clone();
                let h = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = pump(cr, sw, st2.clone()) => {}
                        () = pump(sr, cw, st2) => {}
                    }
                });
                st.live.lock().unwrap().push(h.abort_handle());
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

    pub fn stall(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Drops every live connection at once.
    pub fn cut(&self) {
        for h in self.state.live.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Drops the next connection that carries data, halfway through the chunk it carries.
    pub fn cut_mid_frame(&self) {
        self.state.cut_next.store(true, Ordering::SeqCst);
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
