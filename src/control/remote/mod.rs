//! Remote configuration, confirm-or-revert: `get_config`, `configure` and `confirm` from the
//! centre, and going back by itself when a new config is not confirmed in time.
//!
//! The [`Keeper`] belongs to the agent's main loop, the one that owns the generations of
//! tasks (see [`crate::agent`]): control, which runs *inside* a generation, cannot restart
//! itself. Control parses and verifies a command and sends a [`ConfigRequest`]; the keeper
//! answers it, and for an accepted `configure` the main loop then reloads exactly as for
//! SIGHUP (nothing buffered is lost). The `applied` reply is published by the control of the
//! *new* generation, on the new config's broker and topics — an `applied` that reaches the
//! centre is itself the proof that the new config can talk to it.
//!
//! # Rules
//!
//! * `configure` runs only when the running config (the file on the gateway) has `[mqtt]
//!   remote_config = true`, with a signature when `hmac_key_file` is set, when `base` is the
//!   SHA-256 of the running config, when the file on disk is still that config (a local edit
//!   not yet reloaded is never overwritten), and when no other window is open.
//! * The new text is validated by [`Config::from_toml`], exactly as `check` does, against
//!   the config file's own path (relative `modbus_profiles` resolve the same). Every problem
//!   is answered with its line, column and key.
//! * A remote config must say `[mqtt] remote_config = true` itself. Turning remote
//!   configuration off, like turning it on, is for a local operator: a remote config that
//!   left the key out (it defaults to `false`) or said `false` would take effect, pass its
//!   confirm (sent while the window is open), and leave the centre no way to send the next
//!   config — a lock-out nobody would see until then. The confirm window catches everything
//!   else that cuts the centre off (a wrong broker URL, password, key, topic prefix or
//!   gateway id): no `confirm` can arrive, so the agent goes back.
//! * `gateway.data_dir` cannot change (as for SIGHUP: the store is open there). An
//!   `amqp.url` still holding get_config's `***` is refused.
//! * Bounds: the config text at most [`MAX_CONFIG_BYTES`]; `confirm_within` between
//!   [`MIN_CONFIRM_WITHIN`] and [`MAX_CONFIRM_WITHIN`] (default [`DEFAULT_CONFIRM_WITHIN`]).
//!
//! # What is durable when
//!
//! In `{data_dir}/remote-config/`: `state.json` (the [`window::Durable`] state) and
//! `previous.toml` (the config to go back to). Every file is replaced with
//! [`disk::write_atomically_mode`] (temporary file, fsync, rename, directory fsync; the config
//! and its previous version with the permissions the config file had, since it may hold an
//! inline secret). A `configure`:
//!
//! 1. `previous.toml` ← the running config's text;
//! 2. `state.json` ← the open window (request, both hashes, deadline);
//! 3. the config file ← the new text;
//! 4. the command's record ← `applied`; then the reload.
//!
//! A crash after 1 leaves no window: nothing changed. After 2, the file still holds the
//! previous config: the next start finishes it as reverted. After 3, the next start finds the
//! new config with its window: closed → it reverts *before* anything runs; still open → it
//! runs the new config and waits for the rest of the window (re-announcing `applied`). A
//! revert writes the file back from `previous.toml`, records `reverted` in the command's
//! record and a `config_reverted` system event in the store, then closes the window; a crash
//! in between repeats the revert on the next start (the event may then be sent twice, never
//! lost). A `confirm` closes the window in `state.json`. An operator's edit of the file
//! (a SIGHUP with another valid file, or a start on a file that is neither config) wins: the
//! window is dropped and nothing is reverted.
//!
//! The file writes are small and rare; the main loop does them in place.

pub mod window;

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};

use super::reply::{
    ConfigApplied, ConfigDoc, ConfigProblem, ConfigReverted, Confirmed, Rejected, Status, to_json,
};
use crate::clock::SharedClock;
use crate::config::{Config, Located};
use crate::primitives::{HumanDuration, redact_url};
use crate::reading::{EventKind, Stamp, SystemEvent};
use crate::store::{Append, Store, disk};
use window::{Durable, OnStart};

/// The largest config text `configure` takes.
pub const MAX_CONFIG_BYTES: usize = 256 << 10;
pub const MIN_CONFIRM_WITHIN: Duration = Duration::from_secs(5);
pub const MAX_CONFIRM_WITHIN: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_CONFIRM_WITHIN: Duration = Duration::from_secs(600);

/// Where the keeper's files live, under `gateway.data_dir`.
pub const DIR: &str = "remote-config";
const STATE: &str = "state.json";
const PREVIOUS: &str = "previous.toml";

/// Hex SHA-256, as `get_config` gives it and `base` takes it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// What control asks of the keeper.
pub enum ConfigRequest {
    Get {
        reply: oneshot::Sender<ConfigDoc>,
    },
    Configure {
        request_id: String,
        config: String,
        base: String,
        confirm_within: Duration,
        /// `Ok`: written; the main loop reloads as soon as it has answered.
        reply: oneshot::Sender<Result<String, Rejected>>,
    },
    Confirm {
        target: String,
        reply: oneshot::Sender<Result<Confirmed, String>>,
    },
}

/// What a generation's control gets from the main loop.
#[derive(Clone)]
pub struct RemoteLink {
    pub requests: mpsc::Sender<ConfigRequest>,
    /// Replies to publish once control runs (`applied`, `reverted`), already recorded.
    pub notices: Vec<Vec<u8>>,
}

/// Why the keeper could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config to go back to does not load any more (a file it names has gone).
    #[error("the previous configuration cannot be loaded again: {0}")]
    Previous(crate::config::ConfigError),
}

/// The running config as the keeper knows it.
#[derive(Clone, Debug)]
struct Active {
    text: String,
    sha256: String,
    loaded_ms: i64,
}

/// Remote configuration's state and files; owned by the agent's main loop.
pub struct Keeper {
    path: PathBuf,
    dir: PathBuf,
    clock: SharedClock,
    state: Durable,
    active: Active,
    deadline: Option<tokio::time::Instant>,
    notices: Vec<Vec<u8>>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RemoteError + 'a {
    move |source| RemoteError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The permission bits of the file at `path`, to give its replacement.
fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

fn rfc3339(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Reads `{data_dir}/remote-config/state.json`; none yet is the empty state.
fn read_state(dir: &Path) -> Result<Durable, RemoteError> {
    let path = dir.join(STATE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RemoteError::Io {
            what: "cannot read",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Durable::default()),
        Err(e) => Err(io("cannot read", &path)(e)),
    }
}

/// The config file at `path` does not load (`error`): if it is a remote configuration still
/// inside its confirm window (by the `gateway.data_dir` its text names and the window's
/// state there), write the previous configuration back so that the agent can start on it;
/// [`Keeper::open`] then finishes the revert (reply, `config_reverted` event). Returns
/// whether it did. Without this a remote config that validated when it was sent, but no
/// longer loads after a restart (a key file it names was removed), would keep the agent
/// from starting at all. Anything else (no window, a local edit, unreadable state) is left
/// alone: the load error stands.
pub fn rescue_unloadable(path: &Path, error: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Some(data_dir) = toml::from_str::<toml::Table>(&text).ok().and_then(|t| {
        t.get("gateway")?
            .get("data_dir")?
            .as_str()
            .map(PathBuf::from)
    }) else {
        return false;
    };
    let dir = data_dir.join(DIR);
    let Ok(state) = read_state(&dir) else {
        return false;
    };
    let Some(p) = state.pending else {
        return false;
    };
    if p.sha256 != sha256_hex(text.as_bytes()) {
        return false;
    }
    let previous = dir.join(PREVIOUS);
    let Ok(old) = std::fs::read(&previous) else {
        return false;
    };
    if sha256_hex(&old) != p.previous_sha256 {
        return false;
    }
    match disk::write_atomically_mode(path, &old, mode_of(path)) {
        Ok(()) => {
            tracing::warn!(request_id = %p.request_id, %error, "The remote configuration waiting for its confirm does not load: going back to the previous one");
            true
        }
        Err(e) => {
            tracing::error!(request_id = %p.request_id, path = %path.display(), error = %e, "Cannot write the previous configuration back");
            false
        }
    }
}

impl Keeper {
    /// Takes over the config file `path` that `config` was loaded from (its text read again
    /// here) and the state in `data_dir`; settles a window a stop left open. Returns the
    /// config to run: `config`, or the previous one if the window closed meanwhile.
    pub fn open(
        path: &Path,
        config: Config,
        clock: SharedClock,
        store: &dyn Store,
    ) -> Result<(Keeper, Config), RemoteError> {
        let dir = config.gateway.data_dir.join(DIR);
        let text = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
        let state = read_state(&dir)?;
        let now = clock.now_ms();
        let mut keeper = Keeper {
            path: path.to_owned(),
            dir,
            clock,
            active: Active {
                sha256: sha256_hex(text.as_bytes()),
                text,
                loaded_ms: now,
            },
            state,
            deadline: None,
            notices: Vec::new(),
        };
        match window::on_start(&keeper.state, &keeper.active.sha256, now) {
            OnStart::Nothing => Ok((keeper, config)),
            OnStart::Keep(left) => {
                let p = keeper.state.pending.clone().expect("a window is open");
                tracing::warn!(request_id = %p.request_id, confirm_within_s = left.as_secs(), "Running a remote configuration that waits for its confirm");
                keeper.deadline = Some(tokio::time::Instant::now() + left);
                keeper.active.loaded_ms = p.applied_ms;
                // The centre may have missed it before the restart.
                keeper.notices.push(keeper.applied(&p));
                Ok((keeper, config))
            }
            OnStart::Revert(reason) => {
                let previous = keeper.revert(&reason, store)?;
                Ok((keeper, previous))
            }
            OnStart::AlreadyReverted => {
                let reason =
                    "the agent stopped inside the window, before the configuration was confirmed";
                let previous = keeper.revert(reason, store)?;
                Ok((keeper, previous))
            }
            OnStart::Superseded => {
                tracing::warn!(path = %path.display(), "The config file was edited locally while a remote configuration waited for its confirm: the local file wins");
                let next = window::superseded(&keeper.state);
                keeper.save(&next)?;
                Ok((keeper, config))
            }
        }
    }

    /// Replies for the next generation's control to publish.
    pub fn take_notices(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.notices)
    }

    /// Whether a window is open.
    pub fn pending(&self) -> Option<&str> {
        self.state.pending.as_ref().map(|p| p.request_id.as_str())
    }

    /// Why the open window's config is reverted when it closes.
    pub fn expiry_reason(&self) -> String {
        match &self.state.pending {
            Some(p) => format!(
                "not confirmed within {}",
                HumanDuration::from_millis(p.confirm_within_ms)
            ),
            None => "not confirmed in time".into(),
        }
    }

    /// When the open window closes (tokio's clock); `None` if none is open.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// The pending config cannot be reverted (see [`RemoteError::Previous`]): keep it, and
    /// close the window so that it is not tried again and again.
    pub fn give_up(&mut self, why: &str) {
        let next = window::superseded(&self.state);
        if let Err(e) = self.save(&next) {
            tracing::error!(error = %e, "Could not close the confirm window");
        }
        self.deadline = None;
        tracing::error!(
            reason = why,
            "Kept a remote configuration that was not confirmed: the previous one cannot be loaded"
        );
    }

    fn save(&mut self, next: &Durable) -> Result<(), RemoteError> {
        disk::create_dir_durably(&self.dir).map_err(io("cannot create", &self.dir))?;
        let path = self.dir.join(STATE);
        let json = serde_json::to_vec_pretty(next).unwrap_or_default();
        disk::write_atomically(&path, &json).map_err(io("cannot write", &path))?;
        self.state = next.clone();
        Ok(())
    }

    fn applied(&self, p: &window::Pending) -> Vec<u8> {
        to_json(&ConfigApplied {
            request_id: p.request_id.clone(),
            status: Status::Applied,
            command: "configure",
            sha256: p.sha256.clone(),
            previous_sha256: p.previous_sha256.clone(),
            confirm_within: HumanDuration::from_millis(p.confirm_within_ms).to_string(),
            confirm_by: rfc3339(p.deadline_ms),
        })
    }

    /// `get_config`.
    pub fn describe(&self, remote_config: bool) -> ConfigDoc {
        let (text, redacted) = redact(&self.active.text);
        let remote = window::remote_source(&self.state, &self.active.sha256);
        let pending = self
            .state
            .pending
            .as_ref()
            .filter(|p| p.sha256 == self.active.sha256);
        ConfigDoc {
            path: self.path.display().to_string(),
            sha256: self.active.sha256.clone(),
            text,
            redacted,
            source: if remote.is_some() { "remote" } else { "local" },
            request_id: remote.map(|r| r.request_id.clone()),
            applied_at: Some(rfc3339(
                remote.map_or(self.active.loaded_ms, |r| r.applied_ms),
            )),
            confirmed_at: remote.and_then(|r| r.confirmed_ms).map(rfc3339),
            confirm_by: pending.map(|p| rfc3339(p.deadline_ms)),
            remote_config,
        }
    }

    /// `configure`: checks, validates and writes the new config (steps 1-4 of the module
    /// doc) and returns it for the main loop to start.
    pub fn configure(
        &mut self,
        request_id: &str,
        text: &str,
        base: &str,
        within: Duration,
        running: &Config,
        store: &dyn Store,
    ) -> Result<Config, Rejected> {
        let reject = |why: String| Rejected::new(Some(request_id), why);
        if text.len() > MAX_CONFIG_BYTES {
            return Err(reject(format!(
                "the config is {} bytes, over the limit of {} bytes",
                text.len(),
                MAX_CONFIG_BYTES
            )));
        }
        window::may_configure(&self.state, &self.active.sha256, base).map_err(reject)?;
        let on_disk = std::fs::read(&self.path)
            .map_err(|e| reject(format!("cannot read {}: {e}", self.path.display())))?;
        if sha256_hex(&on_disk) != self.active.sha256 {
            return Err(reject(format!(
                "{} was edited on the gateway and not reloaded: it is not the active configuration, and a remote one would overwrite it",
                self.path.display()
            )));
        }
        let new_sha = sha256_hex(text.as_bytes());
        if new_sha == self.active.sha256 {
            return Err(reject(
                "the config is the active configuration already: nothing to apply".into(),
            ));
        }
        let config = match Config::from_toml(text, &self.path) {
            Ok(c) => c,
            Err(e) => return Err(invalid(request_id, &e.to_string(), &e.problems)),
        };
        let problems = remote_rules(text, &config, running);
        if !problems.is_empty() {
            let shown = crate::config::ConfigError {
                file: self.path.clone(),
                problems: problems.clone(),
            };
            return Err(invalid(request_id, &shown.to_string(), &problems));
        }
        let cannot = |e: RemoteError| reject(format!("the gateway cannot keep it: {e}"));
        disk::create_dir_durably(&self.dir)
            .map_err(io("cannot create", &self.dir))
            .map_err(cannot)?;
        let previous = self.dir.join(PREVIOUS);
        let mode = mode_of(&self.path);
        disk::write_atomically_mode(&previous, self.active.text.as_bytes(), mode)
            .map_err(io("cannot write", &previous))
            .map_err(cannot)?;
        let now = self.clock.now_ms();
        let before = self.state.clone();
        let next = window::begin(
            &before,
            request_id,
            &new_sha,
            &self.active.sha256,
            now,
            within,
        );
        self.save(&next).map_err(cannot)?;
        if let Err(e) = disk::write_atomically_mode(&self.path, text.as_bytes(), mode) {
            // Nothing changed: close the window again.
            let undo = self.save(&before);
            tracing::warn!(error = %e, undo = ?undo.err(), "A remote configuration could not be written");
            return Err(reject(format!(
                "cannot write {}: {e} (the service must be allowed to write the config file's directory: see the README, remote configuration)",
                self.path.display()
            )));
        }
        self.active = Active {
            text: text.to_owned(),
            sha256: new_sha,
            loaded_ms: now,
        };
        self.deadline = Some(tokio::time::Instant::now() + within);
        let p = next.pending.clone().expect("just opened");
        let applied = self.applied(&p);
        if let Err(e) = store.finish_command(request_id, &String::from_utf8_lossy(&applied)) {
            tracing::warn!(request_id, error = %e, "Could not record a configure as applied");
        }
        self.notices.push(applied);
        tracing::info!(request_id, sha256 = %p.sha256, confirm_by = %rfc3339(p.deadline_ms), "Remote configuration written; applying it");
        Ok(config)
    }

    /// `confirm`: keeps the pending config.
    pub fn confirm(&mut self, target: &str) -> Result<Confirmed, String> {
        let c = window::confirm(&self.state, target, self.clock.now_ms())?;
        if !c.already {
            self.save(&c.state)
                .map_err(|e| format!("the confirm cannot be recorded: {e}"))?;
            self.deadline = None;
            tracing::info!(request_id = target, sha256 = %c.sha256, "Remote configuration confirmed");
        }
        Ok(Confirmed {
            target: target.to_owned(),
            sha256: c.sha256,
            already: c.already,
        })
    }

    /// Goes back to the previous config (see the module doc) and returns it to start.
    pub fn revert(&mut self, reason: &str, store: &dyn Store) -> Result<Config, RemoteError> {
        let Some(p) = self.state.pending.clone() else {
            return Err(RemoteError::Io {
                what: "nothing to revert in",
                path: self.dir.join(STATE),
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        let previous_path = self.dir.join(PREVIOUS);
        let text =
            std::fs::read_to_string(&previous_path).map_err(io("cannot read", &previous_path))?;
        let config = Config::from_toml(&text, &self.path).map_err(RemoteError::Previous)?;
        disk::write_atomically_mode(&self.path, text.as_bytes(), mode_of(&self.path))
            .map_err(io("cannot write", &self.path))?;
        let now = self.clock.now_ms();
        let reply = to_json(&ConfigReverted {
            request_id: p.request_id.clone(),
            status: Status::Reverted,
            command: "configure",
            sha256: p.previous_sha256.clone(),
            reverted_sha256: p.sha256.clone(),
            reason: reason.to_owned(),
            at: rfc3339(now),
        });
        if let Err(e) = store.finish_command(&p.request_id, &String::from_utf8_lossy(&reply)) {
            tracing::warn!(request_id = %p.request_id, error = %e, "Could not record a configure as reverted");
        }
        let event = SystemEvent::new(
            EventKind::ConfigReverted,
            Stamp::in_zone(self.clock.now(), &config.gateway.tz),
            format!(
                "The configuration sent by `{}` was reverted: {reason}",
                p.request_id
            ),
        )
        .detail("request_id", &p.request_id)
        .detail("reverted_sha256", &p.sha256)
        .detail("sha256", &p.previous_sha256);
        if let Err(e) = store.append(Append {
            events: vec![event],
            ..Default::default()
        }) {
            tracing::warn!(error = %e, "Could not buffer the config_reverted event");
        }
        let next = window::reverted(&self.state, reason, now);
        self.save(&next)?;
        self.active = Active {
            sha256: sha256_hex(text.as_bytes()),
            text,
            loaded_ms: now,
        };
        self.deadline = None;
        self.notices.push(reply);
        tracing::warn!(request_id = %p.request_id, reason, "Remote configuration reverted: back on the previous configuration");
        Ok(config)
    }

    /// SIGHUP loaded `text` from the file. Another config than the pending one is a local
    /// edit, which wins: the window is dropped.
    pub fn reloaded(&mut self, text: String) {
        let sha = sha256_hex(text.as_bytes());
        if sha == self.active.sha256 {
            return;
        }
        if self.state.pending.is_some() {
            tracing::warn!(
                "The config file was edited locally while a remote configuration waited for its confirm: the local file wins"
            );
            let next = window::superseded(&self.state);
            if let Err(e) = self.save(&next) {
                tracing::error!(error = %e, "Could not drop the confirm window; it may revert the local edit after a restart");
            }
            self.deadline = None;
        }
        self.active = Active {
            text,
            sha256: sha,
            loaded_ms: self.clock.now_ms(),
        };
    }
}

/// A `rejected` reply with every problem located.
fn invalid(request_id: &str, shown: &str, problems: &[Located]) -> Rejected {
    let mut r = Rejected::new(
        Some(request_id),
        format!(
            "the config is invalid ({} problem(s)):\n{shown}",
            problems.len()
        ),
    );
    r.problems = problems
        .iter()
        .map(|p| ConfigProblem {
            line: p.line.map(|l| l.0),
            column: p.line.map(|l| l.1),
            key: p.key.clone(),
            message: p.message.clone(),
        })
        .collect();
    r
}

/// What a remote config must respect beyond `check` (see the module doc).
fn remote_rules(text: &str, new: &Config, running: &Config) -> Vec<Located> {
    let mut problems = Vec::new();
    let mut push = |key: &str, message: String| {
        problems.push(Located {
            line: crate::config::locate(text, key),
            key: key.to_owned(),
            message,
        })
    };
    match &new.mqtt {
        None => push(
            "mqtt",
            "a remote configuration must keep [mqtt] with `remote_config = true`: without it, the centre could not reach this gateway again".into(),
        ),
        Some(m) if !m.remote_config => push(
            "mqtt.remote_config",
            "a remote configuration must say `remote_config = true`: turning remote configuration off is for a local operator, so that a config cannot lock the centre out".into(),
        ),
        Some(_) => {}
    }
    if new.gateway.data_dir != running.gateway.data_dir {
        push(
            "gateway.data_dir",
            format!(
                "cannot change while the agent runs (the store is open in {})",
                running.gateway.data_dir.display()
            ),
        );
    }
    if new
        .amqp
        .url
        .as_ref()
        .is_some_and(|u| u.expose().contains(":***@"))
    {
        push(
            "amqp.url",
            "holds the `***` get_config shows instead of the password: send the real URL, or use `url_file`".into(),
        );
    }
    problems
}

/// `text` with the password of an inline `amqp.url` replaced by `***`, and the keys hidden.
pub fn redact(text: &str) -> (String, Vec<String>) {
    use toml::de::{DeTable, DeValue};
    let Ok(root) = DeTable::parse(text) else {
        // Not TOML (never for a config that runs): show nothing rather than a secret.
        return (String::new(), vec!["(all)".into()]);
    };
    let url = root
        .get_ref()
        .get("amqp")
        .and_then(|a| match a.get_ref() {
            DeValue::Table(t) => t.get("url"),
            _ => None,
        })
        .and_then(|u| match u.get_ref() {
            DeValue::String(s) => Some((u.span(), s.to_string())),
            _ => None,
        });
    match url {
        Some((span, url)) if redact_url(&url) != url => {
            let shown = toml::Value::String(redact_url(&url)).to_string();
            let mut out = text.to_owned();
            out.replace_range(span, &shown);
            (out, vec!["amqp.url".into()])
        }
        _ => (text.to_owned(), Vec::new()),
    }
}

mod summary;

pub use summary::{Summary, summary};

#[cfg(test)]
mod tests;
