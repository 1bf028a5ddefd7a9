//! TLS to both brokers, the way a utility runs them: a private CA, `amqps://` to RabbitMQ and
//! `mqtts://` to Mosquitto with a client certificate. The certificates are made for each run
//! with the `openssl` command; RabbitMQ sits behind `socat` terminating TLS (the shared
//! RabbitMQ has no TLS listener), Mosquitto is a private one with a TLS listener of its own.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::agent::{AgentProc, config};
use common::mqtt::{Broker, Centre};
use common::rabbit::{Rabbit, scratch_queue};
use common::{eventually, free_port, readings, seed, unique};
use serde_json::json;

const PREFIX: &str = "amr-tls-test";

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in `dir`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=amr-edge test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        for (name, usage, san) in [
            ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
            ("client", "clientAuth", "DNS:gw-tls"),
        ] {
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                    ],
                    &["-subj", &format!("/CN={name}")],
                ]
                .concat(),
            );
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
                ),
            )
            .unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &ext,
            ]);
        }
        // Mosquitto started as root reads its certificates after dropping to its own user.
        use std::os::unix::fs::PermissionsExt;
        let readable = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        readable(dir, 0o755);
        for f in ["ca.pem", "server.pem", "server.key"] {
            readable(&dir.join(f), 0o644);
        }
        Pki {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// `socat` terminating TLS on a port of its own and passing the bytes to RabbitMQ.
struct TlsProxy {
    child: Child,
    port: u16,
}

impl TlsProxy {
    fn start(pki: &Pki) -> TlsProxy {
        let port = free_port();
        let proxy = TlsProxy {
            child: Command::new("socat")
                .arg(format!(
                    "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                    pki.path("server.pem"),
                    pki.path("server.key")
                ))
                .arg("TCP:127.0.0.1:5672")
                // Its own process group, so dropping it also ends the children (one per
                // connection) and with them the connections.
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("socat (apt-get install socat)"),
            port,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("socat did not listen on {port}");
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        // SAFETY: signals the process group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_private_ca_should_deliver_and_an_unknown_ca_should_keep_the_readings() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path());
    let proxy = TlsProxy::start(&pki);
    let rabbit = Rabbit::connect().await;
    let (queue, _queues) = scratch_queue("amr.tls");
    rabbit.declare(&queue).await;
    rabbit.declare(&format!("{queue}.events")).await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.port);

    // Without the CA the server is a stranger: nothing is sent, the reason is logged, and the
    // readings stay buffered.
    let dir = tempfile::tempdir().unwrap();
    let gw = unique("gw");
    let seqs = seed(dir.path(), &readings(200, 2));
    let mut agent = AgentProc::start(dir.path(), &config(dir.path(), &gw, &url, &queue, ""));
    agent
        .wait_log("Broker refuses delivery", 1, Duration::from_secs(30))
        .await;
    let log = agent.log();
    assert!(
        log.contains("ERROR") && log.contains("TLS: ") && log.contains("UnknownIssuer"),
        "an ERROR names the certificate problem:\n{log}"
    );
    assert!(!log.contains("guest:guest"), "no password in the log");
    assert_eq!(rabbit.count(&queue).await, 0);
    assert!(agent.sigterm().success());

    // With `ca_file` the same agent and store deliver everything.
    let cfg = config(
        dir.path(),
        &gw,
        &url,
        &queue,
        &format!("ca_file = \"{}\"", pki.path("ca.pem")),
    );
    let mut agent = AgentProc::start(dir.path(), &cfg);
    let want: BTreeSet<String> = seqs.iter().map(|s| format!("{gw}-{s}")).collect();
    let mut got = Vec::new();
    rabbit
        .collect_ids(&queue, &mut got, &want, Duration::from_secs(60))
        .await;
    assert_eq!(got.len(), 200, "each reading once");

    // The TLS link dropping under an idle agent is the network, not a refusal: noticed (the
    // drain watches its connection while it waits), a WARN, no ERROR.
    let before = agent.log().len();
    drop(proxy);
    eventually(Duration::from_secs(30), "the drop noticed", || async {
        agent.log()[before..]
            .contains("Broker not available")
            .then_some(())
    })
    .await;
    let after = agent.log()[before..].to_owned();
    assert!(
        !after.contains("ERROR"),
        "a dropped link is no ERROR:\n{after}"
    );
    assert!(agent.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_client_certificate_should_take_commands_and_without_one_be_refused() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path());
    // A plain listener for the centre (the test), a TLS one demanding client certificates
    // from our CA for the agent.
    let tls_port = free_port();
    let broker = Broker::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem"),
        pki.path("server.pem"),
        pki.path("server.key"),
    ));
    let gw = unique("gw");
    let centre = Centre::connect(broker.port, PREFIX, &gw).await;
    let (queue, _queues) = scratch_queue("amr.tls");
    let mqtt = |client_cert: bool| {
        let mut s = format!(
            "declare_queues = true\n\n[mqtt]\nurl = \"mqtts://localhost:{tls_port}\"\ntopic_prefix = \"{PREFIX}\"\nmax_backoff = \"2s\"\nca_file = \"{}\"\n",
            pki.path("ca.pem")
        );
        if client_cert {
            s.push_str(&format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                pki.path("client.pem"),
                pki.path("client.key")
            ));
        }
        s
    };

    // No client certificate: the broker refuses the handshake, the agent says why and keeps
    // running (and buffering).
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(
        dir.path(),
        &config(dir.path(), &gw, common::AMQP_URL, &queue, &mqtt(false)),
    );
    agent
        .wait_log(
            "TLS with the MQTT broker failed",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert!(agent.is_running(), "{}", agent.log());
    assert!(centre.status().is_empty(), "the agent did not get in");
    let log = agent.log();
    assert!(
        log.contains("ERROR") && log.contains("CertificateRequired"),
        "an ERROR names the missing client certificate:\n{log}"
    );
    assert!(agent.sigterm().success());

    // With it: online, and a command over the plain side answered over TLS.
    let mut agent = AgentProc::start(
        dir.path(),
        &config(dir.path(), &gw, common::AMQP_URL, &queue, &mqtt(true)),
    );
    centre.state("online", 0, Duration::from_secs(20)).await;
    centre
        .send(json!({"request_id": "t1", "command": "inspect"}).to_string())
        .await;
    let done = centre.reply("t1", "done", Duration::from_secs(10)).await;
    assert_eq!(done["request_id"], "t1");
    assert!(agent.sigterm().success());
    drop(broker);
}
