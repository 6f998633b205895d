//! One chunk, source to receiver: binary COPY out of the snapshot, cut into blocks, each block
//! hashed (raw bytes, for the chunk digest) and compressed, rate-limited, and streamed to the
//! receiver as one client-streaming RPC. The receiver replies only after the chunk and its
//! ledger row have committed on the target, so a receipt means "applied exactly once".
//!
//! Memory per chunk in flight is bounded by one block being filled, one being compressed and
//! the frame channel's capacity: a few MiB whatever the table's size.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use bytes::BytesMut;
use futures::StreamExt;
use haul_core::bandwidth::Limiter;
use haul_core::chunk::{table_from_wire, Column, Range};
use haul_core::codec::{Codec, CodecMix};
use haul_core::frames::FrameReader;
use haul_core::ident::quote_ident;
use haul_core::row_digest::{CopyDigest, RowDigest, Shape};
use haul_core::status::{fatal, from_status};
use haul_proto as pb;
use tokio::io::AsyncWriteExt;
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
    /// The receiver read the rows back after commit and compared their digest with ours.
    pub checked: bool,
    pub mismatch: String,
    /// The receiver reads the chunk back after its receipt and reports the result itself.
    pub check_pending: bool,
    /// Our digest of the chunk's rows, when the job verifies and we read them.
    pub row_digest: Option<RowDigest>,
    /// The codec the chunk crossed with.
    pub codec: String,
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

/// `read_whole` is told once a staged chunk has been read whole from the source while it is
/// still crossing, when neither the cap nor the receiver is what holds the job's streams back
/// but each flow of the link is slow (`Shared::flows_are_slow`): the worker
/// then goes on to its next lease, and this stream finishes on its own (chunks in flight
/// beyond the source readers, to fill a long fat path).
pub async fn run(
    shared: &Shared,
    reader: &mut Option<SnapshotReader>,
    lease: &pb::ChunkLease,
    limiter: &Limiter,
    read_whole: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<Outcome> {
    let table = table_from_wire(lease.table.as_ref())?;
    let columns: Vec<Column> = lease
        .columns
        .iter()
        .map(Column::from_wire)
        .collect::<anyhow::Result<_>>()?;
    let range = Range::from_wire(lease.range.as_ref())?;
    let options = lease.options.clone().unwrap_or_default();
    let (job_id, chunk_id) = (lease.job_id.as_str(), lease.chunk_id);

    // Where the bytes come from: a complete stage (read earlier, perhaps by this sender's
    // previous process, under the snapshot it names), or the source under the lease's snapshot,
    // staged on the way when there is room, else straight onto the wire.
    let staged = shared.staging.complete(job_id, chunk_id);
    let (codec, snapshot_id) = match &staged {
        Some(st) => (
            Codec::from_wire(st.codec, st.zstd_level)?,
            st.snapshot_id.clone(),
        ),
        None => (
            shared.codec_for(&lease.job_id, &options, &table.to_string())?,
            lease.snapshot_id.clone(),
        ),
    };

    // Each stream on the least busy of the job's connections to the receiver.
    let connections = connections_for(lease.options.as_ref());
    let (mut receiver, slot) = shared
        .peers
        .stream_to(&lease.receiver_addr, connections)
        .await?;
    // Ask first only when it can save something: a re-lease (the receiver may hold part or
    // all of the chunk), or a chunk big enough that not re-sending it matters. Either way the
    // target's ledger guarantees it is applied once.
    let mut resume = None;
    if !lease.first_lease || lease.est_bytes >= ASK_FIRST_BYTES || staged.is_some() {
        let begin = receiver
            .begin_chunk(pb::BeginChunkRequest {
                job_id: job_id.to_string(),
                chunk_id,
                epoch: lease.epoch,
            })
            .await
            .map_err(|s| from_status(s, "receiver refused to begin chunk"))?
            .into_inner();
        if begin.already_applied {
            shared.staging.remove(job_id, chunk_id).await;
            return Ok(Outcome {
                rows: begin.rows,
                raw_bytes: 0,
                wire_bytes: 0,
                digest: vec![],
                already_applied: true,
                snapshot_id: begin.snapshot_id,
                resumed_bytes: 0,
                resent_bytes: 0,
                checked: false,
                mismatch: String::new(),
                check_pending: false,
                row_digest: None,
                codec: String::new(),
            });
        }
        // Bytes of two snapshots are never joined in one chunk: only a prefix read under the
        // same snapshot as the rest is continued.
        // Spool frames name their codecs, so the rest may cross in another codec.
        if begin.resume_from > 0 && begin.resume_snapshot_id == snapshot_id {
            resume = Some(Prefix {
                bytes: begin.resume_from,
                digest: begin.resume_digest,
            });
        }
    }

    // A reader inside this job's snapshot; a reader of another job's snapshot is replaced.
    // A staged chunk needs none: its snapshot may be long gone.
    if staged.is_none() {
        let fresh = !matches!(reader, Some(r) if r.job_id == lease.job_id && r.snapshot_id == lease.snapshot_id);
        if fresh {
            *reader = Some(
                SnapshotReader::open(&shared.config.source, job_id, &lease.snapshot_id).await?,
            );
        }
    }
    let stage_now = staged.is_none() && shared.staging.reserve(job_id, chunk_id, lease.est_bytes);

    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ChunkFrame>(FRAMES_IN_FLIGHT);
    let call = tokio::spawn(async move {
        let _slot = slot;
        receiver.push_chunk(ReceiverStream::new(rx)).await
    });
    let header = pb::ChunkHeader {
        job_id: job_id.to_string(),
        chunk_id,
        epoch: lease.epoch,
        table: lease.table.clone(),
        columns: lease.columns.clone(),
        codec: codec.to_wire().0 as i32,
        snapshot_id: snapshot_id.clone(),
        resume_from: 0,
        prefix_digest: Vec::new(),
        range: lease.range.clone(),
        verify: options.verify,
        large_object_owner: !options.no_owner,
        large_object_privileges: !options.no_privileges,
        members: Vec::new(),
        table_chunks: lease.table_chunks,
    };
    let started = Instant::now();
    let client = reader.as_ref().map(|r| &r.client);
    // Where each column's binary form holds type OIDs, for the row digest (verify along the
    // way). A staged chunk brings its digest from when it was read.
    let shapes = match (options.verify, client) {
        (true, Some(c)) => {
            let oids: Vec<u32> = columns.iter().map(|c| c.type_oid).collect();
            Some(shared.shapes.for_types(c, &oids).await?)
        }
        _ => None,
    };
    let read = Read {
        shared,
        job_id: &lease.job_id,
        limiter,
        client,
        table: &table,
        columns: &columns,
        range: &range,
        codec,
        options: &options,
        tx: &tx,
        large_object_meta: haul_core::large_object::Metadata {
            owner: !lease.options.as_ref().is_some_and(|o| o.no_owner),
            privileges: !lease.options.as_ref().is_some_and(|o| o.no_privileges),
        },
        shapes: shapes.as_deref(),
        sent: Default::default(),
    };
    let mut resumed_bytes = resume.as_ref().map_or(0, |p| p.bytes);
    let streamed = async {
        let send = |prefix: Option<Prefix>| {
            let (read, header) = (&read, header.clone());
            let staged = staged.clone();
            async move {
                match staged {
                    Some(st) => {
                        let rows = (st.row_digest.len() == haul_core::row_digest::DIGEST_BYTES)
                            .then(|| RowDigest::from_bytes(st.rows, &st.row_digest).ok())
                            .flatten();
                        let (_done, progress) = tokio::sync::watch::channel(Progress {
                            frames: st.frames,
                            done: Some((st.raw_bytes, st.digest, rows)),
                            failed: false,
                        });
                        let path = shared.staging.path(job_id, chunk_id);
                        read.send_staged(&path, progress, header, prefix.as_ref())
                            .await
                    }
                    None => read.copy(header, prefix.as_ref()).await,
                }
            }
        };
        if stage_now {
            // Read into staging as fast as the source allows while sending from it.
            let (progress_tx, progress) = tokio::sync::watch::channel(Progress::default());
            let path = shared.staging.path(job_id, chunk_id);
            // The file exists before the sending side opens it to follow it.
            let file = shared.staging.create(job_id, chunk_id).await?;
            let mut read_whole = read_whole;
            let stage = async {
                let staged = read
                    .stage(job_id, chunk_id, &snapshot_id, file, progress_tx)
                    .await;
                if staged.is_ok() && read.sent.not_capped() && shared.flows_are_slow(job_id) {
                    if let Some(tx) = read_whole.take() {
                        tracing::info!(
                            chunk = chunk_id, %table,
                            "read whole; it crosses on its own while the next chunk is read"
                        );
                        let _ = tx.send(());
                    }
                }
                staged
            };
            let sent = async {
                let mut sent = read
                    .send_staged(&path, progress.clone(), header.clone(), resume.as_ref())
                    .await;
                if let Err(e) = &sent {
                    if let Some(m) = e.downcast_ref::<PrefixMismatch>() {
                        tracing::warn!(chunk = chunk_id, %table, "{m}");
                        resumed_bytes = 0;
                        sent = read
                            .send_staged(&path, progress.clone(), header.clone(), None)
                            .await;
                    }
                }
                sent
            };
            let (staged, sent) = tokio::join!(stage, sent);
            if let Err(e) = staged {
                shared.staging.remove(job_id, chunk_id).await;
                return Err(e);
            }
            return sent;
        }
        let mut copied = send(resume).await;
        if let Err(e) = &copied {
            if let Some(m) = e.downcast_ref::<PrefixMismatch>() {
                // Nothing has been sent yet: read the chunk again and send all of it.
                tracing::warn!(chunk = chunk_id, %table, "{m}");
                resumed_bytes = 0;
                copied = send(None).await;
            }
        }
        copied
    }
    .await;
    let (raw_bytes, wire_bytes, blocks, digest, rows, mix) = match streamed {
        Ok(v) => v,
        Err(e) => {
            drop(tx);
            if let Some(b) = e.downcast_ref::<StageBroken>() {
                tracing::warn!(chunk = chunk_id, %table, "{b}; dropped it, the chunk will be read from the source again");
                shared.staging.remove(job_id, chunk_id).await;
            }
            return Err(abandon(call, e, &format!("chunk {chunk_id} ({table})")).await);
        }
    };
    let trailer = pb::ChunkTrailer {
        raw_bytes,
        blocks,
        digest: digest.clone(),
        row_digest: rows.map(|r| r.to_bytes()).unwrap_or_default(),
        rows: rows.map_or(0, |r| r.rows),
        members: Vec::new(),
    };
    let what = format!("chunk {chunk_id} ({table})");
    let sent = read.sent.get();
    let receipt = finish(shared, job_id, tx, call, trailer, &what, sent).await?;
    shared.staging.remove(job_id, chunk_id).await;
    tracing::debug!(
        chunk = chunk_id, %table, rows = receipt.rows, raw_bytes, wire_bytes,
        secs = started.elapsed().as_secs_f64(), "chunk applied"
    );
    Ok(Outcome {
        rows: receipt.rows,
        raw_bytes,
        wire_bytes,
        digest,
        already_applied: receipt.already_applied,
        snapshot_id: receipt.snapshot_id,
        resumed_bytes: receipt.resumed_bytes.max(resumed_bytes),
        resent_bytes: receipt.resent_bytes,
        checked: receipt.checked,
        mismatch: receipt.mismatch,
        check_pending: receipt.check_pending,
        row_digest: rows,
        codec: mix.describe(),
    })
}

/// How far a chunk's staging has got: frames written, and once the whole chunk is staged its
/// raw size and digest. Why a watch channel: the sending side follows the file as it grows and
/// only ever needs the latest count.
#[derive(Clone, Default)]
struct Progress {
    frames: u64,
    done: Option<(u64, Vec<u8>, Option<RowDigest>)>,
    failed: bool,
}

/// Where a read puts its blocks: onto the wire (limited, after the resume prefix), or into the
/// staging file (as fast as the source goes).
enum Out<'a> {
    Wire {
        header: pb::ChunkHeader,
        resume: Option<&'a Prefix>,
    },
    Stage {
        file: tokio::io::BufWriter<tokio::fs::File>,
        path: &'a Path,
        progress: &'a tokio::sync::watch::Sender<Progress>,
    },
}

/// How many connections a job's streams may use to each receiver: as asked, or when left to
/// haul one for each chunk it may have in flight. Connections open as streams need them, so a
/// job with four streams at a time uses four.
pub fn connections_for(options: Option<&pb::JobOptions>) -> usize {
    let o = options.cloned().unwrap_or_default();
    match o.connections {
        0 => haul_core::chunk::in_flight_limit(o.jobs, 0),
        n => (n as usize).clamp(1, 64),
    }
}

/// One read of a chunk: out of the source (onto the wire or into staging), or out of staging
/// onto the wire.
struct Read<'a> {
    shared: &'a Shared,
    job_id: &'a str,
    limiter: &'a Limiter,
    /// The snapshot reader; none when the chunk comes from a complete stage.
    client: Option<&'a tokio_postgres::Client>,
    table: &'a haul_core::ident::TableName,
    columns: &'a [Column],
    range: &'a Range,
    /// The codec of a staged chunk's untagged frames, and the header's.
    codec: Codec,
    /// Where each block's codec comes from (`Shared::codec_for`).
    options: &'a pb::JobOptions,
    tx: &'a tokio::sync::mpsc::Sender<pb::ChunkFrame>,
    /// For a large-object chunk: which metadata its objects carry.
    large_object_meta: haul_core::large_object::Metadata,
    /// The columns' shapes when the job verifies: the rows are digested as they are read.
    shapes: Option<&'a [Shape]>,
    /// Raw bytes this stream sent, and how long its blocks waited for the wire.
    sent: Sent,
}

/// Raw bytes a stream sent and the time its blocks waited for the wire (the cap, the HTTP/2
/// window), told to the codec tuner with the receipt, less what the receiver held it back.
#[derive(Default)]
pub(crate) struct Sent {
    raw: std::sync::atomic::AtomicU64,
    waited_ns: std::sync::atomic::AtomicU64,
    /// The part of the wait spent on the bandwidth cap (the rest: the HTTP/2 window, the path).
    capped_ns: std::sync::atomic::AtomicU64,
}

impl Sent {
    pub(crate) fn add(&self, raw: u64, waited_ns: u64, capped_ns: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.raw.fetch_add(raw, Relaxed);
        self.waited_ns.fetch_add(waited_ns, Relaxed);
        self.capped_ns.fetch_add(capped_ns, Relaxed);
    }

    /// Whether the cap is not what holds this stream back: it has waited on the cap for at
    /// most half its wait (none at all, early on, when the windows take all it sends).
    fn not_capped(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (waited, capped) = (self.waited_ns.load(Relaxed), self.capped_ns.load(Relaxed));
        capped <= waited / 2
    }

    pub(crate) fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.raw.load(Relaxed), self.waited_ns.load(Relaxed))
    }
}

/// What one read of a chunk produced: raw bytes (the whole chunk), wire bytes and blocks (this
/// stream or stage), the blake3 of the raw bytes, the rows' digest when asked for, and the
/// codecs its blocks took.
type Streamed = (u64, u64, u64, Vec<u8>, Option<RowDigest>, CodecMix);

impl Read<'_> {
    /// Read the chunk from the source straight onto the wire.
    async fn copy(
        &self,
        header: pb::ChunkHeader,
        resume: Option<&Prefix>,
    ) -> anyhow::Result<Streamed> {
        self.source(Out::Wire { header, resume }).await
    }

    /// Read the chunk from the source into its staging file, then record it as complete.
    async fn stage(
        &self,
        job_id: &str,
        chunk_id: u64,
        snapshot_id: &str,
        file: tokio::fs::File,
        progress: tokio::sync::watch::Sender<Progress>,
    ) -> anyhow::Result<()> {
        let staging = &self.shared.staging;
        let path = staging.path(job_id, chunk_id);
        let result = async {
            let file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
            let (raw_bytes, _, frames, digest, rows, _) = self
                .source(Out::Stage {
                    file,
                    path: &path,
                    progress: &progress,
                })
                .await?;
            // Frames name their own codecs; the record's is for frames from before they did.
            let (codec, zstd_level) = self.codec.to_wire();
            let staged = crate::staging::Staged {
                snapshot_id: snapshot_id.to_string(),
                codec: codec as i32,
                zstd_level,
                raw_bytes,
                frames,
                digest,
                row_digest: rows.map(|r| r.to_bytes()).unwrap_or_default(),
                rows: rows.map_or(0, |r| r.rows),
            };
            staging.finish(job_id, chunk_id, &staged).await?;
            anyhow::Ok((raw_bytes, staged.digest, rows))
        }
        .await;
        match result {
            Ok(done) => {
                progress.send_modify(|p| p.done = Some(done));
                Ok(())
            }
            Err(e) => {
                progress.send_modify(|p| p.failed = true);
                Err(e)
            }
        }
    }

    /// COPY the chunk out inside the reader's savepoint, released afterwards whatever happened.
    async fn source(&self, out: Out<'_>) -> anyhow::Result<Streamed> {
        let client = self.client.context("no source reader for the chunk")?;
        client
            .batch_execute("SAVEPOINT haul_chunk")
            .await
            .context("savepoint on source")?;
        let copied = self.stream(client, out).await;
        // Rolling back to the savepoint (set when the reader opened; it survives the rollback)
        // releases this chunk's table lock and clears any error.
        client
            .batch_execute("ROLLBACK TO SAVEPOINT haul_chunk")
            .await
            .context("release chunk savepoint on source")?;
        copied
    }

    /// Put the chunk's blocks where `out` says. Onto the wire, with a `resume` prefix, the first
    /// bytes are read and hashed but not sent: the receiver holds them, and the header goes out
    /// only once their hash matched the receiver's. Returns raw bytes (the whole chunk), wire
    /// bytes and blocks (this stream or stage), and the digest of the whole chunk.
    async fn stream(
        &self,
        client: &tokio_postgres::Client,
        mut out: Out<'_>,
    ) -> anyhow::Result<Streamed> {
        let table = self.table;
        // The codec tuner judges each table's data on its own (`--codec auto`).
        let table_key = table.to_string();
        let stream = copy_out(
            client,
            table,
            self.columns,
            self.range,
            self.large_object_meta,
        )
        .await?;
        futures::pin_mut!(stream);

        let mut hasher = blake3::Hasher::new();
        let mut rows = self.shapes.map(|s| CopyDigest::new(s.to_vec()));
        let mut block = BytesMut::with_capacity(haul_core::BLOCK_BYTES);
        let mut skip = match &out {
            Out::Wire {
                resume: Some(p), ..
            } => p.bytes,
            _ => 0,
        };
        let (mut raw_bytes, mut wire_bytes, mut blocks) = (skip, 0u64, 0u64);
        let mut mix = CodecMix::default();
        if let Out::Wire { header, .. } = &out {
            if skip == 0 {
                self.send_header(header.clone()).await;
            }
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
                    let prefix = piece.split_to(n);
                    hasher.update(&prefix);
                    if let Some(r) = rows.as_mut() {
                        r.update(&prefix).context("digest the chunk's rows")?;
                    }
                    skip -= n as u64;
                    if skip == 0 {
                        if let Out::Wire {
                            header,
                            resume: Some(prefix),
                        } = &mut out
                        {
                            check_prefix(&hasher, prefix)?;
                            header.resume_from = prefix.bytes;
                            header.prefix_digest = prefix.digest.clone();
                            self.send_header(header.clone()).await;
                        }
                    }
                }
                block.extend_from_slice(&piece);
            }
            if done && skip > 0 {
                return Err(short_source(skip));
            }
            let block_bytes = block_bytes(self.limiter);
            while block.len() >= block_bytes || (done && !block.is_empty()) {
                let take = block.len().min(block_bytes);
                let mut raw = block.split_to(take).freeze();
                hasher.update(&raw);
                if haul_core::failpoint::fire("corrupt-block") {
                    // Test point: a block changes between its hash and the wire (a fault in
                    // the sender's memory); the receiver must never commit it.
                    let mut bad = raw.to_vec();
                    let i = bad.len() / 2;
                    bad[i] ^= 0x5a;
                    raw = bad.into();
                }
                let raw_len = raw.len() as u32;
                // Compression and the row digest are CPU work: keep them off the async workers.
                let codec = self
                    .shared
                    .codec_for(self.job_id, self.options, &table_key)?;
                let mut digesting = rows.take();
                let (payload, digested, compress_ns) = tokio::task::spawn_blocking(move || {
                    if let Some(r) = digesting.as_mut() {
                        r.update(&raw).context("digest the chunk's rows")?;
                    }
                    let t = Instant::now();
                    let payload = codec.encode(&raw)?;
                    anyhow::Ok((payload, digesting, t.elapsed().as_nanos() as u64))
                })
                .await
                .context("compression task")??;
                self.shared.tune_compress(
                    self.job_id,
                    &table_key,
                    codec,
                    (raw_len as u64, payload.len() as u64, compress_ns),
                );
                rows = digested;
                raw_bytes += raw_len as u64;
                wire_bytes += payload.len() as u64;
                blocks += 1;
                mix.add(codec, raw_len as u64);
                match &mut out {
                    Out::Wire { .. } => self.send_block(codec, raw_len, payload).await?,
                    Out::Stage {
                        file,
                        path,
                        progress,
                    } => {
                        let write = async {
                            haul_core::frames::write_frame(file, codec, raw_len, &payload).await?;
                            file.flush().await
                        };
                        write
                            .await
                            .with_context(|| format!("write staging file {}", path.display()))?;
                        progress.send_modify(|p| p.frames += 1);
                    }
                }
            }
            if done {
                break;
            }
        }
        let rows = rows.map(CopyDigest::finish).transpose()?;
        Ok((
            raw_bytes,
            wire_bytes,
            blocks,
            hasher.finalize().as_bytes().to_vec(),
            rows,
            mix,
        ))
    }

    /// Send a chunk from its staging file, following it while it is still being written. With
    /// a `resume` prefix, the frames the receiver holds are decoded and hashed, not sent.
    async fn send_staged(
        &self,
        path: &Path,
        mut progress: tokio::sync::watch::Receiver<Progress>,
        mut header: pb::ChunkHeader,
        resume: Option<&Prefix>,
    ) -> anyhow::Result<Streamed> {
        let mut frames = FrameReader::open(path).await.map_err(broken)?;
        let mut hasher = blake3::Hasher::new();
        let skip = resume.map_or(0, |p| p.bytes);
        let (mut offset, mut read_frames, mut wire_bytes, mut blocks) = (0u64, 0u64, 0u64, 0u64);
        let mut mix = CodecMix::default();
        if skip == 0 {
            self.send_header(header.clone()).await;
        }
        loop {
            let now = progress.borrow_and_update().clone();
            if now.failed {
                anyhow::bail!("staging chunk failed");
            }
            if read_frames == now.frames {
                if now.done.is_some() {
                    break;
                }
                progress.changed().await.context("staging chunk stopped")?;
                continue;
            }
            let frame = frames.next_frame().await.map_err(broken)?.ok_or_else(|| {
                broken(anyhow::anyhow!("staging file is shorter than its record"))
            })?;
            let (codec, raw_len, payload) =
                (frame.codec_or(self.codec), frame.raw_len, frame.payload);
            read_frames += 1;
            if offset < skip {
                let raw = tokio::task::spawn_blocking(move || {
                    haul_core::codec::decode(codec, &payload, raw_len as usize)
                })
                .await
                .context("decode task")?
                .map_err(broken)?;
                hasher.update(&raw);
                offset += raw.len() as u64;
                if offset == skip {
                    let prefix = resume.context("resume prefix")?;
                    check_prefix(&hasher, prefix)?;
                    header.resume_from = prefix.bytes;
                    header.prefix_digest = prefix.digest.clone();
                    self.send_header(header.clone()).await;
                } else if offset > skip {
                    return Err(anyhow::Error::new(PrefixMismatch(format!(
                        "the receiver holds {skip} bytes of the chunk, which is not where a staged block ends; sending it from its start"
                    ))));
                }
                continue;
            }
            offset += raw_len as u64;
            wire_bytes += payload.len() as u64;
            blocks += 1;
            mix.add(codec, raw_len as u64);
            self.send_block(codec, raw_len, payload).await?;
        }
        if offset < skip {
            return Err(short_source(skip - offset));
        }
        let (raw_bytes, digest, rows) = progress
            .borrow()
            .done
            .clone()
            .context("staging chunk did not finish")?;
        if raw_bytes != offset {
            return Err(broken(anyhow::anyhow!(
                "staging file holds {offset} bytes, its record says {raw_bytes}"
            )));
        }
        Ok((raw_bytes, wire_bytes, blocks, digest, rows, mix))
    }

    async fn send_header(&self, header: pb::ChunkHeader) {
        self.tx
            .send(frame(pb::chunk_frame::Frame::Header(header)))
            .await
            .ok();
    }

    async fn send_block(&self, codec: Codec, raw_len: u32, payload: Vec<u8>) -> anyhow::Result<()> {
        send_block(
            self.shared,
            self.job_id,
            self.limiter,
            self.tx,
            (codec, raw_len, payload),
            &self.sent,
        )
        .await
    }
}

/// The upload RPC of a chunk stream, running on its own task.
pub(crate) type Upload =
    tokio::task::JoinHandle<Result<tonic::Response<pb::ChunkReceipt>, tonic::Status>>;

/// A stream given up on the sending side (`tx` already dropped): if the receiver ended the call,
/// its status is the better explanation of `e`.
pub(crate) async fn abandon(call: Upload, e: anyhow::Error, what: &str) -> anyhow::Error {
    match tokio::time::timeout(std::time::Duration::from_secs(2), call).await {
        Ok(Ok(Err(status))) => from_status(status, &format!("receiver refused {what}")),
        _ => e,
    }
}

/// End a stream with its trailer and wait for the receiver's receipt (given after the target
/// committed). The wait after the last block, less the receiver's restore, is the link's time
/// (the window's worth still crossing, and the round trip): what `--codec auto` weighs.
pub(crate) async fn finish(
    shared: &Shared,
    job_id: &str,
    tx: tokio::sync::mpsc::Sender<pb::ChunkFrame>,
    call: Upload,
    trailer: pb::ChunkTrailer,
    what: &str,
    (raw, waited): (u64, u64),
) -> anyhow::Result<pb::ChunkReceipt> {
    tx.send(frame(pb::chunk_frame::Frame::Trailer(trailer)))
        .await
        .ok();
    drop(tx);
    let handed = Instant::now();
    let receipt = call
        .await
        .context("chunk upload task")?
        .map_err(|s| from_status(s, &format!("receiver did not apply {what}")))?
        .into_inner();
    let transit = handed
        .elapsed()
        .saturating_sub(std::time::Duration::from_millis(receipt.apply_ms));
    shared.tune_send(job_id, 0, transit.as_nanos() as u64);
    // The blocks' wait, less what the receiver held the stream back (loading it into the
    // target as it arrived, spool room): that part was not the link's, and a better ratio
    // would not have shortened it.
    let held = std::time::Duration::from_millis(receipt.held_ms).as_nanos() as u64;
    shared.tune_send(job_id, raw, waited.saturating_sub(held));
    shared.note_stream(job_id, raw, waited + transit.as_nanos() as u64, held);
    Ok(receipt)
}

/// Start the binary COPY of a chunk's rows out of the source.
pub(crate) async fn copy_out(
    client: &tokio_postgres::Client,
    table: &haul_core::ident::TableName,
    columns: &[Column],
    range: &Range,
    large_object_meta: haul_core::large_object::Metadata,
) -> anyhow::Result<tokio_postgres::CopyOutStream> {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let select = if haul_core::large_object::is_large_objects(table) {
        haul_core::large_object::source_select(range.predicate().as_deref(), large_object_meta)
    } else {
        format!(
            "SELECT {} FROM ONLY {}{}",
            cols.join(", "),
            table.quoted(),
            range
                .predicate()
                .map(|p| format!(" WHERE {p}"))
                .unwrap_or_default()
        )
    };
    let sql = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    client.copy_out(&sql).await.map_err(|e| {
        let line = format!(
            "cannot read source table {table}: {}",
            haul_core::pg::db_error_line(&e)
        );
        // Undefined table or column, no privilege: bad input that no retry fixes.
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("42") => fatal(line),
            _ => anyhow::anyhow!(line),
        }
    })
}

/// One block onto the wire, within the bandwidth cap.
pub(crate) async fn send_block(
    shared: &Shared,
    job_id: &str,
    limiter: &Limiter,
    tx: &tokio::sync::mpsc::Sender<pb::ChunkFrame>,
    (codec, raw_len, payload): (Codec, u32, Vec<u8>),
    sent: &Sent,
) -> anyhow::Result<()> {
    let waited = Instant::now();
    limiter.consume(payload.len()).await;
    let capped = waited.elapsed().as_nanos() as u64;
    shared.stats.add_bytes(raw_len as u64, payload.len() as u64);
    shared.count_sent(job_id, payload.len() as u64);
    let block = pb::ChunkBlock {
        raw_len,
        payload,
        codec: Some(codec.to_wire().0 as i32),
    };
    if tx
        .send(frame(pb::chunk_frame::Frame::Block(block)))
        .await
        .is_err()
    {
        anyhow::bail!("receiver closed the chunk stream early");
    }
    // Time spent on the cap and the HTTP/2 window: what `--codec auto` weighs compression
    // against, told with the receipt (`finish`).
    sent.add(raw_len as u64, waited.elapsed().as_nanos() as u64, capped);
    Ok(())
}

/// The size of the blocks a chunk is cut into: under a cap, no larger than the limiter's burst,
/// so what it meters in one slice is also what crosses the wire in one go.
pub(crate) fn block_bytes(limiter: &Limiter) -> usize {
    limiter.burst_bytes().map_or(haul_core::BLOCK_BYTES, |b| {
        (b as usize).clamp(64 << 10, haul_core::BLOCK_BYTES)
    })
}

/// A staging file that cannot be read back as recorded: it is dropped, and the chunk read from
/// the source again next time, rather than failing the same way on every attempt.
#[derive(Debug)]
struct StageBroken(String);

impl std::fmt::Display for StageBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StageBroken {}

fn broken(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(StageBroken(format!("staged chunk is unreadable: {e:#}")))
}

fn check_prefix(hasher: &blake3::Hasher, prefix: &Prefix) -> anyhow::Result<()> {
    if hasher.finalize().as_bytes().as_slice() != prefix.digest.as_slice() {
        return Err(anyhow::Error::new(PrefixMismatch(format!(
            "the source gave other bytes for the first {} bytes of the chunk than the receiver holds (rows came back in another order); sending it from its start",
            prefix.bytes
        ))));
    }
    Ok(())
}

fn short_source(missing: u64) -> anyhow::Error {
    anyhow::Error::new(PrefixMismatch(format!(
        "the chunk is shorter than what the receiver holds ({missing} bytes missing); sending it from its start"
    )))
}

pub(crate) fn frame(f: pb::chunk_frame::Frame) -> pb::ChunkFrame {
    pb::ChunkFrame { frame: Some(f) }
}
