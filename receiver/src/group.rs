//! A group of small tables in one stream (see the sender's `group`): spooled and checked like
//! any chunk, then restored in one target transaction that claims a ledger row per member.
//! A member the ledger already holds is skipped and reported as applied before, so each table
//! is applied exactly once even if the group is sent again. Each member restored is read back
//! and compared with the sender's row digest before the receipt (members are small).

use anyhow::Context;
use bytes::Bytes;
use futures::SinkExt;
use haul_core::chunk::{table_from_wire, Column, Range};
use haul_core::chunk_rows as readback;
use haul_core::codec::Codec;
use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::row_digest::RowDigest;
use haul_proto as pb;
use tokio_postgres::SimpleQueryMessage;
use tonic::Streaming;

use crate::partial;
use crate::pool::Pooled;
use crate::restore::{check_lease, end_transaction, SpoolCorrupt};
use crate::service::{DigestMismatch, ReceiverService, Unrestored};
use crate::spool::SpoolReader;

struct Member {
    chunk_id: u64,
    table: TableName,
    columns: Vec<Column>,
    raw_bytes: u64,
    rows: Option<RowDigest>,
}

/// How one member came out of the group's transaction.
enum Outcome {
    Now { rows: u64 },
    Before { rows: u64, snapshot_id: String },
}

struct GroupRestore<'a> {
    job_id: &'a str,
    group_id: u64,
    epoch: u64,
    members: &'a [Member],
    codec: Codec,
    digest: &'a [u8],
    raw_bytes: u64,
    snapshot_id: &'a str,
    spool: &'a std::path::Path,
    replica_role: bool,
    fence: Option<haul_proto::coordinator_client::CoordinatorClient<tonic::transport::Channel>>,
}

impl ReceiverService {
    pub(crate) async fn push_group(
        &self,
        header: pb::ChunkHeader,
        mut frames: Streaming<pb::ChunkFrame>,
    ) -> anyhow::Result<pb::ChunkReceipt> {
        let codec = Codec::from_wire(header.codec, 0)?;
        let (job_id, group_id) = (header.job_id.as_str(), header.chunk_id);
        anyhow::ensure!(
            header.resume_from == 0,
            "group {group_id}: a group is always sent from its start"
        );
        let mut listed = Vec::with_capacity(header.members.len());
        for m in &header.members {
            listed.push((
                m.chunk_id,
                table_from_wire(m.table.as_ref())?,
                m.columns
                    .iter()
                    .map(Column::from_wire)
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ));
        }
        let partials = &self.inner.partials;
        let path = self.inner.spool.chunk_path(job_id, group_id);
        let claim = partials.claim(job_id, group_id, header.epoch).await?;
        let stop = claim.stop.clone();
        let _hold = self.inner.spool.hold();
        let earlier = partials.record(job_id, group_id);
        let mut record = partial::Record {
            snapshot_id: header.snapshot_id.clone(),
            codec: header.codec,
            high_water: earlier.as_ref().map_or(0, |r| r.high_water),
            resent: earlier.as_ref().map_or(0, |r| r.resent),
        };
        let file = self.inner.spool.create(&path).await?;
        partials.put(job_id, group_id, &record)?;
        let received = self
            .receive(
                &mut frames,
                codec,
                &path,
                file,
                blake3::Hasher::new(),
                0,
                (job_id, group_id, &mut record),
                &stop,
                &mut None,
            )
            .await;
        // A group is never continued at an offset: what an interrupted stream left is useless.
        let drop_spool = || async {
            self.inner.spool.remove(&path).await;
            partials.forget(job_id, group_id);
        };
        let (raw_bytes, digest, _, extents, held) = match received {
            Ok(v) => v,
            Err(e) => {
                drop_spool().await;
                return Err(e);
            }
        };
        let members = match members_of(group_id, listed, extents, raw_bytes) {
            Ok(m) => m,
            Err(e) => {
                drop_spool().await;
                return Err(e);
            }
        };

        let applying = std::time::Instant::now();
        let r = GroupRestore {
            job_id,
            group_id,
            epoch: header.epoch,
            members: &members,
            codec,
            digest: &digest,
            raw_bytes,
            snapshot_id: &header.snapshot_id,
            spool: &path,
            replica_role: self.inner.replica_role,
            fence: Some(self.inner.fence.clone()),
        };
        // A group that cannot commit is sent again whole: its spool goes whatever the reason.
        let outcomes = match self
            .retry_from_spool(
                job_id,
                &format!("a group of {} small tables", r.members.len()),
                group_id,
                &stop,
                |c| apply(c, &r),
            )
            .await
        {
            Ok(o) => o,
            Err(Unrestored::LeaseLost(e) | Unrestored::Stopped(e) | Unrestored::Hopeless(e)) => {
                drop_spool().await;
                return Err(e);
            }
        };
        drop_spool().await;
        drop(claim);

        // Verify along the way, inline: each member restored now, read back and compared.
        let meta = haul_core::large_object::Metadata {
            owner: false,
            privileges: false,
        };
        let mut receipts = Vec::with_capacity(members.len());
        let reader = if header.verify {
            Some(self.inner.pool.get().await?)
        } else {
            None
        };
        if let (Some(client), Some((m, _))) = (
            &reader,
            members
                .iter()
                .zip(&outcomes)
                .find(|(_, o)| matches!(o, Outcome::Now { .. })),
        ) {
            if haul_core::failpoint::fire("alter-after-commit") {
                // Test point: something else on the target changes a committed table (a
                // trigger, a user) before verification reads it back.
                client
                    .batch_execute(&format!(
                        "DELETE FROM ONLY {t} WHERE ctid = (SELECT ctid FROM ONLY {t} LIMIT 1)",
                        t = m.table.quoted()
                    ))
                    .await
                    .context("failpoint alter-after-commit")?;
            }
        }
        for (m, o) in members.iter().zip(outcomes) {
            let mut receipt = match o {
                Outcome::Now { rows } => pb::MemberReceipt {
                    chunk_id: m.chunk_id,
                    rows,
                    snapshot_id: header.snapshot_id.clone(),
                    ..Default::default()
                },
                Outcome::Before { rows, snapshot_id } => pb::MemberReceipt {
                    chunk_id: m.chunk_id,
                    rows,
                    already_applied: true,
                    snapshot_id,
                    ..Default::default()
                },
            };
            if let (Some(client), Some(source), false) = (&reader, &m.rows, receipt.already_applied)
            {
                match readback::digest(
                    client,
                    &self.inner.shapes,
                    &m.table,
                    &m.columns,
                    &Range::Whole,
                    meta,
                )
                .await
                {
                    Ok(target) => {
                        receipt.checked = true;
                        receipt.mismatch = readback::mismatch(
                            &m.table,
                            m.chunk_id,
                            &Range::Whole,
                            source,
                            &target,
                        )
                        .unwrap_or_default();
                        if !receipt.mismatch.is_empty() {
                            tracing::error!(job = %job_id, chunk = m.chunk_id, "verification found a difference: {}", receipt.mismatch);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(job = %job_id, chunk = m.chunk_id, "failed to read a table back for verification (the final check covers it): {e:#}")
                    }
                }
            }
            receipts.push(receipt);
        }
        Ok(pb::ChunkReceipt {
            rows: receipts.iter().map(|r| r.rows).sum(),
            already_applied: receipts.iter().all(|r| r.already_applied),
            snapshot_id: header.snapshot_id.clone(),
            resent_bytes: record.resent,
            apply_ms: applying.elapsed().as_millis() as u64,
            held_ms: held.as_millis() as u64,
            members: receipts,
            ..Default::default()
        })
    }
}

/// The header's members with the trailer's extents, which must name the same chunks in the same
/// order and add up to the stream.
fn members_of(
    group_id: u64,
    listed: Vec<(u64, TableName, Vec<Column>)>,
    extents: Vec<pb::MemberExtent>,
    raw_bytes: u64,
) -> anyhow::Result<Vec<Member>> {
    let total: u64 = extents.iter().map(|e| e.raw_bytes).sum();
    if extents.len() != listed.len()
        || total != raw_bytes
        || listed
            .iter()
            .zip(&extents)
            .any(|((id, _, _), e)| *id != e.chunk_id)
    {
        return Err(anyhow::Error::new(DigestMismatch(format!(
            "group {group_id}: the trailer's {} extents ({total} bytes) do not match the header's {} tables and the {raw_bytes} bytes received; discarded",
            extents.len(),
            listed.len()
        ))));
    }
    Ok(listed
        .into_iter()
        .zip(extents)
        .map(|((chunk_id, table, columns), e)| Member {
            chunk_id,
            table,
            columns,
            raw_bytes: e.raw_bytes,
            rows: (e.row_digest.len() == haul_core::row_digest::DIGEST_BYTES)
                .then(|| RowDigest::from_bytes(e.rows, &e.row_digest).ok())
                .flatten(),
        })
        .collect())
}

async fn apply(client: Pooled, r: &GroupRestore<'_>) -> anyhow::Result<Vec<Outcome>> {
    client.set_in_transaction(true);
    let result = apply_in_tx(&client, r).await;
    end_transaction(client, result).await
}

/// The spool's decoded bytes, handed out member by member (a block may span members).
struct Cursor {
    reader: SpoolReader,
    block: Bytes,
    hasher: blake3::Hasher,
    taken: u64,
}

impl Cursor {
    /// The next at most `want` bytes, or an error if the spool ends first.
    async fn take(&mut self, want: u64) -> anyhow::Result<Bytes> {
        if self.block.is_empty() {
            self.block = Bytes::from(
                self.reader
                    .next_block()
                    .await?
                    .context("the spool ends before its last table")?,
            );
        }
        let n = self.block.len().min(want as usize);
        let out = self.block.split_to(n);
        self.hasher.update(&out);
        self.taken += out.len() as u64;
        Ok(out)
    }
}

async fn apply_in_tx(client: &Pooled, r: &GroupRestore<'_>) -> anyhow::Result<Vec<Outcome>> {
    let hex: String = r.digest.iter().map(|b| format!("{b:02x}")).collect();
    // One round trip: begin, session settings, and a ledger claim per member. The ledger's
    // digest of each is the group's (their bytes crossed, and were checked, as one).
    let values: Vec<String> = r
        .members
        .iter()
        .map(|m| {
            format!(
                "({}, {}, {}, {}, {}, '\\x{hex}'::bytea, 0, {})",
                quote_literal(r.job_id),
                m.chunk_id,
                r.epoch,
                quote_literal(&m.table.to_string()),
                quote_literal(r.snapshot_id),
                m.raw_bytes
            )
        })
        .collect();
    let begin = format!(
        "BEGIN; SET LOCAL row_security = off;{} \
         INSERT INTO haul.ledger (job_id, chunk_id, epoch, table_name, snapshot_id, digest, rows, raw_bytes) \
         VALUES {} ON CONFLICT DO NOTHING RETURNING chunk_id",
        if r.replica_role {
            " SET LOCAL session_replication_role = replica;"
        } else {
            ""
        },
        values.join(", ")
    );
    let claimed: std::collections::HashSet<u64> = client
        .simple_query(&begin)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "claim a group of tables in the ledger: {}",
                haul_core::pg::db_error_line(&e)
            )
        })?
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<u64>().ok()),
            _ => None,
        })
        .collect();

    let corrupt = |e: anyhow::Error| {
        anyhow::Error::new(SpoolCorrupt(format!(
            "spooled group {} is unreadable ({e:#}); discarded before commit",
            r.group_id
        )))
    };
    let mut cursor = Cursor {
        reader: SpoolReader::open(r.spool, r.codec).await?,
        block: Bytes::new(),
        hasher: blake3::Hasher::new(),
        taken: 0,
    };
    let refused = crate::restore::refused;
    let mut rows = vec![None; r.members.len()];
    for (i, m) in r.members.iter().enumerate() {
        let mut left = m.raw_bytes;
        if !claimed.contains(&m.chunk_id) {
            // Applied before: its bytes are only hashed, with the rest of the stream.
            while left > 0 {
                left -= cursor.take(left).await.map_err(corrupt)?.len() as u64;
            }
            continue;
        }
        let cols: Vec<String> = m.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            m.table.quoted(),
            cols.join(", ")
        );
        let sink = client
            .copy_in::<_, Bytes>(&sql)
            .await
            .map_err(|e| refused(&format!("cannot load target table {}", m.table), &e))?;
        futures::pin_mut!(sink);
        while left > 0 {
            let piece = cursor.take(left).await.map_err(corrupt)?;
            left -= piece.len() as u64;
            sink.send(piece).await.map_err(|e| {
                anyhow::anyhow!(
                    "load {} on target: {}",
                    m.table,
                    haul_core::pg::db_error_line(&e)
                )
            })?;
        }
        rows[i] = Some(
            sink.finish()
                .await
                .map_err(|e| refused(&format!("load {}", m.table), &e))?,
        );
    }
    // Nothing commits unless the bytes that went into COPY are the sender's bytes.
    let trailing = cursor.block.len() as u64
        + match cursor.reader.next_block().await.map_err(corrupt)? {
            Some(b) => b.len() as u64,
            None => 0,
        };
    if trailing > 0
        || cursor.taken != r.raw_bytes
        || cursor.hasher.finalize().as_bytes().as_slice() != r.digest
    {
        return Err(anyhow::Error::new(SpoolCorrupt(format!(
            "spooled group {} changed on disk (digest mismatch); discarded before commit",
            r.group_id
        ))));
    }
    if let Some(fence) = r.fence.clone() {
        let what = format!("group {} ({} tables)", r.group_id, r.members.len());
        check_lease(fence, r.job_id, r.group_id, r.epoch, &what).await?;
    }
    let updates: Vec<String> = r
        .members
        .iter()
        .zip(&rows)
        .filter_map(|(m, n)| n.map(|n| format!("({}, {n})", m.chunk_id)))
        .collect();
    let mut finish = String::new();
    if !updates.is_empty() {
        finish.push_str(&format!(
            "UPDATE haul.ledger l SET rows = v.n FROM (VALUES {}) v(id, n) \
             WHERE l.job_id = {} AND l.chunk_id = v.id; ",
            updates.join(", "),
            quote_literal(r.job_id)
        ));
    }
    finish.push_str("COMMIT");
    client.batch_execute(&finish).await.map_err(|e| {
        anyhow::anyhow!(
            "commit group {} ({} tables): {}",
            r.group_id,
            r.members.len(),
            haul_core::pg::db_error_line(&e)
        )
    })?;
    // Test point: the group is committed but nobody has heard of it yet.
    haul_core::failpoint::die("die-after-commit");
    haul_core::failpoint::die("die-after-group-commit");
    let mut out = Vec::with_capacity(r.members.len());
    for (m, n) in r.members.iter().zip(rows) {
        out.push(match n {
            Some(rows) => Outcome::Now { rows },
            None => {
                let (rows, snapshot_id) = crate::ledger::applied(client, r.job_id, m.chunk_id)
                    .await?
                    .unwrap_or_default();
                Outcome::Before { rows, snapshot_id }
            }
        });
    }
    Ok(out)
}
