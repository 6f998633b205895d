//! `haul`: one binary for every role. `main` folds the config file into the arguments, parses,
//! installs tracing, runs the command, and maps the result to an exit code with one clear line
//! on failure.

mod agents;
mod cli;
mod config;
mod copy;
mod demo;
mod operator;
mod plan;
mod progress;
mod verify;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::cli::{CertsCommand, Cli, Command};

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    few_malloc_arenas(&raw);
    let args = match config::expand(raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("haul: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let default_level = match &cli.command {
        Command::Demo(_)
        | Command::Copy(_)
        | Command::Verify(_)
        | Command::Start(_)
        | Command::Status(_)
        | Command::Bwlimit(_)
        | Command::Plan(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Cancel(_)
        | Command::Cutover(_)
        | Command::Certs(_) => "warn",
        _ => "info",
    };
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default_level.to_string());
    let env_filter =
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    operator::set_json_logs(cli.log_format == cli::LogFormat::Json);
    match cli.log_format {
        cli::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        // Colour for people at a terminal; plain text in log files.
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("haul: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            operator::say_error(&one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The agents (and `copy`, which runs them all) run with glibc's malloc limited to two arenas:
/// the process starts again, at once, with `MALLOC_ARENA_MAX=2` unless that is set already.
/// Why: a sender compresses and reads on many blocking threads, and glibc gives each thread
/// that meets contention an arena of its own, which keeps what it freed. With 16 chunks in
/// flight a sender peaked at 190-230 MiB with the default, 140 MiB with two arenas, at the same
/// speed (`long_haul`, lfn scenarios); the receiver went from 85 to 64 MiB. mimalloc was tried
/// and did worse (260-280 MiB). Setting the variable, to anything, keeps the process as it is.
fn few_malloc_arenas(raw: &[std::ffi::OsString]) {
    use std::os::unix::process::CommandExt;
    // Before anything is read (a `--config` file may be a pipe, read once, by the new process).
    let agent = matches!(
        config::subcommand(raw).as_deref(),
        Some("coordinator" | "receiver" | "sender" | "copy")
    );
    if !agent || std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let arg0 = raw
        .first()
        .cloned()
        .unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only when it failed: the process then goes on as it is.
    let _ = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(raw.iter().skip(1))
        .env("MALLOC_ARENA_MAX", "2")
        .exec();
}

/// The operator-facing line for an error: a fatal (bad input) message as is, else the chain.
pub fn one_line(e: &anyhow::Error) -> String {
    haul_core::status::fatal_message(e).unwrap_or_else(|| format!("{e:#}").replace('\n', " "))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match cli.command {
        Command::Certs(CertsCommand::Init {
            dir,
            hosts,
            days,
            force,
        }) => {
            haul_certs::init(&dir, &haul_certs::InitOptions { hosts, days, force })?;
            println!(
                "wrote a CA and certificates for coordinator, sender, receiver and operator to {}",
                dir.display()
            );
            println!(
                "keep {}/ca.key offline; copy ca.pem and each role's .pem/.key to the agents",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Issue {
            dir,
            role,
            name,
            hosts,
            days,
        }) => {
            let role: haul_certs::Role = role.parse()?;
            let path = haul_certs::issue(&dir, role, &name, &hosts, days)?;
            println!(
                "wrote {} (run the agent with --name {name})",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Revoke { dir, name }) => {
            let path = haul_certs::revoke(&dir, &name)?;
            println!(
                "revoked {name}; wrote {} (agents pick it up within {} seconds)",
                path.display(),
                haul_certs::RELOAD_INTERVAL.as_secs()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator(a) => agents::coordinator(a, shutdown)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Receiver(a) => agents::receiver(a, shutdown)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Sender(a) => agents::sender(a, shutdown).await.map(|_| ExitCode::SUCCESS),
        Command::Start(a) => operator::start(a).await,
        Command::Status(a) => operator::status(a).await,
        Command::Bwlimit(a) => operator::bwlimit(a).await,
        Command::Pause(a) => operator::steer(a, haul_proto::Steer::Pause).await,
        Command::Resume(a) => operator::steer(a, haul_proto::Steer::Resume).await,
        Command::Cancel(a) => operator::cancel(a).await,
        Command::Cutover(a) => operator::cutover(a).await,
        Command::Copy(a) => copy::run(a, shutdown).await,
        Command::Plan(a) => plan::run(a).await,
        Command::Verify(a) => verify::run(a).await,
        Command::Demo(a) => demo::run(a, shutdown).await,
    }
}

/// Ctrl-C or SIGTERM: cancel the root token; every task drains and `run` returns.
async fn watch_signals(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}
