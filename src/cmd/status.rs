//! `amr-edge status --config FILE`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use amr_edge::clock::{Clock, SystemClock};
use amr_edge::lock::{DirLock, LockError};
use amr_edge::status::{self, StatusReport};
use amr_edge::store::{SledStore, Store};

pub async fn run(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = super::load(path)?;
    let dir = &config.gateway.data_dir;
    let report = match DirLock::acquire(dir) {
        // No agent: read the store directly, holding the lock so none starts meanwhile.
        Ok(_lock) => {
            let clock = Arc::new(SystemClock);
            let store = SledStore::open(dir, &config.store, clock.clone())?;
            let meters: Vec<String> = config.meter_ids();
            StatusReport::build(
                &config.gateway.id,
                &store.stats()?,
                &store.meters()?,
                &store.profiles()?,
                &meters,
                None,
                clock.now_ms(),
            )
        }
        Err(LockError::Held { pid, .. }) => status::query(dir).await.map_err(|e| {
            anyhow::anyhow!(
                "an agent{} holds {} but does not answer on its status socket: {e}",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                dir.display()
            )
        })?,
        Err(e) => return Err(e.into()),
    };
    // From the keeper's files, which are there whether or not the agent runs.
    let remote = amr_edge::control::remote::summary(path, dir);
    if json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(map) = doc.as_object_mut() {
            map.insert("remote_config".into(), serde_json::to_value(&remote)?);
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", report.render());
        if let Some(r) = remote {
            println!("config       {}", r.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}
