//! A group of small tables, one lease: every member's rows read under the job's snapshot, one
//! after another, into one stream to the receiver, which restores them in one transaction with
//! a ledger row each. What a table costs alone (a lease, a stream, a transaction, a round trip
//! each) is then paid once per group; exactly-once still holds table by table.
//!
//! A group is small by construction (core::chunk::GROUP_BYTES), so it is neither staged nor
//! resumed at an offset: a group cut off is sent again whole, and the receiver's ledger skips
//! any member that was applied.

use std::time::Instant;

use anyhow::Context;
use bytes::BytesMut;
use futures::StreamExt;
use haul_core::bandwidth::Limiter;
use haul_core::chunk::{table_from_wire, Column, Range};
use haul_core::ident::TableName;
use haul_core::row_digest::{CopyDigest, RowDigest};
use haul_proto as pb;
use tokio_stream::wrappers::ReceiverStream;

use crate::snapshot::SnapshotReader;
use crate::transfer::{abandon, block_bytes, connections_for, copy_out, finish, frame, send_block};
use crate::worker::Shared;

/// Frames buffered between the reader and the gRPC stream.
const FRAMES_IN_FLIGHT: usize = 4;

struct Member {
    chunk_id: u64,
    table: TableName,
    columns: Vec<Column>,
}

/// Move a group lease's tables; returns the report for the coordinator, one entry per member.
pub async fn run(
    shared: &Shared,
    reader: &mut Option<SnapshotReader>,
    lease: &pb::ChunkLease,
    limiter: &Limiter,
) -> anyhow::Result<pb::ChunkReport> {
    let options = lease.options.clone().unwrap_or_default();
    let job_id = lease.job_id.as_str();
    let members = lease
        .members
        .iter()
        .map(|m| {
            Ok(Member {
                chunk_id: m.chunk_id,
                table: table_from_wire(m.table.as_ref())?,
                columns: m
                    .columns
                    .iter()
                    .map(Column::from_wire)
                    .collect::<anyhow::Result<_>>()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!members.is_empty(), "group lease without members");
    let codec = shared.codec_for(job_id, &options, &members[0].table.to_string())?;

    let fresh = !matches!(reader, Some(r) if r.job_id == lease.job_id && r.snapshot_id == lease.snapshot_id);
    if fresh {
        *reader =
            Some(SnapshotReader::open(&shared.config.source, job_id, &lease.snapshot_id).await?);
    }
    let client = &reader
        .as_ref()
        .context("no source reader for the group")?
        .client;
    let mut shapes = Vec::with_capacity(members.len());
    for m in &members {
        shapes.push(if options.verify {
            let oids: Vec<u32> = m.columns.iter().map(|c| c.type_oid).collect();
            Some(shared.shapes.for_types(client, &oids).await?)
        } else {
            None
        });
    }

    let connections = connections_for(lease.options.as_ref());
    let (mut receiver, slot) = shared
        .peers
        .stream_to(&lease.receiver_addr, connections)
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ChunkFrame>(FRAMES_IN_FLIGHT);
    let call = tokio::spawn(async move {
        let _slot = slot;
        receiver.push_chunk(ReceiverStream::new(rx)).await
    });
    let header = pb::ChunkHeader {
        job_id: job_id.to_string(),
        chunk_id: lease.chunk_id,
        epoch: lease.epoch,
        codec: codec.to_wire().0 as i32,
        snapshot_id: lease.snapshot_id.clone(),
        range: Some(Range::Whole.to_wire()),
        verify: options.verify,
        members: lease.members.clone(),
        ..Default::default()
    };
    tx.send(frame(pb::chunk_frame::Frame::Header(header)))
        .await
        .ok();

    let started = Instant::now();
    client
        .batch_execute("SAVEPOINT haul_chunk")
        .await
        .context("savepoint on source")?;
    let sent = crate::transfer::Sent::default();
    let streamed = stream(
        shared, job_id, limiter, &options, client, &members, &shapes, &tx, &sent,
    )
    .await;
    // Releases the members' table locks (taken by their COPYs) and clears any error.
    client
        .batch_execute("ROLLBACK TO SAVEPOINT haul_chunk")
        .await
        .context("release group savepoint on source")?;
    let what = format!("group {} ({} tables)", lease.chunk_id, members.len());
    let (raw_bytes, wire_bytes, blocks, digest, extents, mix) = match streamed {
        Ok(v) => v,
        Err(e) => {
            drop(tx);
            return Err(abandon(call, e, &what).await);
        }
    };
    let trailer = pb::ChunkTrailer {
        raw_bytes,
        blocks,
        digest: digest.clone(),
        members: extents.clone(),
        ..Default::default()
    };
    let receipt = finish(shared, job_id, tx, call, trailer, &what, sent.get()).await?;

    let mut reports = Vec::with_capacity(extents.len());
    for e in &extents {
        let r = receipt
            .members
            .iter()
            .find(|r| r.chunk_id == e.chunk_id)
            .with_context(|| {
                format!(
                    "the receiver's receipt for group {} does not account for chunk {}",
                    lease.chunk_id, e.chunk_id
                )
            })?;
        reports.push(pb::ChunkReport {
            job_id: job_id.to_string(),
            chunk_id: e.chunk_id,
            epoch: lease.epoch,
            rows: r.rows,
            raw_bytes: e.raw_bytes,
            // The group's wire bytes, shared out by raw size.
            wire_bytes: share(wire_bytes, e.raw_bytes, raw_bytes),
            already_applied: r.already_applied,
            snapshot_id: r.snapshot_id.clone(),
            checked: r.checked,
            mismatch: r.mismatch.clone(),
            row_digest: e.row_digest.clone(),
            digest_rows: e.rows,
            codec: mix.describe(),
            ..Default::default()
        });
    }
    tracing::debug!(
        group = lease.chunk_id,
        tables = members.len(),
        raw_bytes,
        wire_bytes,
        secs = started.elapsed().as_secs_f64(),
        "group applied"
    );
    Ok(pb::ChunkReport {
        job_id: job_id.to_string(),
        chunk_id: lease.chunk_id,
        epoch: lease.epoch,
        rows: reports.iter().map(|r| r.rows).sum(),
        raw_bytes,
        wire_bytes,
        digest,
        already_applied: reports.iter().all(|r| r.already_applied),
        snapshot_id: lease.snapshot_id.clone(),
        codec: mix.describe(),
        members: reports,
        ..Default::default()
    })
}

/// `part` of `total` raw bytes, as a share of `wire` bytes.
fn share(wire: u64, part: u64, total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        (wire as u128 * part as u128 / total as u128) as u64
    }
}

type Streamed = (
    u64,
    u64,
    u64,
    Vec<u8>,
    Vec<pb::MemberExtent>,
    haul_core::codec::CodecMix,
);

/// COPY each member out in turn, into blocks that may span members; each member's rows are
/// digested on their own, and their extent recorded for the receiver.
#[allow(clippy::too_many_arguments)]
async fn stream(
    shared: &Shared,
    job_id: &str,
    limiter: &Limiter,
    options: &pb::JobOptions,
    client: &tokio_postgres::Client,
    members: &[Member],
    shapes: &[Option<Vec<haul_core::row_digest::Shape>>],
    tx: &tokio::sync::mpsc::Sender<pb::ChunkFrame>,
    sent: &crate::transfer::Sent,
) -> anyhow::Result<Streamed> {
    let mut hasher = blake3::Hasher::new();
    let mut block = BytesMut::with_capacity(haul_core::BLOCK_BYTES);
    let (mut raw_bytes, mut wire_bytes, mut blocks) = (0u64, 0u64, 0u64);
    let mut mix = haul_core::codec::CodecMix::default();
    let mut extents = Vec::with_capacity(members.len());
    let meta = haul_core::large_object::Metadata {
        owner: false,
        privileges: false,
    };
    for (i, m) in members.iter().enumerate() {
        let out = copy_out(client, &m.table, &m.columns, &Range::Whole, meta).await?;
        futures::pin_mut!(out);
        let mut rows = shapes.get(i).and_then(|s| s.clone()).map(CopyDigest::new);
        let mut bytes = 0u64;
        let last = i + 1 == members.len();
        let table_key = m.table.to_string();
        loop {
            let piece = out.next().await;
            let done = piece.is_none();
            if let Some(piece) = piece {
                let piece = piece.map_err(|e| {
                    anyhow::anyhow!(
                        "read {} from source: {}",
                        m.table,
                        haul_core::pg::db_error_line(&e)
                    )
                })?;
                if let Some(r) = rows.as_mut() {
                    r.update(&piece).context("digest the table's rows")?;
                }
                bytes += piece.len() as u64;
                block.extend_from_slice(&piece);
            }
            let size = block_bytes(limiter);
            while block.len() >= size || (done && last && !block.is_empty()) {
                let raw = block.split_to(block.len().min(size)).freeze();
                hasher.update(&raw);
                let raw_len = raw.len() as u32;
                let codec = shared.codec_for(job_id, options, &table_key)?;
                let (payload, ns) = tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    codec
                        .encode(&raw)
                        .map(|p| (p, t.elapsed().as_nanos() as u64))
                })
                .await
                .context("compression task")??;
                shared.tune_compress(
                    job_id,
                    &table_key,
                    codec,
                    (raw_len as u64, payload.len() as u64, ns),
                );
                raw_bytes += raw_len as u64;
                wire_bytes += payload.len() as u64;
                blocks += 1;
                mix.add(codec, raw_len as u64);
                send_block(shared, job_id, limiter, tx, (codec, raw_len, payload), sent).await?;
            }
            if done {
                break;
            }
        }
        let rows: Option<RowDigest> = rows.map(CopyDigest::finish).transpose()?;
        if i == 0 {
            // Test point: the group's stream is cut off after its first table.
            haul_core::failpoint::die("die-mid-group");
        }
        extents.push(pb::MemberExtent {
            chunk_id: m.chunk_id,
            raw_bytes: bytes,
            row_digest: rows.map(|r| r.to_bytes()).unwrap_or_default(),
            rows: rows.map_or(0, |r| r.rows),
        });
    }
    Ok((
        raw_bytes,
        wire_bytes,
        blocks,
        hasher.finalize().as_bytes().to_vec(),
        extents,
        mix,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn wire_bytes_are_shared_by_raw_size() {
        assert_eq!(super::share(100, 25, 100), 25);
        assert_eq!(super::share(100, 0, 100), 0);
        assert_eq!(super::share(7, 5, 0), 0);
    }
}
