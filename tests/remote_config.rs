//! Remote configuration against the real Mosquitto and the agent as a process: `configure`
//! adding a meter, broken and refused configs, and configs that cut the gateway off and are
//! never confirmed — reverted by the agent itself, also across a kill -9 and power cuts
//! inside the window.

mod common;

use std::path::Path;
use std::time::Duration;

use amr_edge::control::command::sign_configure;
use amr_edge::control::remote::sha256_hex;
use common::agent::{AgentProc, cli, config, sdm630s};
use common::celery::Celery;
use common::mqtt::Centre;
use common::{AMQP_URL, eventually, free_port, unique};
use serde_json::{Value, json};

const PREFIX: &str = "amr-test/remote";
const LONG: Duration = Duration::from_secs(60);

/// What a gateway's config is made of; [`Setup::text`] writes it.
#[derive(Clone)]
struct Setup {
    dir: std::path::PathBuf,
    gw: String,
    queue: String,
    sim: std::net::SocketAddr,
    mqtt_port: u16,
    /// More `[mqtt]` lines (`remote_config`, `hmac_key_file`).
    mqtt_extra: String,
}

impl Setup {
    /// The config with meters `m{unit}` for `units`.
    fn text(&self, units: &[u8]) -> String {
        let mut s = format!(
            "declare_queues = true\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"{PREFIX}\"\nmax_backoff = \"2s\"\nkeep_alive = \"5s\"\n{}\n\n[[bus]]\nname = \"lan\"\ntimeout = \"2s\"\ntcp = {{ host = \"{}\", port = {} }}\n",
            self.mqtt_port,
            self.mqtt_extra,
            self.sim.ip(),
            self.sim.port()
        );
        for u in units {
            s.push_str(&format!(
                "\n[[meter]]\nid = \"m{u}\"\nbus = \"lan\"\nmodbus = {{ unit = {u}, profile = \"eastron-sdm630\" }}\n"
            ));
        }
        config(&self.dir, &self.gw, AMQP_URL, &self.queue, &s)
    }
}

struct Gateway {
    setup: Setup,
    agent: AgentProc,
    centre: Centre,
    _dir: tempfile::TempDir,
}

/// An agent with meter m1 (of two simulated ones) and `[mqtt]` on the shared Mosquitto, once
/// it says `online`.
async fn gateway(mqtt_extra: &str, queue: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        dir: dir.path().to_owned(),
        gw: unique("gw"),
        queue: queue.to_owned(),
        sim: sdm630s(2).await,
        mqtt_port: 1883,
        mqtt_extra: mqtt_extra.to_owned(),
    };
    let agent = AgentProc::start(dir.path(), &setup.text(&[1]));
    let centre = Centre::connect(1883, PREFIX, &setup.gw).await;
    centre.state("online", 0, LONG).await;
    Gateway {
        setup,
        agent,
        centre,
        _dir: dir,
    }
}

impl Gateway {
    /// The reply to `id` with `status`; on a timeout, the panic shows the agent's log.
    async fn reply(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(r) = self
                .centre
                .replies()
                .into_iter()
                .find(|r| r["request_id"] == id && r["status"] == status)
            {
                return r;
            }
            if start.elapsed() > timeout {
                panic!(
                    "no `{status}` reply to {id} within {timeout:?}; replies: {:#?}\nagent log:\n{}",
                    self.centre.replies(),
                    self.agent.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get_config(&self, id: &str) -> Value {
        self.centre
            .send(json!({"request_id": id, "command": "get_config"}).to_string())
            .await;
        self.reply(id, "done", LONG).await["result"].clone()
    }

    async fn configure(&self, id: &str, text: &str, base: &str, within: &str) {
        self.centre
            .send(
                json!({"request_id": id, "command": "configure", "config": text,
                    "base": base, "confirm_within": within})
                .to_string(),
            )
            .await;
    }

    async fn poll(&self, id: &str, meter: &str) -> Value {
        self.centre
            .send(json!({"request_id": id, "command": "poll", "meters": [meter]}).to_string())
            .await;
        self.reply(id, "done", LONG).await
    }

    fn file(&self) -> String {
        std::fs::read_to_string(&self.agent.config_path).unwrap()
    }

    fn check(&self) -> String {
        let out = cli(&[
            "check",
            "--config",
            &self.agent.config_path.display().to_string(),
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn sha_of(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configure_adding_a_meter_should_be_applied_read_and_kept_once_confirmed() {
    let g = gateway("remote_config = true", &unique("q")).await;
    let before = g.get_config("g1").await;
    assert_eq!(before["source"], "local");
    assert_eq!(before["sha256"], sha_of(&g.agent.config_path));
    // The text as it is, but for the password in the inline AMQP URL.
    assert_eq!(
        before["text"],
        g.file().replace("guest:guest@", "guest:***@")
    );
    assert_eq!(before["redacted"], json!(["amqp.url"]));
    g.centre
        .send(json!({"request_id": "p0", "command": "poll", "meters": ["m2"]}).to_string())
        .await;
    let unknown = g.reply("p0", "rejected", LONG).await;
    assert!(
        unknown["reason"]
            .as_str()
            .unwrap()
            .contains("unknown meter `m2`")
    );
    let new = g.setup.text(&[1, 2]);
    g.configure("c1", &new, before["sha256"].as_str().unwrap(), "10m")
        .await;
    g.reply("c1", "accepted", LONG).await;
    let applied = g.reply("c1", "applied", LONG).await;
    assert_eq!(applied["sha256"], sha256_hex(new.as_bytes()));
    assert_eq!(applied["previous_sha256"], before["sha256"]);
    assert_eq!(g.file(), new);
    // The agent reads the new meter.
    let done = g.poll("p1", "m2").await;
    assert_eq!(done["results"][0]["ok"], true, "{done}");
    // A local operator sees it waiting, in check and in status (from the running agent).
    assert!(g.check().contains("PENDING CONFIRMATION"), "{}", g.check());
    let path = g.agent.config_path.display().to_string();
    let status = cli(&["status", "--config", &path]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("remote configuration from `c1`") && shown.contains("PENDING"),
        "{shown}"
    );
    let json_status: Value =
        serde_json::from_slice(&cli(&["status", "--config", &path, "--json"]).stdout).unwrap();
    assert_eq!(json_status["remote_config"]["request_id"], "c1");
    assert!(json_status["remote_config"]["pending_until"].is_string());
    let during = g.get_config("g2").await;
    assert_eq!(
        (&during["source"], &during["request_id"]),
        (&json!("remote"), &json!("c1"))
    );
    assert!(during["confirm_by"].is_string());
    g.centre
        .send(json!({"request_id": "k1", "command": "confirm", "target": "c1"}).to_string())
        .await;
    let confirmed = g.reply("k1", "done", LONG).await;
    assert_eq!(confirmed["result"]["sha256"], sha256_hex(new.as_bytes()));
    let after = g.get_config("g3").await;
    assert!(after["confirmed_at"].is_string() && after["confirm_by"].is_null());
    assert!(g.check().contains("confirmed"), "{}", g.check());
    assert!(!g.check().contains("PENDING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_should_be_rejected_with_line_and_key_and_the_old_one_keep_running() {
    let g = gateway("remote_config = true", &unique("q")).await;
    let base = g.get_config("g1").await["sha256"].clone();
    let old = g.file();
    let broken = g.setup.text(&[1, 2]).replace("unit = 2,", "unit = 300,");
    let line = broken
        .lines()
        .position(|l| l.contains("unit = 300"))
        .unwrap()
        + 1;
    g.configure("c1", &broken, base.as_str().unwrap(), "1m")
        .await;
    let r = g.reply("c1", "rejected", LONG).await;
    assert_eq!(r["problems"][0]["key"], "meter[1].modbus.unit", "{r}");
    assert_eq!(r["problems"][0]["line"], line, "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains(&format!(":{line}:")),
        "{r}"
    );
    assert_eq!(g.file(), old);
    assert_eq!(g.poll("p1", "m1").await["results"][0]["ok"], true);
    assert_eq!(g.get_config("g2").await["sha256"], base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_base_should_be_rejected() {
    let g = gateway("remote_config = true", &unique("q")).await;
    let old = g.file();
    g.configure(
        "c1",
        &g.setup.text(&[1, 2]),
        &sha256_hex(b"someone else's"),
        "1m",
    )
    .await;
    let r = g.reply("c1", "rejected", LONG).await;
    assert!(r["reason"].as_str().unwrap().contains("stale base"), "{r}");
    assert_eq!(g.file(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_should_be_rejected_while_remote_configuration_is_off() {
    let g = gateway("", &unique("q")).await;
    let old = g.file();
    let base = g.get_config("g1").await["sha256"].clone();
    g.configure("c1", &g.setup.text(&[1, 2]), base.as_str().unwrap(), "1m")
        .await;
    let r = g.reply("c1", "rejected", LONG).await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("remote_config = true"),
        "{r}"
    );
    assert_eq!(g.file(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_configure_should_be_rejected_when_a_key_is_set_and_a_signed_one_applied() {
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("hmac.key");
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let extra = format!(
        "remote_config = true\nhmac_key_file = \"{}\"",
        key_file.display()
    );
    let g = gateway(&extra, &unique("q")).await;
    let base = sha_of(&g.agent.config_path);
    let new = g.setup.text(&[1, 2]);
    g.configure("u1", &new, &base, "10m").await;
    let r = g.reply("u1", "rejected", LONG).await;
    assert!(r["reason"].as_str().unwrap().contains("unsigned"), "{r}");
    let ts = jiff::Timestamp::now().as_second();
    // Signed, but for another config than the one sent.
    let sig = sign_configure(b"s3cret-key", "s1", ts, &g.setup.text(&[2]), &base, "10m");
    g.centre
        .send(
            json!({"request_id": "s1", "command": "configure", "config": new, "base": base,
            "confirm_within": "10m", "ts": ts, "sig": sig})
            .to_string(),
        )
        .await;
    let r = g.reply("s1", "rejected", LONG).await;
    assert!(
        r["reason"].as_str().unwrap().contains("does not match"),
        "{r}"
    );
    assert_ne!(g.file(), new);
    let sig = sign_configure(b"s3cret-key", "s2", ts, &new, &base, "10m");
    g.centre
        .send(
            json!({"request_id": "s2", "command": "configure", "config": new, "base": base,
            "confirm_within": "10m", "ts": ts, "sig": sig})
            .to_string(),
        )
        .await;
    g.reply("s2", "applied", LONG).await;
    assert_eq!(g.file(), new);
}

/// The gateway's config with the broker moved to a port nobody listens on.
fn cut_off(g: &Gateway) -> String {
    let mut dead = g.setup.clone();
    dead.mqtt_port = free_port();
    dead.text(&[1, 2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_cuts_the_broker_off_should_be_reverted_when_not_confirmed() {
    let queue = unique("amr.rcfg");
    let celery = Celery::start(
        &[&queue, &format!("{queue}.events")],
        "utilitarian.commits.meter_readings",
        "utilitarian.commits.meter_system_events",
    )
    .await;
    let g = gateway("remote_config = true", &queue).await;
    let old = g.file();
    let base = sha_of(&g.agent.config_path);
    g.configure("c1", &cut_off(&g), &base, "6s").await;
    g.reply("c1", "accepted", LONG).await;
    let seen = g.centre.status().len();
    // No `applied` can come (the new broker is not there); the agent goes back by itself.
    let reverted = g
        .centre
        .reply("c1", "reverted", Duration::from_secs(90))
        .await;
    assert_eq!(reverted["sha256"], base, "{reverted}");
    assert_eq!(reverted["reason"], "not confirmed within 6s", "{reverted}");
    assert!(
        g.centre
            .replies()
            .iter()
            .all(|r| !(r["request_id"] == "c1" && r["status"] == "applied"))
    );
    g.centre.state("online", seen, LONG).await;
    assert_eq!(g.file(), old);
    assert_eq!(g.get_config("g1").await["sha256"], base);
    assert_eq!(g.poll("p1", "m1").await["results"][0]["ok"], true);
    let event = eventually(LONG, "a config_reverted event at the centre", || async {
        celery
            .events()
            .into_iter()
            .find(|e| e["kind"] == "config_reverted")
    })
    .await;
    assert!(event.to_string().contains("c1"), "{event}");
    // A confirm that comes too late changes nothing.
    g.centre
        .send(json!({"request_id": "k1", "command": "confirm", "target": "c1"}).to_string())
        .await;
    let late = g.reply("k1", "rejected", LONG).await;
    assert!(
        late["reason"].as_str().unwrap().contains("too late"),
        "{late}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_inside_the_window_should_still_end_on_the_previous_config() {
    let mut g = gateway("remote_config = true", &unique("q")).await;
    let old = g.file();
    let base = sha_of(&g.agent.config_path);
    let new = cut_off(&g);
    g.configure("c1", &new, &base, "15s").await;
    g.reply("c1", "accepted", LONG).await;
    eventually(LONG, "the new config written", || async {
        (std::fs::read_to_string(&g.agent.config_path).ok()? == new).then_some(())
    })
    .await;
    g.agent.kill9();
    let seen = g.centre.status().len();
    g.agent.restart();
    g.agent.wait_running(LONG).await;
    // Restarted inside the window: the remote config runs until the window closes.
    let reverted = g
        .centre
        .reply("c1", "reverted", Duration::from_secs(90))
        .await;
    assert_eq!(reverted["sha256"], base, "{reverted}");
    g.centre.state("online", seen, LONG).await;
    assert_eq!(g.file(), old);
    assert_eq!(g.poll("p1", "m1").await["results"][0]["ok"], true);
    assert!(!g.check().contains("PENDING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_no_longer_loads_after_a_restart_inside_the_window_should_be_reverted() {
    let mut g = gateway("remote_config = true", &unique("q")).await;
    let old = g.file();
    let base = sha_of(&g.agent.config_path);
    // A DLMS meter whose key files are read when the config loads: there at the configure,
    // gone after the restart.
    let keys = g.setup.dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["ek", "ak"] {
        std::fs::write(keys.join(k), "000102030405060708090A0B0C0D0E0F\n").unwrap();
    }
    let new = format!(
        "{}\n[[bus]]\nname = \"dlms\"\ntcp = {{ host = \"127.0.0.1\", port = {} }}\n\n[[meter]]\nid = \"e450\"\nbus = \"dlms\"\ndlms = {{ client = 1, logical = 1, security = \"hls-gmac\", block_key_file = \"{}\", auth_key_file = \"{}\" }}\n",
        g.setup.text(&[1]),
        free_port(),
        keys.join("ek").display(),
        keys.join("ak").display()
    );
    g.configure("c1", &new, &base, "10m").await;
    g.reply("c1", "applied", LONG).await;
    g.agent.kill9();
    std::fs::remove_dir_all(&keys).unwrap();
    let seen = g.centre.status().len();
    g.agent.restart();
    g.agent.wait_running(LONG).await;
    let reverted = g.reply("c1", "reverted", LONG).await;
    assert_eq!(reverted["sha256"], base, "{reverted}");
    g.centre.state("online", seen, LONG).await;
    assert_eq!(g.file(), old);
    assert!(
        g.agent.log().contains("does not load"),
        "the log says why:\n{}",
        g.agent.log()
    );
    assert_eq!(g.poll("p1", "m1").await["results"][0]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_validates_but_does_not_start_should_be_reverted_at_once() {
    let g = gateway("remote_config = true", &unique("q")).await;
    let old = g.file();
    let base = sha_of(&g.agent.config_path);
    // Valid as a file; but the password file it names is not there when control starts.
    let mut broken = g.setup.clone();
    broken.mqtt_extra =
        "remote_config = true\nusername = \"gw\"\npassword_file = \"/nonexistent/mqtt-password\""
            .into();
    g.configure("c1", &broken.text(&[1, 2]), &base, "10m").await;
    let reverted = g.reply("c1", "reverted", LONG).await;
    assert!(
        reverted["reason"]
            .as_str()
            .unwrap()
            .contains("did not start"),
        "{reverted}"
    );
    assert_eq!(g.file(), old);
    assert_eq!(g.poll("p1", "m1").await["results"][0]["ok"], true);
}

// The power-cut filesystem of tests/powercut.rs; this suite uses only part of it.
#[allow(dead_code)]
#[path = "powercut/fs.rs"]
mod fs;

/// fsync of a directory: what makes the names in it durable.
fn fsync_dir(dir: &Path) {
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Power cuts (tests/powercut: a filesystem that forgets what was not fsynced) with the config
/// file and the data directory on it, inside a configure that cuts the broker off: after the
/// durable writes, at a random moment, and after `accepted`. Each time the file is whole (the
/// old or the new config), and the gateway ends on the old config, online, with `reverted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_inside_a_configure_should_end_on_the_previous_config() {
    let mut fs = fs::PowerCutFs::mount();
    let home = fs.path().join("gw");
    std::fs::create_dir(&home).unwrap();
    fsync_dir(fs.path());
    let setup = Setup {
        dir: home.clone(),
        gw: unique("gw"),
        queue: unique("q"),
        sim: sdm630s(2).await,
        mqtt_port: 1883,
        mqtt_extra: "remote_config = true".into(),
    };
    let old = setup.text(&[1]);
    let centre = Centre::connect(1883, PREFIX, &setup.gw).await;
    let mut agent = AgentProc::start(&home, &old);
    std::fs::File::open(&agent.config_path)
        .unwrap()
        .sync_all()
        .unwrap();
    fsync_dir(&home);
    centre.state("online", 0, LONG).await;
    let mut dead = setup.clone();
    dead.mqtt_port = free_port();
    let new = dead.text(&[1, 2]);
    for n in 0..3 {
        let id = format!("pc-{n}");
        let from = agent.log_len();
        let seen = centre.status().len();
        centre
            .send(
                json!({"request_id": id, "command": "configure", "config": new,
                    "base": sha256_hex(old.as_bytes()), "confirm_within": "8s"})
                .to_string(),
            )
            .await;
        match n {
            0 => {
                eventually(LONG, "the configure written", || async {
                    let log = agent.log();
                    log.get(from..)?
                        .contains("Remote configuration written")
                        .then_some(())
                })
                .await
            }
            1 => tokio::time::sleep(Duration::from_millis(fastrand::u64(..300))).await,
            _ => {
                centre.reply(&id, "accepted", LONG).await;
            }
        }
        fs.cut();
        agent.kill9();
        fs.remount();
        let after = std::fs::read_to_string(&agent.config_path).unwrap();
        assert!(
            after == old || after == new,
            "cut #{n}: the config file is {after:?}"
        );
        agent.restart();
        agent.wait_running(LONG).await;
        // Applied again after the restart if the cut came before it was durable (the broker
        // delivers it again), and reverted in the end either way.
        centre
            .reply(&id, "reverted", Duration::from_secs(120))
            .await;
        centre.state("online", seen, LONG).await;
        assert_eq!(std::fs::read_to_string(&agent.config_path).unwrap(), old);
        let path = agent.config_path.display().to_string();
        let check = cli(&["check", "--config", &path]);
        assert!(
            !String::from_utf8_lossy(&check.stdout).contains("PENDING"),
            "cut #{n}: {check:?}"
        );
    }
    agent.kill9();
}
