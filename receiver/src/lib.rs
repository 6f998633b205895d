//! The receiver: runs beside the target database and holds its credentials. Senders stream it
//! schema scripts and chunks; it spools each chunk to disk, checks the chunk's blake3 digest,
//! and restores it in one transaction together with the chunk's ledger row, so every chunk is
//! applied exactly once and corrupt bytes never commit.
//!
//! Invariant: nothing reaches the target before its digest matched the sender's.

mod early_post;
pub mod follow;
mod group;
pub mod ledger;
mod partial;
mod pool;
mod restore;
mod schema;
mod service;
mod spool;
mod undo;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haul_certs::{Mtls, Role};
use haul_core::pg::DbUrl;
use haul_proto as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything a receiver needs, validated.
#[derive(Clone)]
pub struct ReceiverConfig {
    pub coordinator: String,
    /// The address senders dial (what `--advertise` says, or the listen address).
    pub advertise: String,
    pub target: DbUrl,
    pub state_dir: PathBuf,
    pub spool_dir: PathBuf,
    /// The most the chunk spool files may hold together; 0 = only the disk's size.
    pub spool_bytes: u64,
    pub tls: Mtls,
    pub name: String,
    /// How many chunks restore at once (target connections).
    pub slots: usize,
}

/// Serve on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: ReceiverConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    // The ledger is created when a job's schema arrives, not here: a receiver that never
    // gets a job leaves the target as it found it.
    let client = config.target.connect("haul-receiver-check").await?;
    let replica_role: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .context("read target role")?
        .get(0);
    if !replica_role {
        tracing::warn!(
            "the target user is not a superuser: triggers and foreign keys that already exist on the target will fire during the load"
        );
    }
    drop(client);

    let spool = spool::Spool::open(&config.spool_dir, config.spool_bytes)?;
    let partials = partial::Partials::open(&config.state_dir)?;
    partials.sweep(&spool);
    let inner = Arc::new(service::Inner {
        pool: pool::Pool::new(config.target.clone(), config.slots),
        spool,
        partials,
        replica_role,
        fence: pb::coordinator_client::CoordinatorClient::new(haul_certs::connect_lazy(
            &config.coordinator,
            &config.tls,
            Role::Coordinator,
        )?),
        config: config.clone(),
        finalizing: Default::default(),
        cancelled: Default::default(),
        whole_reads: Default::default(),
        early_post: Default::default(),
        shapes: Default::default(),
    });
    let svc = pb::receiver_server::ReceiverServer::new(service::ReceiverService { inner })
        .max_decoding_message_size(haul_core::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(haul_core::MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(svc);

    let register = tokio::spawn(register_loop(config.clone(), shutdown.clone()));
    let served = haul_certs::serve(routes, listener, &config.tls, shutdown.clone()).await;
    shutdown.cancel();
    let _ = register.await;
    served
}

/// Tell the coordinator where senders reach us; again whenever it forgets (restart).
async fn register_loop(config: ReceiverConfig, shutdown: CancellationToken) {
    let channel =
        match haul_certs::connect_lazy(&config.coordinator, &config.tls, Role::Coordinator) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("failed to set up coordinator connection: {e:#}");
                shutdown.cancel();
                return;
            }
        };
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    let incarnation = haul_core::state::incarnation();
    let mut backoff = Duration::from_millis(200);
    let mut registered = false;
    loop {
        let req = pb::RegisterRequest {
            name: config.name.clone(),
            advertise: config.advertise.clone(),
            slots: config.slots as u32,
            // A new process has lost the read-backs its predecessor was doing: the coordinator
            // stops waiting for their results.
            incarnation: incarnation.clone(),
        };
        match client.register(req).await {
            Ok(r) => {
                if !registered {
                    tracing::info!(agent = %r.into_inner().agent_id, advertise = %config.advertise, "registered with coordinator");
                }
                registered = true;
                backoff = Duration::from_secs(5);
            }
            Err(s) => {
                tracing::warn!(
                    "failed to register with coordinator {}: {}",
                    config.coordinator,
                    s.message()
                );
                registered = false;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

/// `haul plan`: every check the receiver makes of its target before it writes anything, each
/// refusal as one line (empty: the target would be accepted). Reads only.
pub async fn dry_preflight(
    client: &tokio_postgres::Client,
    tables: &[haul_core::ident::TableName],
    create_schema: bool,
    large_objects: bool,
    extensions: &[String],
    roles: &[haul_proto::RoleDef],
    create_roles: bool,
) -> anyhow::Result<Vec<String>> {
    let mut refused = Vec::new();
    let mut note = |r: anyhow::Result<()>| -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => match haul_core::status::fatal_message(&e) {
                Some(line) => {
                    refused.push(line.to_string());
                    Ok(())
                }
                None => Err(e),
            },
        }
    };
    if ledger::exists(client).await? {
        note(Err(haul_core::status::fatal(
            "target already holds a haul ledger (schema haul): another job moved into it; empty the target or continue that job",
        )))?;
    }
    note(schema::preflight(client, tables, create_schema).await)?;
    if large_objects {
        note(schema::preflight_large_objects(client).await)?;
    }
    if create_schema {
        note(schema::preflight_extensions(client, extensions).await)?;
        note(
            schema::preflight_roles(client, roles, create_roles)
                .await
                .map(|_| ()),
        )?;
    }
    Ok(refused)
}
