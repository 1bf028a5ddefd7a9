//! Metrics and health against the real things: the agent polls simulated meters and drains
//! to RabbitMQ with a Celery worker; a real Prometheus (Debian's package) scrapes it on
//! loopback; `promtool check metrics` reads the exposition; a reader loops on the textfile
//! while the agent rewrites it; garbage HTTP requests get their status and do not hold the
//! listener.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use amr_edge::meter::modbus::profile::Profiles;
use amr_edge::sim::modbus::{Fault, Meters, Unit, spawn_tcp};
use common::agent::{AgentProc, config, polling};
use common::celery::Celery;
use common::rabbit::scratch_queue;
use common::{AMQP_URL, eventually, free_port, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` as it is and returns the whole answer (the server closes the connection).
async fn raw(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let answer = raw(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
    .await;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A Prometheus server on loopback scraping `target` every second, with its own storage.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: amr-edge\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus (Debian package `prometheus`, see tests/run.sh)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query with one result.
    async fn value(&self, query: &str) -> Option<f64> {
        let (status, body) = get(self.port, &format!("/api/v1/query?query={query}")).await;
        if status != 200 {
            return None;
        }
        // The body may be chunked: take the JSON object inside.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn promtool(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn sdm630s(units: u8) -> (Meters, std::net::SocketAddr) {
    let meters = Meters::new();
    let profile = Profiles::built_in().get("eastron-sdm630").unwrap().clone();
    for u in 1..=units {
        meters.insert(u, Unit::new(profile.clone()));
    }
    let addr = spawn_tcp(meters.clone()).await.unwrap();
    (meters, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_should_see_as_many_delivered_readings_as_the_celery_worker_received() {
    let (queue, _queues) = scratch_queue("amr.metrics");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let (meters, sim) = sdm630s(2).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let textfile = dir.path().join("amr_edge.prom");
    let metrics = format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"{}\"\ninterval = \"1s\"\nper_meter = true\n",
        textfile.display()
    );
    let mut agent = AgentProc::start(
        dir.path(),
        &(config(
            dir.path(),
            &unique("gw"),
            AMQP_URL,
            &queue,
            "declare_queues = true",
        ) + &metrics
            + &polling(sim, 2, 1)),
    );
    agent.wait_running(Duration::from_secs(60)).await;
    let prometheus = Prometheus::start(port);

    // Health while it runs.
    let (status, body) = get(port, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "live\n"));
    eventually(
        Duration::from_secs(60),
        "readyz with the broker connected",
        || async {
            let (status, body) = get(port, "/readyz").await;
            (status == 200
                && body.contains("broker: connected")
                && body.contains("bus lan: started"))
            .then_some(())
        },
    )
    .await;

    // The textfile is rewritten every second; a reader never sees it half written.
    let reader = {
        let textfile = textfile.clone();
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(6);
            let mut versions = std::collections::HashSet::new();
            let mut reads = 0;
            while std::time::Instant::now() < until {
                if let Ok(text) = std::fs::read_to_string(&textfile) {
                    reads += 1;
                    assert!(
                        text.starts_with("# HELP amr_edge_build_info")
                            && text.ends_with("\n")
                            && text
                                .lines()
                                .last()
                                .is_some_and(|l| l.starts_with("process_start_time_seconds ")),
                        "a partial textfile: {text:?}"
                    );
                    versions.insert(text);
                }
            }
            (reads, versions.len())
        })
    };

    let got = celery.wait_readings(100, Duration::from_secs(120)).await;
    assert!(!got.is_empty());
    // Freeze the count: the meters go silent, the agent drains what it has.
    for u in 1..=2 {
        meters.set_fault(u, Fault::Silent);
    }
    let (reads, versions) = reader.join().unwrap();
    assert!(
        versions >= 2,
        "the textfile was not rewritten ({reads} reads)"
    );

    let delivered = eventually(
        Duration::from_secs(120),
        "Prometheus to agree with the Celery worker",
        || async {
            let received = celery.readings().len() as f64;
            let scraped = prometheus
                .value("amr_edge_readings_delivered_total")
                .await?;
            let (_, body) = get(port, "/metrics").await;
            let buffered_zero = body
                .lines()
                .any(|l| l.starts_with("amr_edge_buffer_records{class=\"profile\"} 0"));
            (buffered_zero && scraped == received && scraped > 0.0).then_some(scraped)
        },
    )
    .await;
    println!(
        "Prometheus: amr_edge_readings_delivered_total = {delivered}; Celery received {}",
        celery.readings().len()
    );
    assert!(
        prometheus.log().contains("Server is ready"),
        "{}",
        prometheus.log()
    );

    // What Prometheus scraped passes promtool, the textfile too.
    let (_, body) = get(port, "/metrics").await;
    let (ok, out) = promtool(&body);
    assert!(ok, "promtool check metrics: {out}\n{body}");
    let (ok, out) = promtool(&std::fs::read_to_string(&textfile).unwrap());
    assert!(ok, "promtool check metrics on the textfile: {out}");
    for series in [
        "amr_edge_readings_polled_total{bus=\"lan\",cadence=\"on_demand\"}",
        "amr_edge_poll_duration_seconds_bucket{bus=\"lan\",le=\"+Inf\"}",
        "amr_edge_failures_total{bus=\"lan\",kind=\"meter_not_answering\"}",
        "amr_edge_meter_polls_total{bus=\"lan\",meter=\"m1\",outcome=\"ok\"}",
        "amr_edge_broker_connected 1",
        "amr_edge_drain_confirm_seconds_count",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(series), "no {series} in\n{body}");
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_should_get_their_status_and_not_hold_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No broker: offline is a normal state, the agent is still ready.
    let dead = format!("amqp://guest:guest@127.0.0.1:{}", free_port());
    let mut agent = AgentProc::start(
        dir.path(),
        &(config(dir.path(), &unique("gw"), &dead, "q", "")
            + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    agent.wait_running(Duration::from_secs(60)).await;

    // Slow clients that send nothing, more of them than the listener serves at once.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let idle_answers = tokio::spawn(async move {
        let mut out = Vec::new();
        for mut s in idle {
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await;
            out.push(String::from_utf8_lossy(&buf).into_owned());
        }
        out
    });
    let (status, body) = get(port, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("broker: not connected"), "{body}");
    for answer in idle_answers.await.unwrap() {
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    }

    let cases: [(&[u8], &str); 6] = [
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "400",
        ),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        (b"GET /nothing-here HTTP/1.1\r\n\r\n", "404"),
        (b"GET /metrics\r\n\r\n", "400"),
        (b"HEAD /healthz HTTP/1.0\r\n\r\n", "200"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", "200"),
    ];
    for (request, want) in cases {
        let answer = raw(port, request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want} ")),
            "{request:?} → {answer:?}"
        );
    }
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(
        raw(port, huge.as_bytes())
            .await
            .starts_with("HTTP/1.1 431 ")
    );
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("amr_edge_broker_connected 0"), "{body}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_port_in_use_should_stop_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut agent = AgentProc::start(
        dir.path(),
        &(config(dir.path(), &unique("gw"), AMQP_URL, "q", "")
            + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    let status = agent.wait(Duration::from_secs(60));
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!("metrics.listen 127.0.0.1:{port}: cannot listen")),
        "{log}"
    );
    drop(taken);
}
