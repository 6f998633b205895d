//! Comparing a source with a target piece by piece, after a move: each piece (a chunk of a
//! table, a table cut by pages as a whole, a range of large objects) is read from both ends
//! with the same binary COPY and folded into row digests (`core::chunk_rows`), so a difference
//! is named down to its table, chunk and key range.
//!
//! Two callers share this. `haul verify --source --target` reads the target itself. A finished
//! job verified through its agents (`haul verify --coordinator`) runs here as a sender task: the
//! target side is read by the receiver beside it (`Receiver.DigestChunk`), so no process holds
//! both passwords and the coordinator holds none.
//!
//! The source is read now, not under the job's snapshot (it is gone): both databases should be
//! quiet, after the move and before writes resume. Each piece is read in its own transaction
//! on each side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use haul_core::chunk::{Column, Range};
use haul_core::chunk_rows;
use haul_core::ident::TableName;
use haul_core::large_object::{self, Metadata};
use haul_core::pg::DbUrl;
use haul_core::row_digest::{RowDigest, ShapeCache};
use haul_core::status::from_status;
use haul_proto as pb;

use crate::worker::{try_deliver, Shared};

/// One comparison to make: a table's rows in `range`, named by `id` (the job's chunk id, or a
/// number of the plan `haul verify` made).
#[derive(Debug, Clone)]
pub struct Piece {
    pub id: u64,
    pub table: TableName,
    pub columns: Vec<Column>,
    pub range: Range,
}

/// Where the target side of a piece is read.
#[tonic::async_trait]
pub trait TargetReader: Send {
    async fn digest(&mut self, piece: &Piece, meta: Metadata) -> anyhow::Result<RowDigest>;
}

/// The target database itself, on one connection (`haul verify` with both URLs).
pub struct LocalTarget {
    client: tokio_postgres::Client,
    shapes: Arc<ShapeCache>,
}

impl LocalTarget {
    pub async fn open(target: &DbUrl, shapes: Arc<ShapeCache>) -> anyhow::Result<Self> {
        Ok(LocalTarget {
            client: target.connect("haul-verify").await?,
            shapes,
        })
    }
}

#[tonic::async_trait]
impl TargetReader for LocalTarget {
    async fn digest(&mut self, p: &Piece, meta: Metadata) -> anyhow::Result<RowDigest> {
        chunk_rows::digest(
            &self.client,
            &self.shapes,
            &p.table,
            &p.columns,
            &p.range,
            meta,
        )
        .await
    }
}

/// The receiver beside the target, which reads it with its own credentials.
struct RemoteTarget {
    receiver: haul_proto::receiver_client::ReceiverClient<tonic::transport::Channel>,
    job_id: String,
}

#[tonic::async_trait]
impl TargetReader for RemoteTarget {
    async fn digest(&mut self, p: &Piece, meta: Metadata) -> anyhow::Result<RowDigest> {
        // Test point: the carrier of a verify run dies in the middle of it.
        haul_core::failpoint::die("die-in-verify");
        let reply = self
            .receiver
            .digest_chunk(pb::DigestChunkRequest {
                job_id: self.job_id.clone(),
                table: Some(p.table.to_wire()),
                columns: p.columns.iter().map(Column::to_wire).collect(),
                range: Some(p.range.to_wire()),
                large_object_owner: meta.owner,
                large_object_privileges: meta.privileges,
            })
            .await
            .map_err(|s| {
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) {
                    anyhow::Error::new(ReceiverAway(s.message().to_string()))
                } else {
                    from_status(s, "read it on the target")
                }
            })?
            .into_inner();
        RowDigest::from_bytes(reply.rows, &reply.row_digest)
    }
}

/// The receiver could not be reached (restarting, link down): nothing was learnt about the
/// target, so the run stops and is handed out again instead of reporting a difference.
#[derive(Debug)]
struct ReceiverAway(String);

impl std::fmt::Display for ReceiverAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the receiver is unreachable: {}", self.0)
    }
}

impl std::error::Error for ReceiverAway {}

/// Pieces compared so far and the table rows they held, for progress reports.
#[derive(Default)]
pub struct Progress {
    pub pieces: AtomicU64,
    pub rows: AtomicU64,
}

/// Compare `pieces`, `jobs` at a time, each on its own source connection and target reader.
/// Returns one line per piece that differs or could not be read on the target; an unreadable
/// source is an error (nothing can be said then).
pub async fn compare<F, Fut>(
    source: &DbUrl,
    pieces: Vec<Piece>,
    jobs: u32,
    meta: Metadata,
    open_target: F,
    progress: Arc<Progress>,
) -> anyhow::Result<Vec<String>>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Box<dyn TargetReader>>> + Send,
{
    let total = pieces.len();
    let queue = Arc::new(tokio::sync::Mutex::new(pieces));
    let shapes = Arc::new(ShapeCache::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs.max(1).min(total.max(1) as u32) {
        let (queue, source, shapes) = (queue.clone(), source.clone(), shapes.clone());
        let (open_target, progress) = (open_target.clone(), progress.clone());
        workers.spawn(async move {
            let s = source.connect("haul-verify").await?;
            let mut target = open_target().await?;
            let mut found = Vec::new();
            loop {
                let next = queue.lock().await.pop();
                let Some(p) = next else {
                    return anyhow::Ok(found);
                };
                let (a, b) = tokio::join!(
                    chunk_rows::digest(&s, &shapes, &p.table, &p.columns, &p.range, meta),
                    target.digest(&p, meta)
                );
                let a = a?;
                match b {
                    Ok(b) => {
                        if !large_object::is_large_objects(&p.table) {
                            progress.rows.fetch_add(a.rows, Ordering::Relaxed);
                        }
                        found.extend(chunk_rows::mismatch(&p.table, p.id, &p.range, &a, &b));
                    }
                    Err(e) if e.downcast_ref::<ReceiverAway>().is_some() => return Err(e),
                    Err(e) => found.push(format!("{} chunk {}: {e:#}", p.table, p.id)),
                }
                progress.pieces.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut differences = Vec::new();
    while let Some(r) = workers.join_next().await {
        differences.extend(r.map_err(|e| anyhow::anyhow!("verify worker ended: {e}"))??);
    }
    differences.sort();
    Ok(differences)
}

/// Compare `pieces` of a job (and with `task.sequences`, the source's sequences) between
/// the source, read here, and the target, read by the job's receiver. Returns what differs,
/// sorted, and the sequences compared.
pub async fn through_receiver(
    shared: &Arc<Shared>,
    task: &pb::VerifyTask,
    pieces: Vec<Piece>,
    progress: Arc<Progress>,
) -> anyhow::Result<(Vec<String>, u32)> {
    let meta = Metadata {
        owner: task.large_object_owner,
        privileges: task.large_object_privileges,
    };
    // One channel to the receiver for every piece (HTTP/2 multiplexes them).
    let receiver = shared.peers.receiver(&task.receiver_addr).await?;
    let job_id = task.job_id.clone();
    let open = move || {
        let (receiver, job_id) = (receiver.clone(), job_id.clone());
        async move { Ok(Box::new(RemoteTarget { receiver, job_id }) as Box<dyn TargetReader>) }
    };
    let source = &shared.config.source;
    let mut found = compare(source, pieces, task.jobs, meta, open, progress).await?;
    let mut sequences = 0;
    if task.sequences {
        let client = source.connect("haul-verify").await?;
        let values =
            crate::catalog::sequences(&client, &haul_core::ident::TableFilter::default()).await?;
        let mut receiver = shared.peers.receiver(&task.receiver_addr).await?;
        let there = receiver
            .read_sequences(pb::ReadSequencesRequest {
                sequences: values
                    .iter()
                    .map(|v| TableName::new(v.schema.clone(), v.name.clone()).to_wire())
                    .collect(),
            })
            .await
            .map_err(|s| from_status(s, "read sequences on the target"))?
            .into_inner()
            .values;
        found.extend(haul_core::sequence::differences(&values, &there));
        sequences = values.len() as u32;
    }
    found.sort();
    Ok((found, sequences))
}

/// The pieces of a verify task, from the wire.
pub fn pieces_of(task: &pb::VerifyTask) -> anyhow::Result<Vec<Piece>> {
    task.pieces
        .iter()
        .map(|p| {
            Ok(Piece {
                id: p.chunk_id,
                table: haul_core::chunk::table_from_wire(p.table.as_ref())?,
                columns: p
                    .columns
                    .iter()
                    .map(Column::from_wire)
                    .collect::<anyhow::Result<_>>()?,
                range: Range::from_wire(p.range.as_ref())?,
            })
        })
        .collect()
}

/// The verify task: a finished job compared again through this sender and the job's receiver.
/// Progress goes to the coordinator every two seconds, which also tells it the run is alive;
/// the result goes once at the end.
pub async fn run_task(shared: &Arc<Shared>, task: pb::VerifyTask) -> anyhow::Result<()> {
    let pieces = pieces_of(&task)?;
    let progress = Arc::new(Progress::default());
    let report =
        |finished: bool, mismatches: Vec<String>, error: String, sequences: u32| pb::VerifyReport {
            verify_id: task.verify_id.clone(),
            finished,
            pieces_done: progress.pieces.load(Ordering::Relaxed),
            rows: progress.rows.load(Ordering::Relaxed),
            mismatches,
            error,
            sequences,
        };
    let work = through_receiver(shared, &task, pieces, progress.clone());
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let mut c = shared.peers.coordinator();
                if let Err(s) = c.report_verify(report(false, Vec::new(), String::new(), 0)).await {
                    if s.code() == tonic::Code::NotFound {
                        // The coordinator restarted and forgot the run: nobody waits for it.
                        anyhow::bail!("verify run {}: {}", task.verify_id, s.message());
                    }
                }
            }
        }
    };
    let last = match outcome {
        Ok((mismatches, sequences)) => report(true, mismatches, String::new(), sequences),
        Err(e) => report(false, Vec::new(), format!("{e:#}"), 0),
    };
    try_deliver(|| {
        let mut c = shared.peers.coordinator();
        let last = last.clone();
        async move { c.report_verify(last).await.map(|_| ()) }
    })
    .await
    .map_err(|s| anyhow::anyhow!("report verify run {}: {}", task.verify_id, s.message()))
}
