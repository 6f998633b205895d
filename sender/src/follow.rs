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
//! A batch is closed after a transaction's end when the stream has nothing more at once, when
//! it holds [`BATCH_BYTES`], or once it has been open [`BATCH_AGE`]: many small transactions
//! share one target transaction and one round trip, none waits long for company, and a
//! follower catching up with a backlog still commits every few hundred milliseconds (the lag
//! is the batch's age plus its apply, not the size of the backlog).
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

/// A batch is closed (at a transaction's end) once it has been open this long.
const BATCH_AGE: Duration = Duration::from_millis(200);

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
    opened: std::time::Instant,
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
            opened: std::time::Instant::now(),
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
    // Where the columns' type names come from, for changes sent as prepared statements.
    let catalog = source
        .connect(&format!("haul-follow-types-{}", spec.job_id))
        .await?;
    repl.start(&spec.slot, Lsn(0), std::slice::from_ref(&spec.publication))
        .await?;
    let mut relations = Relations::default();
    let mut batch: Option<Batch> = None;
    let mut until_open = true;
    // The columns changes are checked against: the plan's, refreshed from the target when a
    // Relation message differs (the operator may have made the same change there).
    let mut tables = spec.tables.clone();
    loop {
        let reached = |p: &Position| matches!(*until.borrow(), Some(u) if p.applied >= u || p.wal_end_reached(u));
        if batch.is_none() && reached(&position.borrow()) {
            return Ok(());
        }
        let closable = batch
            .as_ref()
            .is_some_and(|b| !b.in_transaction && b.transactions > 0);
        let full = batch.as_ref().is_some_and(|b| {
            b.raw_bytes as usize + b.block.len() >= BATCH_BYTES || b.opened.elapsed() >= BATCH_AGE
        });
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
                // Test point: the target committed the batch, the source was not told; the
                // next follower is sent it again and must apply none of it twice.
                haul_core::failpoint::die("die-after-change-batch");
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
                        if check_relation(spec, &tables, schema, name, columns).is_err() {
                            let now = target_columns(&mut receiver, schema, name).await?;
                            if let Some(cols) = now {
                                tables.insert((schema.clone(), name.clone()), cols);
                            }
                            check_relation(spec, &tables, schema, name, columns)?;
                        }
                        relations.learn(&m);
                        if let Message::Relation { id, .. } = &m {
                            if let Some(types) = type_names(&catalog, columns).await {
                                relations.set_types(*id, types);
                            }
                        }
                    }
                    _ => {
                        if let Some((sql, params)) = relations.prepared(&m)? {
                            let size =
                                sql.len() + params.iter().flatten().map(String::len).sum::<usize>();
                            anyhow::ensure!(
                                size <= change_batch::MAX_STATEMENT_BYTES,
                                "a change of {size} bytes is larger than haul can apply"
                            );
                            let record = if params.is_empty() {
                                Record::Statement(sql)
                            } else {
                                Record::Prepared { sql, params }
                            };
                            let b = batch
                                .as_mut()
                                .context("a change outside a transaction in the change stream")?;
                            b.write(&record, spec.codec, limiter).await?;
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
    tables: &HashMap<(String, String), Vec<String>>,
    schema: &str,
    name: &str,
    columns: &[pgoutput::RelColumn],
) -> anyhow::Result<()> {
    let key = (schema.to_string(), name.to_string());
    let Some(planned) = tables.get(&key) else {
        return Err(haul_core::status::fatal(format!(
            "the source sent changes of {schema}.{name}, which this job does not move; its publication must have been altered: stop following and check publication {}",
            spec.publication
        )));
    };
    let now: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    if now != planned.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(haul_core::status::fatal(format!(
            "the columns of {schema}.{name} changed on the source while following (the target has {}, the source now {}): apply the same change to the target, then haul resume",
            planned.join(", "),
            now.join(", ")
        )));
    }
    Ok(())
}

/// The slot and publication of a job (`core::ident::follow_names`).
pub fn names(job_id: &str) -> (String, String) {
    haul_core::ident::follow_names(job_id)
}

/// Tables whose UPDATE and DELETE a publication would break: no primary key and no replica
/// identity (index or FULL). With `full`, they are given REPLICA IDENTITY FULL (returned);
/// without it, the job is refused in one line, before anything is written.
pub async fn replica_identity_preflight(
    client: &tokio_postgres::Client,
    tables: &[haul_core::ident::TableName],
    full: bool,
) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    for t in tables {
        let row = client
            .query_one(
                "SELECT c.relreplident::text, c.relkind::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&t.quoted()],
            )
            .await
            .with_context(|| format!("read the replica identity of {t}"))?;
        let (ident, kind, pk): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
        // Partitioned parents hold no rows; their partitions are checked one by one.
        if kind == "p" {
            continue;
        }
        let ok = match ident.as_str() {
            "f" | "i" => true,
            "d" => pk,
            _ => false,
        };
        if !ok {
            missing.push(t.clone());
        }
    }
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = missing.iter().map(|t| t.to_string()).collect();
    if !full {
        return Err(haul_core::status::fatal(format!(
            "{} table(s) have no primary key or replica identity, so publishing them would make the source's own UPDATE and DELETE on them fail: {}; rerun with --replica-identity-full to give them REPLICA IDENTITY FULL, or leave them out with --exclude-tables",
            names.len(),
            names.join(", ")
        )));
    }
    for t in &missing {
        client
            .batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", t.quoted()))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "set REPLICA IDENTITY FULL on {t} on the source: {}",
                    haul_core::pg::db_error_line(&e)
                )
            })?;
        tracing::warn!(table = %t, "set REPLICA IDENTITY FULL on the source (--replica-identity-full)");
    }
    Ok(names)
}

/// Create the job's publication (committed first: pgoutput looks it up as of each change)
/// and then its slot, whose exported snapshot the bulk copy reads. Leftovers of an earlier
/// attempt at planning the same job are dropped first.
pub async fn create_slot(
    source: &DbUrl,
    client: &tokio_postgres::Client,
    job_id: &str,
    tables: &[haul_core::ident::TableName],
) -> anyhow::Result<(Replication, crate::replication::SlotCreated, String)> {
    let (slot, publication) = names(job_id);
    drop_slot_and_publication(client, &slot, &publication).await?;
    let list = tables
        .iter()
        .map(|t| t.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {list}",
            haul_core::ident::quote_ident(&publication)
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "create publication {publication} on the source: {} (following needs a user that owns the tables, or a superuser)",
                haul_core::pg::db_error_line(&e)
            )
        })?;
    let mut repl = Replication::connect(source, &format!("haul-slot-{job_id}")).await.map_err(|e| {
        anyhow::anyhow!("{e:#} (following needs the source user to have REPLICATION and wal_level = logical)")
    })?;
    let created = repl.create_slot(&slot, false).await.map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (following needs wal_level = logical and a free replication slot on the source)"
        )
    })?;
    tracing::info!(job = %job_id, slot = %slot, publication = %publication, start = %created.consistent_point, "slot and publication created for following");
    Ok((repl, created, publication))
}

/// Drop a job's slot and publication, if there. A follower still attached to the slot is
/// ended first (a slot in use cannot be dropped).
pub async fn drop_slot_and_publication(
    client: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
) -> anyhow::Result<()> {
    for _ in 0..50 {
        let active: Option<i32> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .context("read the source's replication slots")?
            .map(|r| r.get::<_, Option<i32>>(0).unwrap_or(0));
        match active {
            None => break,
            Some(pid) if pid != 0 => {
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .context("end the session following the slot")?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(_) => {
                match client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                {
                    Ok(_) => break,
                    // Taken again between the two statements: try again.
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => {
                        anyhow::bail!(
                            "drop replication slot {slot} on the source: {}",
                            haul_core::pg::db_error_line(&e)
                        )
                    }
                }
            }
        }
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            haul_core::ident::quote_ident(publication)
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "drop publication {publication} on the source: {}",
                haul_core::pg::db_error_line(&e)
            )
        })?;
    Ok(())
}

/// The SQL names of a relation's column types (`format_type` on the source), or none when
/// any cannot be named (its changes then go as literals).
async fn type_names(
    client: &tokio_postgres::Client,
    columns: &[pgoutput::RelColumn],
) -> Option<Vec<String>> {
    let oids: Vec<i64> = columns.iter().map(|c| c.type_oid as i64).collect();
    let mods: Vec<i32> = columns.iter().map(|c| c.type_modifier).collect();
    let rows = client
        .query(
            "SELECT format_type(t.o::oid, t.m) FROM unnest($1::int8[], $2::int4[]) \
             WITH ORDINALITY AS t(o, m, n) ORDER BY t.n",
            &[&oids, &mods],
        )
        .await
        .ok()?;
    let names: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
    // format_type names a type that does not exist "???".
    names
        .into_iter()
        .map(|n| n.filter(|n| !n.contains("???")))
        .collect()
}

/// The target's columns of one table now, through the receiver (None: not on the target).
async fn target_columns(
    receiver: &mut ReceiverClient<Channel>,
    schema: &str,
    name: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let table = haul_core::ident::TableName::new(schema, name);
    let reply = receiver
        .target_columns(pb::TargetColumnsRequest {
            tables: vec![table.to_wire()],
        })
        .await
        .map_err(|s| haul_core::status::from_status(s, "read the target's columns"))?
        .into_inner();
    Ok(reply
        .tables
        .into_iter()
        .next()
        .map(|t| t.columns.into_iter().map(|c| c.name).collect()))
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// WAL the slot holds back on the source, past this, is warned about in status: a follower
/// that is stuck fills the source's disk.
pub const RETAINED_WARNING_BYTES: u64 = 1 << 30;

/// The follow task: follow the job's slot, report where it stands every second, and when the
/// coordinator says cutover, catch up to the source's position at that moment, set the
/// sequences, compare source and target, and drop the slot and publication.
pub async fn run_task(
    shared: &std::sync::Arc<crate::worker::Shared>,
    task: pb::FollowTask,
) -> anyhow::Result<()> {
    let options = task.options.clone().unwrap_or_default();
    let job_id = task.job_id.clone();
    let mut tables = HashMap::new();
    for t in &task.tables {
        let name = haul_core::chunk::table_from_wire(t.table.as_ref())?;
        tables.insert(
            (name.schema, name.name),
            t.columns.iter().map(|c| c.name.clone()).collect(),
        );
    }
    let spec = Spec {
        job_id: job_id.clone(),
        slot: task.slot.clone(),
        publication: task.publication.clone(),
        tables,
        codec: Codec::from_wire(options.codec, options.zstd_level)?,
    };
    let source = shared.config.source.clone();
    let watch = source
        .connect(&format!("haul-follow-watch-{job_id}"))
        .await?;
    let receiver = shared.peers.receiver(&task.receiver_addr).await?;
    let limiter = shared.limiter_for(&job_id, options.bwlimit_bytes);
    let (position, seen) = tokio::sync::watch::channel(Position::default());
    let (until_tx, until_rx) = tokio::sync::watch::channel(None::<Lsn>);
    let stop = CancellationToken::new();
    tracing::info!(job = %job_id, slot = %spec.slot, "following");
    let follower = run(
        &source, receiver, &spec, &limiter, &position, until_rx, &stop,
    );
    tokio::pin!(follower);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut cutover_lsn = Lsn(0);
    // When the target last held everything the source had written (Unix ms).
    let mut caught_up_ms = unix_ms();
    // Cutover --read-only-source: what was done to the source.
    let mut read_only_note = String::new();
    loop {
        tokio::select! {
            r = &mut follower => {
                r?;
                break;
            }
            _ = tick.tick() => {
                let (source_lsn, retained) = source_position(&watch, &spec.slot).await?;
                let mut report = follow_report(&job_id, &seen.borrow(), source_lsn, retained, cutover_lsn);
                report.read_only_source = read_only_note.clone();
                let now = unix_ms();
                let held = Lsn(report.applied_lsn.max(report.confirmed_lsn));
                report.lag_ms = if held >= source_lsn {
                    caught_up_ms = now;
                    0
                } else {
                    let applied_ms = (report.applied_commit_time_us / 1000).max(0) as u64;
                    now.saturating_sub(applied_ms.max(caught_up_ms))
                };
                let reply = shared.peers.coordinator().report_follow(report).await;
                match reply {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.stop {
                            stop.cancel();
                            tracing::info!(job = %job_id, "stopped following: the coordinator said so");
                            return Ok(());
                        }
                        if r.cutover && cutover_lsn == Lsn(0) {
                            // The operator stopped the writes, then asked: what the source
                            // has written by now is everything there is to catch up with.
                            // With --read-only-source the source is made to refuse writes
                            // first, so nothing can come after that position.
                            let mut at = source_lsn;
                            if r.read_only_source && read_only_note.is_empty() {
                                read_only_note = make_read_only(&watch).await;
                                tracing::warn!(job = %job_id, "{read_only_note}");
                                at = source_position(&watch, &spec.slot).await?.0;
                            }
                            cutover_lsn = at;
                            tracing::info!(job = %job_id, until = %cutover_lsn, "cutover: catching up");
                            until_tx.send_replace(Some(cutover_lsn));
                        }
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        stop.cancel();
                        anyhow::bail!("the coordinator no longer knows job {job_id}: {}", s.message());
                    }
                    Err(s) => tracing::warn!("failed to report following to the coordinator: {}", s.message()),
                }
            }
        }
    }
    if stop.is_cancelled() || cutover_lsn == Lsn(0) {
        return Ok(());
    }

    // Caught up: the target holds every change up to the cutover position.
    let filter = haul_core::ident::TableFilter::of(&options);
    let sequences = crate::catalog::sequences(&watch, &filter).await?;
    let mut receiver = shared.peers.receiver(&task.receiver_addr).await?;
    receiver
        .set_sequences(pb::SetSequencesRequest {
            job_id: job_id.clone(),
            sequences: sequences.clone(),
        })
        .await
        .map_err(|s| haul_core::status::from_status(s, "receiver could not set the sequences"))?;
    // Test point: cutover is halfway (caught up, sequences set, nothing compared or dropped).
    haul_core::failpoint::die("die-in-cutover");
    let (mismatches, pieces) = match &task.verify {
        Some(v) if options.verify => {
            let pieces = crate::compare::pieces_of(v)?;
            let n = pieces.len() as u64;
            let progress = std::sync::Arc::new(crate::compare::Progress::default());
            let (found, _) = crate::compare::through_receiver(shared, v, pieces, progress).await?;
            (found, n)
        }
        _ => (Vec::new(), 0),
    };
    drop_slot_and_publication(&watch, &spec.slot, &spec.publication).await?;
    tracing::info!(job = %job_id, mismatches = mismatches.len(), "cutover: caught up, compared; slot and publication dropped");
    let (source_lsn, _) = source_position(&watch, "").await?;
    let mut report = follow_report(&job_id, &seen.borrow(), source_lsn, 0, cutover_lsn);
    report.cutover_done = true;
    report.read_only_source = read_only_note;
    report.mismatches = mismatches;
    report.sequences = sequences.len() as u32;
    report.pieces_compared = pieces;
    crate::worker::try_deliver(|| {
        let mut c = shared.peers.coordinator();
        let report = report.clone();
        async move { c.report_follow(report).await.map(|_| ()) }
    })
    .await
    .map_err(|s| haul_core::status::from_status(s, "coordinator refused the cutover report"))?;
    Ok(())
}

/// `cutover --read-only-source`: new sessions of the source database start read only, and its
/// other sessions are ended so they come back read only too. Returns the line for the
/// operator: what was done and how to undo it, or why it could not be done (the cutover goes
/// on; the operator stopped the writes anyway).
async fn make_read_only(client: &tokio_postgres::Client) -> String {
    let db: String = match client.query_one("SELECT current_database()", &[]).await {
        Ok(r) => r.get(0),
        Err(e) => {
            return format!(
                "could not make the source read only: {}",
                haul_core::pg::db_error_line(&e)
            )
        }
    };
    let quoted = haul_core::ident::quote_ident(&db);
    let undo = format!("ALTER DATABASE {quoted} RESET default_transaction_read_only");
    if let Err(e) = client
        .batch_execute(&format!(
            "ALTER DATABASE {quoted} SET default_transaction_read_only = on"
        ))
        .await
    {
        return format!(
            "could not make the source read only ({}): the cutover goes on; make sure the application's writes are stopped",
            haul_core::pg::db_error_line(&e)
        );
    }
    let ended = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0);
    format!(
        "source database {db} now refuses writes: default_transaction_read_only is on for new sessions and {ended} session(s) were ended; undo with {undo}"
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The source's current WAL position, and what the slot holds back behind it.
async fn source_position(
    client: &tokio_postgres::Client,
    slot: &str,
) -> anyhow::Result<(Lsn, u64)> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text, \
                    coalesce((SELECT (pg_current_wal_lsn() - restart_lsn)::int8 \
                              FROM pg_replication_slots WHERE slot_name = $1), 0)",
            &[&slot],
        )
        .await
        .context("read the source's WAL position")?;
    let lsn: String = row.get(0);
    let retained: i64 = row.get(1);
    Ok((lsn.parse()?, retained.max(0) as u64))
}

fn follow_report(
    job_id: &str,
    p: &Position,
    source_lsn: Lsn,
    retained: u64,
    cutover_lsn: Lsn,
) -> pb::FollowReport {
    pb::FollowReport {
        job_id: job_id.to_string(),
        applied_lsn: p.applied.0,
        confirmed_lsn: p.confirmed.0,
        source_lsn: source_lsn.0,
        applied_commit_time_us: if p.applied_commit_time == 0 {
            0
        } else {
            p.applied_commit_time + PG_EPOCH_US
        },
        transactions: p.transactions,
        statements: p.statements,
        retained_bytes: retained,
        cutover_lsn: cutover_lsn.0,
        ..Default::default()
    }
}
