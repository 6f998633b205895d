//! A table's indexes and keys as soon as the table is loaded, while the rest of the job still
//! copies, instead of all of them at finalize.
//!
//! On a long link the target waits on the wire for most of a move; post-data (index builds)
//! then runs after the last byte, on a target that was idle before. Here, once the ledger
//! holds every chunk of a table (split in chunks, or at least [`MIN_TABLE_BYTES`]), the
//! post-data entries that need that table's rows and nothing
//! else (`Script::post_entry_table`: indexes, primary keys, unique and exclusion constraints on
//! a table with rows of its own) are queued, and a few sessions per job apply them in the
//! background. Foreign keys, triggers, partitioned parents' indexes and their attachments wait
//! for finalize, as before.
//!
//! Invariants:
//! - Every entry goes through `schema::apply_recorded`: it commits together with its
//!   `post:N` row in `haul.finalize_applied`, under an advisory lock on (job, N), so an entry is
//!   made once whoever gets to it first: these sessions, finalize, or another receiver.
//! - How to undo post-data is recorded before the first entry is applied, as at finalize.
//! - Nothing here fails the job: an entry that fails is left to finalize, which applies it
//!   again and names it if it fails there too.
//! - Finalize and cleanup stop a job's sessions first ([`EarlyPost::stop`]) and wait for the
//!   batch in hand, so they never race one of them for a table's locks; a cancel cancels the
//!   statements of that batch instead of waiting for them (`schema::cancel_post_data`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use haul_core::ident::TableName;
use haul_core::pg::DbUrl;
use haul_core::schema_script::{Entry, Script};
use tokio::sync::{mpsc, Mutex, OnceCell};

use crate::schema;

/// A table loaded in one chunk smaller than this has its post-data at finalize: building a
/// small table's indexes costs less than the commit it would take on its own now, and at
/// finalize they go many to a commit on parallel sessions. Tables split in chunks always go.
pub const MIN_TABLE_BYTES: u64 = 16 << 20;

/// Sessions per job applying post-data during the copy: index builds take CPU and I/O the
/// loading of the other chunks also needs.
const SESSIONS: usize = 2;

/// Each job's early post-data, by job id.
#[derive(Default)]
pub struct EarlyPost {
    /// `None` once stopped: a chunk re-sent after finalize began starts nothing again.
    jobs: std::sync::Mutex<HashMap<String, Option<JobPost>>>,
}

struct JobPost {
    tables: mpsc::UnboundedSender<TableName>,
    shared: Arc<Shared>,
    sessions: Vec<tokio::task::JoinHandle<()>>,
}

struct Shared {
    job_id: String,
    target: DbUrl,
    /// The job's post-data script in the spool.
    script_path: PathBuf,
    stop: AtomicBool,
    /// The entries by table, read once: `None` when there is no post-data to apply.
    plan: OnceCell<Option<Plan>>,
    tables: Mutex<mpsc::UnboundedReceiver<TableName>>,
    applied: AtomicU64,
}

struct Plan {
    preamble: String,
    by_table: HashMap<(String, String), Vec<(usize, Entry)>>,
}

impl EarlyPost {
    /// Every chunk of `table` is in the target's ledger: queue its post-data entries.
    pub fn table_loaded(&self, job_id: &str, table: &TableName, target: &DbUrl, script: PathBuf) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        let job = jobs.entry(job_id.to_string()).or_insert_with(|| {
            Some({
                let (tx, rx) = mpsc::unbounded_channel();
                let shared = Arc::new(Shared {
                    job_id: job_id.to_string(),
                    target: target.clone(),
                    script_path: script,
                    stop: AtomicBool::new(false),
                    plan: OnceCell::new(),
                    tables: Mutex::new(rx),
                    applied: AtomicU64::new(0),
                });
                let sessions = (0..SESSIONS)
                    .map(|_| tokio::spawn(session(shared.clone())))
                    .collect();
                JobPost {
                    tables: tx,
                    shared,
                    sessions,
                }
            })
        });
        if let Some(job) = job {
            let _ = job.tables.send(table.clone());
        }
    }

    /// Stop the job's sessions and wait for the batches in hand; the tables still queued are
    /// left to finalize. Returns how many entries were applied during the copy.
    pub async fn stop(&self, job_id: &str) -> u64 {
        self.stop_then(job_id, async {}).await
    }

    /// [`EarlyPost::stop`], running `meanwhile` once no session starts another batch and
    /// before waiting for the batches in hand (a cancel cancels their statements there).
    pub async fn stop_then(
        &self,
        job_id: &str,
        meanwhile: impl std::future::Future<Output = ()>,
    ) -> u64 {
        let job = match self.jobs.lock() {
            Ok(mut jobs) => jobs.insert(job_id.to_string(), None).flatten(),
            Err(_) => None,
        };
        let Some(job) = job else {
            return 0;
        };
        job.shared.stop.store(true, Ordering::Relaxed);
        drop(job.tables);
        meanwhile.await;
        for s in job.sessions {
            let _ = s.await;
        }
        job.shared.applied.load(Ordering::Relaxed)
    }
}

/// One session: tables from the queue, their entries applied in batches, until stopped.
async fn session(shared: Arc<Shared>) {
    let mut client = None;
    loop {
        let table = {
            let mut rx = shared.tables.lock().await;
            rx.recv().await
        };
        let Some(table) = table else { return };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(plan) = shared.plan.get_or_init(|| plan(&shared)).await else {
            continue;
        };
        let Some(entries) = plan
            .by_table
            .get(&(table.schema.clone(), table.name.clone()))
        else {
            continue;
        };
        if client.is_none() {
            match schema::post_session(&shared.target, &plan.preamble, &shared.job_id).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(job = %shared.job_id, "no session for post-data during the copy: {e:#}");
                    return;
                }
            }
        }
        let Some(c) = client.as_ref() else { return };
        let began = std::time::Instant::now();
        for batch in entries.chunks(schema::POST_BATCH) {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let refs: Vec<(usize, &Entry)> = batch.iter().map(|(i, e)| (*i, e)).collect();
            match schema::apply_recorded(c, &shared.job_id, &refs).await {
                Ok(()) => {
                    shared
                        .applied
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(job = %shared.job_id, %table,
                        "post-data of a loaded table failed during the copy; finalize applies it: {e:#}");
                    // The session may be in any state: the next table gets a fresh one.
                    client = None;
                    break;
                }
            }
        }
        tracing::debug!(job = %shared.job_id, %table, entries = entries.len(),
            secs = began.elapsed().as_secs_f32(), "post-data of a loaded table applied during the copy");
        // Test point: a table's post-data is in, the copy goes on.
        haul_core::failpoint::die("die-in-early-post-data");
    }
}

/// Read the job's post-data once and sort its entries by the table they are built on; record
/// how to undo post-data before any of it is applied.
async fn plan(shared: &Shared) -> Option<Plan> {
    let text = match tokio::fs::read_to_string(&shared.script_path).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(job = %shared.job_id, "no post-data to apply during the copy: {e}");
            return None;
        }
    };
    let script = schema::post_script(&text, &shared.job_id);
    let client = match shared.target.connect("haul-post-undo").await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(job = %shared.job_id, "post-data during the copy: {e:#}");
            return None;
        }
    };
    if let Err(e) = crate::undo::record_post_data(&client, &shared.job_id, &script).await {
        tracing::debug!(job = %shared.job_id, "post-data during the copy: {e:#}");
        return None;
    }
    let mut by_table: HashMap<(String, String), Vec<(usize, Entry)>> = HashMap::new();
    for (i, e) in script.entries.iter().enumerate() {
        if let Some(t) = Script::post_entry_table(e) {
            by_table.entry(t).or_default().push((i, e.clone()));
        }
    }
    Some(Plan {
        preamble: script.preamble,
        by_table,
    })
}
