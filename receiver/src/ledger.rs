//! The ledger: `haul.ledger` in the target database, one row per applied chunk, written in the
//! same transaction as the chunk's rows. It, not any local state, is the authority on what was
//! applied: a chunk whose row is there is never applied again, whatever any agent remembers.

use anyhow::Context;
use tokio_postgres::Client;

pub const CREATE: &str = "CREATE SCHEMA IF NOT EXISTS haul; \
    CREATE TABLE IF NOT EXISTS haul.ledger ( \
        job_id text NOT NULL, \
        chunk_id bigint NOT NULL, \
        epoch bigint NOT NULL, \
        table_name text NOT NULL, \
        snapshot_id text NOT NULL, \
        digest bytea NOT NULL, \
        rows bigint NOT NULL, \
        raw_bytes bigint NOT NULL, \
        applied_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (job_id, chunk_id)); \
    CREATE TABLE IF NOT EXISTS haul.schema_applied ( \
        job_id text PRIMARY KEY, \
        objects integer NOT NULL, \
        applied_at timestamptz NOT NULL DEFAULT now())";

/// The row that says a job's pre-data is in, written in the transaction that applies it: a
/// planner that dies after the schema went in, and plans again, finds it and skips ahead.
pub fn mark_schema(job_id: &str, objects: u32) -> String {
    format!(
        "INSERT INTO haul.schema_applied (job_id, objects) VALUES ({}, {objects}) ON CONFLICT DO NOTHING",
        haul_core::ident::quote_literal(job_id)
    )
}

/// The number of pre-data objects applied for a job, if its pre-data is in.
pub async fn schema_applied(client: &Client, job_id: &str) -> anyhow::Result<Option<u32>> {
    let row = client
        .query_opt(
            "SELECT objects FROM haul.schema_applied WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .context("read haul.schema_applied")?;
    Ok(row.map(|r| r.get::<_, i32>(0).max(0) as u32))
}

/// Create the ledger if needed. Serialised by an advisory lock so concurrent receivers on one
/// target do not race on `CREATE ... IF NOT EXISTS`.
pub async fn ensure(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7307838); {CREATE}; COMMIT"
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "create ledger table haul.ledger on target: {}",
                haul_core::pg::db_error_line(&e)
            )
        })
}

/// Rows applied for a chunk and the snapshot they were read under, if it is in the ledger.
pub async fn applied(
    client: &Client,
    job_id: &str,
    chunk_id: u64,
) -> anyhow::Result<Option<(u64, String)>> {
    let row = client
        .query_opt(
            "SELECT rows, snapshot_id FROM haul.ledger WHERE job_id = $1 AND chunk_id = $2",
            &[&job_id, &(chunk_id as i64)],
        )
        .await
        .context("read ledger")?;
    Ok(row.map(|r| (r.get::<_, i64>(0).max(0) as u64, r.get::<_, String>(1))))
}
