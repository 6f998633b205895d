//! The sender's workers: each asks the coordinator for a task, does it, reports, and asks
//! again. Workers share one set of peer connections and the snapshots this sender holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use haul_core::bandwidth::Limiter;
use haul_core::codec::Codec;
use haul_core::status::fatal_message;
use haul_proto as pb;
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::peers::Peers;
use crate::snapshot::{SnapshotHolder, SnapshotReader};
use crate::{finalize, plan, transfer, SenderConfig};

/// Counters for logs and benchmarks.
#[derive(Default)]
pub struct SenderStats {
    pub raw_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
}

impl SenderStats {
    pub fn add_bytes(&self, raw: u64, wire: u64) {
        self.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
    }
}

pub struct Shared {
    pub config: SenderConfig,
    pub peers: Peers,
    pub stats: SenderStats,
    /// Chunks read ahead of the link onto local disk, so a restart does not lose them.
    pub staging: crate::staging::Staging,
    /// This sender's share of each job's cap, one limiter per job shared by all of the job's
    /// streams here; the coordinator changes the share at every renewal and lease.
    limiters: std::sync::Mutex<HashMap<String, Arc<Limiter>>>,
    /// Wire bytes sent for each job since the last renewal, which reports them.
    sent: std::sync::Mutex<HashMap<String, u64>>,
    /// `--codec auto`: the codec choice for each job's next block here (`core::codec::Tuner`).
    pub tuners: std::sync::Mutex<HashMap<String, haul_core::codec::Tuner>>,
    /// Snapshots this sender exported, by job. Held until the job is finalized.
    snapshots: Mutex<HashMap<String, Arc<SnapshotHolder>>>,
    agent_id: RwLock<String>,
    /// This process's incarnation: tells the coordinator when a sender of the same name is a new
    /// process that holds none of its predecessor's leases or snapshots.
    incarnation: String,
    /// Leases this sender's workers hold right now, renewed by the heartbeat. A revoked lease's
    /// token is cancelled, which aborts its transfer: the chunk belongs to someone else now.
    leases: std::sync::Mutex<HashMap<(String, u64), Held>>,
    /// One finalize run per job at a time, and whether one already reported: after a
    /// coordinator restart the task comes again while the first run may still be going.
    pub finalized: Mutex<HashMap<String, Arc<Mutex<bool>>>>,
    /// Column shapes for row digests, from the source's catalog.
    pub shapes: haul_core::row_digest::ShapeCache,
    /// Chunks read whole from the source and still crossing the link, by job and id: their
    /// worker went on to the next lease (`work`), and the coordinator hears of them at every
    /// poll, so their leases do not count against the job's source readers.
    crossing: std::sync::Mutex<std::collections::HashSet<(String, u64)>>,
    /// Source readers whose chunk went on crossing alone, for the next chunk of their job,
    /// with when they were parked.
    idle_readers: std::sync::Mutex<Vec<(SnapshotReader, std::time::Instant)>>,
    /// Per job, what its streams waited for and how much of it the receiver held them back,
    /// from each receipt: decayed sums of (raw bytes, wait, held), see `note_stream`.
    holds: std::sync::Mutex<HashMap<String, (f64, f64, f64)>>,
}

/// How long a parked source reader waits for another chunk of its job before it closes.
const PARKED_READER_IDLE: Duration = Duration::from_secs(30);

/// A stream slower than this per raw byte (50 MB/s) because of the link, not the receiver,
/// is held back by its flow: more streams at once fill more of the path.
pub const FLOW_SLOW_NS_PER_BYTE: f64 = 20.0;

struct Held {
    epoch: u64,
    renew_ms: u32,
    revoked: CancellationToken,
}

impl Shared {
    pub fn new(config: SenderConfig) -> anyhow::Result<Shared> {
        let peers = Peers::new(config.tls.clone(), &config.coordinator)?;
        let staging = crate::staging::Staging::open(&config.state_dir, config.staging_bytes)?;
        Ok(Shared {
            staging,
            config,
            peers,
            stats: SenderStats::default(),
            limiters: std::sync::Mutex::new(HashMap::new()),
            sent: std::sync::Mutex::new(HashMap::new()),
            tuners: std::sync::Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            agent_id: RwLock::new(String::new()),
            leases: std::sync::Mutex::new(HashMap::new()),
            finalized: Mutex::new(HashMap::new()),
            shapes: Default::default(),
            incarnation: haul_core::state::incarnation(),
            crossing: Default::default(),
            idle_readers: Default::default(),
            holds: Default::default(),
        })
    }

    /// A receipt's word on a stream of `job_id`: its `raw` bytes waited `waited_ns` for the
    /// wire in all (blocks, then the last of them crossing), of which the receiver held it
    /// back `held_ns` (loading into the target as it arrived, spool room, restoring).
    pub fn note_stream(&self, job_id: &str, raw: u64, waited_ns: u64, held_ns: u64) {
        if let Ok(mut m) = self.holds.lock() {
            let e = m.entry(job_id.to_string()).or_default();
            // Decayed, so the last few dozen receipts speak.
            e.0 = e.0 * 0.9 + raw as f64;
            e.1 = e.1 * 0.9 + waited_ns as f64;
            e.2 = e.2 * 0.9 + held_ns.min(waited_ns) as f64;
        }
    }

    /// Whether a chunk of `job_id` read whole may be left to cross alone while its worker
    /// takes the next lease: the receipts so far say each stream is held to less than
    /// [`FLOW_SLOW_NS_PER_BYTE`] by the link (not by the receiver, which held the streams
    /// back for less than half their wait), so another stream on another flow fills more of
    /// it. Before any receipt: no.
    pub fn flows_are_slow(&self, job_id: &str) -> bool {
        self.holds
            .lock()
            .ok()
            .and_then(|m| m.get(job_id).copied())
            .is_some_and(|(raw, w, h)| {
                raw > 0.0 && h < 0.5 * w && (w - h) / raw >= FLOW_SLOW_NS_PER_BYTE
            })
    }

    /// The chunks read whole and still crossing, for the coordinator.
    fn crossing_now(&self) -> Vec<pb::SendingChunk> {
        self.crossing
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(job_id, chunk_id)| pb::SendingChunk {
                        job_id: job_id.clone(),
                        chunk_id: *chunk_id,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_crossing(&self, key: &(String, u64), on: bool) {
        if let Ok(mut s) = self.crossing.lock() {
            if on {
                s.insert(key.clone());
            } else {
                s.remove(key);
            }
        }
    }

    /// Keep a reader for the next chunk of its job (a few at most; the rest close).
    fn park_reader(&self, reader: SnapshotReader) {
        if let Ok(mut v) = self.idle_readers.lock() {
            if v.len() < self.config.slots.max(1) {
                v.push((reader, std::time::Instant::now()));
            }
        }
    }

    /// A parked reader inside `lease`'s snapshot, if there is one.
    fn parked_reader(&self, lease: &pb::ChunkLease) -> Option<SnapshotReader> {
        let mut v = self.idle_readers.lock().ok()?;
        // Readers of the job's earlier snapshots (it was exported again) are of no more use.
        v.retain(|(r, _)| r.job_id != lease.job_id || r.snapshot_id == lease.snapshot_id);
        let i = v
            .iter()
            .position(|(r, _)| r.job_id == lease.job_id && r.snapshot_id == lease.snapshot_id)?;
        Some(v.swap_remove(i).0)
    }

    /// Close readers parked longer than [`PARKED_READER_IDLE`]: each holds a transaction open
    /// on the source, which holds back its vacuum, and a sender that is not the job's planner
    /// never hears that the job's reading is over.
    fn close_idle_readers(&self) {
        if let Ok(mut v) = self.idle_readers.lock() {
            v.retain(|(_, parked)| parked.elapsed() < PARKED_READER_IDLE);
        }
    }

    pub async fn hold_snapshot(&self, job_id: &str, holder: SnapshotHolder) {
        self.snapshots
            .lock()
            .await
            .insert(job_id.to_string(), Arc::new(holder));
    }

    pub async fn snapshot(&self, job_id: &str) -> Option<Arc<SnapshotHolder>> {
        self.snapshots.lock().await.get(job_id).cloned()
    }

    /// The job's reading is over here: its snapshot goes, and with it the codec tuner's view
    /// of the job's tables (a chunk leased again later starts a new one).
    pub async fn release_snapshot(&self, job_id: &str) {
        self.snapshots.lock().await.remove(job_id);
        if let Ok(mut t) = self.tuners.lock() {
            t.remove(job_id);
        }
        if let Ok(mut h) = self.holds.lock() {
            h.remove(job_id);
        }
        // Parked readers hold a transaction open on the source (which holds back its vacuum):
        // they close with the job's reading.
        if let Ok(mut v) = self.idle_readers.lock() {
            v.retain(|(r, _)| r.job_id != job_id);
        }
    }

    /// The limiter for a job's cap here, set to `bytes_per_sec` (this sender's share now).
    pub fn limiter_for(&self, job_id: &str, bytes_per_sec: u64) -> Arc<Limiter> {
        let Ok(mut map) = self.limiters.lock() else {
            return Arc::new(Limiter::new(bytes_per_sec));
        };
        let l = map
            .entry(job_id.to_string())
            .or_insert_with(|| Arc::new(Limiter::new(bytes_per_sec)))
            .clone();
        l.set_rate(bytes_per_sec);
        l
    }

    /// The codec for the next block of a job's `table`: the job's own, or with `--codec auto`
    /// this sender's current choice for that table.
    pub fn codec_for(
        &self,
        job_id: &str,
        options: &pb::JobOptions,
        table: &str,
    ) -> anyhow::Result<Codec> {
        if !options.codec_auto {
            return Codec::from_wire(options.codec, options.zstd_level);
        }
        Ok(self
            .tuners
            .lock()
            .map(|mut t| t.entry(job_id.to_string()).or_default().codec_for(table))
            .unwrap_or(Codec::Zstd {
                level: haul_core::codec::DEFAULT_ZSTD_LEVEL,
            }))
    }

    /// Tell the job's tuner (`--codec auto`) that `raw` bytes of `table` took `ns` to become
    /// `wire` bytes with `codec`.
    pub fn tune_compress(
        &self,
        job_id: &str,
        table: &str,
        codec: Codec,
        (raw, wire, ns): (u64, u64, u64),
    ) {
        if let Ok(mut t) = self.tuners.lock() {
            if let Some(t) = t.get_mut(job_id) {
                t.compressed(table, codec, raw, wire, ns);
            }
        }
    }

    /// ... and that `raw` bytes waited `ns` for the wire.
    pub fn tune_send(&self, job_id: &str, raw: u64, ns: u64) {
        if let Ok(mut t) = self.tuners.lock() {
            if let Some(t) = t.get_mut(job_id) {
                t.sent(raw, ns);
            }
        }
    }

    /// Count wire bytes sent for a job, for the next renewal's report.
    pub fn count_sent(&self, job_id: &str, wire_bytes: u64) {
        if let Ok(mut m) = self.sent.lock() {
            *m.entry(job_id.to_string()).or_default() += wire_bytes;
        }
    }

    async fn register(&self, shutdown: &CancellationToken) -> Option<String> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let req = pb::RegisterRequest {
                name: self.config.name.clone(),
                advertise: String::new(),
                slots: self.config.slots as u32,
                incarnation: self.incarnation.clone(),
            };
            match self.peers.coordinator().register(req).await {
                Ok(r) => {
                    let id = r.into_inner().agent_id;
                    *self.agent_id.write().await = id.clone();
                    tracing::info!(agent = %id, "registered with coordinator");
                    return Some(id);
                }
                Err(s) => {
                    tracing::warn!(
                        "failed to register with coordinator {}: {}",
                        self.config.coordinator,
                        s.message()
                    );
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    if shared.register(&shutdown).await.is_none() {
        return Ok(());
    }
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tasks.spawn(async move { heartbeat(shared, shutdown).await });
    }
    for worker in 0..shared.config.slots.max(1) {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { work(shared, worker as u32, shutdown).await });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            shutdown.cancel();
            anyhow::bail!("sender worker ended unexpectedly: {e}");
        }
    }
    Ok(())
}

async fn work(shared: Arc<Shared>, worker: u32, shutdown: CancellationToken) {
    let mut reader: Option<SnapshotReader> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let agent_id = shared.agent_id.read().await.clone();
        let mut coordinator = shared.peers.coordinator();
        let poll = coordinator.sender_poll(pb::SenderPollRequest {
            agent_id,
            worker,
            sending: shared.crossing_now(),
        });
        let task = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = poll => r,
        };
        let task = match task {
            Ok(t) => {
                backoff = Duration::from_millis(100);
                t.into_inner().task
            }
            Err(s) => {
                if s.code() == tonic::Code::NotFound {
                    // The coordinator forgot us (restarted without state): register again.
                    if shared.register(&shutdown).await.is_none() {
                        return;
                    }
                } else {
                    tracing::warn!("failed to poll coordinator: {}", s.message());
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                continue;
            }
        };
        match task {
            None | Some(pb::sender_task::Task::Idle(_)) => {
                let wait = match &task {
                    Some(pb::sender_task::Task::Idle(i)) => i.retry_ms.max(10),
                    _ => 200,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                }
            }
            Some(pb::sender_task::Task::Follow(t)) => {
                let job = t.job_id.clone();
                if let Err(e) = crate::follow::run_task(&shared, t).await {
                    report_failure(&shared, "follow", &job, (0, 0, ""), e).await;
                }
            }
            Some(pb::sender_task::Task::Plan(p)) => {
                let job = p.job_id.clone();
                if let Err(e) = plan::run(&shared, p).await {
                    shared.release_snapshot(&job).await;
                    report_failure(&shared, "plan", &job, (0, 0, ""), e).await;
                }
            }
            Some(pb::sender_task::Task::Chunk(lease)) => {
                if reader.is_none() {
                    reader = shared.parked_reader(&lease);
                }
                let key = (lease.job_id.clone(), lease.chunk_id);
                let (read_whole, crossing) = tokio::sync::oneshot::channel();
                let mut carrying =
                    tokio::spawn(carry(shared.clone(), reader.take(), lease, read_whole));
                tokio::select! {
                    done = &mut carrying => reader = done.ok().flatten(),
                    alone = crossing => match alone {
                        // Read whole, and the link is what it waits for: it crosses on its
                        // own while this worker reads the next chunk, on another reader.
                        Ok(()) => {
                            shared.set_crossing(&key, true);
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let done = carrying.await;
                                shared.set_crossing(&key, false);
                                if let Ok(Some(r)) = done {
                                    shared.park_reader(r);
                                }
                            });
                        }
                        Err(_) => reader = carrying.await.ok().flatten(),
                    },
                }
            }
            Some(pb::sender_task::Task::Snapshot(t)) => {
                let job = t.job_id.clone();
                if let Err(e) = plan::resnapshot(&shared, t).await {
                    report_failure(&shared, "export a new snapshot for", &job, (0, 0, ""), e).await;
                }
            }
            Some(pb::sender_task::Task::Finalize(f)) => {
                let job = f.job_id.clone();
                match finalize::run(&shared, f).await {
                    Ok(()) => shared.staging.remove_job(&job).await,
                    Err(e) => report_failure(&shared, "finalize", &job, (0, 0, ""), e).await,
                }
            }
            Some(pb::sender_task::Task::Cleanup(c)) => {
                let job = c.job_id.clone();
                if let Err(e) = finalize::cleanup(&shared, c).await {
                    report_failure(&shared, "clean up after", &job, (0, 0, ""), e).await;
                }
            }
            Some(pb::sender_task::Task::Verify(v)) => {
                let (id, job) = (v.verify_id.clone(), v.job_id.clone());
                if let Err(e) = crate::compare::run_task(&shared, v).await {
                    tracing::warn!(verify = %id, %job, "failed to verify the finished job: {e:#}");
                }
            }
        }
    }
}

/// One chunk lease carried from the source to its receipt and report; gives its source reader
/// back (none after a failure: its transaction may be unusable). `read_whole` is told when the
/// chunk has been read whole and the rest may cross without the worker (`transfer::run`).
async fn carry(
    shared: Arc<Shared>,
    mut reader: Option<SnapshotReader>,
    lease: pb::ChunkLease,
    read_whole: tokio::sync::oneshot::Sender<()>,
) -> Option<SnapshotReader> {
    let shared = &*shared;

    let limiter = shared.limiter_for(
        &lease.job_id,
        lease.options.as_ref().map_or(0, |o| o.bwlimit_bytes),
    );
    let key = (lease.job_id.clone(), lease.chunk_id);
    let revoked = CancellationToken::new();
    if let Ok(mut held) = shared.leases.lock() {
        held.insert(
            key.clone(),
            Held {
                epoch: lease.epoch,
                renew_ms: lease.renew_ms,
                revoked: revoked.clone(),
            },
        );
    }
    let moved = async {
        if lease.members.is_empty() {
            transfer::run(shared, &mut reader, &lease, &limiter, Some(read_whole))
                .await
                .map(|out| report_of(&lease, out))
        } else {
            crate::group::run(shared, &mut reader, &lease, &limiter).await
        }
    };
    let result = tokio::select! {
        r = moved => r,
        _ = revoked.cancelled() => Err(anyhow::anyhow!(
            "lease on chunk {} was revoked (it expired, went to another sender, or the job was paused); stopped sending it",
            lease.chunk_id
        )),
    };
    if let Ok(mut held) = shared.leases.lock() {
        held.remove(&key);
    }
    match result {
        Ok(report) => {
            if report.members.is_empty() {
                tracing::info!(
                    job = %lease.job_id,
                    chunk = lease.chunk_id,
                    rows = report.rows,
                    wire_bytes = report.wire_bytes,
                    codec = %report.codec,
                    "chunk applied"
                );
            } else {
                tracing::info!(
                    job = %lease.job_id,
                    chunk = lease.chunk_id,
                    tables = report.members.len(),
                    rows = report.rows,
                    wire_bytes = report.wire_bytes,
                    codec = %report.codec,
                    "group of small tables applied"
                );
            }
            // Test point: applied on the target, not yet reported.
            haul_core::failpoint::die("die-before-chunk-report");
            if !report.members.is_empty() {
                haul_core::failpoint::die("die-before-group-report");
            }
            deliver("report chunk", || {
                let mut c = shared.peers.coordinator();
                let report = report.clone();
                async move { c.report_chunk(report).await.map(|_| ()) }
            })
            .await;
        }
        Err(e) => {
            // The reader's transaction may be unusable now; open a fresh one next time.
            reader = None;
            let table = lease.table.as_ref().map_or_else(
                || format!("a group of {} small tables", lease.members.len()),
                |t| format!("{}.{}", t.schema, t.name),
            );
            report_failure(
                shared,
                "copy chunk",
                &lease.job_id,
                (lease.chunk_id, lease.epoch, &table),
                e,
            )
            .await;
        }
    }

    reader
}

/// A lone chunk's report to the coordinator.
fn report_of(lease: &pb::ChunkLease, out: transfer::Outcome) -> pb::ChunkReport {
    pb::ChunkReport {
        job_id: lease.job_id.clone(),
        chunk_id: lease.chunk_id,
        epoch: lease.epoch,
        rows: out.rows,
        raw_bytes: out.raw_bytes,
        wire_bytes: out.wire_bytes,
        digest: out.digest,
        already_applied: out.already_applied,
        snapshot_id: out.snapshot_id,
        resumed_bytes: out.resumed_bytes,
        resent_bytes: out.resent_bytes,
        checked: out.checked,
        mismatch: out.mismatch,
        row_digest: out.row_digest.map(|d| d.to_bytes()).unwrap_or_default(),
        digest_rows: out.row_digest.map_or(0, |d| d.rows),
        check_pending: out.check_pending,
        codec: out.codec,
        members: Vec::new(),
    }
}

async fn report_failure(
    shared: &Shared,
    what: &str,
    job_id: &str,
    (chunk_id, epoch, table): (u64, u64, &str),
    e: anyhow::Error,
) {
    let fatal = fatal_message(&e);
    let message = fatal.clone().unwrap_or_else(|| format!("{e:#}"));
    let agent = shared.config.name.as_str();
    if chunk_id == 0 {
        tracing::warn!(job = %job_id, agent, "failed to {what} {job_id}: {message}");
    } else {
        tracing::warn!(job = %job_id, chunk = chunk_id, table, agent, "failed to {what} {chunk_id} ({table}) of {job_id}: {message}");
    }
    let lost_snapshot = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::snapshot::SnapshotGone>())
        .map(|g| g.snapshot_id.clone())
        .unwrap_or_default();
    let report = pb::FailureReport {
        job_id: job_id.to_string(),
        chunk_id,
        epoch,
        message,
        fatal: fatal.is_some(),
        lost_snapshot,
        exhausted: haul_core::status::exhausted_message(&e).is_some(),
    };
    deliver("report failure", || {
        let mut c = shared.peers.coordinator();
        let report = report.clone();
        async move { c.report_failure(report).await.map(|_| ()) }
    })
    .await;
}

/// Renew every lease this sender holds, a few times per lease timeout, and abort the transfers
/// of leases the coordinator says are no longer ours.
async fn heartbeat(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        shared.close_idle_readers();
        let (leases, every) = match shared.leases.lock() {
            Ok(held) => (
                held.iter()
                    .map(|((job, chunk), h)| pb::LeaseRef {
                        job_id: job.clone(),
                        chunk_id: *chunk,
                        epoch: h.epoch,
                    })
                    .collect::<Vec<_>>(),
                held.values()
                    .map(|h| h.renew_ms)
                    .filter(|&ms| ms > 0)
                    .min()
                    .unwrap_or(1000)
                    // At least once a second: a changed cap must reach the streams quickly.
                    .min(1000),
            ),
            Err(_) => (Vec::new(), 1000),
        };
        let sent: Vec<pb::JobBytes> = match shared.sent.lock() {
            Ok(mut m) => m
                .drain()
                .map(|(job_id, wire_bytes)| pb::JobBytes { job_id, wire_bytes })
                .collect(),
            Err(_) => Vec::new(),
        };
        // Sent even when empty: the list is also how the coordinator learns what we do not hold.
        if !shared.agent_id.read().await.is_empty() {
            match shared
                .peers
                .coordinator()
                .renew_leases(pb::RenewRequest { leases, sent })
                .await
            {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    for r in &reply.rates {
                        shared.limiter_for(&r.job_id, r.bytes_per_sec);
                    }
                    if let Ok(held) = shared.leases.lock() {
                        for r in reply.revoked {
                            if let Some(h) = held.get(&(r.job_id.clone(), r.chunk_id)) {
                                if h.epoch == r.epoch {
                                    h.revoked.cancel();
                                }
                            }
                        }
                    }
                }
                // The coordinator is away: keep working; it will renew or revoke when it is back.
                Err(s) => tracing::debug!("lease renewal failed: {}", s.message()),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(every as u64)) => {}
        }
    }
}

/// Deliver a report to the coordinator, retrying with backoff for about half a minute: a
/// report lost while the coordinator restarts would leave its lease to time out instead.
async fn deliver<F, Fut>(what: &str, call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    if let Err(s) = try_deliver(call).await {
        tracing::warn!("failed to {what}: {}", s.message());
    }
}

/// [`deliver`], returning the last refusal when the coordinator could not be reached in time
/// or refused for good.
pub async fn try_deliver<F, Fut>(mut call: F) -> Result<(), tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut wait = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(()) => return Ok(()),
            Err(s)
                if tokio::time::Instant::now() >= deadline
                    || matches!(
                        s.code(),
                        tonic::Code::NotFound
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::PermissionDenied
                            | tonic::Code::InvalidArgument
                    ) =>
            {
                return Err(s);
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(3));
            }
        }
    }
}
