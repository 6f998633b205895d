//! The sender: runs beside the source database and holds its credentials (the coordinator never
//! sees them). It asks the coordinator for work and does three kinds of it:
//!
//! - **plan**: open the job's snapshot (held open until the job is finalized), measure the
//!   catalog, ship the schema to the receiver, and report tables and cut points;
//! - **chunk**: read one chunk inside that snapshot with binary COPY, cut it into blocks,
//!   compress and hash them, and stream them to the receiver named in the lease;
//! - **finalize**: read sequences and the source side of verification in the snapshot, and
//!   ask the receiver to run post-data and the target side;
//! - **verify**: compare a finished job's source with its target again, piece by piece, the
//!   target side read by the receiver (`compare`).
//!
//! Invariant: every byte moved for a job is read under the job's one exported snapshot. The
//! verify task moves nothing and reads the source as it is now.

pub mod catalog;
pub mod compare;
mod dump;
mod finalize;
pub mod follow;
mod group;
mod peers;
mod plan;
pub mod replication;
mod snapshot;
mod staging;
mod transfer;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use haul_certs::Mtls;
use haul_core::pg::DbUrl;
use tokio_util::sync::CancellationToken;

pub use worker::SenderStats;

/// Everything a sender needs, validated.
#[derive(Clone)]
pub struct SenderConfig {
    pub coordinator: String,
    pub source: DbUrl,
    pub state_dir: PathBuf,
    pub tls: Mtls,
    /// Name this agent registers under.
    pub name: String,
    /// How many chunks this sender works on at once.
    pub slots: usize,
    /// Disk the staging area may use (under the state directory); 0 = never stage.
    pub staging_bytes: u64,
    /// `--pg-dump`: the pg_dump to use; otherwise the newest installed that can dump the source.
    pub pg_dump: Option<PathBuf>,
}

/// Run until `shutdown` is cancelled. Returns after every worker has stopped.
pub async fn run(config: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    // Fail fast on a wrong URL or password: one clear line at startup beats a failed job later.
    config.source.connect("haul-sender-check").await?;
    let shared = Arc::new(worker::Shared::new(config)?);
    worker::run(shared, shutdown).await
}
