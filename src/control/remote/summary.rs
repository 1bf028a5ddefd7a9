//! What `check` and `status` show a local operator of remote configuration.

use super::*;

/// What `check` and `status` say about the config file at `path` (whose data directory is
/// `data_dir`), read from the keeper's files; `None` for a local file with no window.
pub fn summary(path: &Path, data_dir: &Path) -> Option<Summary> {
    let text = std::fs::read(path).ok()?;
    let sha = sha256_hex(&text);
    let state = read_state(&data_dir.join(DIR)).ok()?;
    let remote = window::remote_source(&state, &sha);
    let pending = state.pending.as_ref().filter(|p| p.sha256 == sha);
    let reverted = state
        .last_reverted
        .as_ref()
        .map(|r| format!("{} at {} ({})", r.request_id, rfc3339(r.at_ms), r.reason));
    if remote.is_none() && reverted.is_none() {
        return None;
    }
    Some(Summary {
        sha256: sha,
        source: if remote.is_some() { "remote" } else { "local" }.into(),
        request_id: remote.map(|r| r.request_id.clone()),
        applied_at: remote.map(|r| rfc3339(r.applied_ms)),
        confirmed_at: remote.and_then(|r| r.confirmed_ms).map(rfc3339),
        pending_until: pending.map(|p| rfc3339(p.deadline_ms)),
        last_reverted: reverted,
    })
}

/// Remote configuration, as `check` and `status` show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub sha256: String,
    pub source: String,
    pub request_id: Option<String>,
    pub applied_at: Option<String>,
    pub confirmed_at: Option<String>,
    /// Waiting for its confirm until then; reverted after.
    pub pending_until: Option<String>,
    pub last_reverted: Option<String>,
}

impl Summary {
    /// One line for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        match (&self.request_id, &self.pending_until, &self.confirmed_at) {
            (Some(r), Some(until), _) => s.push_str(&format!(
                "remote configuration from `{r}`, applied {}: PENDING CONFIRMATION until {until}; reverted to the previous configuration unless the centre confirms it",
                self.applied_at.as_deref().unwrap_or("?")
            )),
            (Some(r), None, Some(at)) => s.push_str(&format!(
                "remote configuration from `{r}`, applied {}, confirmed {at}",
                self.applied_at.as_deref().unwrap_or("?")
            )),
            (Some(r), None, None) => s.push_str(&format!("remote configuration from `{r}`")),
            (None, _, _) => s.push_str("local file"),
        }
        if let Some(r) = &self.last_reverted {
            s.push_str(&format!("; last reverted: {r}"));
        }
        s
    }
}
