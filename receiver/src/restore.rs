//! Restoring one verified chunk: its rows and its ledger row in one transaction.
//!
//! The ledger row is inserted first with ON CONFLICT DO NOTHING: if the chunk was applied
//! before (or is being applied right now by another session, which makes us wait on the key),
//! nothing is copied. The spool is decoded and re-hashed while it streams into COPY, and the
//! transaction commits only if that digest equals the sender's.
//!
//! A chunk sent from its start is restored while it arrives ([`Live`]): each block goes into
//! COPY as soon as it is hashed and spooled, and the transaction commits once the trailer's
//! digest matched (decision 2 holds: nothing commits before the bytes are verified). Receiving
//! and loading overlap instead of following each other. If the target fails meanwhile, the
//! live transaction is rolled back and the chunk restored from its spool, as before.

use anyhow::Context;
use bytes::Bytes;
use futures::SinkExt;
use haul_core::chunk::Column;
use haul_core::codec::Codec;
use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::status::fatal;
use haul_proto as pb;
use haul_proto::coordinator_client::CoordinatorClient;
use tokio_postgres::SimpleQueryMessage;
use tonic::transport::Channel;

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
    /// The coordinator, asked whether the lease is still current just before commit.
    pub fence: Option<CoordinatorClient<Channel>>,
    pub spool: &'a std::path::Path,
    /// Load with `session_replication_role = replica`: triggers and FK checks do not fire.
    pub replica_role: bool,
    /// The sender's digest of the chunk's rows, recorded in the ledger: the receiver that
    /// commits a split table's last chunk sums them to check the table read back whole.
    pub row_digest: Option<haul_core::row_digest::RowDigest>,
}

pub enum Applied {
    Now { rows: u64 },
    Before { rows: u64, snapshot_id: String },
}

pub async fn apply(client: Pooled, r: &Restore<'_>) -> anyhow::Result<Applied> {
    client.set_in_transaction(true);
    let result = apply_in_tx(&client, r).await;
    end_transaction(client, result).await
}

/// After a body that opened a transaction on `client` and, on success, committed it: the
/// connection goes back to the pool outside any transaction, rolled back on failure (or
/// discarded if even that fails).
pub async fn end_transaction<T>(client: Pooled, result: anyhow::Result<T>) -> anyhow::Result<T> {
    match result {
        Ok(v) => {
            client.set_in_transaction(false);
            Ok(v)
        }
        Err(e) => {
            if client.batch_execute("ROLLBACK").await.is_ok() {
                client.set_in_transaction(false);
            } else {
                client.discard();
            }
            Err(e)
        }
    }
}

/// A chunk being restored while it arrives: its transaction, ledger claim and COPY open.
pub struct Live {
    client: Pooled,
    sink: std::pin::Pin<Box<tokio_postgres::CopyInSink<Bytes>>>,
    table: String,
}

impl Live {
    /// Open the chunk's transaction, claim it in the ledger (digest and size follow at commit)
    /// and start its COPY. `None` when the ledger already holds the chunk (or another session
    /// holds it right now): the stream is then only spooled, and the restore from the spool
    /// says "applied before". Not for large objects, which are staged and applied in steps.
    pub async fn begin(client: Pooled, r: &Restore<'_>) -> anyhow::Result<Option<Live>> {
        client.set_in_transaction(true);
        let opened = async {
            if !claim(&client, r, true).await? {
                return Ok(None);
            }
            copy_in(&client, r).await.map(Some)
        }
        .await;
        match opened {
            Ok(Some(sink)) => Ok(Some(Live {
                client,
                sink: Box::pin(sink),
                table: r.table.to_string(),
            })),
            // Not claimed: `claim` rolled back already.
            Ok(None) => {
                client.set_in_transaction(false);
                Ok(None)
            }
            Err(e) => end_transaction(client, Err(e)).await,
        }
    }

    /// Load one verified-so-far block.
    /// The table it loads, for messages.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub async fn send(&mut self, raw: Bytes) -> anyhow::Result<()> {
        self.sink.send(raw).await.map_err(|e| {
            anyhow::anyhow!(
                "load {} on target: {}",
                self.table,
                haul_core::pg::db_error_line(&e)
            )
        })
    }

    /// The whole chunk arrived and its digest matched the sender's: finish the COPY, check the
    /// lease, record digest, size and rows, commit.
    pub async fn commit(self, r: &Restore<'_>) -> anyhow::Result<Applied> {
        let Live {
            client, mut sink, ..
        } = self;
        let result = async {
            let rows = finish_copy(sink.as_mut(), r).await?;
            finish(&client, r, rows, true).await
        }
        .await;
        end_transaction(client, result).await
    }

    /// Give the chunk up (the stream broke, or the target failed): roll back.
    pub async fn abandon(self) {
        let Live { client, sink, .. } = self;
        drop(sink);
        let _ = end_transaction::<()>(client, Err(anyhow::anyhow!("abandoned"))).await;
    }
}

/// Begin the chunk's transaction and insert its ledger row; false (and rolled back) when the
/// ledger holds it already. One round trip: begin, session settings, and the claim. `live`:
/// the digest and size are not known yet and are recorded at commit.
async fn claim(client: &Pooled, r: &Restore<'_>, live: bool) -> anyhow::Result<bool> {
    let hex: String = if live {
        String::new()
    } else {
        r.digest.iter().map(|b| format!("{b:02x}")).collect()
    };
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
        if live { 0 } else { r.raw_bytes }
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
    }
    Ok(claimed)
}

/// Start the chunk's COPY inside its transaction (large objects: into their staging tables).
async fn copy_in(
    client: &Pooled,
    r: &Restore<'_>,
) -> anyhow::Result<tokio_postgres::CopyInSink<Bytes>> {
    let large_objects = haul_core::large_object::is_large_objects(r.table);
    let sql = if large_objects {
        client
            .batch_execute(haul_core::large_object::TARGET_STAGE)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "stage large objects on target: {}",
                    haul_core::pg::db_error_line(&e)
                )
            })?;
        haul_core::large_object::TARGET_COPY.to_string()
    } else {
        let cols: Vec<String> = r.columns.iter().map(|c| quote_ident(&c.name)).collect();
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            r.table.quoted(),
            cols.join(", ")
        )
    };
    client.copy_in::<_, Bytes>(&sql).await.map_err(|e| {
        let line = format!(
            "cannot load target table {}: {}",
            r.table,
            haul_core::pg::db_error_line(&e)
        );
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("42") => fatal(line),
            _ => anyhow::anyhow!(line),
        }
    })
}

async fn apply_in_tx(client: &Pooled, r: &Restore<'_>) -> anyhow::Result<Applied> {
    if !claim(client, r, false).await? {
        let (rows, snapshot_id) = crate::ledger::applied(client, r.job_id, r.chunk_id)
            .await?
            .unwrap_or_default();
        return Ok(Applied::Before { rows, snapshot_id });
    }
    let sink = copy_in(client, r).await?;
    futures::pin_mut!(sink);
    let mut reader = SpoolReader::open(r.spool, r.codec).await?;
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let corrupt = |e: anyhow::Error| {
        anyhow::Error::new(SpoolCorrupt(format!(
            "spooled chunk {} of {} is unreadable ({e:#}); discarded before commit",
            r.chunk_id, r.table
        )))
    };
    while let Some(block) = reader.next_block().await.map_err(corrupt)? {
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
        return Err(anyhow::Error::new(SpoolCorrupt(format!(
            "spooled chunk {} of {} changed on disk (digest mismatch); discarded before commit",
            r.chunk_id, r.table
        ))));
    }
    let rows = finish_copy(sink, r).await?;
    finish(client, r, rows, false).await
}

/// Rows the target refuses (constraint, type) are bad input, not a transient fault.
pub(crate) fn refused(what: &str, e: &tokio_postgres::Error) -> anyhow::Error {
    let line = format!("{what} on target: {}", haul_core::pg::db_error_line(e));
    match e.code().map(|c| c.code()) {
        Some(code)
            if code.starts_with("22") || code.starts_with("23") || code.starts_with("42") =>
        {
            fatal(line)
        }
        _ => anyhow::anyhow!(line),
    }
}

/// End the chunk's COPY: the rows it loaded.
async fn finish_copy(
    sink: std::pin::Pin<&mut tokio_postgres::CopyInSink<Bytes>>,
    r: &Restore<'_>,
) -> anyhow::Result<u64> {
    sink.finish()
        .await
        .map_err(|e| refused(&format!("load {}", r.table), &e))
}

/// After the COPY: large objects applied from their staging, the lease checked, the ledger row
/// completed (`live`: with the digest and size too), and the commit.
async fn finish(
    client: &Pooled,
    r: &Restore<'_>,
    mut rows: u64,
    live: bool,
) -> anyhow::Result<Applied> {
    if haul_core::large_object::is_large_objects(r.table) {
        // The rows staged are objects' metadata rows and content slices: the chunk's rows, as
        // the ledger counts them, are its objects.
        let out = client
            .simple_query(haul_core::large_object::TARGET_APPLY)
            .await
            .map_err(|e| refused("create large objects", &e))?;
        rows = out
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            })
            .unwrap_or(0);
    }
    // Fencing: a sender whose lease expired or went to another sender must not commit, even
    // if its bytes are good. Asked last, so the answer is as fresh as it can be.
    // Test point: hold the open transaction a while, so a test can make the RPC go away here.
    if haul_core::failpoint::fire("stall-before-fence") {
        tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    }
    if let Some(fence) = r.fence.clone() {
        let what = format!("chunk {} of {}", r.chunk_id, r.table);
        check_lease(fence, r.job_id, r.chunk_id, r.epoch, &what).await?;
    }
    let mut recorded = if live {
        let hex: String = r.digest.iter().map(|b| format!("{b:02x}")).collect();
        format!(", digest = '\\x{hex}'::bytea, raw_bytes = {}", r.raw_bytes)
    } else {
        String::new()
    };
    if let Some(d) = &r.row_digest {
        let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        recorded.push_str(&format!(", row_digest = '\\x{hex}'::bytea"));
    }
    let finish = format!(
        "UPDATE haul.ledger SET rows = {rows}{recorded} WHERE job_id = {} AND chunk_id = {}; COMMIT",
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
    // Test point: the chunk is committed but nobody has heard of it yet.
    haul_core::failpoint::die("die-after-commit");
    Ok(Applied::Now { rows })
}

/// Whether the lease `epoch` of `chunk_id` is still the current one; `what` names the chunk
/// (or group) in the error when it is not.
pub async fn check_lease(
    mut fence: CoordinatorClient<Channel>,
    job_id: &str,
    chunk_id: u64,
    epoch: u64,
    what: &str,
) -> anyhow::Result<()> {
    let check = fence
        .check_lease(pb::LeaseRef {
            job_id: job_id.to_string(),
            chunk_id,
            epoch,
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "ask the coordinator whether the lease is current: {}",
                s.message()
            )
        })?
        .into_inner();
    if !check.current {
        return Err(anyhow::Error::new(LeaseLost(format!(
            "{what} not committed: its lease is no longer current ({})",
            check.reason
        ))));
    }
    Ok(())
}

/// The sender's lease was superseded: retrying this restore can never succeed.
#[derive(Debug)]
pub struct LeaseLost(pub String);

impl std::fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeaseLost {}

/// The spool file no longer holds what was verified on arrival (altered, truncated, unreadable).
/// Retrying from it cannot help: it is discarded and the sender sends the chunk again.
#[derive(Debug)]
pub struct SpoolCorrupt(pub String);

impl std::fmt::Display for SpoolCorrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpoolCorrupt {}
