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
        row_digest bytea, \
        PRIMARY KEY (job_id, chunk_id)); \
    CREATE INDEX IF NOT EXISTS ledger_by_table ON haul.ledger (job_id, table_name); \
    DO $$ BEGIN \
        IF NOT EXISTS (SELECT 1 FROM pg_attribute \
                       WHERE attrelid = 'haul.ledger'::regclass AND attname = 'row_digest') THEN \
            ALTER TABLE haul.ledger ADD COLUMN row_digest bytea; \
        END IF; END $$; \
    CREATE TABLE IF NOT EXISTS haul.schema_applied ( \
        job_id text PRIMARY KEY, \
        objects integer NOT NULL, \
        applied_at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE IF NOT EXISTS haul.finalize_applied ( \
        job_id text NOT NULL, \
        step text NOT NULL, \
        applied_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (job_id, step)); \
    CREATE TABLE IF NOT EXISTS haul.undo ( \
        job_id text NOT NULL, \
        stage integer NOT NULL, \
        what text NOT NULL, \
        statements text[] NOT NULL, \
        recorded_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (job_id, stage)); \
    CREATE TABLE IF NOT EXISTS haul.follow_position ( \
        job_id text PRIMARY KEY, \
        lsn pg_lsn NOT NULL, \
        applied_at timestamptz NOT NULL DEFAULT now())";

/// The row that says one finalize step of a job is in (a post-data entry, say), written in the
/// transaction that applies it: a finalize run again after a crash skips what is recorded.
pub fn mark_step(job_id: &str, step: &str) -> String {
    format!(
        "INSERT INTO haul.finalize_applied (job_id, step) VALUES ({}, {}) ON CONFLICT DO NOTHING",
        haul_core::ident::quote_literal(job_id),
        haul_core::ident::quote_literal(step)
    )
}

/// The finalize steps of a job that are recorded as applied.
pub async fn steps_applied(
    client: &Client,
    job_id: &str,
) -> anyhow::Result<std::collections::HashSet<String>> {
    let rows = client
        .query(
            "SELECT step FROM haul.finalize_applied WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .context("read haul.finalize_applied")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Record one finalize step as applied, on its own (for steps that are idempotent anyway and
/// are recorded only so a second run can skip their cost).
pub async fn record_step(client: &Client, job_id: &str, step: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&mark_step(job_id, step))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "record finalize step {step} in haul.finalize_applied: {}",
                haul_core::pg::db_error_line(&e)
            )
        })
}

/// Another job's rows in the target's ledger, if any: its id, how many chunks it applied and
/// when it last applied one. Such a target is refused: its ledger says another move was here.
pub async fn other_job(
    client: &Client,
    job_id: &str,
) -> anyhow::Result<Option<(String, i64, String)>> {
    let row = client
        .query_opt(
            "SELECT j.job_id, \
                    (SELECT count(*) FROM haul.ledger l WHERE l.job_id = j.job_id), \
                    coalesce((SELECT to_char(max(applied_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' \
                              FROM haul.ledger l WHERE l.job_id = j.job_id), 'no chunks') \
             FROM (SELECT job_id FROM haul.ledger WHERE job_id <> $1 \
                   UNION SELECT job_id FROM haul.schema_applied WHERE job_id <> $1 \
                   UNION SELECT job_id FROM haul.finalize_applied WHERE job_id <> $1 \
                   UNION SELECT job_id FROM haul.undo WHERE job_id <> $1 \
                   UNION SELECT job_id FROM haul.follow_position WHERE job_id <> $1) j \
             ORDER BY 1 LIMIT 1",
            &[&job_id],
        )
        .await
        .context("look for other jobs in the target's ledger")?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Remove a finished job's rows from the ledger, and the haul schema itself once no other job
/// has rows in it. Returns whether the schema is gone. Idempotent: a cleanup run again after a
/// crash finds less, or nothing, to do.
pub async fn drop_job(client: &Client, job_id: &str) -> anyhow::Result<bool> {
    let exists: bool = client
        .query_one("SELECT to_regnamespace('haul') IS NOT NULL", &[])
        .await
        .context("look up schema haul on target")?
        .get(0);
    if !exists {
        return Ok(true);
    }
    let sql = format!(
        "BEGIN; SELECT pg_advisory_xact_lock(7307838); \
         DELETE FROM haul.ledger WHERE job_id = {id}; \
         DELETE FROM haul.schema_applied WHERE job_id = {id}; \
         DELETE FROM haul.finalize_applied WHERE job_id = {id}; \
         DELETE FROM haul.undo WHERE job_id = {id}; \
         DELETE FROM haul.follow_position WHERE job_id = {id}; \
         DO $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM haul.ledger) AND NOT EXISTS (SELECT 1 FROM haul.schema_applied) \
              AND NOT EXISTS (SELECT 1 FROM haul.finalize_applied) AND NOT EXISTS (SELECT 1 FROM haul.undo) \
              AND NOT EXISTS (SELECT 1 FROM haul.follow_position) THEN \
             DROP SCHEMA haul CASCADE; \
           END IF; END $$; \
         COMMIT",
        id = haul_core::ident::quote_literal(job_id)
    );
    client.batch_execute(&sql).await.map_err(|e| {
        anyhow::anyhow!(
            "remove the ledger of job {job_id} from the target: {}",
            haul_core::pg::db_error_line(&e)
        )
    })?;
    let exists: bool = client
        .query_one("SELECT to_regnamespace('haul') IS NOT NULL", &[])
        .await
        .context("look up schema haul on target")?
        .get(0);
    Ok(!exists)
}

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

/// Whether the target has a `haul` schema (an earlier job's, or this job's before a restart).
pub async fn exists(client: &Client) -> anyhow::Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass('haul.ledger') IS NOT NULL", &[])
        .await
        .context("look up haul.ledger on target")?
        .get(0))
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

/// Record how to undo one stage of a job (`crate::undo`), before the stage writes anything.
/// The first record of a stage stands: a stage run again after a crash finds the target partly
/// changed by its first run, and what it would record now would no longer be the state before.
pub async fn record_undo(
    client: &Client,
    job_id: &str,
    stage: i32,
    what: &str,
    statements: &[String],
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO haul.undo (job_id, stage, what, statements) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job_id, stage) DO NOTHING",
            &[&job_id, &stage, &what, &statements],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "record how to undo {what} in haul.undo: {}",
                haul_core::pg::db_error_line(&e)
            )
        })?;
    Ok(())
}

/// A job's undo stages, the last recorded first (the order they are undone in).
pub async fn undo_stages(
    client: &Client,
    job_id: &str,
) -> anyhow::Result<Vec<(i32, String, Vec<String>)>> {
    if !client
        .query_one("SELECT to_regclass('haul.undo') IS NOT NULL", &[])
        .await
        .context("look up haul.undo on target")?
        .get::<_, bool>(0)
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT stage, what, statements FROM haul.undo WHERE job_id = $1 ORDER BY stage DESC",
            &[&job_id],
        )
        .await
        .context("read haul.undo")?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
