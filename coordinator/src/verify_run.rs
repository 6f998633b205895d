//! A finished job compared again (`haul verify --coordinator`): the job's chunks become the
//! pieces to compare, one sender carries the run (its receiver reads the target side), and
//! the operator follows it with `VerifyStatus`.
//!
//! Runs live in memory only. A run reads and writes nothing durable, so a coordinator that
//! restarts forgets it and the operator's `haul verify` says to run it again; persisting it
//! would only make a half-done comparison survive, which is worth nothing.

use std::collections::HashSet;

use haul_core::chunk::{Column, Range};
use haul_core::chunk_rows::can_read_back;
use haul_core::ident::matches_pattern;
use haul_core::large_object::is_large_objects;
use haul_proto as pb;

use crate::job::{now_ms, Job};

pub struct VerifyRun {
    pub task: pb::VerifyTask,
    /// The sender carrying the run, and when it last reported; a carrier silent for the lease
    /// timeout is taken to be gone and the run is handed out again, from the start.
    pub holder: Option<String>,
    pub last_report_ms: u64,
    pub tables: u32,
    pub large_objects: bool,
    pub last: pb::VerifyReport,
    pub finished: bool,
    /// Carriers that reported an error; after [`MAX_VERIFY_ATTEMPTS`] the run ends failed.
    pub attempts: u32,
}

/// A run whose carriers failed this many times ends with the last error.
pub const MAX_VERIFY_ATTEMPTS: u32 = 3;

impl VerifyRun {
    /// The run for `job`: each chunk selected by a predicate is a piece of its own, and a
    /// table cut by pages is one piece, compared whole (its rows sit on other pages of the
    /// target). `patterns` limit the tables; with patterns, large objects and sequences are
    /// left out, as `haul verify --tables` does.
    pub fn new(id: String, job: &Job, patterns: &[String], jobs: u32) -> VerifyRun {
        let mut whole = HashSet::new();
        let mut tables = HashSet::new();
        let mut pieces = Vec::new();
        let mut chunks: Vec<_> = job.chunks.iter().collect();
        chunks.sort_by_key(|c| c.id);
        for c in chunks {
            let Some(t) = job.tables.get(c.table) else {
                continue;
            };
            if !patterns.is_empty()
                && (is_large_objects(&t.table)
                    || !patterns.iter().any(|p| matches_pattern(p, &t.table)))
            {
                continue;
            }
            let range = if can_read_back(&c.range) {
                c.range.clone()
            } else if whole.insert(c.table) {
                Range::Whole
            } else {
                continue;
            };
            tables.insert(c.table);
            pieces.push(pb::VerifyPiece {
                chunk_id: c.id,
                table: Some(t.table.to_wire()),
                columns: t.columns.iter().map(Column::to_wire).collect(),
                range: Some(range.to_wire()),
            });
        }
        let large_objects = tables.iter().any(|&i| {
            job.tables
                .get(i)
                .is_some_and(|t| is_large_objects(&t.table))
        });
        let options = &job.record.options;
        VerifyRun {
            task: pb::VerifyTask {
                verify_id: id.clone(),
                job_id: job.record.id.clone(),
                receiver_addr: job.record.receiver_addr.clone(),
                pieces,
                jobs: if jobs == 0 { options.jobs.max(1) } else { jobs },
                large_object_owner: !options.no_owner,
                large_object_privileges: !options.no_privileges,
                sequences: patterns.is_empty(),
            },
            holder: None,
            last_report_ms: 0,
            tables: (tables.len() - usize::from(large_objects)) as u32,
            large_objects,
            last: pb::VerifyReport {
                verify_id: id,
                ..Default::default()
            },
            finished: false,
            attempts: 0,
        }
    }

    /// A carrier's report: progress, the result, or an error (the run is handed out again).
    pub fn report(&mut self, agent: &str, r: pb::VerifyReport) {
        if self.finished || self.holder.as_deref() != Some(agent) {
            return;
        }
        self.last_report_ms = now_ms();
        if !r.error.is_empty() {
            self.attempts += 1;
            self.holder = None;
            self.finished = self.attempts >= MAX_VERIFY_ATTEMPTS;
        } else {
            self.finished = r.finished;
        }
        self.last = r;
    }

    /// Whether a sender may take the run now: nobody carries it, or its carrier went silent.
    pub fn available(&self, lease_timeout_ms: u64) -> bool {
        !self.finished
            && (self.holder.is_none()
                || now_ms().saturating_sub(self.last_report_ms) > lease_timeout_ms)
    }

    pub fn status(&self) -> pb::VerifyStatusReply {
        pb::VerifyStatusReply {
            verify_id: self.task.verify_id.clone(),
            job_id: self.task.job_id.clone(),
            state: if self.finished && !self.last.error.is_empty() {
                "failed"
            } else if self.finished {
                "done"
            } else if self.holder.is_some() {
                "running"
            } else {
                "waiting"
            }
            .to_string(),
            agent: self.holder.clone().unwrap_or_default(),
            pieces: self.task.pieces.len() as u64,
            pieces_done: self.last.pieces_done,
            rows: self.last.rows,
            sequences: self.last.sequences,
            mismatches: self.last.mismatches.clone(),
            error: self.last.error.clone(),
            tables: self.tables,
            large_objects: self.large_objects,
        }
    }
}
