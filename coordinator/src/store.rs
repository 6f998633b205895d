//! The coordinator's state in sled: one key per job record and one per chunk, so a chunk's
//! progress rewrites a few hundred bytes, not the whole job (ten thousand chunks per job must
//! stay cheap).
//!
//! Durability: job creation, plans and phase changes are flushed before they are acknowledged.
//! Chunk completions are not flushed one by one: a completion lost in a crash costs a re-lease
//! that the receiver answers from the target's ledger ("already applied") without moving rows.

use std::path::Path;

use anyhow::Context;

use crate::job::{Chunk, Job, JobRecord, TableInfo};

pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    tables: sled::Tree,
    chunks: sled::Tree,
}

fn chunk_key(job: &str, id: u64) -> Vec<u8> {
    let mut k = job.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn chunk_prefix(job: &str) -> Vec<u8> {
    let mut k = job.as_bytes().to_vec();
    k.push(0);
    k
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create state directory {}", dir.display()))?;
        let path = dir.join("coordinator.sled");
        // sled's default page cache is 1 GiB; the coordinator's state is small and its working
        // set smaller, so a modest cache keeps its memory flat as jobs grow.
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(32 << 20)
            .open()
            .with_context(|| {
                format!(
                "open coordinator state {} (is another coordinator using this --state directory?)",
                path.display()
            )
            })?;
        let jobs = db.open_tree("jobs").context("open sled tree jobs")?;
        let tables = db.open_tree("tables").context("open sled tree tables")?;
        let chunks = db.open_tree("chunks").context("open sled tree chunks")?;
        Ok(Store {
            db,
            jobs,
            tables,
            chunks,
        })
    }

    /// Count this start of the coordinator, durably. Lease epochs carry it in their high bits,
    /// so an epoch handed out after a restart is above every epoch handed out before it, even
    /// those the crash kept from being written down.
    pub fn next_generation(&self) -> anyhow::Result<u64> {
        let old = self
            .db
            .get("generation")
            .context("read generation")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let next = old + 1;
        self.db
            .insert("generation", &next.to_be_bytes())
            .context("write generation")?;
        self.db.flush().context("flush generation")?;
        Ok(next)
    }

    pub fn put_record(&self, r: &JobRecord) -> anyhow::Result<()> {
        let v = serde_json::to_vec(r).context("encode job record")?;
        self.jobs
            .insert(r.id.as_bytes(), v)
            .context("write job record")?;
        Ok(())
    }

    /// A job's tables, written once when it is planned.
    pub fn put_tables(&self, job: &str, tables: &[TableInfo]) -> anyhow::Result<()> {
        let v = serde_json::to_vec(tables).context("encode tables")?;
        self.tables
            .insert(job.as_bytes(), v)
            .context("write tables")?;
        Ok(())
    }

    pub fn put_chunk(&self, job: &str, c: &Chunk) -> anyhow::Result<()> {
        let v = serde_json::to_vec(c).context("encode chunk")?;
        self.chunks
            .insert(chunk_key(job, c.id), v)
            .context("write chunk")?;
        Ok(())
    }

    pub fn put_chunks(&self, job: &str, cs: &[Chunk]) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for c in cs {
            batch.insert(
                chunk_key(job, c.id),
                serde_json::to_vec(c).context("encode chunk")?,
            );
        }
        self.chunks.apply_batch(batch).context("write chunks")
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        self.db
            .flush_async()
            .await
            .context("flush coordinator state")?;
        Ok(())
    }

    /// Every job with its chunks, in lease order.
    pub fn load(&self) -> anyhow::Result<Vec<Job>> {
        let mut out = Vec::new();
        for kv in self.jobs.iter() {
            let (_, v) = kv.context("read job record")?;
            let record: JobRecord =
                serde_json::from_slice(&v).context("decode job record (state corrupt?)")?;
            let mut chunks = Vec::new();
            for kv in self.chunks.scan_prefix(chunk_prefix(&record.id)) {
                let (_, v) = kv.context("read chunk")?;
                chunks.push(
                    serde_json::from_slice::<Chunk>(&v).context("decode chunk (state corrupt?)")?,
                );
            }
            chunks.sort_by(|a, b| b.est_bytes.cmp(&a.est_bytes).then(a.id.cmp(&b.id)));
            let tables: Vec<TableInfo> = match self
                .tables
                .get(record.id.as_bytes())
                .context("read tables")?
            {
                Some(v) => serde_json::from_slice(&v).context("decode tables (state corrupt?)")?,
                None => Vec::new(),
            };
            let mut job = Job::new(record.id.clone(), record.options.clone());
            job.record = record;
            job.tables = tables;
            job.chunks = chunks;
            job.recount();
            out.push(job);
        }
        Ok(out)
    }
}
