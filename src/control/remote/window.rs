//! The confirm window, sans-IO: the durable state of remote configuration and what each
//! event (a `configure`, a `confirm`, a start, a local reload) does to it. No files, no
//! timers: [`super::Keeper`] writes the state and waits.
//!
//! Times in the state are wall-clock milliseconds, so that they still mean something after a
//! restart. The wait itself runs on tokio's monotonic clock, for [`remaining`]: the time to
//! the deadline, but never more than the whole window, so that a clock that jumps back (an
//! RTC-less gateway booting in 1970) gives the config one more full window, not years; a
//! clock that jumps forward ends the window early, which reverts to the configuration that
//! was known to work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::primitives::HumanDuration;

/// What `{data_dir}/remote-config/state.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Durable {
    /// A remote config applied and not confirmed yet.
    pub pending: Option<Pending>,
    /// The last remote config that took effect (pending or confirmed). It is the active one
    /// while the file's hash is its hash.
    pub last_remote: Option<Remote>,
    /// The last remote config that was reverted.
    pub last_reverted: Option<Reverted>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub request_id: String,
    pub sha256: String,
    /// The config it replaced, kept in `previous.toml`.
    pub previous_sha256: String,
    pub applied_ms: i64,
    pub deadline_ms: i64,
    pub confirm_within_ms: u64,
    /// `last_remote` before this one: what the previous config was, for after a revert.
    pub previous_remote: Option<Remote>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    pub request_id: String,
    pub sha256: String,
    pub applied_ms: i64,
    pub confirmed_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reverted {
    pub request_id: String,
    /// The config that was given up.
    pub sha256: String,
    pub at_ms: i64,
    pub reason: String,
}

/// What a start does with the state it finds, given the hash of the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnStart {
    /// No window open.
    Nothing,
    /// The window is still open: wait this long more.
    Keep(Duration),
    /// The window closed while the agent was not running: go back before anything runs.
    Revert(String),
    /// The file already holds the previous config (a crash inside a revert, or before the new
    /// file was written): finish the revert's bookkeeping.
    AlreadyReverted,
    /// The file is neither: an operator edited it. A local edit wins; the window is dropped.
    Superseded,
}

pub fn on_start(state: &Durable, file_sha: &str, now_ms: i64) -> OnStart {
    let Some(p) = &state.pending else {
        return OnStart::Nothing;
    };
    if file_sha == p.sha256 {
        if now_ms >= p.deadline_ms {
            OnStart::Revert(format!(
                "not confirmed within {} (the window closed while the agent was not running)",
                HumanDuration::from_millis(p.confirm_within_ms)
            ))
        } else {
            OnStart::Keep(remaining(p, now_ms))
        }
    } else if file_sha == p.previous_sha256 {
        OnStart::AlreadyReverted
    } else {
        OnStart::Superseded
    }
}

/// How long the window of `p` stays open from `now_ms`: never more than the whole window.
pub fn remaining(p: &Pending, now_ms: i64) -> Duration {
    let left = u64::try_from(p.deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
    Duration::from_millis(left.min(p.confirm_within_ms))
}

/// Whether a `configure` based on `base` may go ahead while `active_sha` runs.
pub fn may_configure(state: &Durable, active_sha: &str, base: &str) -> Result<(), String> {
    if let Some(p) = &state.pending {
        return Err(format!(
            "the configuration of `{}` is still waiting for its confirm: confirm it, or wait for it to be reverted, before sending another",
            p.request_id
        ));
    }
    if !base.eq_ignore_ascii_case(active_sha) {
        return Err(format!(
            "stale base: the active configuration is {active_sha}, not {base} (it changed meanwhile: get_config again)"
        ));
    }
    Ok(())
}

/// The state once `request_id`'s config (`sha256`) replaced `previous_sha256` at `now_ms`.
pub fn begin(
    state: &Durable,
    request_id: &str,
    sha256: &str,
    previous_sha256: &str,
    now_ms: i64,
    within: Duration,
) -> Durable {
    let within_ms = within.as_millis() as u64;
    Durable {
        pending: Some(Pending {
            request_id: request_id.to_owned(),
            sha256: sha256.to_owned(),
            previous_sha256: previous_sha256.to_owned(),
            applied_ms: now_ms,
            deadline_ms: now_ms.saturating_add(within_ms as i64),
            confirm_within_ms: within_ms,
            previous_remote: state.last_remote.clone(),
        }),
        last_remote: Some(Remote {
            request_id: request_id.to_owned(),
            sha256: sha256.to_owned(),
            applied_ms: now_ms,
            confirmed_ms: None,
        }),
        last_reverted: state.last_reverted.clone(),
    }
}

/// What a `confirm` of `target` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    pub state: Durable,
    pub sha256: String,
    /// It had been confirmed before (a second `confirm`): nothing changed.
    pub already: bool,
}

pub fn confirm(state: &Durable, target: &str, now_ms: i64) -> Result<Confirmation, String> {
    match &state.pending {
        Some(p) if p.request_id == target => {
            let mut next = state.clone();
            next.pending = None;
            next.last_remote = Some(Remote {
                request_id: p.request_id.clone(),
                sha256: p.sha256.clone(),
                applied_ms: p.applied_ms,
                confirmed_ms: Some(now_ms),
            });
            Ok(Confirmation {
                state: next,
                sha256: p.sha256.clone(),
                already: false,
            })
        }
        Some(p) => Err(format!(
            "`{target}` is not the configuration waiting for its confirm (that is `{}`)",
            p.request_id
        )),
        None => match (&state.last_remote, &state.last_reverted) {
            (Some(r), _) if r.request_id == target && r.confirmed_ms.is_some() => {
                Ok(Confirmation {
                    state: state.clone(),
                    sha256: r.sha256.clone(),
                    already: true,
                })
            }
            (_, Some(r)) if r.request_id == target => Err(format!(
                "too late: the configuration of `{target}` was reverted ({})",
                r.reason
            )),
            _ => Err(format!(
                "no configuration is waiting for its confirm, and `{target}` is not one this gateway applied"
            )),
        },
    }
}

/// The state after going back from the pending config, at `now_ms`.
pub fn reverted(state: &Durable, reason: &str, now_ms: i64) -> Durable {
    let Some(p) = &state.pending else {
        return state.clone();
    };
    Durable {
        pending: None,
        last_remote: p.previous_remote.clone(),
        last_reverted: Some(Reverted {
            request_id: p.request_id.clone(),
            sha256: p.sha256.clone(),
            at_ms: now_ms,
            reason: reason.to_owned(),
        }),
    }
}

/// The state after a local edit replaced the pending config.
pub fn superseded(state: &Durable) -> Durable {
    Durable {
        pending: None,
        ..state.clone()
    }
}

/// Where the config with hash `active_sha` came from.
pub fn remote_source<'a>(state: &'a Durable, active_sha: &str) -> Option<&'a Remote> {
    state
        .last_remote
        .as_ref()
        .filter(|r| r.sha256.eq_ignore_ascii_case(active_sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000;

    fn pending() -> Durable {
        begin(
            &Durable::default(),
            "r1",
            "new",
            "old",
            T,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_start_inside_the_window_should_keep_the_rest_of_it() {
        assert_eq!(
            on_start(&pending(), "new", T + 20_000),
            OnStart::Keep(Duration::from_secs(40))
        );
    }

    #[test]
    fn a_start_after_the_window_should_revert() {
        assert!(matches!(
            on_start(&pending(), "new", T + 60_000),
            OnStart::Revert(why) if why.contains("not confirmed within 1m")
        ));
    }

    #[test]
    fn a_clock_that_went_back_should_give_one_whole_window_not_more() {
        assert_eq!(
            on_start(&pending(), "new", 0),
            OnStart::Keep(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_file_holding_the_previous_config_or_a_local_edit_should_be_told_apart() {
        assert_eq!(on_start(&pending(), "old", T), OnStart::AlreadyReverted);
        assert_eq!(on_start(&pending(), "edited", T), OnStart::Superseded);
        assert_eq!(
            on_start(&Durable::default(), "anything", T),
            OnStart::Nothing
        );
    }

    #[test]
    fn a_configure_should_need_the_active_base_and_no_open_window() {
        let idle = Durable::default();
        assert!(may_configure(&idle, "abc", "ABC").is_ok());
        assert!(
            may_configure(&idle, "abc", "def")
                .unwrap_err()
                .contains("stale base")
        );
        assert!(
            may_configure(&pending(), "new", "new")
                .unwrap_err()
                .contains("`r1` is still waiting")
        );
    }

    #[test]
    fn a_confirm_should_close_the_window_once_and_only_for_its_target() {
        let p = pending();
        assert!(confirm(&p, "r2", T).unwrap_err().contains("that is `r1`"));
        let c = confirm(&p, "r1", T + 5).unwrap();
        assert!(!c.already);
        assert_eq!(c.state.pending, None);
        assert_eq!(
            c.state.last_remote.as_ref().unwrap().confirmed_ms,
            Some(T + 5)
        );
        assert_eq!(remote_source(&c.state, "new").unwrap().request_id, "r1");
        let again = confirm(&c.state, "r1", T + 9).unwrap();
        assert!(again.already);
        assert_eq!(again.state, c.state);
    }

    #[test]
    fn a_revert_should_restore_where_the_previous_config_came_from() {
        let first = confirm(&pending(), "r1", T + 1).unwrap().state;
        let second = begin(&first, "r2", "newer", "new", T + 10, Duration::from_secs(5));
        let back = reverted(&second, "not confirmed", T + 20);
        assert_eq!(back.pending, None);
        assert_eq!(back.last_remote, first.last_remote);
        assert_eq!(remote_source(&back, "new").unwrap().request_id, "r1");
        let r = back.last_reverted.clone().unwrap();
        assert_eq!((r.request_id.as_str(), r.sha256.as_str()), ("r2", "newer"));
        assert!(
            confirm(&back, "r2", T + 30)
                .unwrap_err()
                .contains("too late")
        );
    }
}
