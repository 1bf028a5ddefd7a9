//! `amr-edge run --config FILE`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use amr_edge::agent::{self, BeatMode, Options};

pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = super::load(path)?;
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
