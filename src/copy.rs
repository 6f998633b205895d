//! `haul copy`: the whole move on one host. Coordinator, receiver and sender run as tasks of
//! this process, each with its own certificate from a CA made for the run, talking mTLS over
//! loopback exactly as separate agents would: the same code path as a two-datacenter move.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use haul_certs::Role;
use haul_core::pg::{DbUrl, Side};
use tokio_util::sync::CancellationToken;

use crate::agents::{load_tls, required};
use crate::cli::CopyArgs;
use crate::operator;

pub async fn run(a: CopyArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let source = DbUrl::parse(&required(a.source, "source")?, Side::Source)?;
    let target = DbUrl::parse(&required(a.target, "target")?, Side::Target)?;
    let options = operator::job_options(&a.job)?;

    let temp;
    let dir = match a.state {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new()
                .prefix("haul-copy-")
                .tempdir()
                .context("create temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let certs = dir.join("certs");
    haul_certs::init(
        &certs,
        &haul_certs::InitOptions {
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            days: 30,
            force: true,
        },
    )?;

    let agents = CancellationToken::new();
    let coordinator_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind coordinator")?;
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind receiver")?;
    let coordinator_addr = coordinator_listener
        .local_addr()
        .context("local address")?
        .to_string();
    let receiver_addr = receiver_listener
        .local_addr()
        .context("local address")?
        .to_string();

    let mut tasks = tokio::task::JoinSet::new();
    {
        let cfg = haul_coordinator::CoordinatorConfig {
            state_dir: dir.join("coordinator"),
            tls: load_tls(&certs, Role::Coordinator, "coordinator")?,
            lease_timeout: Duration::from_secs(60),
            time_zone: haul_coordinator::time_zone("UTC")?,
            time_zone_name: "UTC".to_string(),
        };
        let token = agents.clone();
        tasks.spawn(async move {
            (
                "coordinator",
                haul_coordinator::run(cfg, coordinator_listener, None, token).await,
            )
        });
    }
    {
        let cfg = haul_receiver::ReceiverConfig {
            coordinator: coordinator_addr.clone(),
            advertise: receiver_addr,
            target,
            state_dir: dir.join("receiver"),
            spool_dir: dir.join("spool"),
            spool_bytes: 0,
            tls: load_tls(&certs, Role::Receiver, "receiver")?,
            name: "receiver".into(),
            slots: options.jobs as usize,
        };
        let token = agents.clone();
        tasks.spawn(async move {
            (
                "receiver",
                haul_receiver::run(cfg, receiver_listener, token).await,
            )
        });
    }
    {
        let cfg = haul_sender::SenderConfig {
            coordinator: coordinator_addr.clone(),
            source,
            state_dir: dir.join("sender"),
            tls: load_tls(&certs, Role::Sender, "sender")?,
            name: "sender".into(),
            slots: options.jobs as usize,
            // One process holds all three roles: a restart loses everything at once, so
            // staging would only cost disk.
            staging_bytes: 0,
            pg_dump: a.pg_dump.clone(),
        };
        let token = agents.clone();
        tasks.spawn(async move { ("sender", haul_sender::run(cfg, token).await) });
    }

    let drive = async {
        let mut c = operator::client(&coordinator_addr, &certs).await?;
        let job_id = operator::start_job(&mut c, options).await?;
        operator::follow(&mut c, &job_id).await
    };
    let outcome = tokio::select! {
        r = drive => r,
        Some(ended) = tasks.join_next() => match ended {
            Ok((role, Err(e))) => Err(e.context(format!("{role} stopped"))),
            Ok((role, Ok(()))) => Err(anyhow::anyhow!("{role} stopped unexpectedly")),
            Err(e) => Err(anyhow::anyhow!("agent task failed: {e}")),
        },
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    agents.cancel();
    while tokio::time::timeout(Duration::from_secs(10), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    let status = outcome?;
    operator::print_summary(&status);
    Ok(operator::exit_code(&status))
}
