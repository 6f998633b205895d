//! Following (issue 11, not yet used by jobs): each source transaction applied to the target
//! exactly once. Its commit position goes into `haul.follow_position` in the same transaction
//! as its changes; a transaction at or below the recorded position is skipped, so a stream
//! that starts again from an earlier position after any crash applies nothing twice.

use anyhow::Context;
use haul_core::pg::db_error_line;
use haul_core::pgoutput::Lsn;
use tokio_postgres::Client;

/// The last source position applied for `job_id`, if any.
pub async fn applied_position(client: &Client, job_id: &str) -> anyhow::Result<Option<Lsn>> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM haul.follow_position WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .context("read haul.follow_position")?;
    row.map(|r| r.get::<_, String>(0).parse()).transpose()
}

/// Apply one source transaction (its statements, in order) unless its commit position is
/// already applied; returns whether it was applied now. `client` must not be in a transaction.
pub async fn apply_transaction(
    client: &Client,
    job_id: &str,
    commit_lsn: Lsn,
    statements: &[String],
) -> anyhow::Result<bool> {
    client
        .batch_execute("BEGIN")
        .await
        .context("begin a followed transaction")?;
    let applied = async {
        // The row lock orders two appliers of one job; the first to commit wins.
        let at: Option<String> = client
            .query_opt(
                "SELECT lsn::text FROM haul.follow_position WHERE job_id = $1 FOR UPDATE",
                &[&job_id],
            )
            .await
            .context("read haul.follow_position")?
            .map(|r| r.get(0));
        if let Some(at) = at {
            if at.parse::<Lsn>()? >= commit_lsn {
                return anyhow::Ok(false);
            }
        }
        for sql in statements {
            client.batch_execute(sql).await.map_err(|e| {
                anyhow::anyhow!(
                    "apply the source transaction at {commit_lsn} on the target: {}: {sql}",
                    db_error_line(&e)
                )
            })?;
        }
        client
            .execute(
                "INSERT INTO haul.follow_position (job_id, lsn) VALUES ($1, $2::text::pg_lsn) \
                 ON CONFLICT (job_id) DO UPDATE SET lsn = excluded.lsn, applied_at = now()",
                &[&job_id, &commit_lsn.to_string()],
            )
            .await
            .context("record the followed position in haul.follow_position")?;
        Ok(true)
    }
    .await;
    match applied {
        Ok(true) => {
            client
                .batch_execute("COMMIT")
                .await
                .context("commit a followed transaction")?;
            Ok(true)
        }
        Ok(false) => {
            client.batch_execute("ROLLBACK").await.ok();
            Ok(false)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await.ok();
            Err(e)
        }
    }
}

/// What applying one batch of source transactions did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchApplied {
    /// The job's follow position after the batch.
    pub position: Lsn,
    pub applied: u32,
    pub skipped: u32,
    pub statements: u64,
}

/// Statements are sent to the target in runs of about this many bytes: one round trip for
/// many small changes, and bounded memory for a transaction of any size.
const RUN_BYTES: usize = 256 * 1024;

/// Prepared changes sent to the target at once, without waiting for each to finish (the
/// connection runs them in order): one wait for many, and bounded memory.
const PIPELINE: usize = 512;

/// Changes as prepared statements (`Record::Prepared`): each statement text is prepared once
/// per batch (its parameters all text, cast to their columns' types in the text), so the
/// target parses and plans a table's inserts, updates or deletes once, not once a row.
#[derive(Default)]
struct Prepared {
    statements: std::collections::HashMap<String, tokio_postgres::Statement>,
    pending: Vec<(String, Vec<Option<String>>)>,
    /// Bytes of the values pending: a run is sent at [`RUN_BYTES`] too, so a run of rows
    /// with large values does not pile up in memory.
    pending_bytes: usize,
}

impl Prepared {
    fn push(&mut self, sql: String, params: Vec<Option<String>>) {
        self.pending_bytes += sql.len() + params.iter().flatten().map(String::len).sum::<usize>();
        self.pending.push((sql, params));
    }

    /// Whether what is pending should go now.
    fn full(&self) -> bool {
        self.pending.len() >= PIPELINE || self.pending_bytes >= RUN_BYTES
    }

    /// Run what is pending, in order, pipelined.
    async fn flush(&mut self, client: &Client, current: Lsn) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        for (sql, params) in &pending {
            if !self.statements.contains_key(sql) {
                let types = vec![tokio_postgres::types::Type::TEXT; params.len()];
                let st = client.prepare_typed(sql, &types).await.map_err(|e| {
                    anyhow::anyhow!(
                        "prepare a change of the source transaction at {current} on the target: {}: {sql}",
                        db_error_line(&e)
                    )
                })?;
                self.statements.insert(sql.clone(), st);
            }
        }
        let prepared = pending
            .iter()
            .map(|(sql, params)| self.statements.get(sql).map(|st| (st, params)))
            .collect::<Option<Vec<_>>>()
            .context("a change's prepared statement went missing before it ran")?;
        let runs = prepared.into_iter().map(|(st, params)| {
            let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            async move { client.execute(st, &values).await }
        });
        futures::future::try_join_all(runs).await.map_err(|e| {
            anyhow::anyhow!(
                "apply the source transactions up to {current} on the target: {}",
                db_error_line(&e)
            )
        })?;
        Ok(())
    }
}

/// Apply one batch (`core::change_batch`, in the blocks of `frames` after the header) in one
/// target transaction with the job's follow position. A transaction at or below the position
/// already recorded is skipped, so a batch sent again after any crash applies nothing twice;
/// the raw bytes' blake3 must equal the trailer's before anything commits. `client` must not
/// be in a transaction.
pub async fn apply_batch<S>(
    client: &Client,
    job_id: &str,
    frames: S,
) -> anyhow::Result<BatchApplied>
where
    S: futures::Stream<Item = anyhow::Result<haul_proto::ChangeFrame>> + Unpin,
{
    client
        .batch_execute("BEGIN")
        .await
        .context("begin a followed batch")?;
    let result = apply_in_transaction(client, job_id, frames).await;
    match result {
        Ok(done) => {
            client
                .batch_execute("COMMIT")
                .await
                .context("commit a followed batch")?;
            Ok(done)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await.ok();
            Err(e)
        }
    }
}

async fn apply_in_transaction<S>(
    client: &Client,
    job_id: &str,
    mut frames: S,
) -> anyhow::Result<BatchApplied>
where
    S: futures::Stream<Item = anyhow::Result<haul_proto::ChangeFrame>> + Unpin,
{
    use futures::StreamExt;
    use haul_core::change_batch::{Decoder, Record};
    use haul_proto::change_frame::Frame;

    // The row lock orders two appliers of one job (a sender restarted while its old batch is
    // still being applied): the second waits, then skips what the first committed.
    client
        .execute(
            "INSERT INTO haul.follow_position (job_id, lsn) VALUES ($1, '0/0') \
             ON CONFLICT (job_id) DO NOTHING",
            &[&job_id],
        )
        .await
        .context("record the job in haul.follow_position")?;
    let at: String = client
        .query_one(
            "SELECT lsn::text FROM haul.follow_position WHERE job_id = $1 FOR UPDATE",
            &[&job_id],
        )
        .await
        .context("read haul.follow_position")?
        .get(0);
    let recorded: Lsn = at.parse()?;
    let mut done = BatchApplied {
        position: recorded,
        ..BatchApplied::default()
    };
    let mut decoder = Decoder::default();
    let mut hasher = blake3::Hasher::new();
    let mut raw_bytes = 0u64;
    let (mut skipping, mut current) = (false, Lsn(0));
    let mut run = String::new();
    let mut prepared = Prepared::default();
    let flush = |run: &mut String, current: Lsn| {
        let sql = std::mem::take(run);
        async move {
            if sql.is_empty() {
                return anyhow::Ok(());
            }
            client.batch_execute(&sql).await.map_err(|e| {
                anyhow::anyhow!(
                    "apply the source transaction at {current} on the target: {}",
                    db_error_line(&e)
                )
            })
        }
    };
    loop {
        let frame = frames
            .next()
            .await
            .context("the change batch ended before its trailer")??;
        match frame.frame {
            Some(Frame::Block(b)) => {
                let codec = haul_core::codec::Codec::from_wire(
                    b.codec.context("a change block names no codec")?,
                    0,
                )?;
                let raw = haul_core::codec::decode(codec, &b.payload, b.raw_len as usize)?;
                hasher.update(&raw);
                raw_bytes += raw.len() as u64;
                for record in decoder.push(&raw)? {
                    match record {
                        Record::Begin { commit_lsn, .. } => {
                            current = Lsn(commit_lsn);
                            skipping = current <= recorded;
                            if skipping {
                                done.skipped += 1;
                            } else {
                                done.applied += 1;
                                done.position = done.position.max(current);
                            }
                        }
                        Record::Statement(sql) if !skipping => {
                            // In order: the prepared changes before it go first.
                            prepared.flush(client, current).await?;
                            run.push_str(&sql);
                            run.push_str(";\n");
                            done.statements += 1;
                            if run.len() >= RUN_BYTES {
                                flush(&mut run, current).await?;
                            }
                        }
                        Record::Prepared { sql, params } if !skipping => {
                            flush(&mut run, current).await?;
                            done.statements += 1;
                            prepared.push(sql, params);
                            if prepared.full() {
                                prepared.flush(client, current).await?;
                            }
                        }
                        Record::Statement(_) | Record::Prepared { .. } | Record::End => {}
                    }
                }
            }
            Some(Frame::Trailer(t)) => {
                decoder.finish()?;
                flush(&mut run, current).await?;
                prepared.flush(client, current).await?;
                anyhow::ensure!(
                    t.raw_bytes == raw_bytes && t.digest == hasher.finalize().as_bytes().as_slice(),
                    "the change batch's blake3 does not match its trailer ({raw_bytes} bytes arrived, {} sent): nothing of it was applied",
                    t.raw_bytes
                );
                break;
            }
            Some(Frame::Header(_)) => anyhow::bail!("a change batch carries a second header"),
            None => anyhow::bail!("an empty frame in a change batch"),
        }
    }
    if done.applied > 0 {
        client
            .execute(
                "UPDATE haul.follow_position SET lsn = $2::text::pg_lsn, applied_at = now() \
                 WHERE job_id = $1",
                &[&job_id, &done.position.to_string()],
            )
            .await
            .context("record the followed position in haul.follow_position")?;
    }
    Ok(done)
}
