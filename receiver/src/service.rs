//! The Receiver gRPC service. Senders are the only callers; every RPC checks the caller's
//! certificate role first.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use haul_certs::Role;
use haul_core::chunk::{table_from_wire, Column};
use haul_core::codec::{decode, Codec};
use haul_core::ident::TableName;
use haul_core::schema_script::Script;
use haul_core::status::to_status;
use haul_proto as pb;
use haul_proto::coordinator_client::CoordinatorClient;
use haul_proto::receiver_server::Receiver;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::partial::{self, Partials};
use crate::restore::{self, Applied, Restore};
use crate::spool::{self, Spool};
use crate::{ledger, pool::Pool, schema, undo, ReceiverConfig};
use haul_core::chunk_rows as readback;
use haul_core::row_digest::RowDigest;

/// Restores retried from the spool before the chunk is given up. A target that restarts, or a
/// coordinator that must be asked about the lease and is restarting, costs waiting, not a
/// re-send over the link: with the backoff below this is about a minute and a half.
const RESTORE_ATTEMPTS: u32 = 20;

fn restore_backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis((250u64 << attempt.min(5)).min(5_000))
}

pub struct Inner {
    pub config: ReceiverConfig,
    pub pool: Pool,
    pub spool: Spool,
    /// Partly received chunks and which stream owns each.
    pub partials: Partials,
    /// Whether the target user may set session_replication_role (superuser), so triggers and
    /// foreign keys stay quiet during the load even when the schema already existed.
    pub replica_role: bool,
    /// The coordinator, for fencing: asked whether a lease is current before each commit.
    pub fence: CoordinatorClient<Channel>,
    /// One finalize (or cleanup) of a job at a time: after a coordinator restart the job's
    /// finalize task is handed out again while the first run may still be applying post-data.
    /// The second waits here, then finds every step recorded and does nothing twice.
    pub finalizing:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Column shapes for row digests, from the target's catalog.
    pub shapes: haul_core::row_digest::ShapeCache,
    /// Jobs cancelled (and undone) since this process started: nothing more of them is taken.
    pub cancelled: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Tables read back whole during the copy, by (job, table): a split table once its last
    /// chunk is in, or a chunk that is its whole table. An entry is claimed before the read
    /// starts, so the two last chunks of one table committed at once start one read-back, not
    /// two; its value is the target's digest once read. Finalize takes a table's digest from
    /// here (waiting for a read still running) instead of reading the table again, so it need
    /// not wait for the last read-backs before post-data. Dropped at cleanup.
    pub whole_reads: std::sync::Mutex<std::collections::HashMap<(String, String), WholeRead>>,
    /// Each job's post-data for tables already loaded, applied while the copy goes on.
    pub early_post: crate::early_post::EarlyPost,
}

/// The target's digest of a table read back whole: `None` while the read runs, then its result
/// (an error as its message).
pub type WholeRead = tokio::sync::watch::Receiver<Option<Result<RowDigest, String>>>;
type WholeReadDone = tokio::sync::watch::Sender<Option<Result<RowDigest, String>>>;

impl Inner {
    /// Claim the read-back of a whole table; `None` when it is claimed already.
    fn claim_whole_read(&self, job_id: &str, table: &TableName) -> Option<WholeReadDone> {
        let mut reads = self.whole_reads.lock().ok()?;
        let key = (job_id.to_string(), table.to_string());
        if reads.contains_key(&key) {
            return None;
        }
        let (done, read) = tokio::sync::watch::channel(None);
        reads.insert(key, read);
        Some(done)
    }

    /// The digest of a table read back whole during the copy, waiting for a read still
    /// running; `None` when there was none, or it failed.
    async fn whole_read(&self, job_id: &str, table: &TableName) -> Option<RowDigest> {
        let key = (job_id.to_string(), table.to_string());
        let mut read = self.whole_reads.lock().ok()?.get(&key)?.clone();
        let got = read.wait_for(|v| v.is_some()).await.ok()?.clone();
        got?.ok()
    }

    /// Every chunk of `table` is in: its indexes and keys can be built now.
    pub(crate) fn table_loaded(&self, job_id: &str, table: &TableName) {
        if haul_core::large_object::is_large_objects(table)
            || self.refuse_cancelled(job_id).is_err()
        {
            return;
        }
        self.early_post.table_loaded(
            job_id,
            table,
            &self.config.target,
            self.spool.schema_path(job_id, "post"),
        );
    }

    fn forget_whole_reads(&self, job_id: &str) {
        if let Ok(mut reads) = self.whole_reads.lock() {
            reads.retain(|(job, _), _| job != job_id);
        }
    }

    fn job_lock(&self, job_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.finalizing.lock() {
            Ok(mut m) => m.entry(job_id.to_string()).or_default().clone(),
            // A poisoned map only loses the serialisation; each step is still idempotent.
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Refuse work of a job that was cancelled here: its undo ran, and anything taken now
    /// would be left behind.
    fn refuse_cancelled(&self, job_id: &str) -> anyhow::Result<()> {
        let cancelled = self
            .cancelled
            .lock()
            .map(|c| c.contains(job_id))
            .unwrap_or(false);
        if cancelled {
            return Err(haul_core::status::fatal(format!(
                "job {job_id} was cancelled; this receiver takes nothing more of it"
            )));
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct ReceiverService {
    pub inner: Arc<Inner>,
}

#[tonic::async_trait]
impl Receiver for ReceiverService {
    async fn put_schema(
        &self,
        req: Request<Streaming<pb::SchemaPart>>,
    ) -> Result<Response<pb::SchemaReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.put_schema_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn begin_chunk(
        &self,
        req: Request<pb::BeginChunkRequest>,
    ) -> Result<Response<pb::BeginChunkReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.begin_chunk_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn push_chunk(
        &self,
        req: Request<Streaming<pb::ChunkFrame>>,
    ) -> Result<Response<pb::ChunkReceipt>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.push_chunk_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn finalize(
        &self,
        req: Request<pb::FinalizeRequest>,
    ) -> Result<Response<pb::FinalizeReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.finalize_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.cleanup_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn digest_chunk(
        &self,
        req: Request<pb::DigestChunkRequest>,
    ) -> Result<Response<pb::DigestChunkReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        let r = req.into_inner();
        let piece = async {
            let table = table_from_wire(r.table.as_ref())?;
            let columns: Vec<Column> = r
                .columns
                .iter()
                .map(Column::from_wire)
                .collect::<anyhow::Result<_>>()?;
            let range = haul_core::chunk::Range::from_wire(r.range.as_ref())?;
            anyhow::Ok((table, columns, range))
        };
        let (table, columns, range) = piece
            .await
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let meta = haul_core::large_object::Metadata {
            owner: r.large_object_owner,
            privileges: r.large_object_privileges,
        };
        let d = self
            .read_back(&table, &columns, &range, meta)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DigestChunkReply {
            rows: d.rows,
            row_digest: d.to_bytes(),
        }))
    }

    async fn read_sequences(
        &self,
        req: Request<pb::ReadSequencesRequest>,
    ) -> Result<Response<pb::ReadSequencesReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        let names: Vec<TableName> = req
            .into_inner()
            .sequences
            .iter()
            .map(TableName::from)
            .collect();
        let client = self.inner.pool.get().await.map_err(to_status)?;
        let values = haul_core::sequence::values(&client, &names)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReadSequencesReply { values }))
    }

    async fn target_columns(
        &self,
        req: Request<pb::TargetColumnsRequest>,
    ) -> Result<Response<pb::TargetColumnsReply>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        let client = self.inner.pool.get().await.map_err(to_status)?;
        let mut tables = Vec::new();
        for t in &req.get_ref().tables {
            let name = TableName::from(t);
            let cols = client
                .query_opt(
                    "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute \
                     WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped \
                       AND attgenerated = ''",
                    &[&name.quoted()],
                )
                .await
                .map_err(|e| {
                    Status::unavailable(format!("read the target's columns of {name}: {e}"))
                })?
                .and_then(|r| r.get::<_, Option<Vec<String>>>(0));
            if let Some(cols) = cols {
                tables.push(pb::PlannedTable {
                    table: Some(t.clone()),
                    columns: cols
                        .into_iter()
                        .map(|name| pb::Column {
                            name,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(pb::TargetColumnsReply { tables }))
    }

    async fn set_sequences(
        &self,
        req: Request<pb::SetSequencesRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        let r = req.into_inner();
        let work = async {
            self.inner.refuse_cancelled(&r.job_id)?;
            let client = self.inner.pool.get().await?;
            let names: Vec<(String, String)> = r
                .sequences
                .iter()
                .map(|s| (s.schema.clone(), s.name.clone()))
                .collect();
            undo::record_sequences(&client, &r.job_id, &names).await?;
            schema::set_sequences(&client, &r.sequences).await
        };
        work.await.map_err(to_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn apply_changes(
        &self,
        req: Request<Streaming<pb::ChangeFrame>>,
    ) -> Result<Response<pb::ChangeReceipt>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        self.apply_changes_inner(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}

impl ReceiverService {
    /// A batch of followed source transactions: applied in one target transaction, once.
    async fn apply_changes_inner(
        &self,
        mut frames: Streaming<pb::ChangeFrame>,
    ) -> anyhow::Result<pb::ChangeReceipt> {
        let first = frames
            .next()
            .await
            .context("change batch ended before its header")?
            .map_err(|s| anyhow::anyhow!("receive change batch: {}", s.message()))?;
        let Some(pb::change_frame::Frame::Header(header)) = first.frame else {
            anyhow::bail!("a change batch must start with its header");
        };
        self.inner.refuse_cancelled(&header.job_id)?;
        let client = self.inner.pool.get().await?;
        let frames =
            frames.map(|f| f.map_err(|s| anyhow::anyhow!("receive change batch: {}", s.message())));
        let done = crate::follow::apply_batch(&client, &header.job_id, frames).await?;
        tracing::debug!(
            job = %header.job_id,
            position = %done.position,
            applied = done.applied,
            skipped = done.skipped,
            "change batch applied"
        );
        Ok(pb::ChangeReceipt {
            position: done.position.0,
            applied: done.applied,
            skipped: done.skipped,
            statements: done.statements,
        })
    }

    async fn put_schema_inner(
        &self,
        mut parts: Streaming<pb::SchemaPart>,
    ) -> anyhow::Result<pb::SchemaReply> {
        let first = parts
            .next()
            .await
            .context("schema stream ended before its first part")?
            .map_err(|s| anyhow::anyhow!("receive schema: {}", s.message()))?;
        let section =
            pb::SchemaSection::try_from(first.section).unwrap_or(pb::SchemaSection::SectionPre);
        let name = if section == pb::SchemaSection::SectionPre {
            "pre"
        } else {
            "post"
        };
        let began = std::time::Instant::now();
        let path = self.inner.spool.schema_path(&first.job_id, name);
        let mut file = self.inner.spool.create(&path).await?;
        file.write_all(&first.sql)
            .await
            .context("write schema spool")?;
        let mut complete = first.last;
        while let Some(part) = parts.next().await {
            let part = part.map_err(|s| anyhow::anyhow!("receive schema: {}", s.message()))?;
            file.write_all(&part.sql)
                .await
                .context("write schema spool")?;
            complete |= part.last;
        }
        file.flush().await.context("flush schema spool")?;
        drop(file);
        if !complete {
            self.inner.spool.remove(&path).await;
            anyhow::bail!("schema upload ended before it was complete; nothing was applied");
        }
        if section == pb::SchemaSection::SectionPost {
            // Only stored: it is applied at finalize, and how to undo it is written down then,
            // before any of it is applied. Nothing is written to the target here, because this
            // upload runs beside pre-data's, and may end before pre-data's preflight has looked
            // at the target (or refused it) and made the ledger.
            let text = tokio::fs::read_to_string(&path)
                .await
                .context("read post-data spool")?;
            return Ok(pb::SchemaReply {
                objects: Script::parse(&text)
                    .without_publication(&haul_core::ident::follow_names(&first.job_id).1)
                    .entries
                    .len() as u32,
            });
        }

        let tables: Vec<TableName> = first.tables.iter().map(TableName::from).collect();
        // Never at the same time as a cancel's undo of the job.
        let lock = self.inner.job_lock(&first.job_id);
        let _one_at_a_time = lock.lock().await;
        self.inner.refuse_cancelled(&first.job_id)?;
        // Test point: post-data's upload (run beside this one) ends first.
        haul_core::failpoint::stall("stall-before-preflight").await;
        let client = self.inner.config.target.connect("haul-schema").await?;
        if ledger::exists(&client).await? {
            // Tables a ledger of an older haul lacks are added first (no rows are written).
            ledger::ensure(&client).await?;
            // Planned before, by a sender that died after the schema went in: skip ahead.
            if let Some(objects) = ledger::schema_applied(&client, &first.job_id).await? {
                tracing::info!(job = %first.job_id, objects, "pre-data was applied before; not again");
                return Ok(pb::SchemaReply { objects });
            }
            // Another job's ledger: its rows are not this job's work, and its tables may hold
            // its rows. Refused before anything is written.
            if let Some((other, chunks, last)) = ledger::other_job(&client, &first.job_id).await? {
                return Err(haul_core::status::fatal(format!(
                    "target holds the ledger of another haul job, {other} ({chunks} chunks applied, last {last}); \
                     if that job is over, empty the target (its tables and DROP SCHEMA haul CASCADE), \
                     or continue it with the coordinator that started it (haul status --job {other})"
                )));
            }
        }
        // Everything the target must be or offer, checked before anything is written to it.
        schema::preflight(&client, &tables, first.create_schema).await?;
        if first.large_objects {
            schema::preflight_large_objects(&client).await?;
        }
        let mut create_roles = Vec::new();
        if first.create_schema {
            schema::preflight_extensions(&client, &first.extensions).await?;
            create_roles =
                schema::preflight_roles(&client, &first.roles, first.create_roles).await?;
        }
        ledger::ensure(&client).await?;
        // What the job will write, and how to undo it (`haul cancel`), before it is written.
        undo::record_preflight(
            &client,
            &first.job_id,
            &tables,
            first.create_schema,
            first.large_objects,
        )
        .await?;
        if !first.create_schema {
            return Ok(pb::SchemaReply { objects: 0 });
        }
        let text = tokio::fs::read_to_string(&path)
            .await
            .context("read pre-data spool")?;
        let script = Script::parse(&text)
            .without_publication(&haul_core::ident::follow_names(&first.job_id).1);
        let role_names: Vec<String> = create_roles.iter().map(|r| r.name.clone()).collect();
        undo::record_pre_data(&client, &first.job_id, &script, &role_names).await?;
        let create_roles: Vec<String> = create_roles.into_iter().map(|r| r.create_sql).collect();
        tracing::info!(
            job = %first.job_id,
            bytes = text.len(),
            secs = began.elapsed().as_secs_f64(),
            "pre-data received and checked"
        );
        // Test point: the pre-data script has arrived and is about to be applied.
        haul_core::failpoint::die("die-before-pre-data");
        let applying = std::time::Instant::now();
        let objects = schema::apply_pre(&client, &script, &first.job_id, &create_roles).await?;
        tracing::info!(
            job = %first.job_id,
            objects,
            secs = applying.elapsed().as_secs_f64(),
            "applied pre-data"
        );
        Ok(pb::SchemaReply { objects })
    }

    async fn begin_chunk_inner(
        &self,
        r: pb::BeginChunkRequest,
    ) -> anyhow::Result<pb::BeginChunkReply> {
        self.inner.refuse_cancelled(&r.job_id)?;
        let partials = &self.inner.partials;
        // The ledger answer only saves bytes; the ledger claim at restore is what keeps a
        // chunk applied once. A target that is away (restarting) does not stop the bytes from
        // crossing meanwhile: the restore waits for it, from the spool.
        let applied = match self.inner.pool.get().await {
            Ok(client) => ledger::applied(&client, &r.job_id, r.chunk_id).await,
            Err(e) => Err(e),
        };
        let applied = applied.unwrap_or_else(|e| {
            tracing::debug!(chunk = r.chunk_id, "ledger not readable now: {e:#}");
            None
        });
        if let Some((rows, snapshot_id)) = applied {
            // Applied, perhaps just before a crash that left its spool behind.
            if let Ok(_claim) = partials.claim(&r.job_id, r.chunk_id, r.epoch).await {
                self.inner
                    .spool
                    .remove(&self.inner.spool.chunk_path(&r.job_id, r.chunk_id))
                    .await;
                partials.forget(&r.job_id, r.chunk_id);
            }
            return Ok(pb::BeginChunkReply {
                already_applied: true,
                rows,
                snapshot_id,
                ..Default::default()
            });
        }
        let Some(record) = partials.record(&r.job_id, r.chunk_id) else {
            return Ok(pb::BeginChunkReply::default());
        };
        // Stop any stream of an older lease first, so the offset offered is the final one.
        let mut claim = partials.claim(&r.job_id, r.chunk_id, r.epoch).await?;
        let codec = Codec::from_wire(record.codec, 0)?;
        let path = self.inner.spool.chunk_path(&r.job_id, r.chunk_id);
        let scan = partial::scan(&path, codec).await?;
        let reply = pb::BeginChunkReply {
            resume_from: scan.offset,
            resume_snapshot_id: record.snapshot_id.clone(),
            resume_codec: record.codec,
            resume_digest: scan.hasher.finalize().as_bytes().to_vec(),
            ..Default::default()
        };
        *claim.scan = Some(scan);
        partials.flush().await?;
        Ok(reply)
    }

    async fn push_chunk_inner(
        &self,
        mut frames: Streaming<pb::ChunkFrame>,
    ) -> anyhow::Result<pb::ChunkReceipt> {
        let header = match frames.next().await {
            Some(Ok(pb::ChunkFrame {
                frame: Some(pb::chunk_frame::Frame::Header(h)),
            })) => h,
            Some(Err(s)) => anyhow::bail!("receive chunk header: {}", s.message()),
            _ => anyhow::bail!("chunk stream did not start with a header"),
        };
        if !header.members.is_empty() {
            return self.push_group(header, frames).await;
        }
        let table = table_from_wire(header.table.as_ref())?;
        let columns: Vec<Column> = header
            .columns
            .iter()
            .map(Column::from_wire)
            .collect::<anyhow::Result<_>>()?;
        let codec = Codec::from_wire(header.codec, 0)?;
        let (job_id, chunk_id) = (header.job_id.as_str(), header.chunk_id);
        let partials = &self.inner.partials;
        let path = self.inner.spool.chunk_path(job_id, chunk_id);
        let mut claim = partials.claim(job_id, chunk_id, header.epoch).await?;
        let stop = claim.stop.clone();
        let _hold = self.inner.spool.hold();

        let (file, hasher, mut record) = if header.resume_from > 0 {
            // The same snapshot is what matters; the codec may differ from the first
            // stream's (`--codec auto` chooses per block, and every spooled frame names its
            // own), so the spool is read with the codec its record names for frames that
            // do not.
            let record = partials
                .record(job_id, chunk_id)
                .filter(|r| r.snapshot_id == header.snapshot_id);
            let scan = match (claim.scan.take(), &record) {
                (Some(s), _) if s.offset == header.resume_from => Some(s),
                (_, Some(r)) => Some(partial::scan(&path, Codec::from_wire(r.codec, 0)?).await?),
                _ => None,
            };
            match (record, scan) {
                (Some(record), Some(scan))
                    if scan.offset == header.resume_from
                        && scan.hasher.finalize().as_bytes().as_slice()
                            == header.prefix_digest.as_slice() =>
                {
                    let file = self.inner.spool.append(&path, scan.file_len).await?;
                    (file, scan.hasher, record)
                }
                _ => anyhow::bail!(
                    "chunk {chunk_id}: the receiver no longer holds its first {} bytes as the sender read them; the chunk will be sent again from its start",
                    header.resume_from
                ),
            }
        } else {
            // From the start, under whatever snapshot the lease names: what an earlier stream
            // left is replaced, and counted as sent twice as it arrives again.
            let earlier = partials.record(job_id, chunk_id);
            let record = partial::Record {
                snapshot_id: header.snapshot_id.clone(),
                codec: header.codec,
                high_water: earlier.as_ref().map_or(0, |r| r.high_water),
                resent: earlier.as_ref().map_or(0, |r| r.resent),
            };
            let file = self.inner.spool.create(&path).await?;
            partials.put(job_id, chunk_id, &record)?;
            partials.flush().await?;
            (file, blake3::Hasher::new(), record)
        };
        if header.resume_from > 0 {
            tracing::info!(
                chunk = chunk_id,
                %table,
                from = header.resume_from,
                "resuming chunk at the receiver's offset"
            );
        }

        let mut r = Restore {
            job_id,
            chunk_id,
            epoch: header.epoch,
            table: &table,
            columns: &columns,
            codec,
            digest: &[],
            raw_bytes: 0,
            spool: &path,
            replica_role: self.inner.replica_role,
            snapshot_id: &header.snapshot_id,
            fence: Some(self.inner.fence.clone()),
            row_digest: None,
        };
        // From its start, a chunk of rows is loaded while it arrives, when a target connection
        // is free for it; otherwise (and on any failure) it is restored from the spool.
        let mut live = None;
        if header.resume_from == 0 && !haul_core::large_object::is_large_objects(&table) {
            // A target that is down now is no reason to refuse the bytes: they are spooled.
            let opened = match self.inner.pool.try_get().await {
                Ok(Some(client)) => restore::Live::begin(client, &r).await,
                other => other.map(|_| None),
            };
            match opened {
                Ok(l) => live = l,
                Err(e) => tracing::info!(
                    job = %job_id, chunk = chunk_id, %table, agent = %self.inner.config.name,
                    "cannot load the chunk while it arrives; it is restored from the spool: {e:#}"
                ),
            }
        }
        let received = self
            .receive(
                &mut frames,
                codec,
                &path,
                file,
                hasher,
                header.resume_from,
                (job_id, chunk_id, &mut record),
                &stop,
                &mut live,
            )
            .await;
        let (raw_bytes, digest, source_rows, _, held) = match received {
            Ok(v) => v,
            Err(e) => {
                if let Some(l) = live.take() {
                    l.abandon().await;
                }
                // Complete frames stay for the next stream, unless space must be freed or the
                // bytes disagree with the sender's digest.
                if haul_core::status::exhausted_message(&e).is_some()
                    || e.downcast_ref::<DigestMismatch>().is_some()
                {
                    self.inner.spool.remove(&path).await;
                    partials.forget(job_id, chunk_id);
                }
                return Err(e);
            }
        };

        let applying = std::time::Instant::now();
        r.digest = &digest;
        r.raw_bytes = raw_bytes;
        r.row_digest = source_rows;
        if haul_core::failpoint::fire("corrupt-spool") {
            // Test point: the spool changes on disk, and the chunk is restored from it.
            spool::flip_a_byte(&path).await;
            if let Some(l) = live.take() {
                l.abandon().await;
            }
        }
        let mut committed = None;
        if let Some(l) = live.take() {
            match l.commit(&r).await {
                Ok(a) => committed = Some(a),
                Err(e) => tracing::warn!(
                    job = %job_id, chunk = chunk_id, %table, agent = %self.inner.config.name,
                    "loading the chunk while it arrived failed; it is restored from the spool: {e:#}"
                ),
            }
        }
        // A target hiccup is retried from the spool, never by asking for the bytes again.
        let restored = match committed {
            Some(a) => Ok(a),
            None => {
                let what = table.to_string();
                self.retry_from_spool(job_id, &what, chunk_id, &stop, |c| restore::apply(c, &r))
                    .await
            }
        };
        let applied = match restored {
            Ok(a) => a,
            // The lease moved on: the spool, complete and verified, is kept for the chunk's
            // next stream, which then has nothing left to send.
            Err(Unrestored::LeaseLost(e)) | Err(Unrestored::Stopped(e)) => return Err(e),
            Err(Unrestored::Hopeless(e)) => {
                // Retrying from this spool cannot help: drop it.
                self.inner.spool.remove(&path).await;
                partials.forget(job_id, chunk_id);
                return Err(e);
            }
        };
        self.inner.spool.remove(&path).await;
        partials.forget(job_id, chunk_id);
        drop(claim);
        let mut receipt = match applied {
            Applied::Now { rows } => pb::ChunkReceipt {
                rows,
                already_applied: false,
                snapshot_id: header.snapshot_id.clone(),
                resumed_bytes: header.resume_from,
                resent_bytes: record.resent,
                ..Default::default()
            },
            Applied::Before { rows, snapshot_id } => pb::ChunkReceipt {
                rows,
                already_applied: true,
                snapshot_id,
                resumed_bytes: header.resume_from,
                resent_bytes: record.resent,
                ..Default::default()
            },
        };
        // Verify along the way: the rows as the target now holds them, against the sender's.
        let range = haul_core::chunk::Range::from_wire(header.range.as_ref())?;
        if !receipt.already_applied
            && !haul_core::large_object::is_large_objects(&table)
            && haul_core::failpoint::fire("alter-after-commit")
        {
            // Test point: something else on the target changes a committed chunk (a trigger, a
            // user): one of its rows disappears before verification reads it back.
            // A page range selects other rows on the target: any row of the table will do.
            let pred = match &range {
                haul_core::chunk::Range::Pages { .. } => None,
                r => r.predicate(),
            }
            .map(|p| format!(" WHERE {p}"))
            .unwrap_or_default();
            let client = self.inner.pool.get().await?;
            client
                .batch_execute(&format!(
                    "DELETE FROM ONLY {t} WHERE ctid = (SELECT ctid FROM ONLY {t}{pred} LIMIT 1)",
                    t = table.quoted()
                ))
                .await
                .context("failpoint alter-after-commit")?;
        }
        // Along the way: a chunk that is its whole table, and large objects (found by oid
        // through the catalog's index). A key range of a split table is not read back here:
        // the target has no index yet (post-data comes last), so each would scan the whole
        // table; such tables are digested whole once, at the end, against the sum of their
        // chunks, and only a table that differs is read chunk by chunk to name the chunks.
        let whole = matches!(range, haul_core::chunk::Range::Whole);
        let along = whole || haul_core::large_object::is_large_objects(&table);
        if let (true, Some(source)) = (
            header.verify && along && readback::can_read_back(&range),
            source_rows,
        ) {
            let meta = haul_core::large_object::Metadata {
                owner: header.large_object_owner,
                privileges: header.large_object_privileges,
            };
            // Read back after the receipt, not before it: the sender's slot goes on to its next
            // chunk meanwhile. The result goes to the coordinator directly.
            receipt.check_pending = true;
            // A chunk that is its whole table: finalize may use this read instead of its own.
            let done = if matches!(range, haul_core::chunk::Range::Whole)
                && !haul_core::large_object::is_large_objects(&table)
            {
                self.inner.claim_whole_read(job_id, &table)
            } else {
                None
            };
            let (svc, job_id) = (self.clone(), job_id.to_string());
            let (table, columns) = (table.clone(), columns.clone());
            tokio::spawn(async move {
                svc.check_chunk(job_id, chunk_id, table, columns, range, meta, source, done)
                    .await
            });
        }
        // A table in one chunk: only one big enough for its index builds to weigh. Small
        // tables' entries go at finalize, many to a commit, on parallel sessions.
        if whole && raw_bytes >= crate::early_post::MIN_TABLE_BYTES {
            self.inner.table_loaded(job_id, &table);
        }
        // A chunk of a split table: once the ledger holds all of the table's chunks, the table
        // is read back whole now, while the rest of the job copies, instead of at finalize.
        if !header.verify && header.table_chunks > 1 {
            match self
                .table_chunks_in(job_id, &table, header.table_chunks)
                .await
            {
                Ok(true) => self.inner.table_loaded(job_id, &table),
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(job = %job_id, %table, "cannot tell whether the table is loaded: {e:#}")
                }
            }
        }
        if header.verify && !along && header.table_chunks > 1 {
            match self
                .split_table_complete(job_id, &table, header.table_chunks)
                .await
            {
                Ok(Some((ids, source))) => {
                    self.inner.table_loaded(job_id, &table);
                    if let Some(done) = self.inner.claim_whole_read(job_id, &table) {
                        receipt.check_pending = true;
                        let (svc, job_id) = (self.clone(), job_id.to_string());
                        tokio::spawn(async move {
                            svc.check_split_table(
                                job_id, chunk_id, ids, table, columns, source, done,
                            )
                            .await
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(
                    job = %job_id, chunk = chunk_id, %table,
                    "cannot tell whether the table is complete; it is compared at the end: {e:#}"
                ),
            }
        }
        receipt.apply_ms = applying.elapsed().as_millis() as u64;
        receipt.held_ms = held.as_millis() as u64;
        Ok(receipt)
    }

    /// When the target's ledger holds all `count` chunks of a split table, each with the
    /// sender's row digest: their ids and the sum of those digests (`None`: not yet, or a
    /// chunk without one). The count comes first and is cheap (an index on job and table), so
    /// the chunks before the last cost one small query each.
    async fn split_table_complete(
        &self,
        job_id: &str,
        table: &TableName,
        count: u64,
    ) -> anyhow::Result<Option<(Vec<u64>, RowDigest)>> {
        if !self.table_chunks_in(job_id, table, count).await? {
            return Ok(None);
        }
        let name = table.to_string();
        let client = self.inner.pool.get().await?;
        let rows = client
            .query(
                "SELECT chunk_id, rows, row_digest FROM haul.ledger \
                 WHERE job_id = $1 AND table_name = $2",
                &[&job_id, &name],
            )
            .await
            .context("read the table's chunks from the ledger")?;
        let (mut ids, mut sum) = (Vec::with_capacity(rows.len()), RowDigest::default());
        for row in rows {
            let (id, n, d): (i64, i64, Option<Vec<u8>>) = (row.get(0), row.get(1), row.get(2));
            let Some(d) = d.filter(|d| !d.is_empty()) else {
                return Ok(None);
            };
            sum.combine(&RowDigest::from_bytes(n.max(0) as u64, &d)?);
            ids.push(id as u64);
        }
        Ok(Some((ids, sum)))
    }

    /// Whether the target's ledger holds all `count` chunks of `table` (an index on job and
    /// table makes this cheap).
    async fn table_chunks_in(
        &self,
        job_id: &str,
        table: &TableName,
        count: u64,
    ) -> anyhow::Result<bool> {
        let name = table.to_string();
        let client = self.inner.pool.get().await?;
        let have: i64 = client
            .query_one(
                "SELECT count(*) FROM haul.ledger WHERE job_id = $1 AND table_name = $2",
                &[&job_id, &name],
            )
            .await
            .context("count the table's chunks in the ledger")?
            .get(0);
        Ok(have.max(0) as u64 >= count)
    }

    /// Read a split table back whole and compare it with the sum of its chunks' digests. Equal:
    /// every chunk of it is reported compared. Different or unreadable: reported not compared,
    /// so finalize reads it again and names the chunks that differ. `last` (the chunk whose
    /// receipt said the check is pending) is reported last.
    #[allow(clippy::too_many_arguments)]
    async fn check_split_table(
        self,
        job_id: String,
        last: u64,
        chunk_ids: Vec<u64>,
        table: TableName,
        columns: Vec<Column>,
        source: RowDigest,
        done: WholeReadDone,
    ) {
        // Test point: the read-back is still running when finalize starts.
        haul_core::failpoint::stall("stall-in-split-check").await;
        let began = std::time::Instant::now();
        let meta = haul_core::large_object::Metadata::default();
        let got = self
            .digest_whole(&[(table.clone(), columns)], meta, SPLIT_CHECK_PARALLEL)
            .await
            .pop();
        done.send_replace(Some(match &got {
            Some(Ok(d)) => Ok(*d),
            Some(Err(e)) => Err(format!("{e:#}")),
            None => Err("not read".to_string()),
        }));
        let equal = match got {
            Some(Ok(target)) if target == source => {
                tracing::info!(job = %job_id, %table, chunks = chunk_ids.len(), rows = target.rows,
                    secs = began.elapsed().as_secs_f32(), "split table read back whole: equal");
                true
            }
            Some(Ok(target)) => {
                tracing::warn!(job = %job_id, %table, source_rows = source.rows, target_rows = target.rows,
                    "split table read back whole differs; finalize names the chunks");
                false
            }
            Some(Err(e)) => {
                tracing::warn!(job = %job_id, %table, "failed to read the split table back (finalize compares it): {e:#}");
                false
            }
            None => false,
        };
        let mut ids: Vec<u64> = chunk_ids.into_iter().filter(|&i| i != last).collect();
        ids.push(last);
        for chunk_id in ids {
            self.report_check_result(pb::CheckReport {
                job_id: job_id.clone(),
                chunk_id,
                checked: equal,
                mismatch: String::new(),
            })
            .await;
        }
    }

    /// Read a committed chunk back, compare it with the sender's row digest, and tell the
    /// coordinator (retrying for a while: a report lost is a check the job waits for).
    #[allow(clippy::too_many_arguments)]
    async fn check_chunk(
        self,
        job_id: String,
        chunk_id: u64,
        table: TableName,
        columns: Vec<Column>,
        range: haul_core::chunk::Range,
        meta: haul_core::large_object::Metadata,
        source: RowDigest,
        done: Option<WholeReadDone>,
    ) {
        let got = self.read_back(&table, &columns, &range, meta).await;
        let kept = done.is_some();
        if let Some(done) = done {
            done.send_replace(Some(match &got {
                Ok(d) => Ok(*d),
                Err(e) => Err(format!("{e:#}")),
            }));
        }
        let (job, name) = (job_id.clone(), table.to_string());
        let report = match got {
            Ok(target) => {
                let mismatch = readback::mismatch(&table, chunk_id, &range, &source, &target)
                    .unwrap_or_default();
                if !mismatch.is_empty() {
                    tracing::error!(job = %job_id, chunk = chunk_id, "verification found a difference: {mismatch}");
                }
                pb::CheckReport {
                    job_id,
                    chunk_id,
                    checked: true,
                    mismatch,
                }
            }
            // The chunk is applied; a read-back that fails leaves it to the final check.
            Err(e) => {
                tracing::warn!(job = %job_id, chunk = chunk_id, "failed to read chunk back for verification (the final check covers its table): {e:#}");
                pb::CheckReport {
                    job_id,
                    chunk_id,
                    checked: false,
                    mismatch: String::new(),
                }
            }
        };
        self.report_check_result(report).await;
        // Once reported, a small table's read is only needed by a finalize handed out before
        // the report arrived, which reads the table itself if it is gone: a job of 10,000
        // tables does not keep 10,000 entries (split tables keep theirs until cleanup).
        if kept {
            if let Ok(mut reads) = self.inner.whole_reads.lock() {
                reads.remove(&(job, name));
            }
        }
    }

    /// Tell the coordinator a chunk's check result, retrying for a while: a report lost is a
    /// check the job waits for.
    async fn report_check_result(&self, report: pb::CheckReport) {
        let mut wait = std::time::Duration::from_millis(200);
        for _ in 0..10 {
            let mut fence = self.inner.fence.clone();
            match fence.report_check(report.clone()).await {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::NotFound => return,
                Err(s) => {
                    tracing::debug!("failed to report a chunk check: {}", s.message());
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
        tracing::warn!(job = %report.job_id, chunk = report.chunk_id, "failed to report a chunk check to the coordinator; its table is compared whole at the end");
    }

    async fn read_back(
        &self,
        table: &TableName,
        columns: &[Column],
        range: &haul_core::chunk::Range,
        meta: haul_core::large_object::Metadata,
    ) -> anyhow::Result<RowDigest> {
        let client = self.inner.pool.get().await?;
        let out = readback::digest(&client, &self.inner.shapes, table, columns, range, meta).await;
        if out.is_err() {
            client.discard();
        }
        out
    }

    /// Spool the blocks after `offset` and check the trailer's digest over the whole chunk.
    /// Every complete frame is handed to the OS as it arrives, so a stream cut at any point
    /// leaves a spool the next stream can continue. Returns raw bytes and digest.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn receive(
        &self,
        frames: &mut Streaming<pb::ChunkFrame>,
        codec: Codec,
        path: &std::path::Path,
        mut file: tokio::io::BufWriter<tokio::fs::File>,
        mut hasher: blake3::Hasher,
        offset: u64,
        (job_id, chunk_id, record): (&str, u64, &mut partial::Record),
        stop: &CancellationToken,
        live: &mut Option<restore::Live>,
    ) -> anyhow::Result<Received> {
        let (mut raw_bytes, mut blocks) = (offset, 0u64);
        // Time this side held the stream back (spool room, the live load), not the link.
        let mut held = std::time::Duration::ZERO;
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => {
                    file.flush().await.map_err(|e| spool::write_error(e, path))?;
                    return Err(partial_stopped(chunk_id));
                }
                f = frames.next() => f,
            };
            let Some(frame) = frame else {
                file.flush()
                    .await
                    .map_err(|e| spool::write_error(e, path))?;
                anyhow::bail!("chunk stream ended before its trailer; what arrived is kept");
            };
            let frame = match frame {
                Ok(f) => f,
                Err(s) => {
                    file.flush()
                        .await
                        .map_err(|e| spool::write_error(e, path))?;
                    anyhow::bail!("receive chunk: {}", s.message());
                }
            };
            match frame.frame {
                Some(pb::chunk_frame::Frame::Block(b)) => {
                    let raw_len = b.raw_len as usize;
                    let block_codec = match b.codec {
                        Some(c) => Codec::from_wire(c, 0)?,
                        None => codec,
                    };
                    let payload = b.payload;
                    let (raw, payload) = tokio::task::spawn_blocking(move || {
                        decode(block_codec, &payload, raw_len).map(|raw| (raw, payload))
                    })
                    .await
                    .context("decode task")??;
                    hasher.update(&raw);
                    let partials = &self.inner.partials;
                    let frame = (block_codec, raw_len as u32, payload.as_slice());
                    let holding = std::time::Instant::now();
                    self.inner
                        .spool
                        .write_frame_in_room(&mut file, path, frame, partials)
                        .await?;
                    let end = raw_bytes + raw.len() as u64;
                    if let Some(l) = live.as_mut() {
                        let sent = l.send(bytes::Bytes::from(raw)).await;
                        if let Err(e) = sent {
                            tracing::warn!(
                                job = %job_id,
                                chunk = chunk_id,
                                table = %l.table(),
                                agent = %self.inner.config.name,
                                "loading the chunk while it arrives failed; it is restored from the spool once complete: {e:#}"
                            );
                            if let Some(l) = live.take() {
                                l.abandon().await;
                            }
                        }
                    }
                    // Bytes below the high-water mark arrived once before.
                    record.resent += end.min(record.high_water).saturating_sub(raw_bytes);
                    record.high_water = record.high_water.max(end);
                    held += holding.elapsed();
                    self.inner.partials.put(job_id, chunk_id, record)?;
                    raw_bytes = end;
                    blocks += 1;
                }
                Some(pb::chunk_frame::Frame::Trailer(t)) => {
                    file.flush()
                        .await
                        .map_err(|e| spool::write_error(e, path))?;
                    let digest = hasher.finalize();
                    if digest.as_bytes().as_slice() != t.digest.as_slice()
                        || t.raw_bytes != raw_bytes
                        || t.blocks != blocks
                    {
                        return Err(anyhow::Error::new(DigestMismatch(format!(
                            "chunk digest mismatch: received {raw_bytes} bytes ({blocks} blocks in this stream), sender sent {} in {}; discarded",
                            t.raw_bytes, t.blocks
                        ))));
                    }
                    let rows = (t.row_digest.len() == haul_core::row_digest::DIGEST_BYTES)
                        .then(|| RowDigest::from_bytes(t.rows, &t.row_digest).ok())
                        .flatten();
                    return Ok((raw_bytes, t.digest, rows, t.members, held));
                }
                _ => anyhow::bail!("unexpected frame in chunk stream"),
            }
        }
    }

    async fn finalize_inner(&self, req: pb::FinalizeRequest) -> anyhow::Result<pb::FinalizeReply> {
        let lock = self.inner.job_lock(&req.job_id);
        let _one_at_a_time = lock.lock().await;
        self.inner.refuse_cancelled(&req.job_id)?;
        let target = &self.inner.config.target;
        let job = req.job_id.as_str();
        // Post-data applied while the copy went on stops here: what it did not get to is
        // applied below, and nothing of it runs beside finalize.
        let early = self.inner.early_post.stop(job).await;
        if early > 0 {
            tracing::info!(
                job,
                entries = early,
                "post-data entries applied during the copy, as their tables were loaded"
            );
        }
        let client = target.connect("haul-finalize").await?;
        schema::wait_for_earlier_post_data(&client, job).await?;
        let done = ledger::steps_applied(&client, job).await?;
        let began = std::time::Instant::now();
        let post_path = self.inner.spool.schema_path(job, "post");
        let post_objects = match tokio::fs::read_to_string(&post_path).await {
            Ok(text) => {
                let script = schema::post_script(&text, job);
                // How to undo it, written down before any of it is applied (the first record
                // stands: a run again after a crash keeps it).
                undo::record_post_data(&client, job, &script).await?;
                let n =
                    schema::apply_post(target, &script, req.parallel.max(1) as usize, job, &done)
                        .await?;
                tracing::info!(
                    job,
                    post_objects = n,
                    secs = began.elapsed().as_secs_f32(),
                    "post-data in"
                );
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No post-data was stored (--no-schema), or it was and a cleanup removed it.
                done.iter().filter(|s| s.starts_with("post:")).count() as u32
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "read the post-data script {} from the spool",
                    post_path.display()
                )))
            }
        };
        haul_core::failpoint::die("die-before-sequences");
        haul_core::failpoint::stall("stall-before-sequences").await;
        // setval is idempotent: the same values set twice are the same values. Into tables
        // that were there before the job, the values found are written down first.
        let names: Vec<(String, String)> = req
            .sequences
            .iter()
            .map(|s| (s.schema.clone(), s.name.clone()))
            .collect();
        undo::record_sequences(&client, job, &names).await?;
        schema::set_sequences(&client, &req.sequences).await?;
        haul_core::failpoint::die("die-before-matviews");
        haul_core::failpoint::stall("stall-before-matviews").await;
        if !done.contains("matviews") {
            let views: Vec<TableName> = req.matviews.iter().map(TableName::from).collect();
            schema::refresh_matviews(&client, &views).await?;
            ledger::record_step(&client, job, "matviews").await?;
        }
        haul_core::failpoint::die("die-before-digests");
        haul_core::failpoint::stall("stall-before-digests").await;
        let tables: Vec<TableName> = req.verify_tables.iter().map(TableName::from).collect();
        let mut digests = schema::digests(target, tables, req.parallel.max(1) as usize).await?;
        // A table read back whole during the copy, after its last chunk was in, has its count
        // from that read: nothing writes it between then and now, so it is not scanned again.
        let mut counted = Vec::with_capacity(req.count_tables.len());
        for table in req.count_tables.iter().map(TableName::from) {
            match self.inner.whole_read(job, &table).await {
                Some(read) => digests.push(pb::TableDigest {
                    table: Some(table.to_wire()),
                    rows: read.rows as i64,
                    digest: String::new(),
                }),
                None => counted.push(table),
            }
        }
        digests.extend(schema::counts(target, counted, req.parallel.max(1) as usize).await?);
        let meta = haul_core::large_object::Metadata {
            owner: req.large_object_owner,
            privileges: req.large_object_privileges,
        };
        let digests_began = std::time::Instant::now();
        let (row_digests, chunk_mismatches) = self
            .table_row_digests(job, &req.expect, meta, req.parallel.max(1) as usize)
            .await?;
        if !req.expect.is_empty() {
            tracing::info!(
                job,
                tables = req.expect.len(),
                secs = digests_began.elapsed().as_secs_f32(),
                "tables digested whole on the target"
            );
        }
        haul_core::failpoint::die("die-after-digests");
        haul_core::failpoint::stall("stall-after-digests").await;
        // The spool (post-data script included) stays until cleanup: a finalize run again
        // before the job is done still finds what it needs.
        Ok(pb::FinalizeReply {
            post_data_objects: post_objects,
            digests,
            row_digests,
            chunk_mismatches,
        })
    }

    /// Whole tables read back and digested as chunks are (`core::chunk_rows`), `parallel` at a
    /// time, for tables some chunk of which could not be compared along the way.
    async fn table_row_digests(
        &self,
        job_id: &str,
        expect: &[pb::TableExpect],
        meta: haul_core::large_object::Metadata,
        parallel: usize,
    ) -> anyhow::Result<(Vec<pb::TableDigest>, Vec<String>)> {
        if expect.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut tables = Vec::with_capacity(expect.len());
        for e in expect {
            let table = table_from_wire(e.table.as_ref())?;
            let columns: Vec<Column> = e
                .columns
                .iter()
                .map(Column::from_wire)
                .collect::<anyhow::Result<_>>()?;
            tables.push((table, columns));
        }
        // A table read back whole during the copy (its read may still be running, alongside
        // post-data) is not read again: that read is its digest.
        let mut sums: Vec<Option<anyhow::Result<RowDigest>>> = Vec::with_capacity(tables.len());
        for (table, _) in &tables {
            sums.push(self.inner.whole_read(job_id, table).await.map(Ok));
        }
        let reused = sums.iter().filter(|s| s.is_some()).count();
        let unread: Vec<(TableName, Vec<Column>)> = tables
            .iter()
            .zip(&sums)
            .filter(|(_, s)| s.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        tracing::info!(
            job = job_id,
            tables = tables.len(),
            reused,
            "tables compared whole at finalize ({reused} read back during the copy)"
        );
        let mut read = self.digest_whole(&unread, meta, parallel).await.into_iter();
        let sums: Vec<anyhow::Result<RowDigest>> = sums
            .into_iter()
            .map(|s| {
                s.or_else(|| read.next())
                    .unwrap_or_else(|| Err(anyhow::anyhow!("not read")))
            })
            .collect();
        let (mut out, mut found) = (Vec::with_capacity(expect.len()), Vec::new());
        for ((e, (table, columns)), sum) in expect.iter().zip(tables.iter()).zip(sums) {
            let (rows, digest) = match sum {
                Ok(d) => {
                    let expected = RowDigest::from_bytes(e.rows, &e.row_digest).ok();
                    if expected.is_some_and(|x| x != d) {
                        found.extend(self.drill_down(table, columns, &e.chunks, meta).await);
                    }
                    (
                        d.rows as i64,
                        d.to_bytes().iter().map(|x| format!("{x:02x}")).collect(),
                    )
                }
                Err(err) => {
                    tracing::warn!(%table, "failed to digest table on target: {err:#}");
                    (-1, "unreadable".to_string())
                }
            };
            out.push(pb::TableDigest {
                table: Some(table.to_wire()),
                rows,
                digest,
            });
        }
        found.sort();
        Ok((out, found))
    }

    /// Tables read back whole and digested as chunks are, `parallel` connections at a time. A
    /// big table is read in page ranges on several connections at once (its digest is the sum
    /// of theirs), so one table does not leave the other connections idle; the biggest pieces
    /// go first.
    async fn digest_whole(
        &self,
        tables: &[(TableName, Vec<Column>)],
        meta: haul_core::large_object::Metadata,
        parallel: usize,
    ) -> Vec<anyhow::Result<RowDigest>> {
        if tables.is_empty() {
            return Vec::new();
        }
        let pages = self.target_pages(tables).await;
        let piece = read_back_piece_pages();
        let mut pieces: Vec<(usize, haul_core::chunk::Range, i64)> = Vec::new();
        for (i, n) in pages.iter().enumerate() {
            match n {
                Some(n) if *n > piece => {
                    let mut lo = 0;
                    while lo < *n {
                        let hi = lo + piece;
                        // The last piece is open-ended: nothing past the pages measured is lost.
                        let range = haul_core::chunk::Range::Pages {
                            lo,
                            hi: (hi < *n).then_some(hi),
                        };
                        pieces.push((i, range, piece.min(n - lo)));
                        lo = hi;
                    }
                }
                n => pieces.push((i, haul_core::chunk::Range::Whole, n.unwrap_or(0))),
            }
        }
        pieces.sort_by_key(|(i, _, size)| {
            (
                std::cmp::Reverse(pages[*i].unwrap_or(0)),
                *i,
                std::cmp::Reverse(*size),
            )
        });
        pieces.reverse(); // popped from the end
        let tables = Arc::new(tables.to_vec());
        let queue = Arc::new(tokio::sync::Mutex::new(pieces));
        let mut workers = tokio::task::JoinSet::new();
        let n_pieces = queue.lock().await.len();
        tracing::info!(
            tables = tables.len(),
            pieces = n_pieces,
            "reading tables back whole on the target"
        );
        for _ in 0..parallel.max(1).min(n_pieces) {
            let (queue, svc, tables) = (queue.clone(), self.clone(), tables.clone());
            workers.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let next = queue.lock().await.pop();
                    let Some((i, range, _)) = next else {
                        return anyhow::Ok(out);
                    };
                    let (table, columns) = &tables[i];
                    let got = svc.read_back(table, columns, &range, meta).await;
                    out.push((i, got));
                }
            });
        }
        let mut sums: Vec<Option<anyhow::Result<RowDigest>>> =
            (0..tables.len()).map(|_| None).collect();
        while let Some(r) = workers.join_next().await {
            // A worker lost takes its pieces with it: no sum can be trusted then.
            let done = match r {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    return tables
                        .iter()
                        .map(|_| Err(anyhow::anyhow!("{e:#}")))
                        .collect()
                }
                Err(e) => {
                    return tables
                        .iter()
                        .map(|_| Err(anyhow::anyhow!("table digest worker: {e}")))
                        .collect()
                }
            };
            for (i, got) in done {
                let slot = &mut sums[i];
                *slot = Some(match (slot.take(), got) {
                    (None, got) => got,
                    (Some(Ok(mut sum)), Ok(d)) => {
                        sum.combine(&d);
                        Ok(sum)
                    }
                    (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
                });
            }
        }
        sums.into_iter()
            .map(|s| s.unwrap_or_else(|| Err(anyhow::anyhow!("no piece of it was read"))))
            .collect()
    }

    /// Each table's size in pages on the target, where its server can read a page range
    /// without scanning the rest (a TID range scan, PostgreSQL 14 and newer); `None` for a
    /// table read whole (large objects, older servers, a table the catalog cannot size).
    async fn target_pages(&self, tables: &[(TableName, Vec<Column>)]) -> Vec<Option<i64>> {
        let sized = async {
            let client = self.inner.pool.get().await?;
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int4", &[])
                .await?
                .get(0);
            if version < 140000 {
                return anyhow::Ok(vec![None; tables.len()]);
            }
            let names: Vec<String> = tables.iter().map(|(t, _)| t.quoted()).collect();
            let rows = client
                .query(
                    "SELECT CASE WHEN to_regclass(t) IS NULL THEN NULL \
                     ELSE pg_relation_size(to_regclass(t)) / current_setting('block_size')::int8 END \
                     FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
                    &[&names],
                )
                .await?;
            Ok(rows
                .iter()
                .zip(tables)
                .map(|(r, (t, _))| {
                    r.get::<_, Option<i64>>(0)
                        .filter(|_| !haul_core::large_object::is_large_objects(t))
                })
                .collect())
        };
        sized.await.unwrap_or_else(|e: anyhow::Error| {
            tracing::debug!("cannot size the tables on the target; each is read whole: {e:#}");
            vec![None; tables.len()]
        })
    }

    /// A table that differs as a whole, read back chunk by chunk (key ranges) to name the
    /// chunks that differ.
    async fn drill_down(
        &self,
        table: &TableName,
        columns: &[Column],
        chunks: &[pb::ChunkExpect],
        meta: haul_core::large_object::Metadata,
    ) -> Vec<String> {
        let mut found = Vec::new();
        for c in chunks {
            let (Ok(range), Ok(source)) = (
                haul_core::chunk::Range::from_wire(c.range.as_ref()),
                RowDigest::from_bytes(c.rows, &c.row_digest),
            ) else {
                continue;
            };
            match self.read_back(table, columns, &range, meta).await {
                Ok(target) => found.extend(readback::mismatch(
                    table, c.chunk_id, &range, &source, &target,
                )),
                Err(e) => found.push(format!("{table} chunk {}: {e:#}", c.chunk_id)),
            }
        }
        found
    }

    async fn cleanup_inner(&self, req: pb::CleanupRequest) -> anyhow::Result<pb::CleanupReply> {
        let lock = self.inner.job_lock(&req.job_id);
        let _one_at_a_time = lock.lock().await;
        haul_core::failpoint::die("die-in-cleanup");
        haul_core::failpoint::stall("stall-in-cleanup").await;
        let mut outcome = undo::Outcome::default();
        if req.undo {
            if let Ok(mut c) = self.inner.cancelled.lock() {
                c.insert(req.job_id.clone());
            }
            // The job's leases are revoked: a chunk of it still arriving cannot commit
            // (`CheckLease`), and one committing now holds its table's lock until it is in, so
            // the undo below waits for it and takes it away too.
            let client = self.inner.config.target.connect("haul-cancel").await?;
            // Indexes being built for the copy are not waited for: their statements are
            // cancelled, and what they built is undone with the rest.
            self.inner
                .early_post
                .stop_then(&req.job_id, async {
                    if let Err(e) = schema::cancel_post_data(&client, &req.job_id).await {
                        tracing::debug!(job = %req.job_id, "{e:#}");
                    }
                })
                .await;
            outcome = undo::run(&client, &req.job_id, req.keep_target).await?;
        } else {
            self.inner.early_post.stop(&req.job_id).await;
        }
        // A cancelled job kept on the target keeps its ledger too: it says which chunks of
        // the rows there were applied, and by which job. One undone loses it, --keep-ledger
        // or not: it would only describe rows that are gone.
        let keep = if req.undo {
            req.keep_target
        } else {
            req.keep_ledger
        };
        let schema_dropped = if keep {
            false
        } else {
            let client = self.inner.config.target.connect("haul-cleanup").await?;
            ledger::drop_job(&client, &req.job_id).await?
        };
        if req.undo && !schema_dropped {
            outcome.left.push(if req.keep_target {
                "schema haul with the job's ledger (DROP SCHEMA haul CASCADE once it is not needed)"
                    .to_string()
            } else {
                "schema haul, which holds another job's ledger too".to_string()
            });
        }
        self.inner.spool.remove_job(&req.job_id).await;
        self.inner.partials.forget_job(&req.job_id);
        self.inner.forget_whole_reads(&req.job_id);
        tracing::info!(job = %req.job_id, schema_dropped, undo = req.undo, undone = ?outcome.undone, left = ?outcome.left, "cleaned up");
        Ok(pb::CleanupReply {
            schema_dropped,
            undone: outcome.undone,
            left: outcome.left,
        })
    }
}

/// Connections a split table's read-back during the copy uses (the rest keep loading chunks).
const SPLIT_CHECK_PARALLEL: usize = 2;

/// A table bigger than this many pages (64 MB) is read back at the end in pieces this big;
/// `HAUL_READBACK_PIECE_PAGES` sets another size (tests use it to split small tables).
fn read_back_piece_pages() -> i64 {
    std::env::var("HAUL_READBACK_PIECE_PAGES")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(8192)
}

/// Why a restore from the spool ended without a commit.
pub(crate) enum Unrestored {
    /// The lease moved on; the spool is still good for the chunk's next stream.
    LeaseLost(anyhow::Error),
    /// A stream under a newer lease took over while this one waited to retry.
    Stopped(anyhow::Error),
    /// Retrying from this spool cannot help (bad input, a spool that no longer checks out or
    /// is gone, or the attempts used up).
    Hopeless(anyhow::Error),
}

impl ReceiverService {
    /// Run `restore` on a pooled target connection until it commits, retrying a target hiccup
    /// from the spool with backoff (never by asking the sender for the bytes again). `job`,
    /// `id` and `what` (its table, or a group's size) name the chunk or group in the log.
    pub(crate) async fn retry_from_spool<T, F, Fut>(
        &self,
        job: &str,
        what: &str,
        id: u64,
        stop: &CancellationToken,
        mut restore: F,
    ) -> Result<T, Unrestored>
    where
        F: FnMut(crate::pool::Pooled) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.inner.pool.get().await {
                Ok(c) => restore(c).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if e.downcast_ref::<restore::LeaseLost>().is_some() {
                return Err(Unrestored::LeaseLost(e));
            }
            if haul_core::status::fatal_message(&e).is_some()
                || attempt >= RESTORE_ATTEMPTS
                || e.downcast_ref::<restore::SpoolCorrupt>().is_some()
                || e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
                })
            {
                return Err(Unrestored::Hopeless(e));
            }
            tracing::warn!(job, chunk = id, table = %what, agent = %self.inner.config.name, attempt, "failed to restore, retrying from spool: {e:#}");
            tokio::select! {
                _ = stop.cancelled() => return Err(Unrestored::Stopped(partial_stopped(id))),
                _ = tokio::time::sleep(restore_backoff(attempt)) => {}
            }
        }
    }
}

/// What a chunk stream delivered: raw bytes, their digest, the rows' digest if sent, and a
/// group's member extents.
pub(crate) type Received = (
    u64,
    Vec<u8>,
    Option<RowDigest>,
    Vec<pb::MemberExtent>,
    std::time::Duration,
);

/// The chunk's bytes do not hash to what the sender says it sent: they are discarded.
#[derive(Debug)]
pub(crate) struct DigestMismatch(pub String);

impl std::fmt::Display for DigestMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DigestMismatch {}

/// A stream under a newer lease took the chunk over; what this one spooled is kept for it.
pub(crate) fn partial_stopped(chunk_id: u64) -> anyhow::Error {
    anyhow::Error::new(restore::LeaseLost(format!(
        "chunk {chunk_id}: a stream under a newer lease took over; this one stopped"
    )))
}
