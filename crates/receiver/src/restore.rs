//! Restoring one verified chunk: its rows and its ledger row in one transaction.
//!
//! The ledger row is inserted first with ON CONFLICT DO NOTHING: if the chunk was applied
//! before (or is being applied right now by another session, which makes us wait on the key),
//! nothing is copied. The spool is decoded and re-hashed while it streams into COPY, and the
//! transaction commits only if that digest equals the sender's.

use anyhow::Context;
use bytes::Bytes;
use futures::SinkExt;
use haul_core::chunk::Column;
use haul_core::codec::Codec;
use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::status::fatal;
use tokio_postgres::SimpleQueryMessage;

use crate::pool::Pooled;
use crate::spool::SpoolReader;

pub struct Restore<'a> {
    pub job_id: &'a str,
    pub chunk_id: u64,
    pub epoch: u64,
    pub table: &'a TableName,
    pub columns: &'a [Column],
    pub codec: Codec,
    pub digest: &'a [u8],
    pub raw_bytes: u64,
    /// The snapshot the sender read the rows under, recorded in the ledger.
    pub snapshot_id: &'a str,
    pub spool: &'a std::path::Path,
    /// Load with `session_replication_role = replica`: triggers and FK checks do not fire.
    pub replica_role: bool,
}

pub enum Applied {
    Now { rows: u64 },
    Before { rows: u64, snapshot_id: String },
}

pub async fn apply(client: Pooled, r: &Restore<'_>) -> anyhow::Result<Applied> {
    match apply_in_tx(&client, r).await {
        Ok(a) => Ok(a),
        Err(e) => {
            if client.batch_execute("ROLLBACK").await.is_err() {
                client.discard();
            }
            Err(e)
        }
    }
}

async fn apply_in_tx(client: &Pooled, r: &Restore<'_>) -> anyhow::Result<Applied> {
    // One round trip: begin, session settings, and the ledger claim.
    let hex: String = r.digest.iter().map(|b| format!("{b:02x}")).collect();
    let begin = format!(
        "BEGIN; SET LOCAL row_security = off;{} \
         INSERT INTO haul.ledger (job_id, chunk_id, epoch, table_name, snapshot_id, digest, rows, raw_bytes) \
         VALUES ({}, {}, {}, {}, {}, '\\x{hex}'::bytea, 0, {}) ON CONFLICT DO NOTHING RETURNING 1",
        if r.replica_role {
            " SET LOCAL session_replication_role = replica;"
        } else {
            ""
        },
        quote_literal(r.job_id),
        r.chunk_id,
        r.epoch,
        quote_literal(&r.table.to_string()),
        quote_literal(r.snapshot_id),
        r.raw_bytes
    );
    let claimed = client
        .simple_query(&begin)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "claim chunk in ledger: {}",
                haul_core::pg::db_error_line(&e)
            )
        })?
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(_)));
    if !claimed {
        client.batch_execute("ROLLBACK").await.context("rollback")?;
        let (rows, snapshot_id) = crate::ledger::applied(client, r.job_id, r.chunk_id)
            .await?
            .unwrap_or_default();
        return Ok(Applied::Before { rows, snapshot_id });
    }

    let cols: Vec<String> = r.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        r.table.quoted(),
        cols.join(", ")
    );
    let sink = client.copy_in::<_, Bytes>(&sql).await.map_err(|e| {
        let line = format!(
            "cannot load target table {}: {}",
            r.table,
            haul_core::pg::db_error_line(&e)
        );
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("42") => fatal(line),
            _ => anyhow::anyhow!(line),
        }
    })?;
    futures::pin_mut!(sink);
    let mut reader = SpoolReader::open(r.spool, r.codec).await?;
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    while let Some(block) = reader.next_block().await? {
        hasher.update(&block);
        total += block.len() as u64;
        sink.send(Bytes::from(block)).await.map_err(|e| {
            anyhow::anyhow!(
                "load {} on target: {}",
                r.table,
                haul_core::pg::db_error_line(&e)
            )
        })?;
    }
    // Decision 2: nothing commits unless the bytes that went into COPY are the sender's bytes.
    if hasher.finalize().as_bytes().as_slice() != r.digest || total != r.raw_bytes {
        anyhow::bail!(
            "spooled chunk {} of {} changed on disk (digest mismatch); discarded before commit",
            r.chunk_id,
            r.table
        );
    }
    let rows = sink.finish().await.map_err(|e| {
        let line = format!(
            "load {} on target: {}",
            r.table,
            haul_core::pg::db_error_line(&e)
        );
        // Rows the target refuses (constraint, type) are bad input, not a transient fault.
        match e.code().map(|c| c.code()) {
            Some(code)
                if code.starts_with("22") || code.starts_with("23") || code.starts_with("42") =>
            {
                fatal(line)
            }
            _ => anyhow::anyhow!(line),
        }
    })?;
    let finish = format!(
        "UPDATE haul.ledger SET rows = {rows} WHERE job_id = {} AND chunk_id = {}; COMMIT",
        quote_literal(r.job_id),
        r.chunk_id
    );
    client.batch_execute(&finish).await.map_err(|e| {
        anyhow::anyhow!(
            "commit chunk {} of {}: {}",
            r.chunk_id,
            r.table,
            haul_core::pg::db_error_line(&e)
        )
    })?;
    Ok(Applied::Now { rows })
}
