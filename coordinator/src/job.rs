//! A job and its chunks: the state machine the coordinator drives.
//!
//! planning -> copying -> finalizing -> done, or failed from any of them. A chunk is pending,
//! leased (to one sender worker, with an epoch that grows on every lease) or done. The
//! coordinator never sees rows: a chunk is done when its sender reports the receiver's
//! receipt, which is given only after the target committed the chunk with its ledger row.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use haul_core::chunk::{ChunkPlan, Column, Range};
use haul_core::ident::TableName;
use haul_core::row_digest::RowDigest;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Planning,
    Copying,
    Finalizing,
    /// `--follow`: the bulk copy is done and verified; the slot's changes are being applied
    /// until cutover.
    Following,
    Done,
    Failed,
    /// `haul cancel`: nothing more of it goes out; its undo is on its way to the target.
    Cancelling,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planning => "planning",
            Phase::Copying => "copying",
            Phase::Finalizing => "finalizing",
            Phase::Following => "following",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelling => "cancelling",
            Phase::Cancelled => "cancelled",
        }
    }
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// The options a job was started with (the wire's JobOptions, owned here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    pub codec: i32,
    pub zstd_level: i32,
    pub chunk_bytes: u64,
    pub bwlimit_bytes: u64,
    pub create_schema: bool,
    pub verify: bool,
    pub tables: Vec<String>,
    pub jobs: u32,
    #[serde(default)]
    pub keep_ledger: bool,
    #[serde(default)]
    pub no_owner: bool,
    #[serde(default)]
    pub no_privileges: bool,
    #[serde(default)]
    pub create_roles: bool,
    #[serde(default)]
    pub role_passwords: bool,
    /// The job's cap as written (a rate, off, or a timetable); empty in records from before
    /// timetables, whose cap is `bwlimit_bytes`.
    #[serde(default)]
    pub bwlimit: String,
    /// TCP connections per sender-receiver pair (0: haul chooses).
    #[serde(default)]
    pub connections: u32,
    #[serde(default)]
    pub codec_auto: bool,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    #[serde(default)]
    pub schemas: Vec<String>,
    #[serde(default)]
    pub exclude_schemas: Vec<String>,
    /// `--follow`: after the bulk copy, the slot's changes are applied until cutover.
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub replica_identity_full: bool,
}

impl From<&haul_proto::JobOptions> for Options {
    fn from(o: &haul_proto::JobOptions) -> Self {
        Options {
            codec: o.codec,
            zstd_level: o.zstd_level,
            chunk_bytes: o.chunk_bytes,
            bwlimit_bytes: o.bwlimit_bytes,
            create_schema: o.create_schema,
            verify: o.verify,
            tables: o.tables.clone(),
            jobs: o.jobs,
            keep_ledger: o.keep_ledger,
            no_owner: o.no_owner,
            no_privileges: o.no_privileges,
            create_roles: o.create_roles,
            role_passwords: o.role_passwords,
            bwlimit: o.bwlimit.clone(),
            connections: o.connections,
            codec_auto: o.codec_auto,
            exclude_tables: o.exclude_tables.clone(),
            schemas: o.schemas.clone(),
            exclude_schemas: o.exclude_schemas.clone(),
            follow: o.follow,
            replica_identity_full: o.replica_identity_full,
        }
    }
}

impl Options {
    pub fn to_wire(&self) -> haul_proto::JobOptions {
        haul_proto::JobOptions {
            codec: self.codec,
            zstd_level: self.zstd_level,
            chunk_bytes: self.chunk_bytes,
            bwlimit_bytes: self.bwlimit_bytes,
            create_schema: self.create_schema,
            verify: self.verify,
            tables: self.tables.clone(),
            jobs: self.jobs,
            keep_ledger: self.keep_ledger,
            no_owner: self.no_owner,
            no_privileges: self.no_privileges,
            create_roles: self.create_roles,
            role_passwords: self.role_passwords,
            bwlimit: self.bwlimit.clone(),
            connections: self.connections,
            codec_auto: self.codec_auto,
            exclude_tables: self.exclude_tables.clone(),
            schemas: self.schemas.clone(),
            exclude_schemas: self.exclude_schemas.clone(),
            follow: self.follow,
            replica_identity_full: self.replica_identity_full,
        }
    }

    /// The cap spec in force for the job.
    pub fn cap_spec(&self) -> String {
        crate::cap::spec_of(&self.bwlimit, self.bwlimit_bytes)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableInfo {
    pub table: TableName,
    pub columns: Vec<Column>,
    pub bytes: u64,
}

/// The job record persisted under its id (chunks are persisted one key each).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub options: Options,
    pub phase: Phase,
    pub error: String,
    /// The sender that planned the job holds its snapshot and finalizes it.
    pub planner: Option<String>,
    pub receiver_addr: String,
    pub snapshot_id: String,
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub plan_attempts: u32,
    pub verified: bool,
    pub checks: Vec<Check>,
    pub sequences: u32,
    pub post_data_objects: u32,
    /// The planner's process incarnation: a planner that comes back as a new process has lost
    /// the snapshot it held.
    #[serde(default)]
    pub planner_incarnation: String,
    /// The snapshot died with its holder; a sender must export a new one before more chunks go
    /// out.
    #[serde(default)]
    pub snapshot_lost: bool,
    /// A snapshot task is out; not handed out twice at once.
    #[serde(default)]
    pub snapshot_leased: bool,
    /// A condition the operator should know about while the job waits (a full spool disk).
    /// Cleared when a chunk completes.
    #[serde(default)]
    pub warning: String,
    /// `haul pause`: the job holds no leases and is handed out to nobody until `haul resume`.
    #[serde(default)]
    pub paused: bool,
    /// Leases that ran out without a renewal (their holder died or lost its way here).
    #[serde(default)]
    pub lease_expiries: u64,
    /// The finalize task is out (with the planner); not handed out twice at once.
    #[serde(default)]
    pub finalize_leased: bool,
    /// Failed finalize or cleanup attempts, and the earliest time of the next one (backoff, so
    /// a receiver that is restarting is not burnt through the attempts in a second).
    #[serde(default)]
    pub finalize_attempts: u32,
    #[serde(default)]
    pub finalize_not_before_ms: u64,
    /// Verification passed (or was not asked for): what is left is to clean the target up.
    #[serde(default)]
    pub cleanup_pending: bool,
    /// The sender the cleanup task is out with (a new process of it holds nothing).
    #[serde(default)]
    pub cleanup_holder: Option<String>,
    /// Whether the haul schema is gone from the target (false with --keep-ledger).
    #[serde(default)]
    pub ledger_dropped: bool,
    /// `haul cancel --keep-target`: undo nothing on the target, only say what is there.
    #[serde(default)]
    pub cancel_keep_target: bool,
    /// The phase the job was in when it was cancelled.
    #[serde(default)]
    pub cancelled_in: String,
    /// What the cancel undid on the target, and what the job left there, a line each.
    #[serde(default)]
    pub undone: Vec<String>,
    #[serde(default)]
    pub left: Vec<String>,
    /// A `--follow` job's slot, and how following stands.
    #[serde(default)]
    pub follow: Option<Follow>,
}

/// WAL a slot holds back on the source, past which status warns.
pub const RETAINED_WARNING_BYTES: u64 = 1 << 30;

/// A `--follow` job: its slot and publication on the source, and the follower's last report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Follow {
    pub slot: String,
    pub publication: String,
    pub start_lsn: u64,
    /// Tables given REPLICA IDENTITY FULL on the source by the plan.
    pub identity_full: Vec<String>,
    /// The sender following now, and when it last reported (a silent one is replaced).
    pub holder: Option<String>,
    pub last_report_ms: u64,
    /// Failed follow attempts in a row, and the earliest time of the next.
    pub attempts: u32,
    pub not_before_ms: u64,
    pub applied_lsn: u64,
    pub confirmed_lsn: u64,
    pub source_lsn: u64,
    pub applied_commit_time_us: i64,
    pub transactions: u64,
    pub retained_bytes: u64,
    /// Transactions a second, over the reports of the last few seconds.
    pub apply_rate: f64,
    /// The follower's measure of the lag in time, at its last report.
    pub lag_ms: u64,
    #[serde(skip)]
    pub rate_window: std::collections::VecDeque<(u64, u64)>,
    /// `haul cutover`: when it was asked for, the position it waits for, when it finished.
    pub cutover_requested_ms: u64,
    /// `haul cutover --read-only-source`, and what the follower reported doing about it.
    pub read_only_source: bool,
    pub read_only_note: String,
    pub cutover_lsn: u64,
    pub cutover_done_ms: u64,
    pub cutover_sequences: u32,
    pub cutover_pieces: u64,
    /// The slot and publication are gone from the source.
    pub slot_dropped: bool,
    /// Who is dropping them (a failed job's source-only cleanup).
    pub drop_holder: Option<String>,
}

impl Follow {
    /// Bytes of the source's WAL not yet applied: nothing when the follower has confirmed
    /// everything the source has written.
    pub fn lag_bytes(&self) -> u64 {
        self.source_lsn
            .saturating_sub(self.applied_lsn.max(self.confirmed_lsn))
    }

    /// Seconds behind, as the follower measured at its last report: none when the target
    /// held everything the source had written, else since the later of the last applied
    /// commit and the last time it was caught up. Before any follower reported: since the job
    /// started.
    pub fn lag_seconds(&self, now_ms: u64, started_ms: u64) -> f64 {
        if self.lag_bytes() == 0 {
            return 0.0;
        }
        if self.last_report_ms == 0 {
            return now_ms.saturating_sub(started_ms) as f64 / 1000.0;
        }
        self.lag_ms as f64 / 1000.0
    }

    /// Take a follower's report.
    pub fn report(&mut self, r: &haul_proto::FollowReport, now_ms: u64) {
        self.last_report_ms = now_ms;
        self.attempts = 0;
        self.lag_ms = r.lag_ms;
        self.applied_lsn = self.applied_lsn.max(r.applied_lsn);
        self.confirmed_lsn = self.confirmed_lsn.max(r.confirmed_lsn);
        self.source_lsn = self.source_lsn.max(r.source_lsn);
        if r.applied_commit_time_us > 0 {
            self.applied_commit_time_us = r.applied_commit_time_us;
        }
        if r.retained_bytes > 0 || r.cutover_done {
            self.retained_bytes = r.retained_bytes;
        }
        if r.cutover_lsn > 0 {
            self.cutover_lsn = r.cutover_lsn;
        }
        if !r.read_only_source.is_empty() {
            self.read_only_note = r.read_only_source.clone();
        }
        // A follower starts its count at zero: the job's total adds what each one did.
        self.rate_window.push_back((now_ms, r.transactions));
        while self.rate_window.len() > 6 {
            self.rate_window.pop_front();
        }
        if let (Some(&(t0, n0)), Some(&(t1, n1))) =
            (self.rate_window.front(), self.rate_window.back())
        {
            if t1 > t0 && n1 >= n0 {
                self.apply_rate = (n1 - n0) as f64 * 1000.0 / (t1 - t0) as f64;
            }
        }
        self.transactions = self.transactions.max(r.transactions);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub table: TableName,
    pub source_rows: i64,
    pub target_rows: i64,
    pub source_digest: String,
    pub target_digest: String,
}

impl Check {
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows && self.source_digest == self.target_digest
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkState {
    Pending,
    Leased {
        agent: String,
        since_unix_ms: u64,
    },
    Done {
        rows: u64,
        raw_bytes: u64,
        wire_bytes: u64,
        /// Raw bytes a resumed stream did not send again (the receiver held them).
        #[serde(default)]
        resumed_bytes: u64,
        /// Raw bytes that reached the receiver more than once.
        #[serde(default)]
        resent_bytes: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub id: u64,
    pub table: usize,
    pub range: Range,
    pub est_bytes: u64,
    pub epoch: u64,
    pub attempts: u32,
    pub state: ChunkState,
    pub last_error: String,
    /// The snapshot the chunk's rows were read under (from the target's ledger).
    #[serde(default)]
    pub snapshot_id: String,
    /// After a failure the chunk waits before it is leased again (exponential backoff), so a
    /// peer that is restarting is not burnt through the attempt limit in a second.
    #[serde(default)]
    pub not_before_ms: u64,
    /// The receiver read the chunk's rows back after commit and compared them with the
    /// sender's digest; `mismatch` says how they differ (empty: equal).
    #[serde(default)]
    pub checked: bool,
    #[serde(default)]
    pub mismatch: String,
    /// The sender's row digest of the chunk (empty when it sent none) and its row count.
    #[serde(default)]
    pub row_digest: Vec<u8>,
    #[serde(default)]
    pub digest_rows: u64,
    /// Since when the receiver has been reading the chunk back (0: not pending). Finalize does
    /// not wait for it: a table with a chunk not compared yet is compared whole at finalize,
    /// where the receiver uses its read still running instead of reading the table again.
    #[serde(default)]
    pub check_pending_since_ms: u64,
    /// The receiver's read-back result came (it may come before the sender's report).
    #[serde(default)]
    pub check_reported: bool,
    /// The codec the chunk crossed with, as its sender reported.
    #[serde(default)]
    pub codec: String,
    /// The id of the first chunk of this chunk's group (small tables leased, streamed and
    /// restored together), or 0 for a chunk leased alone. A group's members are consecutive.
    #[serde(default)]
    pub group: u64,
}

/// A table to digest whole at the end: its index, the sum of its chunks' digests, and its
/// chunks (to read one by one if the table differs).
pub type Expected<'a> = (usize, RowDigest, Vec<&'a Chunk>);

/// Failed finalize or cleanup attempts before the job fails: with [`backoff_ms`] that is about
/// five minutes of a receiver being away.
pub const MAX_FINALIZE_ATTEMPTS: u32 = 14;

/// Transient failures a chunk may have before the job fails. With the backoff below, that is
/// about two minutes of a peer being unreachable.
pub const MAX_ATTEMPTS: u32 = 8;

/// The wait before the next lease after `attempts` failures: 1 s, 2 s, 4 s ... capped at 30 s.
pub fn backoff_ms(attempts: u32) -> u64 {
    (1000u64 << attempts.saturating_sub(1).min(5)).min(30_000)
}

impl Chunk {
    pub fn from_plan(id: u64, p: ChunkPlan) -> Chunk {
        Chunk {
            id,
            table: p.table,
            range: p.range,
            est_bytes: p.est_bytes,
            epoch: 0,
            attempts: 0,
            state: ChunkState::Pending,
            last_error: String::new(),
            not_before_ms: 0,
            snapshot_id: String::new(),
            checked: false,
            mismatch: String::new(),
            row_digest: Vec::new(),
            digest_rows: 0,
            check_pending_since_ms: 0,
            check_reported: false,
            codec: String::new(),
            group: 0,
        }
    }

    /// Whether this chunk stands for its lease in counts: alone, or first of its group.
    fn heads_lease(&self) -> bool {
        self.group == 0 || self.group == self.id
    }
}

/// A job in memory: its record, its tables (persisted once, at plan time: they are the bulk of
/// a job's state and never change) and its chunks in lease order (largest first).
#[derive(Debug, Clone)]
pub struct Job {
    pub record: JobRecord,
    pub tables: Vec<TableInfo>,
    pub chunks: Vec<Chunk>,
    /// How many chunks are done; kept so progress checks do not scan every chunk.
    pub done: usize,
    /// When leases were last checked for expiry (they are checked at most once a second).
    pub expiry_checked_ms: u64,
    /// The cap's shares and the achieved rate (memory only).
    pub cap: crate::cap::CapState,
    /// Bytes done over time, for the dashboard's chart (memory only).
    pub history: History,
    /// Chunks per table index, counted from `chunks` when their number last changed (memory
    /// only): a lease of a split table says how many chunks the table has, without a scan of
    /// every chunk per lease.
    chunk_counts: (usize, Vec<u64>),
}

/// The most samples a job's history keeps.
const HISTORY_SAMPLES: usize = 600;

/// Raw and wire bytes done over time: a sample every 2 s at first. When full, every other
/// sample is dropped and the interval doubles, so a move of days keeps its whole shape at a
/// coarser grain in bounded memory.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// (unix ms, raw bytes done, wire bytes done)
    pub samples: Vec<(u64, u64, u64)>,
    every_ms: u64,
}

impl History {
    pub fn record(&mut self, now_ms: u64, raw: u64, wire: u64) {
        let every = self.every_ms.max(2000);
        if self.samples.last().is_some_and(|s| now_ms < s.0 + every) {
            return;
        }
        self.samples.push((now_ms, raw, wire));
        if self.samples.len() > HISTORY_SAMPLES {
            let mut i = 0;
            self.samples.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.every_ms = every * 2;
        }
    }
}

impl Job {
    /// How many chunks table `table` (an index) has.
    pub fn table_chunk_count(&mut self, table: usize) -> u64 {
        if self.chunk_counts.0 != self.chunks.len()
            || self.chunk_counts.1.len() != self.tables.len()
        {
            let mut counts = vec![0u64; self.tables.len()];
            for c in &self.chunks {
                if let Some(n) = counts.get_mut(c.table) {
                    *n += 1;
                }
            }
            self.chunk_counts = (self.chunks.len(), counts);
        }
        self.chunk_counts.1.get(table).copied().unwrap_or(0)
    }

    pub fn new(id: String, options: Options) -> Job {
        Job {
            record: JobRecord {
                id,
                options,
                phase: Phase::Planning,
                error: String::new(),
                planner: None,
                receiver_addr: String::new(),
                snapshot_id: String::new(),
                started_unix_ms: now_ms(),
                finished_unix_ms: 0,
                plan_attempts: 0,
                verified: false,
                checks: Vec::new(),
                sequences: 0,
                post_data_objects: 0,
                finalize_leased: false,
                finalize_attempts: 0,
                finalize_not_before_ms: 0,
                cleanup_pending: false,
                cleanup_holder: None,
                ledger_dropped: false,
                cancel_keep_target: false,
                cancelled_in: String::new(),
                undone: Vec::new(),
                left: Vec::new(),
                follow: None,
                planner_incarnation: String::new(),
                snapshot_lost: false,
                snapshot_leased: false,
                warning: String::new(),
                paused: false,
                lease_expiries: 0,
            },
            tables: Vec::new(),
            chunks: Vec::new(),
            done: 0,
            expiry_checked_ms: 0,
            cap: Default::default(),
            history: History::default(),
            chunk_counts: (0, Vec::new()),
        }
    }

    /// Recount done chunks (after loading or replacing the chunk list).
    pub fn recount(&mut self) {
        self.done = self
            .chunks
            .iter()
            .filter(|c| matches!(c.state, ChunkState::Done { .. }))
            .count();
    }

    pub fn fail(&mut self, message: impl Into<String>) {
        // A job being cancelled ends cancelled (or, if its undo cannot run, failed by
        // `report_failure`), whatever else goes wrong with what was still out.
        if !self.record.phase.is_over() && self.record.phase != Phase::Cancelling {
            self.record.phase = Phase::Failed;
            self.record.error = message.into();
            self.record.finished_unix_ms = now_ms();
        }
    }

    /// The codecs done chunks crossed with, most used first: `zstd:6 x12, lz4 x3`.
    pub fn codecs(&self) -> String {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in self.chunks.iter().filter(|c| !c.codec.is_empty()) {
            *counts.entry(c.codec.as_str()).or_default() += 1;
        }
        let mut v: Vec<(&str, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.iter()
            .map(|(c, n)| format!("{c} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Pause (`haul pause`): every chunk leased goes back to pending, without counting as an
    /// attempt. Its holder hears at its next renewal that the lease is revoked, and the
    /// receiver refuses to commit under it (`CheckLease`); what the receiver spooled stays, so
    /// the next lease continues at its offset. Returns the leases revoked, and the chunks
    /// changed (to be written down, so a restart does not bring the leases back).
    pub fn pause(&mut self) -> (usize, Vec<Chunk>) {
        self.record.paused = true;
        let revoked = self.leases_out();
        let mut changed = Vec::new();
        for c in &mut self.chunks {
            if matches!(c.state, ChunkState::Leased { .. }) {
                c.state = ChunkState::Pending;
                changed.push(c.clone());
            }
        }
        (revoked, changed)
    }

    /// Cancel (`haul cancel`): every lease revoked as by [`Job::pause`], and the job turns to
    /// undoing what it wrote. Returns what `pause` returns.
    pub fn cancel(&mut self, keep_target: bool) -> (usize, Vec<Chunk>) {
        let out = self.pause();
        self.record.paused = false;
        self.record.cancelled_in = self.record.phase.as_str().to_string();
        self.record.phase = Phase::Cancelling;
        self.record.cancel_keep_target = keep_target;
        self.record.cleanup_holder = None;
        self.record.cleanup_pending = false;
        self.record.finalize_leased = false;
        self.record.finalize_attempts = 0;
        self.record.finalize_not_before_ms = 0;
        out
    }

    /// Leases out now, with any sender (a group's lease counts once).
    pub fn leases_out(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| c.heads_lease() && matches!(&c.state, ChunkState::Leased { .. }))
            .count()
    }

    /// Whether `agent` may take one more lease of this job, `crossing` being the ids of its
    /// chunks read whole and still crossing: fewer than `--jobs` of its leases read the source,
    /// and it has fewer than the job's chunks in flight (`core::chunk::in_flight_limit`).
    pub fn may_lease_to(&self, agent: &str, crossing: &[u64]) -> bool {
        let held = self.leases_held_by(agent);
        let reading = held.saturating_sub(self.leases_held_among(agent, crossing));
        let o = &self.record.options;
        reading < o.jobs.max(1) as usize
            && held < haul_core::chunk::in_flight_limit(o.jobs, o.connections)
    }

    /// How many of `agent`'s leases head one of `chunk_ids`.
    pub fn leases_held_among(&self, agent: &str, chunk_ids: &[u64]) -> usize {
        self.chunks
            .iter()
            .filter(|c| {
                c.heads_lease()
                    && chunk_ids.contains(&c.id)
                    && matches!(&c.state, ChunkState::Leased { agent: a, .. } if a == agent)
            })
            .count()
    }

    pub fn leases_held_by(&self, agent: &str) -> usize {
        self.chunks
            .iter()
            .filter(|c| {
                c.heads_lease()
                    && matches!(&c.state, ChunkState::Leased { agent: a, .. } if a == agent)
            })
            .count()
    }

    /// The indices of the chunks of `index`'s group (just `index` for a chunk leased alone).
    pub fn group_at(&self, index: usize) -> std::ops::Range<usize> {
        let Some(g) = self.chunks.get(index).map(|c| c.group) else {
            return index..index;
        };
        if g == 0 {
            return index..index + 1;
        }
        let mut start = index;
        while start > 0 && self.chunks[start - 1].group == g {
            start -= 1;
        }
        let mut end = index + 1;
        while end < self.chunks.len() && self.chunks[end].group == g {
            end += 1;
        }
        start..end
    }

    /// The chunks a lease of `chunk_id` under `epoch` covers: the chunk and the rest of its group
    /// leased under the same epoch.
    pub fn lease_members(&self, chunk_id: u64, epoch: u64) -> Vec<usize> {
        let Some(index) = self.chunks.iter().position(|c| c.id == chunk_id) else {
            return Vec::new();
        };
        self.group_at(index)
            .filter(|&i| i == index || self.chunks[i].epoch == epoch)
            .collect()
    }

    /// Return leases older than `timeout` to pending, at most once a second. Returns how many
    /// expired.
    pub fn expire_leases(&mut self, timeout: Duration) -> usize {
        let now = now_ms();
        if now.saturating_sub(self.expiry_checked_ms) < 1000 {
            return 0;
        }
        self.expiry_checked_ms = now;
        let cutoff = now.saturating_sub(timeout.as_millis() as u64);
        let mut n = 0;
        for c in &mut self.chunks {
            if let ChunkState::Leased {
                agent,
                since_unix_ms,
            } = &c.state
            {
                if *since_unix_ms < cutoff {
                    tracing::warn!(job = %self.record.id, chunk = c.id, %agent, "lease expired (not renewed); the chunk goes out again");
                    c.state = ChunkState::Pending;
                    n += 1;
                }
            }
        }
        self.record.lease_expiries += n as u64;
        n
    }

    /// Raw and wire bytes of the chunks done.
    pub fn bytes_done(&self) -> (u64, u64) {
        self.chunks.iter().fold((0, 0), |(r, w), c| match c.state {
            ChunkState::Done {
                raw_bytes,
                wire_bytes,
                ..
            } => (r + raw_bytes, w + wire_bytes),
            _ => (r, w),
        })
    }

    pub fn all_done(&self) -> bool {
        self.done == self.chunks.len()
    }

    /// Mark a chunk done (`state` is a `ChunkState::Done`), read under `snapshot_id`; returns
    /// false if it already was.
    pub fn complete(&mut self, index: usize, state: ChunkState, snapshot_id: &str) -> bool {
        let Some(c) = self.chunks.get_mut(index) else {
            return false;
        };
        if matches!(c.state, ChunkState::Done { .. }) {
            return false;
        }
        c.snapshot_id = snapshot_id.to_string();
        c.state = state;
        self.done += 1;
        true
    }

    /// Return every lease held by `agent` to pending (its process restarted: it holds nothing).
    pub fn void_leases_of(&mut self, agent: &str) -> usize {
        let mut n = 0;
        for c in &mut self.chunks {
            if matches!(&c.state, ChunkState::Leased { agent: a, .. } if a == agent) {
                c.state = ChunkState::Pending;
                n += 1;
            }
        }
        n
    }

    /// Snapshots the done chunks were read under, with their chunk ids, first used first.
    pub fn snapshots(&self) -> Vec<(String, Vec<u64>)> {
        let mut out: Vec<(String, Vec<u64>)> = Vec::new();
        let mut done: Vec<&Chunk> = self
            .chunks
            .iter()
            .filter(|c| matches!(c.state, ChunkState::Done { .. }))
            .collect();
        done.sort_by_key(|c| c.id);
        for c in done {
            match out.iter_mut().find(|(s, _)| *s == c.snapshot_id) {
                Some((_, ids)) => ids.push(c.id),
                None => out.push((c.snapshot_id.clone(), vec![c.id])),
            }
        }
        out
    }

    /// Tables with a chunk whose rows were not compared along the way, to be compared whole at
    /// the end: with the sum of their chunks' row digests when every chunk carried one
    /// (`expect`: table, digest, rows), else on both ends (`both`).
    pub fn tables_to_verify_whole(&self) -> (Vec<Expected<'_>>, Vec<usize>) {
        let n = self.tables.len();
        let (mut unchecked, mut sum, mut undigested) = (
            vec![false; n],
            vec![RowDigest::default(); n],
            vec![false; n],
        );
        for c in &self.chunks {
            let Some(t) = unchecked.get_mut(c.table) else {
                continue;
            };
            *t |= !c.checked;
            match RowDigest::from_bytes(c.digest_rows, &c.row_digest) {
                Ok(d) => sum[c.table].combine(&d),
                Err(_) => undigested[c.table] = true,
            }
        }
        let (mut expect, mut both) = (Vec::new(), Vec::new());
        for i in (0..n).filter(|&i| unchecked[i]) {
            if undigested[i] {
                both.push(i);
            } else {
                let keyed: Vec<&Chunk> = self
                    .chunks
                    .iter()
                    .filter(|c| c.table == i && matches!(c.range, Range::Key { .. } | Range::Whole))
                    .collect();
                expect.push((i, sum[i], keyed));
            }
        }
        (expect, both)
    }

    /// Rows the chunks of each table carried (done chunks), by table index.
    pub fn rows_by_table(&self) -> Vec<i64> {
        let mut rows = vec![0i64; self.tables.len()];
        for c in &self.chunks {
            if let (ChunkState::Done { rows: r, .. }, Some(t)) = (&c.state, rows.get_mut(c.table)) {
                *t += *r as i64;
            }
        }
        rows
    }

    /// Chunks whose rows differ between source and target, one line each.
    pub fn chunk_mismatches(&self) -> Vec<String> {
        let mut out: Vec<(u64, String)> = self
            .chunks
            .iter()
            .filter(|c| !c.mismatch.is_empty())
            .map(|c| (c.id, c.mismatch.clone()))
            .collect();
        out.sort();
        out.into_iter().map(|(_, m)| m).collect()
    }

    pub fn elapsed_secs(&self) -> f64 {
        let end = if self.record.finished_unix_ms > 0 {
            self.record.finished_unix_ms
        } else {
            now_ms()
        };
        end.saturating_sub(self.record.started_unix_ms) as f64 / 1000.0
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_chunk_counts_follow_the_chunks() {
        let mut j = job_with(3);
        for name in ["a", "b"] {
            j.tables.push(TableInfo {
                table: haul_core::ident::TableName::new("public", name),
                columns: Vec::new(),
                bytes: 10,
            });
        }
        j.chunks[1].table = 1;
        assert_eq!((j.table_chunk_count(0), j.table_chunk_count(1)), (2, 1));
        assert_eq!(j.table_chunk_count(7), 0);
        // The chunks change (they are set at planning, before any lease): counted afresh.
        let mut more = j.chunks[1].clone();
        more.id = 4;
        j.chunks.push(more);
        assert_eq!(j.table_chunk_count(1), 2);
    }

    fn job_with(n: usize) -> Job {
        let mut j = Job::new(
            "j1".into(),
            Options {
                codec: 1,
                zstd_level: 3,
                chunk_bytes: 1,
                bwlimit_bytes: 0,
                create_schema: true,
                verify: true,
                tables: vec![],
                jobs: 2,
                keep_ledger: false,
                no_owner: false,
                no_privileges: false,
                create_roles: false,
                role_passwords: false,
                bwlimit: String::new(),
                connections: 0,
                codec_auto: false,
                exclude_tables: Vec::new(),
                schemas: Vec::new(),
                exclude_schemas: Vec::new(),
                follow: false,
                replica_identity_full: false,
            },
        );
        for i in 0..n {
            j.chunks.push(Chunk::from_plan(
                i as u64 + 1,
                ChunkPlan {
                    table: 0,
                    range: Range::Whole,
                    est_bytes: 10,
                },
            ));
        }
        j
    }

    #[test]
    fn history_stays_bounded_and_keeps_its_start() {
        let mut h = History::default();
        h.record(0, 0, 0);
        h.record(1000, 5, 5);
        assert_eq!(h.samples.len(), 1, "a sample every 2 s at first");
        for i in 1..5000u64 {
            h.record(i * 2000, i, i);
        }
        assert!(h.samples.len() <= HISTORY_SAMPLES);
        assert_eq!(h.samples[0], (0, 0, 0));
        assert!(h.samples.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(h.samples.last().is_some_and(|s| s.1 > 4000));
    }

    #[test]
    fn a_pause_returns_every_lease_without_counting_an_attempt() {
        let mut j = job_with(3);
        for c in &mut j.chunks[..2] {
            c.epoch = 4;
            c.state = ChunkState::Leased {
                agent: "sender/a".into(),
                since_unix_ms: now_ms(),
            };
        }
        let (revoked, changed) = j.pause();
        assert_eq!((revoked, changed.len()), (2, 2));
        assert!(j.record.paused);
        assert_eq!(j.leases_out(), 0);
        assert!(j
            .chunks
            .iter()
            .all(|c| c.state == ChunkState::Pending && c.attempts == 0));
        // The next lease of each is a new epoch (the old one can no longer commit).
        assert_eq!(j.chunks[0].epoch, 4);
    }

    #[test]
    fn expired_leases_return_to_pending() {
        let mut j = job_with(2);
        j.chunks[0].state = ChunkState::Leased {
            agent: "sender/a".into(),
            since_unix_ms: 1,
        };
        j.chunks[1].state = ChunkState::Leased {
            agent: "sender/a".into(),
            since_unix_ms: now_ms(),
        };
        assert_eq!(j.leases_held_by("sender/a"), 2);
        assert_eq!(j.expire_leases(Duration::from_secs(60)), 1);
        assert_eq!(j.chunks[0].state, ChunkState::Pending);
        assert_eq!(j.leases_held_by("sender/a"), 1);
    }

    #[test]
    fn chunks_crossing_free_their_reader_up_to_the_limit_in_flight() {
        let mut j = job_with(40);
        j.record.options.jobs = 2;
        j.record.options.connections = 0;
        let lease = |j: &mut Job, i: usize| {
            j.chunks[i].state = ChunkState::Leased {
                agent: "sender/a".into(),
                since_unix_ms: now_ms(),
            };
        };
        lease(&mut j, 0);
        assert!(j.may_lease_to("sender/a", &[]));
        lease(&mut j, 1);
        // Two readers busy: no more, unless one has read its chunk whole.
        assert!(!j.may_lease_to("sender/a", &[]));
        let first = j.chunks[0].id;
        assert!(j.may_lease_to("sender/a", &[first]));
        // Another sender is not held back by this one's leases.
        assert!(j.may_lease_to("sender/b", &[]));
        // A crossing chunk no longer leased (reported done since) frees nothing.
        assert!(!j.may_lease_to("sender/a", &[j.chunks[30].id]));
        // However many have been read whole, no more than the limit in flight.
        let n = haul_core::chunk::AUTO_IN_FLIGHT;
        for i in 2..n {
            lease(&mut j, i);
        }
        let crossing: Vec<u64> = j.chunks[..n].iter().map(|c| c.id).collect();
        assert!(!j.may_lease_to("sender/a", &crossing));
        // --connections 24 lets 24 be in flight.
        j.record.options.connections = 24;
        assert!(j.may_lease_to("sender/a", &crossing));
    }

    #[test]
    fn retries_back_off() {
        let waits: Vec<u64> = (1..=8).map(backoff_ms).collect();
        assert_eq!(waits, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    }

    #[test]
    fn failing_keeps_the_first_error() {
        let mut j = job_with(0);
        j.fail("first");
        j.fail("second");
        assert_eq!(j.record.phase, Phase::Failed);
        assert_eq!(j.record.error, "first");
    }
}
