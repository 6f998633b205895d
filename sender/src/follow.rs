//! Following a job's source after its bulk copy (issue 11): the slot's changes, read over the
//! replication session (`replication.rs`), decoded (`core::pgoutput`), turned into statements
//! (`core::change_sql`) and sent to the receiver in batches of whole transactions
//! (`core::change_batch`): compressed, blake3-hashed, inside the job's cap, over the same mTLS
//! gRPC as chunks. The receiver applies each batch in one target transaction with the job's
//! follow position (`receiver/follow.rs`), and only after its receipt does this side confirm
//! the position to the source, so the slot never lets go of a change the target does not hold.
//!
//! Memory is bounded: a statement is written into the batch as soon as it is decoded, and a
//! block leaves once it is full, so a transaction of any size streams through. pgoutput
//! (protocol 1) sends a transaction only once it committed, in one piece, so a batch never
//! waits on a transaction still running.
//!
//! A batch is closed after a transaction's end when the stream has nothing more at once, or
//! when it holds [`BATCH_BYTES`]: many small transactions share one target transaction and one
//! round trip, and none waits long for company.
//!
//! Restarts: the stream starts where the slot was last confirmed, which is never past what the
//! target holds; a transaction sent again is skipped by the receiver (its commit position is at
//! or below the recorded one). Nothing is applied twice and nothing is lost.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use haul_core::bandwidth::Limiter;
use haul_core::change_batch::{self, Record};
use haul_core::change_sql::Relations;
use haul_core::codec::Codec;
use haul_core::pg::DbUrl;
use haul_core::pgoutput::{self, Lsn, Message};
use haul_proto as pb;
use haul_proto::receiver_client::ReceiverClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::replication::{Event, Replication};

/// A batch is closed once it holds this many raw bytes (at a transaction's end).
pub const BATCH_BYTES: usize = 4 << 20;

/// How long a closed transaction waits for the next one to share its batch.
const LINGER: Duration = Duration::from_millis(5);

/// While waiting to reach a position, how often the source is asked how far it has sent.
const ASK_EVERY: Duration = Duration::from_millis(200);

/// What a follower follows.
#[derive(Debug, Clone)]
pub struct Spec {
    pub job_id: String,
    pub slot: String,
    pub publication: String,
    /// The moved tables' columns as planned, by (schema, name). A Relation message whose
    /// columns differ (DDL on the source while following) stops the follower with one line:
    /// applying its changes to the target's old columns would drop or misplace data.
    pub tables: HashMap<(String, String), Vec<String>>,
    pub codec: Codec,
}

/// Where the follower stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The commit position of the last transaction the target holds.
    pub applied: Lsn,
    /// The end of that transaction: what the source was told is applied.
    pub confirmed: Lsn,
    /// The source's WAL end, as last heard.
    pub wal_end: Lsn,
    /// The commit time of the last applied transaction (microseconds since 2000-01-01).
    pub applied_commit_time: i64,
    /// Transactions applied by this follower, and statements.
    pub transactions: u64,
    pub statements: u64,
}

/// The batch being built and the upload carrying it.
struct Batch {
    tx: tokio::sync::mpsc::Sender<pb::ChangeFrame>,
    call: tokio::task::JoinHandle<Result<tonic::Response<pb::ChangeReceipt>, tonic::Status>>,
    block: Vec<u8>,
    hasher: blake3::Hasher,
    raw_bytes: u64,
    /// Whole transactions in it, and the last one's commit, end and time.
    transactions: u32,
    last: (Lsn, Lsn, i64),
    in_transaction: bool,
}

impl Batch {
    fn open(receiver: &mut ReceiverClient<Channel>, job_id: &str) -> Batch {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut client = receiver.clone();
        let call = tokio::spawn(async move {
            client
                .apply_changes(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let header = pb::ChangeFrame {
            frame: Some(pb::change_frame::Frame::Header(pb::ChangeHeader {
                job_id: job_id.to_string(),
            })),
        };
        // The channel is new and holds 4: the header always fits.
        let _ = tx.try_send(header);
        Batch {
            tx,
            call,
            block: Vec::with_capacity(haul_core::BLOCK_BYTES),
            hasher: blake3::Hasher::new(),
            raw_bytes: 0,
            transactions: 0,
            last: (Lsn(0), Lsn(0), 0),
            in_transaction: false,
        }
    }

    async fn write(
        &mut self,
        record: &Record,
        codec: Codec,
        limiter: &Limiter,
    ) -> anyhow::Result<()> {
        change_batch::encode(record, &mut self.block);
        if self.block.len() >= haul_core::BLOCK_BYTES {
            self.send_block(codec, limiter).await?;
        }
        Ok(())
    }

    async fn send_block(&mut self, codec: Codec, limiter: &Limiter) -> anyhow::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.block);
        self.hasher.update(&raw);
        self.raw_bytes += raw.len() as u64;
        let raw_len = raw.len() as u32;
        let (payload, raw) =
            tokio::task::spawn_blocking(move || codec.encode(&raw).map(|p| (p, raw)))
                .await
                .context("compression task")??;
        limiter.consume(payload.len()).await;
        let (c, _) = codec.to_wire();
        let frame = pb::ChangeFrame {
            frame: Some(pb::change_frame::Frame::Block(pb::ChunkBlock {
                raw_len,
                payload,
                codec: Some(c as i32),
            })),
        };
        self.tx
            .send(frame)
            .await
            .map_err(|_| anyhow::anyhow!("the receiver ended the change batch early"))?;
        self.block = raw;
        self.block.clear();
        Ok(())
    }

    /// Send what is left and the trailer; the receipt comes after the target's commit.
    async fn finish(
        mut self,
        codec: Codec,
        limiter: &Limiter,
    ) -> anyhow::Result<(pb::ChangeReceipt, (Lsn, Lsn, i64), u32)> {
        self.send_block(codec, limiter).await?;
        let trailer = pb::ChangeFrame {
            frame: Some(pb::change_frame::Frame::Trailer(pb::ChangeTrailer {
                raw_bytes: self.raw_bytes,
                digest: self.hasher.finalize().as_bytes().to_vec(),
            })),
        };
        self.tx.send(trailer).await.ok();
        drop(self.tx);
        let receipt = self
            .call
            .await
            .context("change batch upload task")?
            .map_err(|s| {
                anyhow::anyhow!("the receiver did not apply a change batch: {}", s.message())
            })?
            .into_inner();
        Ok((receipt, self.last, self.transactions))
    }
}

/// Follow `spec`'s slot until `until` is set and the target holds everything up to it, or
/// `shutdown`. `position` is kept current for status and lag.
pub async fn run(
    source: &DbUrl,
    mut receiver: ReceiverClient<Channel>,
    spec: &Spec,
    limiter: &Limiter,
    position: &tokio::sync::watch::Sender<Position>,
    mut until: tokio::sync::watch::Receiver<Option<Lsn>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut repl = Replication::connect(source, &format!("haul-follow-{}", spec.job_id)).await?;
    repl.start(&spec.slot, Lsn(0), std::slice::from_ref(&spec.publication))
        .await?;
    let mut relations = Relations::default();
    let mut batch: Option<Batch> = None;
    let mut until_open = true;
    loop {
        let reached = |p: &Position| matches!(*until.borrow(), Some(u) if p.applied >= u || p.wal_end_reached(u));
        if batch.is_none() && reached(&position.borrow()) {
            return Ok(());
        }
        let closable = batch
            .as_ref()
            .is_some_and(|b| !b.in_transaction && b.transactions > 0);
        let full = batch
            .as_ref()
            .is_some_and(|b| b.raw_bytes as usize + b.block.len() >= BATCH_BYTES);
        let event = if closable && full {
            None
        } else if closable {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                e = tokio::time::timeout(LINGER, repl.next()) => e.ok().transpose()?,
            }
        } else {
            let waiting = batch.is_none() && until.borrow().is_some();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = until.changed(), if until_open => {
                    // Whoever could ask for an end is gone: follow until shutdown.
                    until_open = r.is_ok();
                    continue;
                }
                // Waiting for a position on a source that may be idle: ask how far it has sent.
                _ = tokio::time::sleep(ASK_EVERY), if waiting => {
                    let confirmed = position.borrow().confirmed;
                    repl.status(confirmed, true).await?;
                    continue;
                }
                e = repl.next() => Some(e?),
            }
        };
        let Some(event) = event else {
            // Nothing more at once (or the batch is full): close the batch.
            if let Some(b) = batch.take() {
                let (receipt, (commit, end, time), n) = b.finish(spec.codec, limiter).await?;
                repl.confirm(end).await?;
                position.send_modify(|p| {
                    p.applied = p.applied.max(Lsn(receipt.position)).max(commit);
                    p.confirmed = p.confirmed.max(end);
                    p.applied_commit_time = time;
                    p.transactions += n as u64;
                    p.statements += receipt.statements;
                });
            }
            continue;
        };
        match event {
            Event::Data {
                wal_end, message, ..
            } => {
                position.send_modify(|p| p.wal_end = p.wal_end.max(wal_end));
                let m = pgoutput::decode(&message)?;
                match &m {
                    Message::Begin {
                        final_lsn,
                        commit_time,
                        ..
                    } => {
                        let b =
                            batch.get_or_insert_with(|| Batch::open(&mut receiver, &spec.job_id));
                        b.in_transaction = true;
                        b.last = (*final_lsn, Lsn(0), *commit_time);
                        b.write(
                            &Record::Begin {
                                commit_lsn: final_lsn.0,
                                end_lsn: 0,
                                commit_time: *commit_time,
                            },
                            spec.codec,
                            limiter,
                        )
                        .await?;
                    }
                    Message::Commit {
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    } => {
                        let b = batch
                            .as_mut()
                            .context("a commit without its begin in the change stream")?;
                        b.write(&Record::End, spec.codec, limiter).await?;
                        b.in_transaction = false;
                        b.transactions += 1;
                        b.last = (*commit_lsn, *end_lsn, *commit_time);
                    }
                    Message::Relation {
                        schema,
                        name,
                        columns,
                        ..
                    } => {
                        check_relation(spec, schema, name, columns)?;
                        relations.learn(&m);
                    }
                    _ => {
                        if let Some(sql) = relations.statement(&m)? {
                            anyhow::ensure!(
                                sql.len() <= change_batch::MAX_STATEMENT_BYTES,
                                "a change of {} bytes is larger than haul can apply",
                                sql.len()
                            );
                            let b = batch
                                .as_mut()
                                .context("a change outside a transaction in the change stream")?;
                            b.write(&Record::Statement(sql), spec.codec, limiter)
                                .await?;
                        }
                    }
                }
            }
            Event::Keepalive { wal_end, reply } => {
                position.send_modify(|p| p.wal_end = p.wal_end.max(wal_end));
                // With no batch open, the target holds everything sent: an idle source's
                // WAL end (its own records, other databases') is confirmed too, so the
                // slot does not hold WAL that carries nothing of ours.
                if batch.is_none() {
                    let idle_end = {
                        let p = position.borrow();
                        p.confirmed.max(wal_end)
                    };
                    repl.confirm(idle_end).await?;
                    position.send_modify(|p| p.confirmed = idle_end);
                } else if reply {
                    let confirmed = position.borrow().confirmed;
                    repl.confirm(confirmed).await?;
                }
            }
            Event::End => anyhow::bail!("the source ended the change stream"),
        }
    }
}

impl Position {
    /// The stream has passed `target` with nothing left to apply: everything the source
    /// wrote up to it is on the target, even when no transaction of ours sat at it.
    fn wal_end_reached(&self, target: Lsn) -> bool {
        self.confirmed >= target
    }
}

/// A Relation message against the planned columns: the same names in the same order, or one
/// line naming the table and what changed.
fn check_relation(
    spec: &Spec,
    schema: &str,
    name: &str,
    columns: &[pgoutput::RelColumn],
) -> anyhow::Result<()> {
    let key = (schema.to_string(), name.to_string());
    let Some(planned) = spec.tables.get(&key) else {
        return Err(haul_core::status::fatal(format!(
            "the source sent changes of {schema}.{name}, which this job does not move; its publication must have been altered: stop following and check publication {}",
            spec.publication
        )));
    };
    let now: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    if now != planned.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(haul_core::status::fatal(format!(
            "the columns of {schema}.{name} changed on the source while following (were {}, now {}): apply the same change to the target, then resume",
            planned.join(", "),
            now.join(", ")
        )));
    }
    Ok(())
}
