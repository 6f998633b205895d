//! Fuzzes the `--config FILE` folding of the `haul` binary (`src/config.rs`) with arbitrary TOML.
//!
//! That code lives in the binary crate, not a library, so this target compiles the binary's own
//! `src/cli.rs` and `src/config.rs` in with `#[path]` instead of copying them: the fuzzed code is
//! the shipped code.
//!
//! Input layout: `[which: u8][file ...]`. `which` picks one of a few command lines; the rest is
//! written (as UTF-8, lossily) to a temp file passed as `--config`.
//!
//! Checks: `config::expand` never panics (errors are fine); on success it keeps the command line
//! it was given as a prefix; and clap then parses the expanded line without panicking.

#![no_main]

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/cli.rs"]
mod cli;
#[path = "../../src/config.rs"]
mod config;

/// One temp dir for the whole run; the file in it is rewritten for every input.
fn config_path() -> &'static PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        DIR.get_or_init(|| tempfile::tempdir().expect("create temp dir"))
            .path()
            .join("haul.toml")
    })
}

fn command_line(which: u8, path: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["haul".into(), "--config".into(), path.into()];
    let tail: &[&str] = match which % 10 {
        0 => &["sender"],
        1 => &["receiver"],
        2 => &["coordinator"],
        3 => &["start", "--codec", "lz4"],
        4 => &["status"],
        5 => &["copy", "--no-verify"],
        6 => &["demo"],
        7 => &["certs", "init"],
        8 => {
            args = vec![
                "haul".into(),
                "--log".into(),
                "info".into(),
                format!("--config={path}"),
            ];
            &["sender", "--slots=2"]
        }
        _ => &["receiver", "--config", path],
    };
    args.extend(tail.iter().map(|s| s.to_string()));
    args
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, file)) = data.split_first() else {
        return;
    };
    let path = config_path();
    std::fs::write(path, String::from_utf8_lossy(file).as_bytes()).expect("write config file");
    let raw: Vec<OsString> = command_line(which, &path.to_string_lossy())
        .into_iter()
        .map(OsString::from)
        .collect();

    let Ok(expanded) = config::expand(raw.clone()) else {
        return;
    };
    assert!(
        expanded.starts_with(&raw),
        "expand changed the given command line: {raw:?} -> {expanded:?}"
    );
    let _ = cli::Cli::try_parse_from(&expanded);
});
