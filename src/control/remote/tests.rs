//! The keeper on real files (a temporary data dir), the in-memory store and paused time:
//! configure, confirm, the window closing, and every start a crash can leave behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::ManualClock;
use crate::store::{CommandLog, CommandRecord, MemoryStore, Record};

const AT_MS: i64 = 1_800_000_000_000;

fn text(data_dir: &Path, extra: &str) -> String {
    format!(
        "[gateway]\nid = \"gw-1\"\ndata_dir = \"{}\"\n\n[amqp]\nurl = \"amqp://guest:secret@127.0.0.1:5672/%2f\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nremote_config = true\n{extra}",
        data_dir.display()
    )
}

struct Rig {
    dir: tempfile::TempDir,
    path: PathBuf,
    clock: Arc<ManualClock>,
    store: MemoryStore,
}

impl Rig {
    fn new(initial: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let initial = if initial.is_empty() {
            text(dir.path(), "")
        } else {
            initial.to_owned()
        };
        std::fs::write(&path, initial).unwrap();
        Rig {
            dir,
            path,
            clock: ManualClock::new(Timestamp::from_millisecond(AT_MS).unwrap()),
            store: MemoryStore::new(),
        }
    }

    fn config(&self) -> Config {
        Config::load(&self.path).unwrap()
    }

    fn open(&self) -> (Keeper, Config) {
        Keeper::open(&self.path, self.config(), self.clock.clone(), &self.store).unwrap()
    }

    fn file(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    fn record(&self, id: &str) {
        let r = CommandRecord {
            request_id: id.into(),
            accepted_ms: AT_MS,
            command: "{}".into(),
            outcome: None,
        };
        assert!(self.store.accept_command(&r).unwrap().is_none());
    }

    /// The outcome recorded for `id`, as JSON.
    fn outcome(&self, id: &str) -> serde_json::Value {
        let r = CommandRecord {
            request_id: id.into(),
            accepted_ms: AT_MS,
            command: "{}".into(),
            outcome: None,
        };
        let kept = self.store.accept_command(&r).unwrap().expect("recorded");
        serde_json::from_str(kept.outcome.as_deref().expect("finished")).unwrap()
    }

    fn reverted_events(&self) -> usize {
        self.store
            .records()
            .iter()
            .filter(|r| matches!(r, Record::Event(e) if e.kind == EventKind::ConfigReverted))
            .count()
    }

    fn with_meter(&self) -> String {
        text(
            self.dir.path(),
            "\n[[bus]]\nname = \"lan\"\ntcp = { host = \"127.0.0.1\", port = 5020 }\n\n[[meter]]\nid = \"m1\"\nbus = \"lan\"\nmodbus = { unit = 1, profile = \"eastron-sdm630\" }\n",
        )
    }

    fn configure(&self, k: &mut Keeper, id: &str, new: &str, within: Duration) -> Config {
        self.record(id);
        let base = sha256_hex(self.file().as_bytes());
        k.configure(id, new, &base, within, &self.config(), &self.store)
            .unwrap_or_else(|r| panic!("{}", r.reason))
    }
}

async fn closes(k: &Keeper, within: Duration) -> bool {
    let Some(at) = k.deadline() else {
        return false;
    };
    tokio::time::timeout(within, tokio::time::sleep_until(at))
        .await
        .is_ok()
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmed_config_should_be_reverted_when_its_window_closes() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new("");
    let old = rig.file();
    // It holds a password: the remote one replacing it must not be readable by more.
    std::fs::set_permissions(&rig.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (mut k, _) = rig.open();
    let new = rig.with_meter();
    let c = rig.configure(&mut k, "r1", &new, Duration::from_secs(30));
    assert_eq!(c.meters.len(), 1);
    assert_eq!(rig.file(), new);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&rig.path), 0o600);
    assert_eq!(mode(&rig.dir.path().join(DIR).join(PREVIOUS)), 0o600);
    assert_eq!(rig.outcome("r1")["status"], "applied");
    assert_eq!(k.take_notices().len(), 1);
    assert_eq!(k.pending(), Some("r1"));
    assert!(!closes(&k, Duration::from_secs(29)).await, "closed early");
    assert!(closes(&k, Duration::from_secs(2)).await, "never closed");
    let back = k.revert("not confirmed", &rig.store).unwrap();
    assert!(back.meters.is_empty());
    assert_eq!(rig.file(), old);
    assert_eq!(k.pending(), None);
    assert_eq!(k.deadline(), None);
    let reverted = rig.outcome("r1");
    assert_eq!(reverted["status"], "reverted");
    assert_eq!(reverted["sha256"], sha256_hex(old.as_bytes()));
    assert_eq!(rig.reverted_events(), 1);
    let notices = k.take_notices();
    assert_eq!(notices.len(), 1);
    assert!(String::from_utf8_lossy(&notices[0]).contains("\"reverted\""));
    // Back where it started: the old base works again.
    assert_eq!(k.describe(true).sha256, sha256_hex(old.as_bytes()));
    assert_eq!(k.describe(true).source, "local");
}

#[tokio::test(start_paused = true)]
async fn a_confirm_inside_the_window_should_keep_the_config() {
    let rig = Rig::new("");
    let (mut k, _) = rig.open();
    let new = rig.with_meter();
    rig.configure(&mut k, "r1", &new, Duration::from_secs(30));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        k.confirm("r2")
            .unwrap_err()
            .contains("not the configuration waiting")
    );
    let c = k.confirm("r1").unwrap();
    assert_eq!(c.sha256, sha256_hex(new.as_bytes()));
    assert_eq!(k.deadline(), None);
    assert!(!closes(&k, Duration::from_secs(3600)).await);
    let doc = k.describe(true);
    assert_eq!(
        (doc.source, doc.request_id.as_deref()),
        ("remote", Some("r1"))
    );
    assert!(doc.confirmed_at.is_some() && doc.confirm_by.is_none());
    // Kept across a restart, with no window.
    let (k2, c2) = rig.open();
    assert_eq!(k2.deadline(), None);
    assert_eq!(c2.meters.len(), 1);
    assert_eq!(rig.file(), new);
}

#[tokio::test(start_paused = true)]
async fn a_restart_inside_the_window_should_keep_the_rest_of_it() {
    let rig = Rig::new("");
    let (mut k, _) = rig.open();
    rig.configure(&mut k, "r1", &rig.with_meter(), Duration::from_secs(30));
    drop(k);
    rig.clock.advance(Duration::from_secs(20));
    let (mut k, c) = rig.open();
    assert_eq!(c.meters.len(), 1, "still the new config");
    let notices = k.take_notices();
    assert!(String::from_utf8_lossy(&notices[0]).contains("\"applied\""));
    assert!(!closes(&k, Duration::from_secs(9)).await);
    assert!(closes(&k, Duration::from_secs(2)).await);
}

#[tokio::test(start_paused = true)]
async fn a_start_after_the_window_closed_should_revert_before_anything_runs() {
    let rig = Rig::new("");
    let old = rig.file();
    let (mut k, _) = rig.open();
    rig.configure(&mut k, "r1", &rig.with_meter(), Duration::from_secs(30));
    drop(k);
    rig.clock.advance(Duration::from_secs(31));
    let (k, c) = rig.open();
    assert!(c.meters.is_empty(), "the previous config");
    assert_eq!(rig.file(), old);
    assert_eq!(k.pending(), None);
    assert_eq!(rig.outcome("r1")["status"], "reverted");
    assert_eq!(rig.reverted_events(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_before_the_new_file_was_written_should_end_on_the_previous_config() {
    let rig = Rig::new("");
    let old = rig.file();
    let (mut k, _) = rig.open();
    rig.configure(&mut k, "r1", &rig.with_meter(), Duration::from_secs(30));
    drop(k);
    // As if the crash came between steps 2 and 3: the window is open, the file is old.
    std::fs::write(&rig.path, &old).unwrap();
    let (k, c) = rig.open();
    assert!(c.meters.is_empty());
    assert_eq!(k.pending(), None);
    assert_eq!(rig.outcome("r1")["status"], "reverted");
}

#[tokio::test(start_paused = true)]
async fn a_local_edit_should_win_over_an_open_window() {
    let rig = Rig::new("");
    let (mut k, _) = rig.open();
    rig.configure(&mut k, "r1", &rig.with_meter(), Duration::from_secs(30));
    let edited = text(rig.dir.path(), "status_interval = \"30s\"\n");
    std::fs::write(&rig.path, &edited).unwrap();
    k.reloaded(edited.clone());
    assert_eq!(k.deadline(), None);
    assert_eq!(k.pending(), None);
    drop(k);
    let (k, _) = rig.open();
    assert_eq!(k.pending(), None);
    assert_eq!(rig.file(), edited);
}

#[tokio::test(start_paused = true)]
async fn configures_that_must_not_run_should_be_rejected_with_reasons() {
    let rig = Rig::new("");
    let (mut k, _) = rig.open();
    let running = rig.config();
    let base = sha256_hex(rig.file().as_bytes());
    let within = Duration::from_secs(30);
    let mut reject = |new: &str, base: &str| {
        k.configure("x", new, base, within, &running, &rig.store)
            .unwrap_err()
    };
    let good = rig.with_meter();
    assert!(reject(&good, "00ff").reason.contains("stale base"));
    // Every problem `check` finds, with line and key.
    let broken = good.replace("unit = 1,", "unit = 300,");
    let r = reject(&broken, &base);
    let line = broken
        .lines()
        .position(|l| l.contains("unit = 300"))
        .unwrap()
        + 1;
    assert_eq!(r.problems.len(), 1, "{}", r.reason);
    assert_eq!(r.problems[0].key, "meter[0].modbus.unit");
    assert_eq!(r.problems[0].line, Some(line));
    assert!(
        r.reason.contains(&format!("config.toml:{line}:")),
        "{}",
        r.reason
    );
    // A remote config cannot turn remote configuration off, not even by leaving the key out.
    let off = good.replace("remote_config = true\n", "");
    let r = reject(&off, &base);
    assert_eq!(r.problems[0].key, "mqtt.remote_config");
    let r = reject(
        &good.replace("remote_config = true", "remote_config = false"),
        &base,
    );
    assert_eq!(r.problems[0].key, "mqtt.remote_config");
    assert_eq!(r.problems[0].line, Some(10));
    let moved = good.replace(
        &format!("data_dir = \"{}\"", rig.dir.path().display()),
        "data_dir = \"/elsewhere\"",
    );
    assert_eq!(reject(&moved, &base).problems[0].key, "gateway.data_dir");
    let redacted = good.replace("guest:secret@", "guest:***@");
    assert_eq!(reject(&redacted, &base).problems[0].key, "amqp.url");
    assert!(reject(&rig.file(), &base).reason.contains("already"));
    let huge = format!("{good}\n#{}\n", "x".repeat(MAX_CONFIG_BYTES));
    assert!(reject(&huge, &base).reason.contains("over the limit"));
    // Nothing of it was written.
    assert_eq!(k.pending(), None);
    assert_eq!(rig.file(), text(rig.dir.path(), ""));
}

#[tokio::test(start_paused = true)]
async fn a_file_edited_and_not_reloaded_should_not_be_overwritten() {
    let rig = Rig::new("");
    let (mut k, _) = rig.open();
    let base = sha256_hex(rig.file().as_bytes());
    let edited = text(rig.dir.path(), "status_interval = \"30s\"\n");
    std::fs::write(&rig.path, &edited).unwrap();
    let r = k
        .configure(
            "x",
            &rig.with_meter(),
            &base,
            Duration::from_secs(30),
            &rig.config(),
            &rig.store,
        )
        .unwrap_err();
    assert!(r.reason.contains("edited on the gateway"), "{}", r.reason);
    assert_eq!(rig.file(), edited);
}

#[test]
fn get_config_should_not_show_an_inline_password() {
    let t =
        "[gateway]\nid = \"g\"\n\n[amqp]\nurl = \"amqp://guest:secret@host/%2f\"\nqueue = \"q\"\n";
    let (shown, keys) = redact(t);
    assert!(!shown.contains("secret"), "{shown}");
    assert!(
        shown.contains("url = \"amqp://guest:***@host/%2f\"\nqueue"),
        "{shown}"
    );
    assert_eq!(keys, vec!["amqp.url".to_owned()]);
    let plain = "[amqp]\nurl_file = \"/etc/amr-edge/amqp-url\"\n";
    assert_eq!(redact(plain), (plain.to_owned(), Vec::new()));
}

#[test]
fn check_and_status_should_say_a_config_waits_for_its_confirm() {
    let rig = Rig::new("");
    assert_eq!(summary(&rig.path, rig.dir.path()), None);
    let (mut k, _) = rig.open();
    rig.configure(&mut k, "r1", &rig.with_meter(), Duration::from_secs(30));
    let s = summary(&rig.path, rig.dir.path()).unwrap();
    assert_eq!(s.request_id.as_deref(), Some("r1"));
    assert!(
        s.render().contains("PENDING CONFIRMATION"),
        "{}",
        s.render()
    );
    k.confirm("r1").unwrap();
    let s = summary(&rig.path, rig.dir.path()).unwrap();
    assert!(s.render().contains("confirmed"), "{}", s.render());
    assert!(!s.render().contains("PENDING"));
}
