//! The staging area: a bounded place on the sender's disk where a chunk's compressed blocks are
//! written as fast as the source gives them, ahead of the link, and sent from there.
//!
//! Why: a sender that restarts loses the snapshot its transaction held, and bytes read under two
//! snapshots are never joined in one chunk. Without staging, every chunk in flight would start
//! again from its first byte under the new snapshot, re-crossing the link for what the receiver
//! already holds. A chunk staged completely is independent of any snapshot: the restarted
//! sender continues it from the receiver's offset, out of staging, and says which snapshot its
//! rows were read under. Reading the source is much faster than a long-haul link, so a chunk is
//! usually staged completely within moments of starting.
//!
//! Bounded: a chunk is staged only if its planned size fits in what is left of the budget
//! (`--staging-size`); otherwise it is read straight onto the wire as before. Staged files are
//! deleted once their chunk is applied.
//!
//! Durable: a stage counts only once complete, and its record (snapshot, codec, size, digest)
//! is flushed to sled before anything relies on it. Files without a complete record are
//! deleted when the sender starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use haul_core::state::{chunk_key, job_prefix, parse_chunk_key};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Budget accounting unit: permits are KiB so a u32 covers terabytes.
const UNIT: u64 = 1024;

/// Chunks smaller than this are not staged: restarting them costs less than staging them.
pub const STAGE_MIN_BYTES: u64 = 4 << 20;

/// A completely staged chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Staged {
    pub snapshot_id: String,
    pub codec: i32,
    pub zstd_level: i32,
    pub raw_bytes: u64,
    pub frames: u64,
    pub digest: Vec<u8>,
    /// The rows' digest (`core::row_digest`) and count, when the job verifies.
    #[serde(default)]
    pub row_digest: Vec<u8>,
    #[serde(default)]
    pub rows: u64,
}

pub struct Staging {
    dir: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    /// Bytes of staging left, in KiB permits. Why a semaphore: reservations are taken by
    /// concurrent workers and given back when a chunk is applied.
    budget: Arc<Semaphore>,
    /// Reservations held by staged (or staging) chunks, released with their files.
    held: Mutex<HashMap<(String, u64), OwnedSemaphorePermit>>,
}

impl Staging {
    /// Open the staging area under `state_dir` with a budget of `bytes` (0 = never stage).
    pub fn open(state_dir: &Path, bytes: u64) -> anyhow::Result<Staging> {
        let db = haul_core::state::open_or_rebuild(
            &state_dir.join("sender.sled"),
            "sender state",
            "chunks staged before the restart will be read from the source again",
        )?;
        let tree = db.open_tree("staged").context("open sled tree staged")?;
        let dir = state_dir.join("staging");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create staging directory {}", dir.display()))?;
        let permits = (bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        let staging = Staging {
            dir,
            db,
            tree,
            budget: Arc::new(Semaphore::new(permits)),
            held: Mutex::new(HashMap::new()),
        };
        staging.sweep();
        Ok(staging)
    }

    /// Keep complete stages (and reserve their size), drop everything else.
    fn sweep(&self) {
        let mut keep = Vec::new();
        for (k, v) in self.tree.iter().flatten() {
            let parsed = parse_chunk_key(&k)
                .zip(serde_json::from_slice::<Staged>(&v).ok())
                .filter(|((job, chunk), _)| self.path(job, *chunk).exists());
            match parsed {
                Some(((job, chunk), staged)) => {
                    let path = self.path(&job, chunk);
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if let Some(permit) = self.try_reserve(size) {
                        if let Ok(mut held) = self.held.lock() {
                            held.insert((job.clone(), chunk), permit);
                        }
                    }
                    tracing::info!(
                        job = %job, chunk, bytes = staged.raw_bytes,
                        "kept a staged chunk from before the restart"
                    );
                    keep.push(path);
                }
                None => {
                    let _ = self.tree.remove(&k);
                }
            }
        }
        for job in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(job.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !keep.contains(&f.path()) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    pub fn path(&self, job_id: &str, chunk_id: u64) -> PathBuf {
        self.dir
            .join(haul_core::state::path_component(job_id))
            .join(format!("chunk-{chunk_id}.stage"))
    }

    /// The chunk, if it is staged completely.
    pub fn complete(&self, job_id: &str, chunk_id: u64) -> Option<Staged> {
        let v = self.tree.get(chunk_key(job_id, chunk_id)).ok()??;
        let staged: Staged = serde_json::from_slice(&v).ok()?;
        self.path(job_id, chunk_id).exists().then_some(staged)
    }

    fn try_reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(UNIT).max(1);
        let units = u32::try_from(units).ok()?;
        self.budget.clone().try_acquire_many_owned(units).ok()
    }

    /// Reserve room to stage a chunk of about `est_bytes`; `None` when it does not fit (or
    /// is too small to be worth it), and the chunk goes straight onto the wire.
    pub fn reserve(&self, job_id: &str, chunk_id: u64, est_bytes: u64) -> bool {
        if est_bytes < STAGE_MIN_BYTES {
            return false;
        }
        let Some(permit) = self.try_reserve(est_bytes) else {
            return false;
        };
        match self.held.lock() {
            Ok(mut held) => {
                held.insert((job_id.to_string(), chunk_id), permit);
                true
            }
            Err(_) => false,
        }
    }

    /// Create (or empty) the chunk's staging file.
    pub async fn create(&self, job_id: &str, chunk_id: u64) -> anyhow::Result<tokio::fs::File> {
        let path = self.path(job_id, chunk_id);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("create staging directory {}", parent.display()))?;
        }
        let _ = self.tree.remove(chunk_key(job_id, chunk_id));
        tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("create staging file {}", path.display()))
    }

    /// The chunk is staged completely: record it, durably, before anything relies on it.
    pub async fn finish(&self, job_id: &str, chunk_id: u64, staged: &Staged) -> anyhow::Result<()> {
        let v = serde_json::to_vec(staged).context("encode staged chunk record")?;
        self.tree
            .insert(chunk_key(job_id, chunk_id), v)
            .context("write sender state")?;
        self.db.flush_async().await.context("flush sender state")?;
        Ok(())
    }

    /// Drop a chunk's stage (it is applied, or its bytes are no longer wanted).
    pub async fn remove(&self, job_id: &str, chunk_id: u64) {
        let _ = self.tree.remove(chunk_key(job_id, chunk_id));
        let _ = tokio::fs::remove_file(self.path(job_id, chunk_id)).await;
        if let Ok(mut held) = self.held.lock() {
            held.remove(&(job_id.to_string(), chunk_id));
        }
    }

    /// Drop every stage of a job (it is finalized).
    pub async fn remove_job(&self, job_id: &str) {
        for (k, _) in self.tree.scan_prefix(job_prefix(job_id)).flatten() {
            if let Some((job, chunk)) = parse_chunk_key(&k) {
                self.remove(&job, chunk).await;
            }
        }
        if let Some(dir) = self.path(job_id, 0).parent() {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        if let Ok(mut held) = self.held.lock() {
            held.retain(|(job, _), _| job != job_id);
        }
    }

    /// Bytes of budget left.
    #[cfg(test)]
    pub fn available(&self) -> u64 {
        self.budget.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_bounds_what_is_staged_and_comes_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Staging::open(dir.path(), 20 << 20)?;
        assert!(!s.reserve("j", 1, 1 << 20), "tiny chunks are not staged");
        assert!(s.reserve("j", 2, 12 << 20));
        assert!(!s.reserve("j", 3, 12 << 20), "over budget");
        s.remove("j", 2).await;
        assert!(s.reserve("j", 3, 12 << 20), "budget came back");
        Ok(())
    }

    #[tokio::test]
    async fn only_complete_stages_survive_a_restart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let s = Staging::open(dir.path(), 64 << 20)?;
            assert!(s.reserve("j", 1, 8 << 20));
            drop(s.create("j", 1).await?);
            let staged = Staged {
                snapshot_id: "snap".into(),
                codec: 1,
                zstd_level: 3,
                raw_bytes: 10,
                frames: 1,
                digest: vec![1; 32],
                row_digest: vec![2; 16],
                rows: 3,
            };
            s.finish("j", 1, &staged).await?;
            drop(s.create("j", 2).await?); // never finished: a crash mid-stage
        }
        let s = Staging::open(dir.path(), 64 << 20)?;
        assert_eq!(s.complete("j", 1).map(|st| st.raw_bytes), Some(10));
        assert!(s.complete("j", 2).is_none());
        assert!(
            !s.path("j", 2).exists(),
            "an unfinished stage was left behind"
        );
        assert!(s.available() < 64 << 20, "a kept stage holds its budget");
        Ok(())
    }
}
