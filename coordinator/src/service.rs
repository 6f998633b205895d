//! The Coordinator gRPC service: registration, long-polled task handout, reports, and the
//! operator's start and status calls. Every RPC checks the caller's certificate role first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use haul_certs::Role;
use haul_core::chunk::{plan, Column, TableMeasure};
use haul_core::ident::TableName;
use haul_core::status::to_status;
use haul_proto as pb;
use haul_proto::coordinator_server::Coordinator;
use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};

use crate::job::{
    backoff_ms, now_ms, Check, Chunk, ChunkState, Job, Options, Phase, TableInfo, MAX_ATTEMPTS,
    MAX_FINALIZE_ATTEMPTS,
};
use crate::store::Store;
use crate::verify_run::VerifyRun;

/// How long a poll waits for work before answering Idle. Long polls keep hand-out latency low
/// without a busy loop; short enough that a sender notices shutdown quickly.
const LONG_POLL: Duration = Duration::from_secs(2);

struct Agent {
    role: Role,
    advertise: String,
    last_seen_ms: u64,
    incarnation: String,
}

pub struct State {
    jobs: Vec<Job>,
    /// This run's generation in the high 32 bits: every epoch leased now is above any epoch
    /// leased by an earlier run of the coordinator.
    epoch_base: u64,
    agents: HashMap<String, Agent>,
    next_receiver: usize,
    /// Finished jobs being compared again, oldest first (in memory only: see `verify_run`).
    verifies: Vec<VerifyRun>,
    /// Where timetables are evaluated.
    time_zone: jiff::tz::TimeZone,
    time_zone_name: String,
}

pub struct Inner {
    pub store: Store,
    pub state: Mutex<State>,
    /// Wakes long-polling senders when work may have appeared.
    pub work: Notify,
    pub lease_timeout: Duration,
}

#[derive(Clone)]
pub struct CoordinatorService {
    pub inner: Arc<Inner>,
}

impl Inner {
    /// Write a job record and flush it before the caller acknowledges anything: plans, phase
    /// changes and failures must survive a crash right after the reply.
    async fn save(&self, record: &crate::job::JobRecord) -> Result<(), Status> {
        self.store.put_record(record).map_err(to_status)?;
        self.store.flush().await.map_err(to_status)
    }

    /// Expire leases that were not renewed in time, once a second, whoever is polling. Why a
    /// ticker: a sender that cannot reach us (stalled link) also cannot poll, so expiry must not
    /// depend on polls.
    pub async fn expire_loop(&self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let mut expired = 0;
            {
                let mut st = self.state.lock().await;
                let now = now_ms();
                for j in st.jobs.iter_mut().filter(|j| !j.record.phase.is_over()) {
                    if j.record.phase == Phase::Copying {
                        expired += j.expire_leases(self.lease_timeout);
                    }
                    let (raw, wire) = j.bytes_done();
                    j.history.record(now, raw, wire);
                }
            }
            if expired > 0 {
                self.work.notify_waiters();
            }
        }
    }

    pub fn new(
        store: Store,
        lease_timeout: Duration,
        time_zone: jiff::tz::TimeZone,
        time_zone_name: String,
    ) -> anyhow::Result<Inner> {
        let mut jobs = store.load()?;
        let generation = store.next_generation()?;
        // Leases from a previous run stand, with a fresh timeout: a holder that is still alive
        // renews them and its transfer can still commit; a dead one's expire.
        let now = now_ms();
        for j in &mut jobs {
            for c in &mut j.chunks {
                if let ChunkState::Leased { since_unix_ms, .. } = &mut c.state {
                    *since_unix_ms = now;
                }
            }
            if j.record.phase == Phase::Planning {
                j.record.planner = None;
            }
            j.record.finalize_leased = false;
            j.record.snapshot_leased = false;
            j.record.cleanup_holder = None;
        }
        // Newest last: `status` without a job id shows the latest job.
        jobs.sort_by_key(|j| j.record.started_unix_ms);
        Ok(Inner {
            store,
            state: Mutex::new(State {
                jobs,
                epoch_base: generation << 32,
                agents: HashMap::new(),
                next_receiver: 0,
                verifies: Vec::new(),
                time_zone,
                time_zone_name,
            }),
            work: Notify::new(),
            lease_timeout,
        })
    }
}

fn agent_id(role: Role, name: &str) -> String {
    format!("{}/{}", role.as_str(), name)
}

impl State {
    fn job_mut(&mut self, id: &str) -> Result<&mut Job, Status> {
        self.jobs
            .iter_mut()
            .find(|j| j.record.id == id)
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    /// The index of job `id`, or of the latest job when `id` is empty (what operator calls
    /// without `--job` mean).
    fn operator_job(&self, id: &str) -> Result<usize, Status> {
        let index = if id.is_empty() {
            self.jobs.len().checked_sub(1)
        } else {
            self.jobs.iter().position(|j| j.record.id == id)
        };
        index.ok_or_else(|| {
            Status::not_found(if id.is_empty() {
                "the coordinator has no jobs yet; start one with `haul start`".to_string()
            } else {
                format!("no job {id}")
            })
        })
    }

    /// The cap in force for `job` now (bytes per second, 0 = none) and its line for people.
    fn cap_now(&self, job: &Job) -> (u64, String) {
        let minute = crate::cap::minute_now(&self.time_zone);
        let (now, text) =
            crate::cap::in_force(&job.record.options.cap_spec(), minute, &self.time_zone_name);
        (now.bytes_per_sec, text)
    }

    /// A live receiver's address, round robin.
    fn pick_receiver(&mut self) -> Option<String> {
        let cutoff = now_ms().saturating_sub(30_000);
        let mut live: Vec<&String> = self
            .agents
            .values()
            .filter(|a| {
                a.role == Role::Receiver && a.last_seen_ms >= cutoff && !a.advertise.is_empty()
            })
            .map(|a| &a.advertise)
            .collect();
        live.sort();
        if live.is_empty() {
            return None;
        }
        let addr = live[self.next_receiver % live.len()].clone();
        self.next_receiver = self.next_receiver.wrapping_add(1);
        Some(addr)
    }

    /// The next task for `agent`, if any.
    /// `sending`: the chunks, by job and id, this sender has read whole and is still sending.
    fn next_task(
        &mut self,
        agent: &str,
        lease_timeout: Duration,
        sending: &[pb::SendingChunk],
    ) -> Option<pb::sender_task::Task> {
        let receiver = self.pick_receiver();
        let minute = crate::cap::minute_now(&self.time_zone);
        let timeout_ms = lease_timeout.as_millis() as u64;
        if let Some(v) = self.verifies.iter_mut().find(|v| v.available(timeout_ms)) {
            v.holder = Some(agent.to_string());
            v.last_report_ms = now_ms();
            let mut task = v.task.clone();
            // Any live receiver of the target will do; the job's may have moved since.
            if let Some(addr) = receiver.clone() {
                task.receiver_addr = addr;
            }
            return Some(pb::sender_task::Task::Verify(task));
        }
        // A --follow job that failed or was cancelled still has its slot on the source, which
        // holds WAL there for as long as it exists: any sender drops it.
        for j in self
            .jobs
            .iter_mut()
            .filter(|j| j.record.phase == Phase::Failed)
        {
            let Some(f) = j.record.follow.as_mut() else {
                continue;
            };
            let stale = f.last_report_ms + timeout_ms < now_ms();
            if f.slot_dropped || (f.drop_holder.is_some() && !stale) {
                continue;
            }
            f.drop_holder = Some(agent.to_string());
            f.last_report_ms = now_ms();
            return Some(pb::sender_task::Task::Cleanup(pb::CleanupTask {
                job_id: j.record.id.clone(),
                receiver_addr: j.record.receiver_addr.clone(),
                keep_ledger: true,
                follow_slot: f.slot.clone(),
                follow_publication: f.publication.clone(),
                source_only: true,
                ..Default::default()
            }));
        }
        for j in self
            .jobs
            .iter_mut()
            .filter(|j| !j.record.phase.is_over() && !j.record.paused)
        {
            if j.record.phase == Phase::Cancelling {
                // The undo needs no snapshot: any sender may carry it to the receiver, which
                // runs it after whatever of the job it is applying now, and takes nothing
                // of the job after it.
                if j.record.cleanup_holder.is_none() && j.record.finalize_not_before_ms <= now_ms()
                {
                    j.record.cleanup_holder = Some(agent.to_string());
                    let (follow_slot, follow_publication) = match &j.record.follow {
                        Some(f) if !f.slot_dropped => (f.slot.clone(), f.publication.clone()),
                        _ => (String::new(), String::new()),
                    };
                    return Some(pb::sender_task::Task::Cleanup(pb::CleanupTask {
                        job_id: j.record.id.clone(),
                        receiver_addr: receiver
                            .clone()
                            .unwrap_or_else(|| j.record.receiver_addr.clone()),
                        keep_ledger: j.record.options.keep_ledger,
                        undo: true,
                        keep_target: j.record.cancel_keep_target,
                        follow_slot,
                        follow_publication,
                        source_only: false,
                    }));
                }
                continue;
            }
            if j.record.snapshot_lost {
                // Nothing of this job can be read until a sender exports a new snapshot.
                if j.record.snapshot_leased {
                    continue;
                }
                j.record.snapshot_leased = true;
                j.record.planner = Some(agent.to_string());
                return Some(pb::sender_task::Task::Snapshot(pb::SnapshotTask {
                    job_id: j.record.id.clone(),
                }));
            }
            match j.record.phase {
                Phase::Planning if j.record.planner.is_none() => {
                    let addr = receiver.clone()?;
                    j.record.planner = Some(agent.to_string());
                    j.record.receiver_addr = addr.clone();
                    j.record.plan_attempts += 1;
                    return Some(pb::sender_task::Task::Plan(pb::PlanTask {
                        job_id: j.record.id.clone(),
                        options: Some(j.record.options.to_wire()),
                        receiver_addr: addr,
                    }));
                }
                Phase::Copying => {
                    j.expire_leases(lease_timeout);
                    if j.all_done() {
                        j.record.phase = Phase::Finalizing;
                    } else {
                        // At most `jobs` of this sender's leases read the source at once; chunks
                        // read whole and still crossing a slow link count only against the
                        // chunks it may have in flight (`core::chunk::in_flight_limit`).
                        let crossing: Vec<u64> = sending
                            .iter()
                            .filter(|c| c.job_id == j.record.id)
                            .map(|c| c.chunk_id)
                            .collect();
                        if !j.may_lease_to(agent, &crossing) {
                            continue;
                        }
                        let receiver = receiver
                            .clone()
                            .unwrap_or_else(|| j.record.receiver_addr.clone());
                        let now = now_ms();
                        let Some(index) = j
                            .chunks
                            .iter()
                            .position(|c| c.state == ChunkState::Pending && c.not_before_ms <= now)
                        else {
                            continue;
                        };
                        // A group goes out whole: every member still pending, under one epoch.
                        let members: Vec<usize> = j
                            .group_at(index)
                            .filter(|&i| j.chunks[i].state == ChunkState::Pending)
                            .collect();
                        let first_lease = members.iter().all(|&i| j.chunks[i].epoch == 0);
                        let epoch = members
                            .iter()
                            .map(|&i| j.chunks[i].epoch + 1)
                            .max()
                            .unwrap_or(1)
                            .max(self.epoch_base);
                        for &i in &members {
                            let c = &mut j.chunks[i];
                            c.epoch = epoch;
                            c.state = ChunkState::Leased {
                                agent: agent.to_string(),
                                since_unix_ms: now,
                            };
                        }
                        let grouped = j.chunks[index].group != 0;
                        let c = &j.chunks[index];
                        let (chunk_id, range, table) = (c.id, c.range.to_wire(), c.table);
                        // A split table: its receiver builds its indexes once the last of
                        // its chunks is in, and, verified, reads it back whole then (a chunk
                        // that is its table is read back on its own).
                        let table_chunks =
                            if !grouped && !matches!(c.range, haul_core::chunk::Range::Whole) {
                                j.table_chunk_count(table)
                            } else {
                                0
                            };
                        let est_bytes = members.iter().map(|&i| j.chunks[i].est_bytes).sum();
                        // This sender's share of the job's cap, with this lease counted.
                        let cap = crate::cap::in_force(
                            &j.record.options.cap_spec(),
                            minute,
                            &self.time_zone_name,
                        )
                        .0
                        .bytes_per_sec;
                        let (mine, out) = (j.leases_held_by(agent), j.leases_out());
                        let mut options = j.record.options.to_wire();
                        options.bwlimit_bytes = j.cap.grant(agent, cap, mine, out);
                        let t = &j.tables[table];
                        let group = if grouped {
                            members
                                .iter()
                                .map(|&i| {
                                    let t = &j.tables[j.chunks[i].table];
                                    pb::GroupMember {
                                        chunk_id: j.chunks[i].id,
                                        table: Some(t.table.to_wire()),
                                        columns: t.columns.iter().map(Column::to_wire).collect(),
                                    }
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        return Some(pb::sender_task::Task::Chunk(pb::ChunkLease {
                            job_id: j.record.id.clone(),
                            chunk_id,
                            epoch,
                            snapshot_id: j.record.snapshot_id.clone(),
                            table: (!grouped).then(|| t.table.to_wire()),
                            columns: if grouped {
                                Vec::new()
                            } else {
                                t.columns.iter().map(Column::to_wire).collect()
                            },
                            range: Some(range),
                            receiver_addr: receiver,
                            options: Some(options),
                            est_bytes,
                            renew_ms: (lease_timeout.as_millis() / 4).clamp(200, 15_000) as u32,
                            first_lease,
                            members: group,
                            table_chunks,
                        }));
                    }
                    if j.record.phase == Phase::Finalizing
                        && j.record.planner.as_deref() == Some(agent)
                    {
                        j.record.finalize_leased = true;
                        return Some(finalize_task(j));
                    }
                }
                // Following needs no snapshot: any sender may follow; a silent one is replaced.
                Phase::Following => {
                    let now = now_ms();
                    let Some(f) = j.record.follow.as_ref() else {
                        continue;
                    };
                    let stale = f.last_report_ms + timeout_ms < now;
                    if (f.holder.is_some() && !stale) || f.not_before_ms > now {
                        continue;
                    }
                    let verify = crate::verify_run::VerifyRun::new(
                        format!("{}-cutover", j.record.id),
                        j,
                        &[],
                        0,
                    )
                    .task;
                    let tables = j
                        .tables
                        .iter()
                        .filter(|t| !haul_core::large_object::is_large_objects(&t.table))
                        .map(|t| pb::PlannedTable {
                            table: Some(t.table.to_wire()),
                            columns: t.columns.iter().map(Column::to_wire).collect(),
                            ..Default::default()
                        })
                        .collect();
                    let receiver_addr = receiver
                        .clone()
                        .unwrap_or_else(|| j.record.receiver_addr.clone());
                    let Some(f) = j.record.follow.as_mut() else {
                        continue;
                    };
                    f.holder = Some(agent.to_string());
                    f.last_report_ms = now;
                    return Some(pb::sender_task::Task::Follow(pb::FollowTask {
                        job_id: j.record.id.clone(),
                        slot: f.slot.clone(),
                        publication: f.publication.clone(),
                        tables,
                        receiver_addr,
                        options: Some(j.record.options.to_wire()),
                        verify: Some(verify),
                    }));
                }
                // Cleanup needs no snapshot: any sender may carry it to the receiver.
                Phase::Finalizing
                    if j.record.cleanup_pending
                        && j.record.cleanup_holder.is_none()
                        && j.record.finalize_not_before_ms <= now_ms() =>
                {
                    j.record.cleanup_holder = Some(agent.to_string());
                    return Some(pb::sender_task::Task::Cleanup(pb::CleanupTask {
                        job_id: j.record.id.clone(),
                        receiver_addr: j.record.receiver_addr.clone(),
                        keep_ledger: j.record.options.keep_ledger,
                        ..Default::default()
                    }));
                }
                Phase::Finalizing
                    if !j.record.cleanup_pending
                        && j.record.planner.as_deref() == Some(agent)
                        && !j.record.finalize_leased
                        && j.record.finalize_not_before_ms <= now_ms() =>
                {
                    j.record.finalize_leased = true;
                    return Some(finalize_task(j));
                }
                _ => {}
            }
        }
        None
    }
}

/// Why a --follow job fails when its snapshot is lost: the slot's changes start at the first
/// snapshot's position, so rows read under a new one would take some changes twice.
const FOLLOW_SNAPSHOT_LOST: &str = "the sender holding the slot's snapshot stopped before the copy finished; a --follow job cannot continue under a new snapshot (its changes start at the slot's position): start the job again (its slot is dropped)";

/// Mark a chunk done from its report (the receipt means the target's ledger holds it: done,
/// whatever the epoch). Returns false if it already was.
fn complete_chunk(job: &mut Job, index: usize, r: &pb::ChunkReport) -> bool {
    let done = ChunkState::Done {
        rows: r.rows,
        raw_bytes: r.raw_bytes,
        wire_bytes: r.wire_bytes,
        resumed_bytes: r.resumed_bytes,
        resent_bytes: r.resent_bytes,
    };
    if !job.complete(index, done, &r.snapshot_id) {
        return false;
    }
    let c = &mut job.chunks[index];
    c.row_digest = r.row_digest.clone();
    c.digest_rows = r.digest_rows;
    if !r.already_applied {
        c.codec = r.codec.clone();
    }
    // The receiver's own report of its read-back may have come first; it stands.
    if !c.check_reported {
        c.checked = r.checked;
        c.mismatch = r.mismatch.clone();
        c.check_pending_since_ms = if r.check_pending { now_ms() } else { 0 };
    }
    true
}

fn finalize_task(j: &Job) -> pb::sender_task::Task {
    let (expect, both) = j.tables_to_verify_whole();
    pb::sender_task::Task::Finalize(pb::FinalizeTask {
        job_id: j.record.id.clone(),
        receiver_addr: j.record.receiver_addr.clone(),
        options: Some(j.record.options.to_wire()),
        full_verify: both
            .into_iter()
            .filter_map(|i| j.tables.get(i).map(|t| t.table.to_wire()))
            .collect(),
        expect: expect
            .into_iter()
            .filter_map(|(i, d, chunks)| {
                j.tables.get(i).map(|t| pb::TableExpect {
                    table: Some(t.table.to_wire()),
                    columns: t.columns.iter().map(Column::to_wire).collect(),
                    row_digest: d.to_bytes(),
                    rows: d.rows,
                    chunks: chunks
                        .into_iter()
                        .map(|c| pb::ChunkExpect {
                            chunk_id: c.id,
                            range: Some(c.range.to_wire()),
                            row_digest: c.row_digest.clone(),
                            rows: c.digest_rows,
                        })
                        .collect(),
                })
            })
            .collect(),
    })
}

fn table_ref(t: Option<&pb::TableRef>) -> Result<TableName, Status> {
    haul_core::chunk::table_from_wire(t).map_err(|e| Status::invalid_argument(format!("{e:#}")))
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender, Role::Receiver])?;
        let r = req.into_inner();
        // The certificate names the agent; a differing self-reported name is only a label.
        let id = agent_id(who.role, &who.name);
        if who.role == Role::Receiver && r.advertise.is_empty() {
            return Err(Status::invalid_argument(
                "a receiver must advertise the address senders dial",
            ));
        }
        let mut st = self.inner.state.lock().await;
        let restarted = st
            .agents
            .get(&id)
            .is_some_and(|a| a.incarnation != r.incarnation);
        let mut changed = Vec::new();
        let mut changed_chunks = Vec::new();
        if who.role == Role::Receiver && restarted {
            // Its read-backs died with the old process: those chunks count as not compared
            // (their tables are compared whole at the end) instead of being waited for.
            for j in st.jobs.iter_mut().filter(|j| !j.record.phase.is_over()) {
                for c in j.chunks.iter_mut().filter(|c| c.check_pending_since_ms > 0) {
                    c.check_pending_since_ms = 0;
                    changed_chunks.push((j.record.id.clone(), c.clone()));
                }
            }
            if !changed_chunks.is_empty() {
                tracing::info!(agent = %id, chunks = changed_chunks.len(), "the receiver restarted; its pending read-backs count as not compared");
            }
        }
        if who.role == Role::Sender && restarted {
            // A new process carries none of its predecessor's verify runs.
            for v in st.verifies.iter_mut() {
                if v.holder.as_deref() == Some(id.as_str()) {
                    v.holder = None;
                }
            }
        }
        if who.role == Role::Sender {
            for j in st.jobs.iter_mut().filter(|j| !j.record.phase.is_over()) {
                let mut dirty = false;
                // A new process holds no leases: give its predecessor's back now rather than
                // after the lease timeout.
                if restarted && j.void_leases_of(&id) > 0 {
                    dirty = true;
                }
                // A new process of the snapshot's holder: the snapshot died with the old one.
                let holder = j.record.planner.as_deref() == Some(id.as_str());
                // A new process of the planner: the plan it was making died with the old one.
                if holder && restarted && j.record.phase == Phase::Planning {
                    tracing::warn!(job = %j.record.id, agent = %id, "the planning sender restarted; planning again");
                    j.record.planner = None;
                    dirty = true;
                }
                // A new process of the sender cleaning up: the cleanup died with the old one.
                if restarted && j.record.cleanup_holder.as_deref() == Some(id.as_str()) {
                    j.record.cleanup_holder = None;
                    dirty = true;
                }
                // ... or of the follower: it follows no more; hand following out again.
                if let Some(f) = j.record.follow.as_mut() {
                    if restarted && f.holder.as_deref() == Some(id.as_str()) {
                        f.holder = None;
                        dirty = true;
                    }
                }
                if holder
                    && !j.record.cleanup_pending
                    && !r.incarnation.is_empty()
                    && !j.record.planner_incarnation.is_empty()
                    && j.record.planner_incarnation != r.incarnation
                    && matches!(j.record.phase, Phase::Copying | Phase::Finalizing)
                    && !j.record.snapshot_lost
                    && j.record.options.follow
                {
                    j.fail(FOLLOW_SNAPSHOT_LOST);
                    dirty = true;
                } else if holder
                    && !j.record.cleanup_pending
                    && !r.incarnation.is_empty()
                    && !j.record.planner_incarnation.is_empty()
                    && j.record.planner_incarnation != r.incarnation
                    && matches!(j.record.phase, Phase::Copying | Phase::Finalizing)
                    && !j.record.snapshot_lost
                {
                    tracing::warn!(job = %j.record.id, agent = %id, "the snapshot holder restarted; a new snapshot will be exported");
                    j.record.snapshot_lost = true;
                    j.record.snapshot_leased = false;
                    j.record.finalize_leased = false;
                    dirty = true;
                }
                if dirty {
                    changed.push(j.record.clone());
                }
            }
        }
        st.agents.insert(
            id.clone(),
            Agent {
                role: who.role,
                advertise: r.advertise,
                last_seen_ms: now_ms(),
                incarnation: r.incarnation,
            },
        );
        drop(st);
        for record in &changed {
            self.inner.store.put_record(record).map_err(to_status)?;
        }
        for (job, c) in &changed_chunks {
            self.inner.store.put_chunk(job, c).map_err(to_status)?;
        }
        if !changed.is_empty() {
            self.inner.store.flush().await.map_err(to_status)?;
        }
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::RegisterReply { agent_id: id }))
    }

    async fn sender_poll(
        &self,
        req: Request<pb::SenderPollRequest>,
    ) -> Result<Response<pb::SenderTask>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let id = agent_id(who.role, &who.name);
        let sending = req.get_ref().sending.clone();
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let notified = self.inner.work.notified();
            {
                let mut st = self.inner.state.lock().await;
                match st.agents.get_mut(&id) {
                    Some(a) => a.last_seen_ms = now_ms(),
                    None => return Err(Status::not_found("unknown agent: register first")),
                }
                if let Some(task) = st.next_task(&id, self.inner.lease_timeout, &sending) {
                    if let pb::sender_task::Task::Chunk(l) = &task {
                        // Written down (not flushed: a lost lease only means a re-lease) so a
                        // restarted coordinator still knows who holds what.
                        let chunks: Vec<Chunk> = st
                            .jobs
                            .iter()
                            .find(|j| j.record.id == l.job_id)
                            .map(|j| {
                                j.lease_members(l.chunk_id, l.epoch)
                                    .into_iter()
                                    .map(|i| j.chunks[i].clone())
                                    .collect()
                            })
                            .unwrap_or_default();
                        self.inner
                            .store
                            .put_chunks(&l.job_id, &chunks)
                            .map_err(to_status)?;
                    }
                    return Ok(Response::new(pb::SenderTask { task: Some(task) }));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(pb::SenderTask {
                    task: Some(pb::sender_task::Task::Idle(pb::Idle { retry_ms: 0 })),
                }));
            }
        }
    }

    async fn report_plan(
        &self,
        req: Request<pb::PlanReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        // Test point: a plan arrives and is lost with the coordinator.
        haul_core::failpoint::die("die-on-plan-report");
        let r = req.into_inner();
        let mut measures = Vec::with_capacity(r.tables.len());
        for t in &r.tables {
            measures.push(TableMeasure {
                table: table_ref(t.table.as_ref())?,
                columns: t
                    .columns
                    .iter()
                    .map(Column::from_wire)
                    .collect::<anyhow::Result<_>>()
                    .map_err(|e| Status::invalid_argument(format!("{e:#}")))?,
                bytes: t.bytes,
                est_rows: t.est_rows,
                split_key: (!t.split_key.is_empty()).then(|| t.split_key.clone()),
                key_cuts: t.key_cuts.clone(),
                pages: t.pages,
            });
        }
        let mut st = self.inner.state.lock().await;
        let planner_incarnation = st
            .agents
            .get(&agent_id(who.role, &who.name))
            .map(|a| a.incarnation.clone())
            .unwrap_or_default();
        let job = st.job_mut(&r.job_id)?;
        if job.record.phase != Phase::Planning {
            return Ok(Response::new(pb::Empty {}));
        }
        // Cut where the sender sampled its key cuts: a small job finer than --chunk-size.
        let chunk_bytes = match r.chunk_bytes {
            0 => job.record.options.chunk_bytes,
            n => n,
        };
        let plans = plan(&measures, chunk_bytes);
        // Small tables go in groups: one lease, stream and transaction for many. Large objects
        // are read and restored their own way, alone.
        let groups = haul_core::chunk::group_small(&plans, |p| {
            measures
                .get(p.table)
                .is_some_and(|m| !haul_core::large_object::is_large_objects(&m.table))
        });
        job.chunks = plans
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut c = Chunk::from_plan(i as u64 + 1, p);
                c.group = groups[i].map_or(0, |g| g as u64 + 1);
                c
            })
            .collect();
        job.tables = measures
            .into_iter()
            .map(|m| TableInfo {
                table: m.table,
                columns: m.columns,
                bytes: m.bytes,
            })
            .collect();
        job.record.snapshot_id = r.snapshot_id;
        job.record.planner_incarnation = planner_incarnation;
        if let Some(f) = &r.follow {
            let cutover_requested_ms = job
                .record
                .follow
                .as_ref()
                .map_or(0, |f| f.cutover_requested_ms);
            job.record.follow = Some(crate::job::Follow {
                slot: f.slot.clone(),
                publication: f.publication.clone(),
                start_lsn: f.start_lsn,
                identity_full: f.identity_full.clone(),
                applied_lsn: f.start_lsn,
                confirmed_lsn: f.start_lsn,
                cutover_requested_ms,
                ..Default::default()
            });
        }
        job.record.phase = Phase::Copying;
        job.recount();
        tracing::info!(job = %job.record.id, tables = job.tables.len(), chunks = job.chunks.len(), "planned");
        let (record, tables, chunks) = (job.record.clone(), job.tables.clone(), job.chunks.clone());
        drop(st);
        self.inner
            .store
            .put_tables(&record.id, &tables)
            .map_err(to_status)?;
        self.inner
            .store
            .put_chunks(&record.id, &chunks)
            .map_err(to_status)?;
        self.inner.save(&record).await?;
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_chunk(
        &self,
        req: Request<pb::ChunkReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        // Test point: the chunk is applied on the target, and its report dies here.
        haul_core::failpoint::die("die-on-chunk-report");
        let r = req.into_inner();
        if !r.members.is_empty() {
            // Test point: a group's tables are applied on the target, and its report dies here.
            haul_core::failpoint::die("die-on-group-report");
        }
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        // A group's report is one per member; a lone chunk's is itself.
        let reports: Vec<&pb::ChunkReport> = if r.members.is_empty() {
            vec![&r]
        } else {
            r.members.iter().collect()
        };
        let mut changed = Vec::with_capacity(reports.len());
        for m in reports {
            let Some(index) = job.chunks.iter().position(|c| c.id == m.chunk_id) else {
                return Err(Status::not_found(format!(
                    "job {} has no chunk {}",
                    r.job_id, m.chunk_id
                )));
            };
            if complete_chunk(job, index, m) {
                changed.push(job.chunks[index].clone());
            }
        }
        if changed.is_empty() {
            return Ok(Response::new(pb::Empty {}));
        }
        job.record.warning.clear();
        let phase_changed = job.all_done() && job.record.phase == Phase::Copying;
        if phase_changed {
            tracing::info!(job = %job.record.id, chunks = job.chunks.len(), "every chunk applied; finalizing");
            job.record.phase = Phase::Finalizing;
        }
        // Only a phase change rewrites (and flushes) the job record; a chunk is one small key.
        let record = phase_changed.then(|| job.record.clone());
        let job_id = r.job_id;
        drop(st);
        self.inner
            .store
            .put_chunks(&job_id, &changed)
            .map_err(to_status)?;
        if let Some(record) = record {
            self.inner.store.put_record(&record).map_err(to_status)?;
            self.inner.store.flush().await.map_err(to_status)?;
        }
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_final(
        &self,
        req: Request<pb::FinalReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        let r = req.into_inner();
        let mut checks = Vec::with_capacity(r.checks.len());
        for c in &r.checks {
            checks.push(Check {
                table: table_ref(c.table.as_ref())?,
                source_rows: c.source_rows,
                target_rows: c.target_rows,
                source_digest: c.source_digest.clone(),
                target_digest: c.target_digest.clone(),
            });
        }
        // Test point: the final report arrives and dies with the coordinator.
        haul_core::failpoint::die("die-on-final-report");
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        // A second finalize run (after a restart of any role) reports again: the first counts.
        if job.record.phase != Phase::Finalizing || job.record.cleanup_pending {
            return Ok(Response::new(pb::Empty {}));
        }
        job.record.verified = r.verified;
        job.record.sequences = r.sequences;
        job.record.post_data_objects = r.post_data_objects;
        // A table whose rows were compared chunk by chunk is checked at the end by its count
        // only: the source's is what its chunks carried, under the job's snapshot.
        let rows = job.rows_by_table();
        for c in &mut checks {
            if c.source_digest.is_empty() && c.target_digest.is_empty() {
                if let Some(i) = job.tables.iter().position(|t| t.table == c.table) {
                    c.source_rows = rows[i];
                }
            }
        }
        let chunk_bad = if r.verified {
            let mut bad = job.chunk_mismatches();
            bad.extend(r.chunk_mismatches.iter().cloned());
            bad
        } else {
            Vec::new()
        };
        let bad: Vec<String> = checks
            .iter()
            .filter(|c| !c.matches())
            .map(|c| {
                if haul_core::large_object::is_large_objects(&c.table) {
                    "large objects".to_string()
                } else {
                    c.table.to_string()
                }
            })
            .collect();
        job.record.checks = checks;
        if !chunk_bad.is_empty() {
            job.fail(format!(
                "verification found {} chunk(s) whose rows differ between source and target: {}",
                chunk_bad.len(),
                chunk_bad.join("; ")
            ));
        } else if bad.is_empty() && job.record.follow.is_some() {
            // Verified, and following: the slot's changes go to the target until cutover.
            job.record.phase = Phase::Following;
            job.record.finalize_attempts = 0;
            job.record.finalize_not_before_ms = 0;
        } else if bad.is_empty() {
            // Verified: the target's traces of the job go next, then it is done.
            job.record.cleanup_pending = true;
            job.record.finalize_attempts = 0;
            job.record.finalize_not_before_ms = 0;
        } else {
            job.fail(format!(
                "verification found {} table(s) that differ between source and target: {}",
                bad.len(),
                bad.join(", ")
            ));
        }
        if job.record.phase == Phase::Failed {
            tracing::info!(job = %job.record.id, "finished: {}", job.record.error);
        } else if job.record.phase == Phase::Following {
            tracing::info!(job = %job.record.id, "verified; following the source's changes");
        } else {
            tracing::info!(job = %job.record.id, "verified; cleaning up the target");
        }
        let record = job.record.clone();
        drop(st);
        self.inner.save(&record).await?;
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_follow(
        &self,
        req: Request<pb::FollowReport>,
    ) -> Result<Response<pb::FollowReply>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let reporter = agent_id(who.role, &who.name);
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        let (phase, paused) = (job.record.phase, job.record.paused);
        let started = job.record.started_unix_ms;
        let Some(f) = job.record.follow.as_mut() else {
            return Err(Status::failed_precondition(format!(
                "job {} does not follow changes",
                r.job_id
            )));
        };
        // Only the follower the job was handed to counts; any other stops.
        if phase != Phase::Following || f.holder.as_deref() != Some(reporter.as_str()) || paused {
            if paused && f.holder.as_deref() == Some(reporter.as_str()) {
                f.holder = None;
            }
            return Ok(Response::new(pb::FollowReply {
                cutover: false,
                stop: true,
                read_only_source: false,
            }));
        }
        f.report(&r, now_ms());
        // Following again: what stopped it before is over.
        if job.record.warning.starts_with("following stopped") {
            job.record.warning.clear();
        }
        let cutover = f.cutover_requested_ms != 0;
        let read_only_source = f.read_only_source;
        let mut finished = false;
        if r.cutover_done {
            f.cutover_done_ms = now_ms();
            f.cutover_sequences = r.sequences;
            f.cutover_pieces = r.pieces_compared;
            f.slot_dropped = true;
            f.holder = None;
            finished = true;
        } else if f.retained_bytes >= crate::job::RETAINED_WARNING_BYTES {
            let w = format!(
                "the slot {} holds {} MiB of WAL on the source; a stuck follower fills the source's disk",
                f.slot,
                f.retained_bytes >> 20
            );
            job.record.warning = w;
        } else if job.record.warning.contains("of WAL on the source") {
            job.record.warning.clear();
        }
        if finished {
            let lag = job
                .record
                .follow
                .as_ref()
                .map_or(0.0, |f| f.lag_seconds(now_ms(), started));
            if !r.mismatches.is_empty() {
                job.fail(format!(
                    "cutover: the target caught up, but verification found {} difference(s): {}",
                    r.mismatches.len(),
                    r.mismatches.join("; ")
                ));
            } else {
                job.record.phase = Phase::Finalizing;
                job.record.cleanup_pending = true;
                job.record.finalize_attempts = 0;
                job.record.finalize_not_before_ms = 0;
                job.record.verified = job.record.options.verify;
            }
            tracing::info!(job = %r.job_id, lag_seconds = lag, mismatches = r.mismatches.len(), "cutover: caught up and compared");
        }
        let record = job.record.clone();
        drop(st);
        if finished {
            self.inner.save(&record).await?;
            self.inner.work.notify_waiters();
        } else {
            // Progress is kept in memory; the slot's confirmed position on the source and the
            // target's follow position are what a restart resumes from.
            self.inner.store.put_record(&record).map_err(to_status)?;
        }
        Ok(Response::new(pb::FollowReply {
            cutover,
            stop: false,
            read_only_source,
        }))
    }

    async fn report_cleanup(
        &self,
        req: Request<pb::CleanupReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        haul_certs::require(&req, &[Role::Sender])?;
        // Test point: the target is clean, and the report dies with the coordinator.
        haul_core::failpoint::die("die-on-cleanup-report");
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        if r.source_only {
            if let Some(f) = job.record.follow.as_mut() {
                f.slot_dropped = true;
                f.drop_holder = None;
            }
            tracing::info!(job = %r.job_id, "the failed job's slot and publication are dropped from the source");
            let record = job.record.clone();
            drop(st);
            self.inner.save(&record).await?;
            return Ok(Response::new(pb::Empty {}));
        }
        if job.record.phase == Phase::Cancelling && r.undo {
            if let Some(f) = job.record.follow.as_mut() {
                f.slot_dropped = true;
            }
            job.record.cleanup_holder = None;
            job.record.phase = Phase::Cancelled;
            job.record.finished_unix_ms = now_ms();
            job.record.undone = r.undone;
            job.record.left = r.left;
            job.record.ledger_dropped =
                !job.record.left.iter().any(|l| l.starts_with("schema haul"));
            tracing::info!(job = %job.record.id, undone = ?job.record.undone, left = ?job.record.left, "cancelled");
            let record = job.record.clone();
            drop(st);
            self.inner.save(&record).await?;
            return Ok(Response::new(pb::Empty {}));
        }
        if job.record.phase != Phase::Finalizing || !job.record.cleanup_pending {
            return Ok(Response::new(pb::Empty {}));
        }
        job.record.cleanup_pending = false;
        job.record.cleanup_holder = None;
        job.record.ledger_dropped = !job.record.options.keep_ledger;
        job.record.phase = Phase::Done;
        job.record.finished_unix_ms = now_ms();
        tracing::info!(job = %job.record.id, "done");
        let record = job.record.clone();
        drop(st);
        self.inner.save(&record).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_snapshot(
        &self,
        req: Request<pb::SnapshotReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let id = agent_id(who.role, &who.name);
        let r = req.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("empty snapshot id"));
        }
        let mut st = self.inner.state.lock().await;
        let incarnation = st
            .agents
            .get(&id)
            .map(|a| a.incarnation.clone())
            .unwrap_or_default();
        let job = st.job_mut(&r.job_id)?;
        if !job.record.snapshot_lost {
            return Ok(Response::new(pb::Empty {}));
        }
        tracing::info!(job = %job.record.id, snapshot = %r.snapshot_id, holder = %id, "new snapshot for the remaining chunks");
        job.record.snapshot_id = r.snapshot_id;
        job.record.planner = Some(id);
        job.record.planner_incarnation = incarnation;
        job.record.snapshot_lost = false;
        job.record.snapshot_leased = false;
        job.record.finalize_leased = false;
        let record = job.record.clone();
        drop(st);
        self.inner.save(&record).await?;
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn renew_leases(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewReply>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let id = agent_id(who.role, &who.name);
        let r = req.into_inner();
        let now = now_ms();
        let mut revoked = Vec::new();
        let mut st = self.inner.state.lock().await;
        if let Some(a) = st.agents.get_mut(&id) {
            a.last_seen_ms = now;
        }
        // The renewal lists every lease the sender holds. An older lease of its that the list
        // omits (its completion was lost in a coordinator crash, say) is released now rather
        // than after the timeout; the 2 s margin covers leases granted while this was in flight.
        let listed: std::collections::HashSet<(String, u64)> = r
            .leases
            .iter()
            .map(|l| (l.job_id.clone(), l.chunk_id))
            .collect();
        // Renewed first (a group's lease renews every member), so what is left stale below
        // is what the list omits.
        for l in r.leases {
            let mut held = false;
            if let Some(j) = st.jobs.iter_mut().find(|j| j.record.id == l.job_id) {
                for i in j.lease_members(l.chunk_id, l.epoch) {
                    let c = &mut j.chunks[i];
                    if c.epoch != l.epoch {
                        continue;
                    }
                    if let ChunkState::Leased {
                        agent,
                        since_unix_ms,
                    } = &mut c.state
                    {
                        if *agent == id {
                            *since_unix_ms = now;
                            held |= c.id == l.chunk_id;
                        }
                    }
                }
            }
            if !held {
                revoked.push(l);
            }
        }
        for j in st.jobs.iter_mut().filter(|j| !j.record.phase.is_over()) {
            let job_id = j.record.id.clone();
            for c in &mut j.chunks {
                let stale = matches!(&c.state, ChunkState::Leased { agent, since_unix_ms }
                    if *agent == id && *since_unix_ms + 2000 < now && !listed.contains(&(job_id.clone(), c.id)));
                if stale {
                    c.state = ChunkState::Pending;
                }
            }
        }
        for b in &r.sent {
            if let Some(j) = st.jobs.iter_mut().find(|j| j.record.id == b.job_id) {
                j.cap.record_sent(now, b.wire_bytes);
            }
        }
        // This sender's share of each job's cap, by the leases it holds now.
        let minute = crate::cap::minute_now(&st.time_zone);
        let tz = st.time_zone_name.clone();
        let mut rates = Vec::new();
        for j in st.jobs.iter_mut().filter(|j| !j.record.phase.is_over()) {
            let mine = j.leases_held_by(&id);
            if mine == 0 {
                j.cap.release(&id);
                continue;
            }
            let cap = crate::cap::in_force(&j.record.options.cap_spec(), minute, &tz)
                .0
                .bytes_per_sec;
            let out = j.leases_out();
            rates.push(pb::JobRate {
                job_id: j.record.id.clone(),
                bytes_per_sec: j.cap.grant(&id, cap, mine, out),
            });
        }
        Ok(Response::new(pb::RenewReply { revoked, rates }))
    }

    async fn report_check(
        &self,
        req: Request<pb::CheckReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        haul_certs::require(&req, &[Role::Receiver])?;
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        let Some(c) = job.chunks.iter_mut().find(|c| c.id == r.chunk_id) else {
            return Err(Status::not_found(format!(
                "job {} has no chunk {}",
                r.job_id, r.chunk_id
            )));
        };
        c.checked = r.checked;
        c.mismatch = r.mismatch;
        c.check_pending_since_ms = 0;
        c.check_reported = true;
        let chunk = c.clone();
        drop(st);
        self.inner
            .store
            .put_chunk(&r.job_id, &chunk)
            .map_err(to_status)?;
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_verify(
        &self,
        req: Request<pb::VerifyReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let id = agent_id(who.role, &who.name);
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let Some(v) = st
            .verifies
            .iter_mut()
            .find(|v| v.task.verify_id == r.verify_id)
        else {
            return Err(Status::not_found(format!(
                "no verify run {} (the coordinator restarted since)",
                r.verify_id
            )));
        };
        if !r.error.is_empty() {
            tracing::warn!(verify = %r.verify_id, agent = %id, "failed to verify: {}", r.error);
        } else if r.finished {
            tracing::info!(verify = %r.verify_id, mismatches = r.mismatches.len(), "verify run done");
        }
        v.report(&id, r);
        drop(st);
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn check_lease(
        &self,
        req: Request<pb::LeaseRef>,
    ) -> Result<Response<pb::LeaseCheck>, Status> {
        haul_certs::require(&req, &[Role::Receiver])?;
        let l = req.into_inner();
        let mut st = self.inner.state.lock().await;
        if let Ok(job) = st.job_mut(&l.job_id) {
            job.expiry_checked_ms = 0;
            job.expire_leases(self.inner.lease_timeout);
        }
        let chunk = st
            .jobs
            .iter()
            .find(|j| j.record.id == l.job_id)
            .and_then(|j| j.chunks.iter().find(|c| c.id == l.chunk_id));
        let (current, reason) = match chunk {
            None => (false, "no such chunk".to_string()),
            Some(c) if c.epoch > l.epoch => (
                false,
                format!("lease epoch {} was superseded by {}", l.epoch, c.epoch),
            ),
            Some(c) if c.epoch != l.epoch => (
                false,
                "the coordinator restarted without a record of this lease; the chunk goes out again"
                    .to_string(),
            ),
            Some(c) if matches!(c.state, ChunkState::Leased { .. }) => (true, String::new()),
            Some(_) => (false, "the lease is no longer held".to_string()),
        };
        Ok(Response::new(pb::LeaseCheck { current, reason }))
    }

    async fn report_failure(
        &self,
        req: Request<pb::FailureReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let who = haul_certs::require(&req, &[Role::Sender])?;
        let reporter = agent_id(who.role, &who.name);
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let job = st.job_mut(&r.job_id)?;
        let mut changed_chunks = Vec::new();
        if job.record.phase == Phase::Cancelling {
            // Only the undo's own failure matters now: it is retried with backoff, and a
            // target that refuses it for good fails the job with what it said.
            if r.chunk_id == 0 && job.record.cleanup_holder.as_deref() == Some(reporter.as_str()) {
                job.record.cleanup_holder = None;
                job.record.finalize_attempts += 1;
                job.record.finalize_not_before_ms =
                    now_ms() + backoff_ms(job.record.finalize_attempts);
                if r.fatal || job.record.finalize_attempts >= MAX_FINALIZE_ATTEMPTS {
                    job.record.phase = Phase::Failed;
                    job.record.error = format!(
                        "cancelled, but the target could not be put back: {}",
                        r.message
                    );
                    job.record.finished_unix_ms = now_ms();
                }
            }
        } else if job.record.phase == Phase::Following {
            // The follower stopped. A fatal cause (a column changed on the source) waits for
            // the operator: the job is paused with the line that says what to do, the slot
            // keeps the changes, and `haul resume` follows again. Anything else is retried
            // with backoff, from the slot's confirmed position.
            if let Some(f) = job.record.follow.as_mut() {
                if f.holder.as_deref() == Some(reporter.as_str()) {
                    f.holder = None;
                    f.attempts += 1;
                    f.not_before_ms = now_ms() + backoff_ms(f.attempts.min(6));
                    job.record.warning = format!("following stopped: {}", r.message);
                    if r.fatal {
                        job.record.paused = true;
                    }
                }
            }
        } else if !r.lost_snapshot.is_empty() && job.record.options.follow {
            job.fail(FOLLOW_SNAPSHOT_LOST);
        } else if !r.lost_snapshot.is_empty() {
            // The snapshot could not be imported: its holder is gone. Not the chunk's fault.
            if r.lost_snapshot == job.record.snapshot_id && !job.record.snapshot_lost {
                tracing::warn!(job = %r.job_id, snapshot = %r.lost_snapshot, "snapshot lost; a new one will be exported");
                job.record.snapshot_lost = true;
                job.record.snapshot_leased = false;
            }
            for i in job.lease_members(r.chunk_id, r.epoch) {
                let c = &mut job.chunks[i];
                if c.epoch == r.epoch && matches!(c.state, ChunkState::Leased { .. }) {
                    c.state = ChunkState::Pending;
                }
            }
        } else if r.exhausted {
            // Waiting for the operator (disk full): retry every few seconds, without counting.
            job.record.warning = r.message.clone();
            for i in job.lease_members(r.chunk_id, r.epoch) {
                let c = &mut job.chunks[i];
                if c.epoch == r.epoch && matches!(c.state, ChunkState::Leased { .. }) {
                    c.state = ChunkState::Pending;
                    c.not_before_ms = now_ms() + 5_000;
                }
            }
        } else if r.chunk_id == 0
            && job.record.cleanup_pending
            && job.record.cleanup_holder.as_deref() != Some(reporter.as_str())
        {
            // A late failure of a finalize run that another run already reported: nothing to
            // retry.
        } else if r.fatal {
            job.fail(r.message.clone());
        } else if job.record.snapshot_lost && r.chunk_id == 0 {
            // The snapshot task failed: hand it out again.
            job.record.snapshot_leased = false;
            job.record.plan_attempts += 1;
            if job.record.plan_attempts > 10 {
                job.fail(format!("cannot export a new snapshot: {}", r.message));
            }
        } else if r.chunk_id == 0 {
            match job.record.phase {
                Phase::Planning if job.record.plan_attempts < 3 => job.record.planner = None,
                // Finalize (or cleanup) is retried with backoff: every step of it is idempotent or
                // recorded in the target, so running it again after any failure is safe.
                Phase::Finalizing if job.record.finalize_attempts + 1 < MAX_FINALIZE_ATTEMPTS => {
                    job.record.finalize_attempts += 1;
                    job.record.finalize_not_before_ms =
                        now_ms() + backoff_ms(job.record.finalize_attempts);
                    if job.record.cleanup_pending {
                        job.record.cleanup_holder = None;
                    } else {
                        job.record.finalize_leased = false;
                    }
                }
                _ => job.fail(r.message.clone()),
            }
        } else {
            // A group's members fail together, as they were leased.
            let mut exhausted = None;
            for i in job.lease_members(r.chunk_id, r.epoch) {
                let c = &mut job.chunks[i];
                if c.epoch == r.epoch && matches!(c.state, ChunkState::Leased { .. }) {
                    c.attempts += 1;
                    c.last_error = r.message.clone();
                    c.state = ChunkState::Pending;
                    c.not_before_ms = now_ms() + backoff_ms(c.attempts);
                    changed_chunks.push(c.clone());
                    if c.attempts >= MAX_ATTEMPTS && exhausted.is_none() {
                        exhausted = Some(format!(
                            "chunk {} failed {} times; last error: {}",
                            c.id, c.attempts, r.message
                        ));
                    }
                }
            }
            if let Some(msg) = exhausted {
                job.fail(msg);
            }
        }
        let table = job
            .chunks
            .iter()
            .find(|c| c.id == r.chunk_id)
            .and_then(|c| job.tables.get(c.table))
            .map(|t| t.table.to_string())
            .unwrap_or_default();
        tracing::warn!(job = %r.job_id, chunk = r.chunk_id, %table, agent = %reporter, fatal = r.fatal, "sender reported: {}", r.message);
        let record = job.record.clone();
        drop(st);
        if !changed_chunks.is_empty() {
            self.inner
                .store
                .put_chunks(&record.id, &changed_chunks)
                .map_err(to_status)?;
        }
        self.inner.save(&record).await?;
        self.inner.work.notify_waiters();
        Ok(Response::new(pb::Empty {}))
    }

    async fn start_job(
        &self,
        req: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::StartJobReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let o = req
            .into_inner()
            .options
            .ok_or_else(|| Status::invalid_argument("start needs job options"))?;
        if o.jobs == 0 {
            return Err(Status::invalid_argument("--jobs must be at least 1"));
        }
        // A UUID (time-ordered, v7): two jobs never share an id, whichever coordinator or `copy`
        // run made them, so one job's ledger rows on a target are never taken as another's.
        let id = uuid::Uuid::now_v7().to_string();
        let job = Job::new(id.clone(), Options::from(&o));
        self.inner
            .store
            .put_record(&job.record)
            .map_err(to_status)?;
        self.inner.store.flush().await.map_err(to_status)?;
        self.inner.state.lock().await.jobs.push(job);
        self.inner.work.notify_waiters();
        tracing::info!(job = %id, "job started");
        Ok(Response::new(pb::StartJobReply { job_id: id }))
    }

    async fn set_bandwidth(
        &self,
        req: Request<pb::SetBandwidthRequest>,
    ) -> Result<Response<pb::SetBandwidthReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let r = req.into_inner();
        haul_core::schedule::Schedule::parse(&r.spec)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let mut st = self.inner.state.lock().await;
        let index = st.operator_job(&r.job_id)?;
        if st.jobs[index].record.phase.is_over() {
            return Err(Status::failed_precondition(format!(
                "job {} is {}; a cap changes only a job that is still moving",
                st.jobs[index].record.id,
                st.jobs[index].record.phase.as_str()
            )));
        }
        st.jobs[index].record.options.bwlimit = r.spec.trim().to_string();
        let record = st.jobs[index].record.clone();
        let (_, cap) = st.cap_now(&st.jobs[index]);
        drop(st);
        self.inner.save(&record).await?;
        tracing::info!(job = %record.id, spec = %record.options.bwlimit, %cap, "cap changed");
        Ok(Response::new(pb::SetBandwidthReply {
            job_id: record.id,
            cap,
        }))
    }

    async fn steer_job(
        &self,
        req: Request<pb::SteerJobRequest>,
    ) -> Result<Response<pb::SteerJobReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let r = req.into_inner();
        let steer = pb::Steer::try_from(r.steer).unwrap_or(pb::Steer::Unspecified);
        let mut st = self.inner.state.lock().await;
        let index = st.operator_job(&r.job_id)?;
        let job = &mut st.jobs[index];
        let phase = job.record.phase;
        match steer {
            // A failed job can be cancelled: its undo takes away what it left.
            pb::Steer::Cancel if phase == Phase::Failed => {}
            pb::Steer::Cancel if phase == Phase::Done => {
                return Err(Status::failed_precondition(format!(
                    "job {} is done: the target holds the move, verified; there is nothing to cancel \
                     (drop the target database to undo it)",
                    job.record.id
                )));
            }
            _ if phase.is_over() => {
                return Err(Status::failed_precondition(format!(
                    "job {} is {}; only a job that is still moving can be paused, resumed or cancelled",
                    job.record.id,
                    phase.as_str()
                )));
            }
            pb::Steer::Cutover if job.record.follow.is_none() && !job.record.options.follow => {
                return Err(Status::failed_precondition(format!(
                    "job {} does not follow the source's changes; cutover is for jobs started with --follow",
                    job.record.id
                )));
            }
            pb::Steer::Cutover if phase == Phase::Cancelling => {
                return Err(Status::failed_precondition(format!(
                    "job {} is being cancelled; it cannot cut over",
                    job.record.id
                )));
            }
            pb::Steer::Pause | pb::Steer::Resume if phase == Phase::Cancelling => {
                return Err(Status::failed_precondition(format!(
                    "job {} is being cancelled; it cannot be paused or resumed",
                    job.record.id
                )));
            }
            _ => {}
        }
        let (revoked, changed) = match steer {
            pb::Steer::Pause => job.pause(),
            pb::Steer::Resume => {
                job.record.paused = false;
                (0, Vec::new())
            }
            // Cancelling twice is cancelling once.
            pb::Steer::Cancel if phase == Phase::Cancelling => (0, Vec::new()),
            pb::Steer::Cancel => job.cancel(r.keep_target),
            // Asked for before following started, it runs as soon as following does.
            pb::Steer::Cutover => {
                let f = job.record.follow.get_or_insert_with(Default::default);
                if f.cutover_requested_ms == 0 {
                    f.cutover_requested_ms = now_ms();
                }
                f.read_only_source |= r.read_only_source;
                job.record.paused = false;
                (0, Vec::new())
            }
            pb::Steer::Unspecified => {
                return Err(Status::invalid_argument("say pause, resume or cancel"));
            }
        };
        let record = job.record.clone();
        drop(st);
        if !changed.is_empty() {
            self.inner
                .store
                .put_chunks(&record.id, &changed)
                .map_err(to_status)?;
        }
        self.inner.save(&record).await?;
        if !record.paused {
            self.inner.work.notify_waiters();
        }
        let did = match steer {
            pb::Steer::Cancel => "cancelled",
            pb::Steer::Cutover => "cutting over",
            _ if record.paused => "paused",
            _ => "resumed",
        };
        tracing::info!(job = %record.id, paused = record.paused, leases_revoked = revoked, "job {did}");
        Ok(Response::new(pb::SteerJobReply {
            job_id: record.id,
            phase: record.phase.as_str().to_string(),
            paused: record.paused,
            leases_revoked: revoked as u32,
        }))
    }

    async fn start_verify(
        &self,
        req: Request<pb::StartVerifyRequest>,
    ) -> Result<Response<pb::StartVerifyReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let r = req.into_inner();
        let mut st = self.inner.state.lock().await;
        let job = &st.jobs[st.operator_job(&r.job_id)?];
        if !job.record.phase.is_over() || job.chunks.is_empty() {
            return Err(Status::failed_precondition(format!(
                "job {} is {}; verify it through its agents once it is done (`haul status --wait`)",
                job.record.id,
                job.record.phase.as_str()
            )));
        }
        let cutoff = now_ms().saturating_sub(30_000);
        let live = |role: Role| {
            st.agents
                .values()
                .any(|a| a.role == role && a.last_seen_ms >= cutoff)
        };
        for (role, beside) in [(Role::Sender, "source"), (Role::Receiver, "target")] {
            if !live(role) {
                return Err(Status::failed_precondition(format!(
                    "no {} is connected to the coordinator; verifying job {} through its agents needs a {} beside the {beside} (or use --source and --target)",
                    role.as_str(),
                    job.record.id,
                    role.as_str()
                )));
            }
        }
        let id = uuid::Uuid::now_v7().to_string();
        let run = VerifyRun::new(id.clone(), job, &r.tables, r.jobs);
        if run.task.pieces.is_empty() {
            return Err(Status::invalid_argument(format!(
                "no table of job {} matches --tables {}",
                job.record.id,
                r.tables.join(",")
            )));
        }
        let reply = pb::StartVerifyReply {
            verify_id: id.clone(),
            job_id: run.task.job_id.clone(),
            pieces: run.task.pieces.len() as u64,
            tables: run.tables,
            large_objects: run.large_objects,
        };
        tracing::info!(verify = %id, job = %reply.job_id, pieces = reply.pieces, "verify run started");
        st.verifies.push(run);
        drop(st);
        self.inner.work.notify_waiters();
        Ok(Response::new(reply))
    }

    async fn verify_status(
        &self,
        req: Request<pb::VerifyStatusRequest>,
    ) -> Result<Response<pb::VerifyStatusReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let r = req.into_inner();
        let st = self.inner.state.lock().await;
        st.verifies
            .iter()
            .find(|v| v.task.verify_id == r.verify_id)
            .map(|v| Response::new(v.status()))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no verify run {}: the coordinator restarted since and forgot it; run haul verify again",
                    r.verify_id
                ))
            })
    }

    async fn job_status(
        &self,
        req: Request<pb::JobStatusRequest>,
    ) -> Result<Response<pb::JobStatusReply>, Status> {
        haul_certs::require(&req, &[Role::Operator])?;
        let r = req.into_inner();
        let st = self.inner.state.lock().await;
        let index = st.operator_job(&r.job_id)?;
        let mut reply = st.status_reply(index, r.detail || r.in_flight_tables);
        if r.in_flight_tables && !r.detail {
            reply.table_progress.retain(|t| t.chunks_in_flight > 0);
        }
        Ok(Response::new(reply))
    }
}

impl State {
    /// What `haul status` (and the HTTP side) says of job `index`.
    fn status_reply(&self, index: usize, detail: bool) -> pb::JobStatusReply {
        let job = &self.jobs[index];
        let mut reply = status_of(
            job,
            self.agents.values().any(|a| a.role == Role::Receiver),
            detail,
        );
        let (cap, text) = self.cap_now(job);
        reply.cap_bytes_per_sec = cap;
        reply.cap = text;
        reply.codecs = job.codecs();
        reply.paused = job.record.paused;
        reply.wire_rate = if job.record.phase.is_over() {
            0.0
        } else {
            job.cap.rate(now_ms())
        };
        reply
    }

    /// Every job and agent, for `/metrics`.
    pub(crate) fn metrics_input(
        &self,
    ) -> (Vec<crate::http::JobMetrics>, Vec<crate::http::AgentMetrics>) {
        let jobs = (0..self.jobs.len())
            .map(|i| {
                let j = &self.jobs[i];
                let leased = j
                    .chunks
                    .iter()
                    .filter(|c| matches!(c.state, ChunkState::Leased { .. }))
                    .count() as u64;
                crate::http::JobMetrics {
                    status: self.status_reply(i, false),
                    leased,
                    retries: j.chunks.iter().map(|c| c.attempts as u64).sum(),
                    lease_expiries: j.record.lease_expiries,
                }
            })
            .collect();
        let now = now_ms();
        let mut agents: Vec<crate::http::AgentMetrics> = self
            .agents
            .iter()
            .map(|(id, a)| crate::http::AgentMetrics {
                id: id.clone(),
                role: a.role.as_str(),
                up: a.last_seen_ms + AGENT_UP_MS >= now,
                last_seen_secs: now.saturating_sub(a.last_seen_ms) as f64 / 1000.0,
            })
            .collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        (jobs, agents)
    }
}

impl State {
    /// Everything the dashboard shows, newest job first: each job's status, its tables
    /// (unfinished ones first, at most `DASHBOARD_TABLES`), errors and retries, and its
    /// history; and every agent.
    pub(crate) fn dashboard(&self) -> serde_json::Value {
        let now = now_ms();
        let jobs: Vec<serde_json::Value> = (0..self.jobs.len())
            .rev()
            .map(|i| {
                let j = &self.jobs[i];
                let s = self.status_reply(i, false);
                #[derive(Default)]
                struct T {
                    chunks: u64,
                    done: u64,
                    leased: u64,
                    rows: u64,
                    raw: u64,
                    wire: u64,
                    est: u64,
                    retries: u64,
                    error: String,
                }
                let mut tables: Vec<T> = j.tables.iter().map(|_| T::default()).collect();
                let mut errors = Vec::new();
                for c in &j.chunks {
                    let Some(t) = tables.get_mut(c.table) else {
                        continue;
                    };
                    t.chunks += 1;
                    t.est += c.est_bytes;
                    t.retries += c.attempts as u64;
                    if !c.last_error.is_empty() {
                        t.error = c.last_error.clone();
                        if errors.len() < 20 {
                            errors.push(serde_json::json!({
                                "chunk": c.id,
                                "table": j.tables[c.table].table.to_string(),
                                "attempts": c.attempts,
                                "error": c.last_error,
                            }));
                        }
                    }
                    match &c.state {
                        ChunkState::Leased { .. } => t.leased += 1,
                        ChunkState::Done {
                            rows,
                            raw_bytes,
                            wire_bytes,
                            ..
                        } => {
                            t.done += 1;
                            t.rows += rows;
                            t.raw += raw_bytes;
                            t.wire += wire_bytes;
                        }
                        ChunkState::Pending => {}
                    }
                }
                let mut order: Vec<usize> = (0..tables.len()).collect();
                // In flight first, then not started, then done; larger first within each.
                order.sort_by_key(|&k| {
                    let t = &tables[k];
                    let rank = if t.leased > 0 {
                        0
                    } else if t.done < t.chunks {
                        1
                    } else {
                        2
                    };
                    (rank, std::cmp::Reverse(t.est))
                });
                let shown: Vec<serde_json::Value> = order
                    .iter()
                    .take(DASHBOARD_TABLES)
                    .map(|&k| {
                        let t = &tables[k];
                        serde_json::json!({
                            "table": j.tables[k].table.to_string(),
                            "chunks": t.chunks, "done": t.done, "leased": t.leased,
                            "rows": t.rows, "raw": t.raw, "wire": t.wire, "est": t.est,
                            "retries": t.retries, "error": t.error,
                        })
                    })
                    .collect();
                let mismatches: Vec<String> = s
                    .mismatches
                    .iter()
                    .map(|m| {
                        let t = m.table.as_ref().map(|t| format!("{}.{}", t.schema, t.name));
                        format!(
                            "{}: source {} rows, target {} rows",
                            t.unwrap_or_default(),
                            m.source_rows,
                            m.target_rows
                        )
                    })
                    .chain(s.chunk_mismatches.iter().cloned())
                    .collect();
                serde_json::json!({
                    "job": s.job_id, "phase": s.phase, "step": s.step, "paused": s.paused,
                    "undone": s.undone, "left": s.left,
                    "error": s.error, "elapsed_secs": s.elapsed_secs,
                    "tables": s.tables, "chunks": s.chunks, "chunks_done": s.chunks_done,
                    "rows_done": s.rows_done, "raw_bytes_done": s.raw_bytes_done,
                    "wire_bytes_done": s.wire_bytes_done, "est_bytes_total": s.est_bytes_total,
                    "est_bytes_done": s.est_bytes_done, "cap": s.cap,
                    "cap_bytes_per_sec": s.cap_bytes_per_sec, "wire_rate": s.wire_rate,
                    "codecs": s.codecs, "verified": s.verified,
                    "verify": j.record.options.verify,
                    "tables_checked": s.tables_checked, "chunks_checked": s.chunks_checked,
                    "mismatches": mismatches,
                    "resumed_bytes": s.resumed_bytes_done, "resent_bytes": s.resent_bytes_done,
                    "retries": j.chunks.iter().map(|c| c.attempts as u64).sum::<u64>(),
                    "lease_expiries": j.record.lease_expiries,
                    "errors": errors,
                    "table_rows": shown,
                    "tables_hidden": tables.len().saturating_sub(DASHBOARD_TABLES),
                    "history": j.history.samples,
                    "follow": s.follow.as_ref().map(dashboard_follow),
                })
            })
            .collect();
        let (_, agents) = self.metrics_input();
        let agents: Vec<serde_json::Value> = agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "agent": a.id, "role": a.role, "up": a.up, "last_seen_secs": a.last_seen_secs,
                })
            })
            .collect();
        serde_json::json!({ "now_ms": now, "jobs": jobs, "agents": agents })
    }
}

/// A following job's lag for the dashboard.
fn dashboard_follow(f: &pb::FollowStatus) -> serde_json::Value {
    serde_json::json!({
        "lag_seconds": f.lag_seconds, "lag_bytes": f.lag_bytes, "apply_rate": f.apply_rate,
        "transactions": f.transactions, "retained_bytes": f.retained_bytes,
        "warning": f.warning, "cutover": f.cutover,
    })
}

/// The most tables of one job the dashboard lists (the rest are counted).
const DASHBOARD_TABLES: usize = 200;

/// An agent heard from within this long is up.
const AGENT_UP_MS: u64 = 30_000;

/// How a --follow job's following stands, for status.
fn follow_status(rec: &crate::job::JobRecord) -> Option<pb::FollowStatus> {
    let f = rec.follow.as_ref()?;
    let lsn = |v: u64| haul_core::pgoutput::Lsn(v).to_string();
    let now = now_ms();
    let stopped_end = if f.cutover_done_ms > 0 {
        rec.finished_unix_ms.max(f.cutover_done_ms)
    } else {
        now
    };
    Some(pb::FollowStatus {
        slot: f.slot.clone(),
        publication: f.publication.clone(),
        applied_lsn: lsn(f.applied_lsn.max(f.confirmed_lsn)),
        source_lsn: lsn(f.source_lsn),
        lag_bytes: f.lag_bytes(),
        lag_seconds: f.lag_seconds(now, rec.started_unix_ms),
        apply_rate: f.apply_rate,
        transactions: f.transactions,
        retained_bytes: f.retained_bytes,
        warning: if f.retained_bytes >= crate::job::RETAINED_WARNING_BYTES {
            format!(
                "the slot holds {} MiB of WAL on the source",
                f.retained_bytes >> 20
            )
        } else {
            String::new()
        },
        cutover: f.cutover_requested_ms > 0,
        cutover_lsn: if f.cutover_lsn > 0 {
            lsn(f.cutover_lsn)
        } else {
            String::new()
        },
        writes_stopped_secs: if f.cutover_requested_ms > 0 {
            stopped_end.saturating_sub(f.cutover_requested_ms) as f64 / 1000.0
        } else {
            0.0
        },
        identity_full: f.identity_full.clone(),
        cutover_pieces: f.cutover_pieces,
        cutover_sequences: f.cutover_sequences,
        read_only_source: f.read_only_note.clone(),
    })
}

fn status_of(job: &Job, have_receiver: bool, detail: bool) -> pb::JobStatusReply {
    let rec = &job.record;
    let mut reply = pb::JobStatusReply {
        follow: follow_status(rec),
        job_id: rec.id.clone(),
        phase: rec.phase.as_str().to_string(),
        error: rec.error.clone(),
        tables: job.tables.len() as u32,
        chunks: job.chunks.len() as u64,
        elapsed_secs: job.elapsed_secs(),
        verified: rec.verified && rec.phase == Phase::Done,
        ledger_dropped: rec.ledger_dropped,
        chunks_checked: job.chunks.iter().filter(|c| c.checked).count() as u64,
        chunk_mismatches: job.chunk_mismatches(),
        tables_checked: rec
            .checks
            .iter()
            .filter(|c| !haul_core::large_object::is_large_objects(&c.table))
            .count() as u32,
        // Objects as their chunks carried them: a large objects' digest, compared whole at
        // finalize when one of their chunks was not compared along the way, counts pieces.
        large_objects_checked: rec
            .checks
            .iter()
            .find(|c| haul_core::large_object::is_large_objects(&c.table))
            .map_or(0, |c| {
                job.tables
                    .iter()
                    .position(|t| t.table == c.table)
                    .and_then(|i| job.rows_by_table().get(i).copied())
                    .unwrap_or(c.source_rows)
            }),
        sequences: rec.sequences,
        snapshot_id: rec.snapshot_id.clone(),
        planned_bytes: job.tables.iter().map(|t| t.bytes).sum(),
        undone: rec.undone.clone(),
        left: rec.left.clone(),
        ..Default::default()
    };
    if rec.phase == Phase::Cancelling {
        reply.step = if rec.cancel_keep_target {
            "surveying what the job left on the target".to_string()
        } else {
            "undoing what the job wrote to the target".to_string()
        };
    }
    if rec.phase == Phase::Finalizing {
        reply.step = if rec.cleanup_pending {
            "cleanup".to_string()
        } else {
            "post-data, sequences and verification".to_string()
        };
    }
    if !rec.phase.is_over() && !rec.warning.is_empty() {
        reply.error = format!("waiting: {}", rec.warning);
    }
    if rec.phase == Phase::Planning && !have_receiver {
        reply.error = "waiting for a receiver to register".to_string();
    }
    let mut per_table: Vec<pb::TableProgress> = job
        .tables
        .iter()
        .map(|t| pb::TableProgress {
            table: Some(t.table.to_wire()),
            bytes: t.bytes,
            ..Default::default()
        })
        .collect();
    for c in &job.chunks {
        reply.retries += c.attempts as u64;
        if let Some(tp) = per_table.get_mut(c.table) {
            tp.chunks += 1;
            tp.retries += c.attempts as u64;
            tp.est_bytes += c.est_bytes;
        }
        if let ChunkState::Leased { .. } = c.state {
            if detail {
                reply.in_flight.push(c.id);
            }
            if let Some(tp) = per_table.get_mut(c.table) {
                tp.chunks_in_flight += 1;
            }
        }
        if let ChunkState::Done {
            rows,
            raw_bytes,
            wire_bytes,
            resumed_bytes,
            resent_bytes,
        } = c.state
        {
            reply.resumed_bytes_done += resumed_bytes;
            reply.resent_bytes_done += resent_bytes;
            reply.chunks_done += 1;
            reply.est_bytes_done += c.est_bytes;
            reply.rows_done += rows;
            reply.raw_bytes_done += raw_bytes;
            reply.wire_bytes_done += wire_bytes;
            if let Some(tp) = per_table.get_mut(c.table) {
                tp.chunks_done += 1;
                tp.rows_done += rows;
                tp.raw_bytes_done += raw_bytes;
                tp.wire_bytes_done += wire_bytes;
                tp.est_bytes_done += c.est_bytes;
            }
        }
    }
    reply.est_bytes_total = job.chunks.iter().map(|c| c.est_bytes).sum();
    let snapshots = job.snapshots();
    reply.consistent = snapshots.len() <= 1;
    reply.snapshots = snapshots
        .into_iter()
        .map(|(id, chunks)| pb::SnapshotUse {
            snapshot_id: id,
            chunks: chunks.len() as u64,
            chunk_ids: if detail { chunks } else { Vec::new() },
        })
        .collect();
    if detail {
        reply.table_progress = per_table;
    }
    reply.mismatches = rec
        .checks
        .iter()
        .filter(|c| !c.matches())
        .map(|c| pb::TableCheck {
            table: Some(c.table.to_wire()),
            source_rows: c.source_rows,
            target_rows: c.target_rows,
            source_digest: c.source_digest.clone(),
            target_digest: c.target_digest.clone(),
        })
        .collect();
    reply
}
