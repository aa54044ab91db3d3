//! `deploy/hub.toml` and `deploy/forward.toml` name only real options of `keyway-hub run` and
//! `keyway forward`, and show every one of them (`deploy/relay.toml` is checked in the relay's
//! own tests, with its real loader).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use keyway_proto::cli::config_env;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Every option of the file maps to a flag of `sub`, and every flag with an environment
/// variable (but `config`) appears in the file.
fn check(command: clap::Command, sub: &str, file: &str) {
    let command = command.find_subcommand(sub).unwrap_or_else(|| panic!("no subcommand {sub}")).clone();
    let path = deploy(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let env = config_env(&command, &path, &text).unwrap_or_else(|e| panic!("{e}"));
    let vars: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for arg in command.get_arguments().filter(|a| a.get_long() != Some("config")) {
        if let (Some(var), false) = (arg.get_env(), arg.is_hide_set()) {
            let var = var.to_string_lossy();
            assert!(
                vars.contains(&var.as_ref()),
                "{file} lacks {}",
                arg.get_long().unwrap().replace('-', "_")
            );
        }
    }
}

#[test]
fn hub_toml_names_every_option_of_keyway_hub_run() {
    check(keyway_hub::cli::Cli::command(), "run", "hub.toml");
}

#[test]
fn forward_toml_names_every_option_of_keyway_forward() {
    check(keyway_cli::Cli::command(), "forward", "forward.toml");
}
