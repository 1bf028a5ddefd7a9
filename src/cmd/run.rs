//! `amr-edge run --config FILE`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use amr_edge::agent::{self, BeatMode, Options};

pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match super::load(path) {
        Ok(c) => c,
        // A remote config inside its window that no longer loads goes back to the previous
        // one rather than keep the gateway down.
        Err(e) if amr_edge::control::remote::rescue_unloadable(path, &format!("{e:#}")) => {
            super::load(path)?
        }
        Err(e) => return Err(e),
    };
    agent::run(
        config,
        Options {
            beat: BeatMode::Schedule,
            config_path: Some(path.to_owned()),
            summary_every: Duration::from_secs(300),
            stop_after: None,
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
