//! Every example config shipped in `boards/` loads and validates, so a broken example (or a
//! config change that breaks one) fails `cargo test`, not a field engineer. The raspberry-pi
//! example is also the default `/etc/amr-edge/config.toml` of the .deb packages.

use std::path::{Path, PathBuf};

use amr_edge::config::Config;

fn boards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("boards")
}

/// Every `boards/*/*.toml`, sorted.
fn board_configs() -> Vec<PathBuf> {
    let mut configs = Vec::new();
    for board in std::fs::read_dir(boards()).expect("boards/ exists") {
        let board = board.expect("readable boards/ entry").path();
        if !board.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&board).expect("readable board folder") {
            let file = file.expect("readable board file").path();
            if file.extension().is_some_and(|e| e == "toml") {
                configs.push(file);
            }
        }
    }
    configs.sort();
    configs
}

#[test]
fn every_board_config_should_load_and_validate() {
    let configs = board_configs();
    assert!(
        configs.len() >= 3,
        "expected the Raspberry Pi and at least two gateway configs, found {configs:?}"
    );
    let mut failures = Vec::new();
    for path in &configs {
        match Config::load(path) {
            Ok(config) => {
                assert!(!config.buses.is_empty(), "{}: no bus", path.display());
                assert!(!config.meters.is_empty(), "{}: no meter", path.display());
                // The shipped unit's StateDirectory: anything else is not writable under
                // ProtectSystem=strict.
                assert_eq!(
                    config.gateway.data_dir,
                    Path::new("/var/lib/amr-edge"),
                    "{}: data_dir must be the unit's StateDirectory",
                    path.display()
                );
                // Credentials stay out of example files.
                assert!(
                    config.amqp.url.is_none() && config.amqp.url_file.is_some(),
                    "{}: use amqp.url_file for the broker URL",
                    path.display()
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_board_folder_should_have_a_readme_and_a_config() {
    for board in std::fs::read_dir(boards()).expect("boards/ exists") {
        let board = board.expect("readable boards/ entry").path();
        if !board.is_dir() {
            continue;
        }
        assert!(
            board.join("README.md").is_file(),
            "{}: no README.md",
            board.display()
        );
        assert!(
            board.join("config.toml").is_file(),
            "{}: no config.toml",
            board.display()
        );
    }
}
