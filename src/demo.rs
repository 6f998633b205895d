//! `haul demo`: the first thing a newcomer runs. Two throwaway PostgreSQL clusters, a sample
//! database, a fresh CA, and the three roles as separate processes of this binary on loopback;
//! then a whole move with live progress, verification, a summary, and cleanup.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use haul_pgcluster::{Cluster, ClusterOptions};
use haul_proto as pb;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::cli::{DemoArgs, JobArgs};
use crate::operator;

const SAMPLE: &str = include_str!("demo.sql");

pub async fn run(a: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    haul_pgcluster::pg_bin("initdb").map_err(|_| {
        haul_core::status::fatal(
            "the demo needs PostgreSQL's server programs (initdb, pg_ctl): install them with `apt-get install postgresql` (Debian/Ubuntu) or set HAUL_PG_BIN to their directory",
        )
    })?;
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("haul-demo-")
        .tempdir()
        .context("create demo directory")?;
    let dir = work.path().to_path_buf();

    println!("haul demo: starting two throwaway PostgreSQL clusters (source and target)");
    let (src, dst) = tokio::try_join!(start_cluster(), start_cluster())?;
    let rows = a.rows.max(1000);
    println!("haul demo: seeding the source with a sample shop database ({rows} events)");
    let seed = SAMPLE.replace(":ROWS", &rows.to_string());
    let (src, dst) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Cluster, Cluster)> {
        src.create_database("shop")?;
        dst.create_database("shop")?;
        src.psql("shop", &seed)
            .context("seed the sample database")?;
        Ok((src, dst))
    })
    .await
    .context("seed task")??;

    let certs = dir.join("certs");
    haul_certs::init(
        &certs,
        &haul_certs::InitOptions {
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            days: 30,
            force: false,
        },
    )?;
    let coordinator_addr = free_addr()?;
    let receiver_addr = free_addr()?;
    let exe = std::env::current_exe().context("locate the haul executable")?;
    let certs_s = certs.display().to_string();
    println!("haul demo: starting coordinator, receiver and sender as separate processes (mTLS on loopback)");
    let mut children = Vec::new();
    children.push(spawn_role(
        &exe,
        &dir,
        "coordinator",
        &[
            "--listen",
            &coordinator_addr,
            "--state",
            &dir.join("coordinator").display().to_string(),
            "--certs",
            &certs_s,
        ],
    )?);
    children.push(spawn_role(
        &exe,
        &dir,
        "receiver",
        &[
            "--coordinator",
            &coordinator_addr,
            "--listen",
            &receiver_addr,
            "--target",
            &dst.url("shop"),
            "--state",
            &dir.join("receiver").display().to_string(),
            "--spool",
            &dir.join("spool").display().to_string(),
            "--certs",
            &certs_s,
        ],
    )?);
    children.push(spawn_role(
        &exe,
        &dir,
        "sender",
        &[
            "--coordinator",
            &coordinator_addr,
            "--source",
            &src.url("shop"),
            "--state",
            &dir.join("sender").display().to_string(),
            "--certs",
            &certs_s,
        ],
    )?);

    let result = async {
        let mut client = connect_when_up(&coordinator_addr, &certs).await?;
        let options = operator::job_options(&JobArgs {
            jobs: Some(4),
            chunk_size: Some("8MB".into()),
            ..Default::default()
        })?;
        let job_id = operator::start_job(&mut client, options).await?;
        println!("haul demo: moving the database ({job_id})");
        tokio::select! {
            s = operator::follow(&mut client, &job_id) => s,
            _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
        }
    }
    .await;

    for c in &mut children {
        stop(c).await;
    }
    let status = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "haul demo: the move did not finish; agent logs are in {}:",
                dir.display()
            );
            for role in ["coordinator", "receiver", "sender"] {
                eprintln!(
                    "--- {role}.log (last lines)\n{}",
                    tail(&dir.join(format!("{role}.log")), 8)
                );
            }
            if a.keep {
                let _ = work.keep();
            }
            return Err(e);
        }
    };
    println!();
    operator::print_summary(&status);
    println!(
        "demo total {:.1} s (including cluster setup and seeding)",
        started.elapsed().as_secs_f64()
    );
    if a.keep {
        let kept = work.keep();
        let (mut src, mut dst) = (src, dst);
        src.keep();
        dst.keep();
        println!(
            "kept: files in {}; source {} ; target {}",
            kept.display(),
            src.url("shop"),
            dst.url("shop")
        );
    }
    Ok(operator::exit_code(&status))
}

async fn start_cluster() -> anyhow::Result<Cluster> {
    tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await
        .context("cluster task")?
}

fn free_addr() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr().context("local address")?.to_string())
}

fn spawn_role(exe: &Path, dir: &Path, role: &str, args: &[&str]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{role}.log"))).context("create agent log")?;
    let err = log.try_clone().context("clone log handle")?;
    Command::new(exe)
        .arg(role)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start the {role} process"))
}

async fn connect_when_up(
    addr: &str,
    certs: &Path,
) -> anyhow::Result<pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match operator::client(addr, certs).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the coordinator did not come up"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// SIGTERM, then wait a little for a clean exit, then kill.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(8), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
