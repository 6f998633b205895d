//! The job's snapshot. One connection per job opens a REPEATABLE READ transaction and exports
//! its snapshot; every chunk connection imports it, so the whole job reads the database as of
//! one instant. The exporting transaction must stay open for as long as anyone imports it,
//! so [`SnapshotHolder`] lives until the job is finalized.
//!
//! Readers turn off synchronized and parallel scans, so reading a chunk again under the same
//! snapshot gives the same bytes in the same order: that is what lets a broken stream resume
//! at a byte offset (the receiver checks the re-read prefix's hash anyway).
//!
//! Chunk connections run each COPY inside a savepoint that is rolled back afterwards: locks
//! taken in a subtransaction are released on rollback, so a connection that copies ten
//! thousand tables never holds ten thousand locks.

use anyhow::Context;
use haul_core::pg::DbUrl;
use tokio_postgres::Client;

/// The connection whose open transaction keeps the job's snapshot alive. For a `--follow`
/// job the snapshot was exported by creating the slot, and lives while that replication
/// session stays idle: the holder keeps it, plus a normal session that imported the snapshot
/// (`client`) for what planning and finalize read.
pub struct SnapshotHolder {
    pub client: Client,
    pub snapshot_id: String,
    pub replication: Option<crate::replication::Replication>,
}

impl SnapshotHolder {
    pub async fn open(source: &DbUrl, job_id: &str) -> anyhow::Result<SnapshotHolder> {
        let client = source.connect(&format!("haul-snapshot-{job_id}")).await?;
        client
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL row_security = off",
            )
            .await
            .context("begin snapshot transaction on source")?;
        let row = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .context("export snapshot on source")?;
        Ok(SnapshotHolder {
            client,
            snapshot_id: row.get(0),
            replication: None,
        })
    }

    /// Hold a slot's exported snapshot: keep its replication session idle, and import the
    /// snapshot on a normal session.
    pub async fn from_slot(
        source: &DbUrl,
        job_id: &str,
        replication: crate::replication::Replication,
        snapshot_id: String,
    ) -> anyhow::Result<SnapshotHolder> {
        let reader = SnapshotReader::open(source, job_id, &snapshot_id).await?;
        Ok(SnapshotHolder {
            client: reader.client,
            snapshot_id,
            replication: Some(replication),
        })
    }
}

/// A chunk-reading connection inside the job's snapshot.
pub struct SnapshotReader {
    pub client: Client,
    pub job_id: String,
    pub snapshot_id: String,
}

impl SnapshotReader {
    pub async fn open(
        source: &DbUrl,
        job_id: &str,
        snapshot_id: &str,
    ) -> anyhow::Result<SnapshotReader> {
        let client = source.connect(&format!("haul-reader-{job_id}")).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
                 SET LOCAL row_security = off; SET LOCAL synchronize_seqscans = off; \
                 SET LOCAL max_parallel_workers_per_gather = 0; SAVEPOINT haul_chunk",
                haul_core::ident::quote_literal(snapshot_id)
            ))
            .await
            .map_err(|e| {
                let line = format!(
                    "import snapshot {snapshot_id} on source: {} (the sender holding it may have stopped)",
                    haul_core::pg::db_error_line(&e)
                );
                // 22023: "invalid snapshot identifier": the exporting transaction is gone.
                if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) {
                    anyhow::Error::new(SnapshotGone {
                        snapshot_id: snapshot_id.to_string(),
                        message: line,
                    })
                } else {
                    anyhow::anyhow!(line)
                }
            })?;
        Ok(SnapshotReader {
            client,
            job_id: job_id.to_string(),
            snapshot_id: snapshot_id.to_string(),
        })
    }
}

/// The job's snapshot can no longer be imported: the transaction that exported it has ended
/// (its sender restarted). The coordinator has a new one exported; the chunk is not at fault.
#[derive(Debug)]
pub struct SnapshotGone {
    pub snapshot_id: String,
    pub message: String,
}

impl std::fmt::Display for SnapshotGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SnapshotGone {}
