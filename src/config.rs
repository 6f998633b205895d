//! `--config FILE`: a TOML file supplying flags. Top-level keys apply to any command that has
//! such a flag; keys in a table named after the command (`[sender]`) apply to that command and
//! must be flags it has. A flag given on the command line wins over the file.
//!
//! The file is folded into the argument list before clap parses it, so one parser validates
//! flags from both places and a typo in the file is reported like a typo on the line.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context};
use clap::CommandFactory;

use crate::cli::Cli;

/// Flags that take no value.
fn is_switch(arg: &clap::Arg) -> bool {
    matches!(
        arg.get_action(),
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
    )
}

/// The command line's `--config` file, if any, and where its subcommand is.
fn scan(strs: &[String]) -> (Option<String>, Option<usize>) {
    let mut config: Option<String> = None;
    let mut sub_at = None;
    let mut i = 1;
    while i < strs.len() {
        let a = &strs[i];
        if let Some(v) = a.strip_prefix("--config=") {
            config = Some(v.to_string());
        } else if a == "--config" {
            config = strs.get(i + 1).cloned();
            i += 1;
        } else if a == "--log" || a == "--log-format" {
            i += 1;
        } else if !a.starts_with('-') && sub_at.is_none() {
            sub_at = Some(i);
        }
        i += 1;
    }
    (config, sub_at)
}

/// The subcommand named on a raw command line (before `--config` is read).
pub fn subcommand(raw: &[OsString]) -> Option<String> {
    let strs: Vec<String> = raw
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let (_, sub_at) = scan(&strs);
    sub_at.map(|i| strs[i].clone())
}

pub fn expand(raw: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let strs: Vec<String> = raw
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let (config, sub_at) = scan(&strs);
    let (Some(path), Some(sub_at)) = (config, sub_at) else {
        return Ok(raw);
    };
    let sub = strs[sub_at].clone();
    let table = read(Path::new(&path))?;

    let cmd = Cli::command();
    let Some(subcmd) = cmd.find_subcommand(&sub) else {
        return Ok(raw); // clap will report the unknown command
    };
    let flags: Vec<(&str, bool)> = subcmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| (l, is_switch(a))))
        .collect();
    let given = |flag: &str| {
        strs.iter()
            .any(|a| a == &format!("--{flag}") || a.starts_with(&format!("--{flag}=")))
    };

    let mut extra: Vec<OsString> = Vec::new();
    let mut push = |key: &str, value: &toml::Value, strict: bool| -> anyhow::Result<()> {
        let flag = key.replace('_', "-");
        let Some(&(_, switch)) = flags.iter().find(|(l, _)| *l == flag) else {
            if strict {
                let known: Vec<&str> = flags
                    .iter()
                    .map(|(l, _)| *l)
                    .filter(|l| *l != "help" && *l != "version")
                    .collect();
                bail!(
                    "{path}: [{sub}] has unknown key {key:?}; valid keys are {}",
                    known.join(", ")
                );
            }
            return Ok(());
        };
        if given(&flag) || flag == "config" {
            return Ok(());
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        for v in values {
            match (v, switch) {
                (toml::Value::Boolean(true), true) => extra.push(format!("--{flag}").into()),
                (toml::Value::Boolean(false), true) => {}
                (_, true) => bail!("{path}: {key} must be true or false"),
                (toml::Value::String(s), false) => {
                    extra.push(format!("--{flag}").into());
                    extra.push(s.into());
                }
                (toml::Value::Integer(n), false) => {
                    extra.push(format!("--{flag}").into());
                    extra.push(n.to_string().into());
                }
                (toml::Value::Float(n), false) => {
                    extra.push(format!("--{flag}").into());
                    extra.push(n.to_string().into());
                }
                (other, false) => bail!("{path}: {key} has an unsupported value {other}"),
            }
        }
        Ok(())
    };
    if let Some(toml::Value::Table(own)) = table.get(&sub) {
        for (k, v) in own {
            push(k, v, true)?;
        }
    }
    for (k, v) in &table {
        if !v.is_table() {
            let own_has =
                matches!(table.get(&sub), Some(toml::Value::Table(t)) if t.contains_key(k));
            if !own_has {
                push(k, v, false)?;
            }
        }
    }
    let mut out = raw;
    out.extend(extra);
    Ok(out)
}

fn read(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    text.parse::<toml::Table>().map_err(|e| {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or("invalid TOML");
        anyhow::anyhow!("config file {} is not valid TOML: {first}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], file: &str) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("haul.toml");
        std::fs::write(&p, file).expect("write");
        let mut raw: Vec<OsString> = vec!["haul".into(), "--config".into(), p.clone().into()];
        raw.extend(args.iter().map(OsString::from));
        Ok(expand(raw)?
            .into_iter()
            .skip(3)
            .map(|s| s.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn file_fills_missing_flags_and_cli_wins() {
        let file = "certs = \"certs\"\ncoordinator = \"10.0.0.1:7400\"\n[sender]\nsource = \"postgres://a@b/c\"\nslots = 4\n[start]\nno_schema = true\n";
        let got = run(&["sender", "--coordinator", "x:1"], file)
            .expect("expand")
            .join(" ");
        assert!(got.starts_with("sender --coordinator x:1 "), "{got}");
        for pair in ["--source postgres://a@b/c", "--slots 4", "--certs certs"] {
            assert!(got.contains(pair), "{pair} missing from {got}");
        }
        assert!(
            !got.contains("10.0.0.1"),
            "the command line must win: {got}"
        );
        let got = run(&["start"], file).expect("expand");
        assert!(got.contains(&"--no-schema".to_string()), "{got:?}");
        // A top-level key a command lacks is ignored for that command.
        let got = run(&["coordinator"], "source = \"x\"\n").expect("expand");
        assert_eq!(got, ["coordinator"]);
    }

    #[test]
    fn typos_and_bad_toml_are_one_line_errors() {
        let e = run(&["sender"], "[sender]\nsoruce = \"x\"\n").expect_err("typo");
        assert!(e.to_string().contains("unknown key \"soruce\""), "{e}");
        let e = run(&["sender"], "[sender\n").expect_err("bad toml");
        assert!(e.to_string().contains("not valid TOML"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }
}
