//! One module per subcommand.

pub mod check;
pub mod demo;
pub mod poll;
pub mod run;
pub mod scan;
pub mod simulate;
pub mod status;

use std::path::Path;

use amr_edge::config::Config;

/// Loads a config, printing every problem with its place in the file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}
