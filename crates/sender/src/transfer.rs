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
    /// Raw bytes the receiver already held from an earlier stream, not sent again.
    pub resumed_bytes: u64,
    /// Raw bytes of this chunk the receiver was sent more than once, over all its streams.
    pub resent_bytes: u64,
}

/// The part of a chunk the receiver already holds: its first `bytes` raw bytes, whose blake3
/// is `digest`.
struct Prefix {
    bytes: u64,
    digest: Vec<u8>,
}

/// The source gave other bytes for the chunk's prefix than the receiver holds (the rows came
/// back in another order), so the chunk is sent from its start.
#[derive(Debug)]
struct PrefixMismatch(String);

impl std::fmt::Display for PrefixMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrefixMismatch {}

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
    let mut resume = None;
    if lease.epoch > 1 || lease.est_bytes >= ASK_FIRST_BYTES {
        let begin = receiver
            .begin_chunk(pb::BeginChunkRequest {
                job_id: lease.job_id.clone(),
                chunk_id: lease.chunk_id,
                epoch: lease.epoch,
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
                resumed_bytes: 0,
                resent_bytes: 0,
            });
        }
        // Bytes of two snapshots are never joined in one chunk: only a prefix read under the
        // lease's snapshot is continued.
        if begin.resume_from > 0
            && begin.resume_snapshot_id == lease.snapshot_id
            && begin.resume_codec == codec.to_wire().0 as i32
        {
            resume = Some(Prefix {
                bytes: begin.resume_from,
                digest: begin.resume_digest,
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
    let header = pb::ChunkHeader {
        job_id: lease.job_id.clone(),
        chunk_id: lease.chunk_id,
        epoch: lease.epoch,
        table: lease.table.clone(),
        columns: lease.columns.clone(),
        codec: codec.to_wire().0 as i32,
        snapshot_id: lease.snapshot_id.clone(),
        resume_from: 0,
        prefix_digest: Vec::new(),
    };
    let started = Instant::now();
    let read = Read {
        shared,
        limiter,
        client,
        table: &table,
        columns: &columns,
        range: &range,
        codec,
        tx: &tx,
    };
    let mut resumed_bytes = resume.as_ref().map_or(0, |p| p.bytes);
    let streamed = async {
        let mut copied = read.copy(header.clone(), resume.as_ref()).await;
        if let Err(e) = &copied {
            if let Some(m) = e.downcast_ref::<PrefixMismatch>() {
                // Nothing has been sent yet: read the chunk again and send all of it.
                tracing::warn!(chunk = lease.chunk_id, %table, "{m}");
                resumed_bytes = 0;
                copied = read.copy(header.clone(), None).await;
            }
        }
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
        resumed_bytes: receipt.resumed_bytes.max(resumed_bytes),
        resent_bytes: receipt.resent_bytes,
    })
}

/// One read of a chunk out of the source, sent as blocks.
struct Read<'a> {
    shared: &'a Shared,
    limiter: &'a Limiter,
    client: &'a tokio_postgres::Client,
    table: &'a haul_core::ident::TableName,
    columns: &'a [Column],
    range: &'a Range,
    codec: Codec,
    tx: &'a tokio::sync::mpsc::Sender<pb::ChunkFrame>,
}

impl Read<'_> {
    /// COPY the chunk out inside the reader's savepoint, released afterwards whatever happened.
    async fn copy(
        &self,
        header: pb::ChunkHeader,
        resume: Option<&Prefix>,
    ) -> anyhow::Result<(u64, u64, u64, blake3::Hash)> {
        self.client
            .batch_execute("SAVEPOINT haul_chunk")
            .await
            .context("savepoint on source")?;
        let copied = self.stream(header, resume).await;
        // Rolling back to the savepoint (set when the reader opened; it survives the rollback)
        // releases this chunk's table lock and clears any error.
        self.client
            .batch_execute("ROLLBACK TO SAVEPOINT haul_chunk")
            .await
            .context("release chunk savepoint on source")?;
        copied
    }

    /// Send the header, then the chunk's blocks. With a `resume` prefix the first bytes are
    /// read and hashed but not sent: the receiver holds them, and the header goes out only once
    /// their hash matched the receiver's. Returns raw bytes (the whole chunk), wire bytes and
    /// blocks (this stream), and the digest of the whole chunk.
    async fn stream(
        &self,
        mut header: pb::ChunkHeader,
        resume: Option<&Prefix>,
    ) -> anyhow::Result<(u64, u64, u64, blake3::Hash)> {
        let (table, tx) = (self.table, self.tx);
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let select = format!(
            "SELECT {} FROM ONLY {}{}",
            if cols.is_empty() {
                String::new()
            } else {
                cols.join(", ")
            },
            table.quoted(),
            self.range
                .predicate()
                .map(|p| format!(" WHERE {p}"))
                .unwrap_or_default()
        );
        let sql = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
        let stream = self.client.copy_out(&sql).await.map_err(|e| {
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
        let mut skip = resume.map_or(0, |p| p.bytes);
        let (mut raw_bytes, mut wire_bytes, mut blocks) = (skip, 0u64, 0u64);
        if skip == 0 {
            tx.send(frame(pb::chunk_frame::Frame::Header(header.clone())))
                .await
                .ok();
        }
        loop {
            let next = stream.next().await;
            let done = next.is_none();
            if let Some(piece) = next {
                let mut piece = piece.map_err(|e| {
                    anyhow::anyhow!(
                        "read {table} from source: {}",
                        haul_core::pg::db_error_line(&e)
                    )
                })?;
                if skip > 0 {
                    let n = piece.len().min(skip as usize);
                    hasher.update(&piece.split_to(n));
                    skip -= n as u64;
                    if skip == 0 {
                        let prefix = resume.context("resume prefix")?;
                        if hasher.finalize().as_bytes().as_slice() != prefix.digest.as_slice() {
                            return Err(anyhow::Error::new(PrefixMismatch(format!(
                                "the source gave other bytes for the first {} bytes of the chunk than the receiver holds (rows came back in another order); sending it from its start",
                                prefix.bytes
                            ))));
                        }
                        header.resume_from = prefix.bytes;
                        header.prefix_digest = prefix.digest.clone();
                        tx.send(frame(pb::chunk_frame::Frame::Header(header.clone())))
                            .await
                            .ok();
                    }
                }
                block.extend_from_slice(&piece);
            }
            if done && skip > 0 {
                return Err(anyhow::Error::new(PrefixMismatch(format!(
                    "the source gave fewer bytes for the chunk than the receiver holds ({} missing); sending it from its start",
                    skip
                ))));
            }
            while block.len() >= haul_core::BLOCK_BYTES || (done && !block.is_empty()) {
                let take = block.len().min(haul_core::BLOCK_BYTES);
                let raw = block.split_to(take).freeze();
                hasher.update(&raw);
                let raw_len = raw.len();
                // Compression is CPU work: keep it off the async workers.
                let codec = self.codec;
                let payload = tokio::task::spawn_blocking(move || codec.encode(&raw))
                    .await
                    .context("compression task")??;
                self.limiter.consume(payload.len()).await;
                raw_bytes += raw_len as u64;
                wire_bytes += payload.len() as u64;
                blocks += 1;
                self.shared
                    .stats
                    .add_bytes(raw_len as u64, payload.len() as u64);
                let block = pb::ChunkBlock {
                    raw_len: raw_len as u32,
                    payload,
                };
                if tx
                    .send(frame(pb::chunk_frame::Frame::Block(block)))
                    .await
                    .is_err()
                {
                    anyhow::bail!("receiver closed the chunk stream early");
                }
            }
            if done {
                break;
            }
        }
        Ok((raw_bytes, wire_bytes, blocks, hasher.finalize()))
    }
}

fn frame(f: pb::chunk_frame::Frame) -> pb::ChunkFrame {
    pb::ChunkFrame { frame: Some(f) }
}
