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
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::restore::{self, Applied, Restore};
use crate::spool::{self, Spool};
use crate::{ledger, pool::Pool, schema, ReceiverConfig};

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
    /// Whether the target user may set session_replication_role (superuser), so triggers and
    /// foreign keys stay quiet during the load even when the schema already existed.
    pub replica_role: bool,
    /// The coordinator, for fencing: asked whether a lease is current before each commit.
    pub fence: CoordinatorClient<Channel>,
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
        let r = req.into_inner();
        let client = self.inner.pool.get().await.map_err(to_status)?;
        let applied = ledger::applied(&client, &r.job_id, r.chunk_id)
            .await
            .map_err(to_status)?;
        let (rows, snapshot_id) = applied.clone().unwrap_or_default();
        Ok(Response::new(pb::BeginChunkReply {
            already_applied: applied.is_some(),
            rows,
            snapshot_id,
        }))
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
}

impl ReceiverService {
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
            let text = tokio::fs::read_to_string(&path)
                .await
                .context("read post-data spool")?;
            return Ok(pb::SchemaReply {
                objects: Script::parse(&text).entries.len() as u32,
            });
        }

        let tables: Vec<TableName> = first.tables.iter().map(TableName::from).collect();
        let client = self.inner.config.target.connect("haul-schema").await?;
        ledger::ensure(&client).await?;
        schema::preflight(&client, &tables, first.create_schema).await?;
        if !first.create_schema {
            return Ok(pb::SchemaReply { objects: 0 });
        }
        let text = tokio::fs::read_to_string(&path)
            .await
            .context("read pre-data spool")?;
        let script = Script::parse(&text);
        let objects = schema::apply_pre(&client, &script).await?;
        tracing::info!(job = %first.job_id, objects, "applied pre-data");
        Ok(pb::SchemaReply { objects })
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
        let table = table_from_wire(header.table.as_ref())?;
        let columns: Vec<Column> = header
            .columns
            .iter()
            .map(Column::from_wire)
            .collect::<anyhow::Result<_>>()?;
        let codec = Codec::from_wire(header.codec, 0)?;
        let path = self
            .inner
            .spool
            .chunk_path(&header.job_id, header.chunk_id, header.epoch);

        let received = self.receive(&mut frames, codec, &path).await;
        let (raw_bytes, digest) = match received {
            Ok(v) => v,
            Err(e) => {
                self.inner.spool.remove(&path).await;
                return Err(e);
            }
        };

        if haul_core::failpoint::fire("corrupt-spool") {
            spool::flip_a_byte(&path).await;
        }
        let r = Restore {
            job_id: &header.job_id,
            chunk_id: header.chunk_id,
            epoch: header.epoch,
            table: &table,
            columns: &columns,
            codec,
            digest: &digest,
            raw_bytes,
            spool: &path,
            replica_role: self.inner.replica_role,
            snapshot_id: &header.snapshot_id,
            fence: Some(self.inner.fence.clone()),
        };
        // A target hiccup is retried from the spool, never by asking for the bytes again.
        let mut attempt = 0;
        let applied = loop {
            attempt += 1;
            let client = self.inner.pool.get().await;
            let result = match client {
                Ok(c) => restore::apply(c, &r).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(a) => break a,
                Err(e)
                    if haul_core::status::fatal_message(&e).is_some()
                        || attempt >= RESTORE_ATTEMPTS =>
                {
                    self.inner.spool.remove(&path).await;
                    return Err(e);
                }
                // Retrying cannot help: the spool changed or vanished, or the lease moved on.
                Err(e)
                    if e.downcast_ref::<restore::SpoolCorrupt>().is_some()
                        || e.downcast_ref::<restore::LeaseLost>().is_some()
                        || e.chain().any(|c| {
                            c.downcast_ref::<std::io::Error>()
                                .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
                        }) =>
                {
                    self.inner.spool.remove(&path).await;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(
                        chunk = header.chunk_id,
                        attempt,
                        "failed to restore, retrying from spool: {e:#}"
                    );
                    tokio::time::sleep(restore_backoff(attempt)).await;
                }
            }
        };
        self.inner.spool.remove(&path).await;
        Ok(match applied {
            Applied::Now { rows } => pb::ChunkReceipt {
                rows,
                already_applied: false,
                snapshot_id: header.snapshot_id.clone(),
            },
            Applied::Before { rows, snapshot_id } => pb::ChunkReceipt {
                rows,
                already_applied: true,
                snapshot_id,
            },
        })
    }

    /// Spool the blocks and check the trailer's digest. Returns raw bytes and digest.
    async fn receive(
        &self,
        frames: &mut Streaming<pb::ChunkFrame>,
        codec: Codec,
        path: &std::path::Path,
    ) -> anyhow::Result<(u64, Vec<u8>)> {
        let mut file = self.inner.spool.create(path).await?;
        let mut hasher = blake3::Hasher::new();
        let (mut raw_bytes, mut blocks) = (0u64, 0u64);
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|s| anyhow::anyhow!("receive chunk: {}", s.message()))?;
            match frame.frame {
                Some(pb::chunk_frame::Frame::Block(b)) => {
                    let raw_len = b.raw_len as usize;
                    let payload = b.payload;
                    let (raw, payload) = tokio::task::spawn_blocking(move || {
                        decode(codec, &payload, raw_len).map(|raw| (raw, payload))
                    })
                    .await
                    .context("decode task")??;
                    hasher.update(&raw);
                    raw_bytes += raw.len() as u64;
                    blocks += 1;
                    spool::write_frame(&mut file, path, raw_len as u32, &payload).await?;
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
                        anyhow::bail!(
                            "chunk digest mismatch: received {raw_bytes} bytes in {blocks} blocks, sender sent {} in {}; discarded",
                            t.raw_bytes,
                            t.blocks
                        );
                    }
                    return Ok((raw_bytes, t.digest));
                }
                _ => anyhow::bail!("unexpected frame in chunk stream"),
            }
        }
        anyhow::bail!("chunk stream ended before its trailer; discarded")
    }

    async fn finalize_inner(&self, req: pb::FinalizeRequest) -> anyhow::Result<pb::FinalizeReply> {
        let target = &self.inner.config.target;
        let post_path = self.inner.spool.schema_path(&req.job_id, "post");
        let mut post_objects = 0;
        if let Ok(text) = tokio::fs::read_to_string(&post_path).await {
            let script = Script::parse(&text);
            post_objects =
                schema::apply_post(target, &script, req.parallel.max(1) as usize).await?;
            tracing::info!(job = %req.job_id, post_objects, "applied post-data");
        }
        let client = target.connect("haul-finalize").await?;
        schema::set_sequences(&client, &req.sequences).await?;
        let views: Vec<TableName> = req.matviews.iter().map(TableName::from).collect();
        schema::refresh_matviews(&client, &views).await?;
        let tables: Vec<TableName> = req.verify_tables.iter().map(TableName::from).collect();
        let digests = schema::digests(target, tables, req.parallel.max(1) as usize).await?;
        self.inner.spool.remove_job(&req.job_id).await;
        Ok(pb::FinalizeReply {
            post_data_objects: post_objects,
            digests,
        })
    }
}
