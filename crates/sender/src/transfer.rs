//! One chunk, source to receiver: binary COPY out of the snapshot, cut into blocks, each block
//! hashed (raw bytes, for the chunk digest) and compressed, rate-limited, and streamed to the
//! receiver as one client-streaming RPC. The receiver replies only after the chunk and its
//! ledger row have committed on the target, so a receipt means "applied exactly once".
//!
//! Memory per chunk in flight is bounded by one block being filled, one being compressed and
//! the frame channel's capacity: a few MiB whatever the table's size.

use std::time::Instant;

use anyhow::Context;
use bytes::BytesMut;
use futures::StreamExt;
use haul_core::bandwidth::Limiter;
use haul_core::chunk::{table_from_wire, Column, Range};
use haul_core::codec::Codec;
use haul_core::ident::quote_ident;
use haul_core::status::{fatal, from_status};
use haul_proto as pb;
use tokio_stream::wrappers::ReceiverStream;

use crate::snapshot::SnapshotReader;
use crate::worker::Shared;

/// Frames buffered between the reader and the gRPC stream. Why a channel at all: the RPC runs
/// on its own task so reading, compressing and sending overlap; its capacity is the bound.
const FRAMES_IN_FLIGHT: usize = 4;

/// Chunks at least this big are checked against the receiver's ledger before being sent.
const ASK_FIRST_BYTES: u64 = 4 << 20;

pub struct Outcome {
    pub rows: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub digest: Vec<u8>,
    pub already_applied: bool,
    /// The snapshot the applied rows were read under (the ledger's word for re-applied chunks).
    pub snapshot_id: String,
}

pub async fn run(
    shared: &Shared,
    reader: &mut Option<SnapshotReader>,
    lease: &pb::ChunkLease,
    limiter: &Limiter,
) -> anyhow::Result<Outcome> {
    let table = table_from_wire(lease.table.as_ref())?;
    let columns: Vec<Column> = lease
        .columns
        .iter()
        .map(Column::from_wire)
        .collect::<anyhow::Result<_>>()?;
    let range = Range::from_wire(lease.range.as_ref())?;
    let options = lease.options.clone().unwrap_or_default();
    let codec = Codec::from_wire(options.codec, options.zstd_level)?;

    let mut receiver = shared.peers.receiver(&lease.receiver_addr).await?;
    // Ask first only when it can save something: a re-lease, or a chunk big enough that not
    // re-sending it matters. Either way the target's ledger guarantees it is applied once.
    if lease.epoch > 1 || lease.est_bytes >= ASK_FIRST_BYTES {
        let begin = receiver
            .begin_chunk(pb::BeginChunkRequest {
                job_id: lease.job_id.clone(),
                chunk_id: lease.chunk_id,
            })
            .await
            .map_err(|s| from_status(s, "receiver refused to begin chunk"))?
            .into_inner();
        if begin.already_applied {
            return Ok(Outcome {
                rows: begin.rows,
                raw_bytes: 0,
                wire_bytes: 0,
                digest: vec![],
                already_applied: true,
                snapshot_id: begin.snapshot_id,
            });
        }
    }

    // A reader inside this job's snapshot; a reader of another job's snapshot is replaced.
    let fresh = !matches!(reader, Some(r) if r.job_id == lease.job_id && r.snapshot_id == lease.snapshot_id);
    if fresh {
        *reader = Some(
            SnapshotReader::open(&shared.config.source, &lease.job_id, &lease.snapshot_id).await?,
        );
    }
    let client = &reader.as_ref().context("snapshot reader")?.client;

    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ChunkFrame>(FRAMES_IN_FLIGHT);
    let call = tokio::spawn(async move { receiver.push_chunk(ReceiverStream::new(rx)).await });
    let header = pb::ChunkFrame {
        frame: Some(pb::chunk_frame::Frame::Header(pb::ChunkHeader {
            job_id: lease.job_id.clone(),
            chunk_id: lease.chunk_id,
            epoch: lease.epoch,
            table: lease.table.clone(),
            columns: lease.columns.clone(),
            codec: codec.to_wire().0 as i32,
            snapshot_id: lease.snapshot_id.clone(),
        })),
    };
    let started = Instant::now();
    let streamed = async {
        tx.send(header).await.ok();
        client
            .batch_execute("SAVEPOINT haul_chunk")
            .await
            .context("savepoint on source")?;
        let copied = stream_copy(
            shared, limiter, client, &table, &columns, &range, codec, &tx,
        )
        .await;
        // Rolling back to the savepoint (set when the reader opened; it survives the rollback)
        // releases this chunk's table lock and clears any error.
        client
            .batch_execute("ROLLBACK TO SAVEPOINT haul_chunk")
            .await
            .context("release chunk savepoint on source")?;
        copied
    }
    .await;
    let (raw_bytes, wire_bytes, blocks, digest) = match streamed {
        Ok(v) => v,
        Err(e) => {
            drop(tx);
            // If the receiver ended the call, its status is the better explanation.
            if let Ok(Ok(Err(status))) =
                tokio::time::timeout(std::time::Duration::from_secs(2), call).await
            {
                return Err(from_status(
                    status,
                    &format!("receiver refused chunk {} ({table})", lease.chunk_id),
                ));
            }
            return Err(e);
        }
    };
    tx.send(pb::ChunkFrame {
        frame: Some(pb::chunk_frame::Frame::Trailer(pb::ChunkTrailer {
            raw_bytes,
            blocks,
            digest: digest.as_bytes().to_vec(),
        })),
    })
    .await
    .ok();
    drop(tx);
    let receipt = call
        .await
        .context("chunk upload task")?
        .map_err(|s| {
            from_status(
                s,
                &format!("receiver did not apply chunk {} ({table})", lease.chunk_id),
            )
        })?
        .into_inner();
    tracing::debug!(
        chunk = lease.chunk_id, %table, rows = receipt.rows, raw_bytes, wire_bytes,
        secs = started.elapsed().as_secs_f64(), "chunk applied"
    );
    Ok(Outcome {
        rows: receipt.rows,
        raw_bytes,
        wire_bytes,
        digest: digest.as_bytes().to_vec(),
        already_applied: receipt.already_applied,
        snapshot_id: receipt.snapshot_id,
    })
}

/// COPY the chunk out and send it as blocks. Returns raw bytes, wire bytes, blocks, digest.
#[allow(clippy::too_many_arguments)]
async fn stream_copy(
    shared: &Shared,
    limiter: &Limiter,
    client: &tokio_postgres::Client,
    table: &haul_core::ident::TableName,
    columns: &[Column],
    range: &Range,
    codec: Codec,
    tx: &tokio::sync::mpsc::Sender<pb::ChunkFrame>,
) -> anyhow::Result<(u64, u64, u64, blake3::Hash)> {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let select = format!(
        "SELECT {} FROM ONLY {}{}",
        if cols.is_empty() {
            String::new()
        } else {
            cols.join(", ")
        },
        table.quoted(),
        range
            .predicate()
            .map(|p| format!(" WHERE {p}"))
            .unwrap_or_default()
    );
    let sql = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    let stream = client.copy_out(&sql).await.map_err(|e| {
        let line = format!(
            "cannot read source table {table}: {}",
            haul_core::pg::db_error_line(&e)
        );
        // Undefined table or column, no privilege: bad input that no retry fixes.
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("42") => fatal(line),
            _ => anyhow::anyhow!(line),
        }
    })?;
    futures::pin_mut!(stream);

    let mut hasher = blake3::Hasher::new();
    let mut block = BytesMut::with_capacity(haul_core::BLOCK_BYTES);
    let (mut raw_bytes, mut wire_bytes, mut blocks) = (0u64, 0u64, 0u64);
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(piece) = next {
            let piece = piece.map_err(|e| {
                anyhow::anyhow!(
                    "read {table} from source: {}",
                    haul_core::pg::db_error_line(&e)
                )
            })?;
            block.extend_from_slice(&piece);
        }
        while block.len() >= haul_core::BLOCK_BYTES || (done && !block.is_empty()) {
            let take = block.len().min(haul_core::BLOCK_BYTES);
            let raw = block.split_to(take).freeze();
            hasher.update(&raw);
            let raw_len = raw.len();
            // Compression is CPU work: keep it off the async workers.
            let payload = tokio::task::spawn_blocking(move || codec.encode(&raw))
                .await
                .context("compression task")??;
            limiter.consume(payload.len()).await;
            raw_bytes += raw_len as u64;
            wire_bytes += payload.len() as u64;
            blocks += 1;
            shared.stats.add_bytes(raw_len as u64, payload.len() as u64);
            let frame = pb::ChunkFrame {
                frame: Some(pb::chunk_frame::Frame::Block(pb::ChunkBlock {
                    raw_len: raw_len as u32,
                    payload,
                })),
            };
            if tx.send(frame).await.is_err() {
                anyhow::bail!("receiver closed the chunk stream early");
            }
        }
        if done {
            break;
        }
    }
    Ok((raw_bytes, wire_bytes, blocks, hasher.finalize()))
}
