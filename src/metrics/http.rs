//! A minimal HTTP/1.1 responder for three paths: `GET /metrics`, `GET /healthz`,
//! `GET /readyz` (and `HEAD` of each). 404 for any other path, 405 for another method, 400
//! for what is not HTTP, 431 for a request head over [`MAX_HEAD`]. One request per
//! connection (`Connection: close`).
//!
//! Not hyper or axum: three fixed answers do not need them, and the binary has to fit the
//! gateways' flash. What a general server gives for free is bounded here by hand, so a slow
//! or garbage client cannot hold the agent: the head must arrive within [`READ_TIMEOUT`],
//! the answer must be taken within [`WRITE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are
//! served at once (more wait in the kernel's backlog).
//!
//! The parsing is a pure function ([`route`]) over the bytes received.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::View;

/// Longest request head taken (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 8;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    Ready,
}

/// How a request is answered, before any work is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A path we serve; `head`: answer without a body.
    Serve { route: Route, head: bool },
    /// The head is not complete yet: read more.
    Incomplete,
    /// Answer with this status and a short reason.
    Error(u16),
}

/// Looks at the bytes received so far.
pub fn route(buf: &[u8]) -> Parsed {
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"));
    let Some(_end) = end else {
        return if buf.len() >= MAX_HEAD {
            Parsed::Error(431)
        } else {
            Parsed::Incomplete
        };
    };
    let line_end = find(buf, b"\n").unwrap_or(buf.len());
    let Ok(line) = std::str::from_utf8(&buf[..line_end]) else {
        return Parsed::Error(400);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Error(400);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Parsed::Error(400);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => return Parsed::Error(404),
    };
    match method {
        "GET" => Parsed::Serve { route, head: false },
        "HEAD" => Parsed::Serve { route, head: true },
        _ => Parsed::Error(405),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The bytes of a whole response.
pub fn response(status: u16, content_type: &str, body: &str, head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, view: Arc<View>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "Serving metrics and health");
    }
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "Metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let view = view.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &view).await {
                tracing::debug!(%peer, error = %e, "Metrics request ended early");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, view: &Arc<View>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let parsed = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            let take = n.min(MAX_HEAD - buf.len());
            buf.extend_from_slice(&chunk[..take]);
            match route(&buf) {
                Parsed::Incomplete if buf.len() < MAX_HEAD => continue,
                Parsed::Incomplete => return Ok(Some(Parsed::Error(431))),
                p => return Ok(Some(p)),
            }
        }
    })
    .await;
    let bytes = match parsed {
        Err(_elapsed) => response(408, "text/plain", "request timeout\n", false),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(Parsed::Error(status)))) => response(
            status,
            "text/plain",
            &format!("{}\n", reason(status).to_ascii_lowercase()),
            false,
        ),
        Ok(Ok(Some(Parsed::Incomplete))) => return Ok(()),
        Ok(Ok(Some(Parsed::Serve { route, head }))) => match route {
            Route::Metrics => response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &super::render::scrape(view).await,
                head,
            ),
            Route::Health => {
                let (ok, body) = super::health(view).await;
                response(if ok { 200 } else { 503 }, "text/plain", &body, head)
            }
            Route::Ready => {
                let (ok, body) = super::ready(view).await;
                response(if ok { 200 } else { 503 }, "text/plain", &body, head)
            }
        },
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_should_be_served_with_get_and_head() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Serve {
                route: Route::Metrics,
                head: false
            }
        );
        assert_eq!(
            route(b"HEAD /readyz?verbose=1 HTTP/1.0\r\n\r\n"),
            Parsed::Serve {
                route: Route::Ready,
                head: true
            }
        );
        assert_eq!(
            route(b"GET /healthz HTTP/1.1\n\n"),
            Parsed::Serve {
                route: Route::Health,
                head: false
            }
        );
    }

    #[test]
    fn other_requests_should_get_404_405_or_400() {
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Parsed::Error(404));
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Parsed::Error(405));
        assert_eq!(route(b"GET /metrics SMTP/1.0\r\n\r\n"), Parsed::Error(400));
        assert_eq!(route(b"\x16\x03\x01\x02\x00\r\n\r\n"), Parsed::Error(400));
        assert_eq!(route(b"GET  /metrics HTTP/1.1\r\n\r\n"), Parsed::Error(400));
        assert_eq!(
            route(b"GET http://x/metrics HTTP/1.1\r\n\r\n"),
            Parsed::Error(400)
        );
    }

    #[test]
    fn partial_heads_should_wait_until_the_limit() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n"), Parsed::Incomplete);
        assert_eq!(route(&vec![b'a'; MAX_HEAD]), Parsed::Error(431));
    }

    #[test]
    fn head_responses_should_carry_the_length_but_no_body() {
        let r = String::from_utf8(response(200, "text/plain", "ok\n", true)).unwrap();
        assert!(r.contains("Content-Length: 3\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
        let r = String::from_utf8(response(405, "text/plain", "no\n", false)).unwrap();
        assert!(
            r.contains("Allow: GET, HEAD\r\n") && r.ends_with("no\n"),
            "{r}"
        );
    }
}
