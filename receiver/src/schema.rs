//! Schema on the target: the preflight that refuses a target that is not ready, pre-data before
//! any rows, and at the end post-data, sequences and materialized views.
//!
//! Pre-data runs in one transaction when the target's lock table can hold it (nothing is
//! half-created if any statement fails), otherwise in batches of entries, since creating ten
//! thousand tables in one transaction needs ten thousand locks. Post-data runs in two waves:
//! indexes and key constraints in parallel, then the entries that depend on them in order.

use std::sync::Arc;

use anyhow::Context;
use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::pg::DbUrl;
use haul_core::schema_script::{Entry, Script};
use haul_core::status::fatal;
use haul_proto as pb;
use tokio_postgres::Client;

const BATCH: usize = 500;

/// Refuse a target that would make the move unsafe: with schema creation, a table that already
/// exists; without it, a table that is missing or already holds rows. A few round trips for
/// the whole list, not one per table.
pub async fn preflight(
    client: &Client,
    tables: &[TableName],
    create_schema: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let existing: Vec<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) WHERE to_regclass(t) IS NOT NULL ORDER BY i",
            &[&names],
        )
        .await
        .context("look up target tables")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let display = |quoted: &str| {
        tables
            .iter()
            .find(|t| t.quoted() == quoted)
            .map_or_else(|| quoted.to_string(), |t| t.to_string())
    };
    if create_schema {
        if let Some(t) = existing.first() {
            return Err(fatal(format!(
                "target already has table {}{}; drop it, use an empty target database, or pass --no-schema to load into the existing tables",
                display(t),
                if existing.len() > 1 { format!(" (and {} more)", existing.len() - 1) } else { String::new() }
            )));
        }
        return Ok(());
    }
    if let Some(missing) = names.iter().find(|n| !existing.contains(n)) {
        return Err(fatal(format!(
            "target has no table {} and --no-schema was given; create the schema first or drop --no-schema",
            display(missing)
        )));
    }
    for batch in names.chunks(200) {
        let sql = batch
            .iter()
            .map(|n| {
                format!(
                    "SELECT {} WHERE EXISTS (SELECT 1 FROM ONLY {n})",
                    quote_literal(n)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(&sql, &[])
            .await
            .context("check target tables are empty")?;
        if let Some(r) = rows.first() {
            let t: String = r.get(0);
            return Err(fatal(format!(
                "target table {} already holds rows; empty it (TRUNCATE) or use another target database",
                display(&t)
            )));
        }
    }
    Ok(())
}

/// Refuse a target that already holds large objects when the job moves some: the source's
/// would collide with them, or be merged into a database that is not the source's.
pub async fn preflight_large_objects(client: &Client) -> anyhow::Result<()> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await
        .context("count target large objects")?
        .get(0);
    if n > 0 {
        return Err(fatal(format!(
            "target already holds {n} large objects and the source has large objects to move; \
             use an empty target database (or remove them with lo_unlink)"
        )));
    }
    Ok(())
}

/// Which of `names` the target's catalog view `view` has no row for (by its `column`), sorted.
async fn absent(
    client: &Client,
    names: &[&str],
    view: &str,
    column: &str,
    what: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query(
            &format!(
                "SELECT n FROM unnest($1::text[]) AS n \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.{view} a WHERE a.{column} = n) ORDER BY 1"
            ),
            &[&names],
        )
        .await
        .with_context(|| format!("look up {what} on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Refuse a target that cannot create an extension the source uses, naming every one missing,
/// before anything is written: pg_dump's pre-data creates them, and the first missing one
/// would otherwise fail the schema halfway.
pub async fn preflight_extensions(client: &Client, names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let missing = absent(
        client,
        &names,
        "pg_available_extensions",
        "name",
        "extensions",
    )
    .await?;
    if !missing.is_empty() {
        return Err(fatal(format!(
            "the target server cannot create extensions the source uses: {}; install their packages on the target's server, then run the move again",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// The roles the moved objects need that the target lacks. Without `create`, they are refused
/// in one line naming them all and the flags that help; with it, they are returned, their
/// `CREATE ROLE` statements to run in the transaction that applies pre-data.
pub async fn preflight_roles(
    client: &Client,
    roles: &[pb::RoleDef],
    create: bool,
) -> anyhow::Result<Vec<pb::RoleDef>> {
    if roles.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    let missing = absent(client, &names, "pg_roles", "rolname", "roles").await?;
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    if !create {
        return Err(fatal(format!(
            "the target lacks {} role(s) that own or are granted the moved objects: {}; create them, \
             pass --roles to create them (without passwords; add --role-passwords for the source's), \
             or pass --no-owner --no-privileges to leave owners and grants behind",
            missing.len(),
            missing.join(", ")
        )));
    }
    Ok(roles
        .iter()
        .filter(|r| missing.contains(&r.name))
        .cloned()
        .collect())
}

/// Statements sent per round trip. A multi-statement simple query runs as one implicit
/// transaction, so a batch either applies whole or not at all; on failure it is replayed one
/// entry at a time to name the entry that failed.
const GROUP: usize = 50;

/// Run `entries` as batches on `client`. Inside an explicit transaction a failure leaves it
/// aborted: `in_tx` tells us not to replay (the caller rolls back and replays from the start).
async fn run_entries(client: &Client, entries: &[Entry], in_tx: bool) -> anyhow::Result<()> {
    for group in entries.chunks(GROUP) {
        let sql: String = group
            .iter()
            .map(|e| e.sql.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        if let Err(err) = client.batch_execute(&sql).await {
            if group.len() == 1 {
                return Err(entry_error("create", &group[0], &err));
            }
            if in_tx {
                return Err(BatchFailed(haul_core::pg::db_error_line(&err)).into());
            }
            for e in group {
                client
                    .batch_execute(&e.sql)
                    .await
                    .map_err(|err| entry_error("create", e, &err))?;
            }
        }
    }
    Ok(())
}

/// A batch inside a transaction failed; the caller finds which entry by replaying.
#[derive(Debug)]
struct BatchFailed(String);

impl std::fmt::Display for BatchFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BatchFailed {}

/// Apply pre-data; returns the number of entries applied.
/// Apply pre-data, in one transaction when the target's lock table allows, else in batches.
/// The last transaction also records the job in `haul.schema_applied`.
pub async fn apply_pre(
    client: &Client,
    script: &Script,
    job_id: &str,
    create_roles: &[String],
) -> anyhow::Result<u32> {
    let capacity: i64 = client
        .query_one(
            "SELECT current_setting('max_locks_per_transaction')::int8 * \
             (current_setting('max_connections')::int8 + current_setting('max_prepared_transactions')::int8)",
            &[],
        )
        .await
        .context("read target lock settings")?
        .get(0);
    client.batch_execute(&script.preamble).await.map_err(|e| {
        anyhow::anyhow!(
            "prepare schema session on target: {}",
            haul_core::pg::db_error_line(&e)
        )
    })?;
    let batch = if (script.entries.len() as i64) * 2 + 256 < capacity {
        script.entries.len().max(1)
    } else {
        BATCH
    };
    let groups = script.entries.chunks(batch).count();
    for (i, group) in script.entries.chunks(batch).enumerate() {
        client
            .batch_execute("BEGIN")
            .await
            .context("begin schema batch")?;
        // The roles the objects need go in with the first batch: created with the schema, or
        // not at all.
        if i == 0 {
            for sql in create_roles {
                if let Err(e) = client.batch_execute(sql).await {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(fatal(format!(
                        "cannot create role on target ({sql}): {}",
                        haul_core::pg::db_error_line(&e)
                    )));
                }
            }
        }
        if i + 1 == groups {
            let mark = crate::ledger::mark_schema(job_id, script.entries.len() as u32);
            client
                .batch_execute(&mark)
                .await
                .context("record pre-data in haul.schema_applied")?;
        }
        if let Err(e) = run_entries(client, group, true).await {
            let _ = client.batch_execute("ROLLBACK").await;
            if e.downcast_ref::<BatchFailed>().is_none() {
                return Err(e);
            }
            // Find the entry that failed, then undo everything of this transaction again.
            client
                .batch_execute("BEGIN")
                .await
                .context("begin schema replay")?;
            if i == 0 {
                for sql in create_roles {
                    let _ = client.batch_execute(sql).await;
                }
            }
            for entry in group {
                if let Err(err) = client.batch_execute(&entry.sql).await {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(entry_error("create", entry, &err));
                }
            }
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        client
            .batch_execute("COMMIT")
            .await
            .context("commit schema batch")?;
    }
    Ok(script.entries.len() as u32)
}

fn entry_error(verb: &str, e: &Entry, err: &tokio_postgres::Error) -> anyhow::Error {
    fatal(format!(
        "cannot {verb} {} {}{} on target: {}",
        e.kind.to_lowercase(),
        if e.schema == "-" {
            String::new()
        } else {
            format!("{}.", e.schema)
        },
        e.name,
        haul_core::pg::db_error_line(err)
    ))
}

/// A job's post-data script as stored in the spool, as finalize applies it: numbered the
/// same wherever it is read (entries are recorded by number).
pub fn post_script(text: &str, job_id: &str) -> Script {
    // A --follow job's own publication is the source's, not the target's.
    Script::parse(text).without_publication(&haul_core::ident::follow_names(job_id).1)
}

/// Apply post-data with up to `parallel` connections; returns the number of entries.
///
/// Every entry commits together with its row in `haul.finalize_applied`, in batches, under an
/// advisory lock per entry ([`apply_recorded`]), and entries recorded there are skipped: a
/// finalize that runs again after a crash of any role, twice at once after a coordinator
/// restart, or beside the sessions that built a loaded table's indexes during the copy, never
/// creates an index a second time.
pub async fn apply_post(
    target: &DbUrl,
    script: &Script,
    parallel: usize,
    job_id: &str,
    done: &std::collections::HashSet<String>,
) -> anyhow::Result<u32> {
    let step = |i: usize| format!("post:{i}");
    type Numbered<'a> = Vec<(usize, &'a Entry)>;
    let (wave1, wave2): (Numbered, Numbered) = script
        .entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !done.contains(&step(*i)))
        .partition(|(_, e)| Script::is_independent_post(e));
    if wave1.is_empty() && wave2.is_empty() {
        return Ok(script.entries.len() as u32);
    }
    let wave1_len = wave1.len();
    let queue = Arc::new(tokio::sync::Mutex::new(
        wave1
            .into_iter()
            .map(|(i, e)| (i, e.clone()))
            .collect::<Vec<(usize, Entry)>>(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1).min(wave1_len.max(1)) {
        let queue = queue.clone();
        let target = target.clone();
        let preamble = script.preamble.clone();
        let job_id = job_id.to_string();
        workers.spawn(async move {
            let client = post_session(&target, &preamble, &job_id).await?;
            loop {
                let batch: Vec<(usize, Entry)> = {
                    let mut q = queue.lock().await;
                    let keep = q.len().saturating_sub(POST_BATCH);
                    q.split_off(keep)
                };
                if batch.is_empty() {
                    return anyhow::Ok(());
                }
                let refs: Vec<(usize, &Entry)> = batch.iter().map(|(i, e)| (*i, e)).collect();
                apply_recorded(&client, &job_id, &refs).await?;
                // Test point: part of the first wave is in.
                haul_core::failpoint::die("die-in-post-data-wave1");
                haul_core::failpoint::stall("stall-in-post-data-wave1").await;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("post-data worker")??;
    }
    let client = post_session(target, &script.preamble, job_id).await?;
    for batch in wave2.chunks(POST_BATCH) {
        apply_recorded(&client, job_id, batch).await?;
        // Test point: part of the second wave is in.
        haul_core::failpoint::die("die-in-post-data-wave2");
        haul_core::failpoint::stall("stall-in-post-data-wave2").await;
    }
    Ok(script.entries.len() as u32)
}

/// Post-data entries committed together (with their records): one commit, and one wait for
/// the target's WAL flush, per batch rather than per index.
pub(crate) const POST_BATCH: usize = 32;

/// Post-data entries and their records, in one transaction: all are in, or none. Each entry
/// is first locked (an advisory lock on the job and the entry's number) and looked up in
/// `haul.finalize_applied`: an entry another session applied, or is applying (an early run
/// while the copy goes on, another receiver, a finalize run again), is waited for and skipped,
/// never made twice. A batch that fails is replayed entry by entry, which names the entry
/// that fails (the others of the batch are in by then, recorded).
pub(crate) async fn apply_recorded(
    client: &Client,
    job_id: &str,
    entries: &[(usize, &Entry)],
) -> anyhow::Result<()> {
    match apply_locked(client, job_id, entries).await {
        Ok(()) => Ok(()),
        Err(err) if entries.len() == 1 => Err(entry_error("create", entries[0].1, &err)),
        // Cancelled (a cancelled job): the entries are not to blame, and not replayed.
        Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            Err(anyhow::anyhow!(
                "post-data cancelled on the target: {}",
                haul_core::pg::db_error_line(&err)
            ))
        }
        Err(_) => {
            for (i, e) in entries {
                apply_locked(client, job_id, &[(*i, *e)])
                    .await
                    .map_err(|err| entry_error("create", e, &err))?;
            }
            Ok(())
        }
    }
}

/// [`apply_recorded`]'s transaction; rolled back on any error.
async fn apply_locked(
    client: &Client,
    job_id: &str,
    entries: &[(usize, &Entry)],
) -> Result<(), tokio_postgres::Error> {
    let mut entries = entries.to_vec();
    // Always in the same order: two sessions locking overlapping batches cannot deadlock.
    entries.sort_by_key(|(i, _)| *i);
    let key = post_lock_key(job_id);
    let mut sql = String::from("BEGIN;");
    for (i, _) in &entries {
        sql.push_str(&format!("SELECT pg_advisory_xact_lock({key}, {i});"));
    }
    let r = async {
        client.batch_execute(&sql).await?;
        let steps: Vec<String> = entries.iter().map(|(i, _)| format!("post:{i}")).collect();
        let done: std::collections::HashSet<String> = client
            .query(
                "SELECT step FROM haul.finalize_applied WHERE job_id = $1 AND step = ANY($2)",
                &[&job_id, &steps],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The newline ends a trailing `--` comment of an entry before what follows it.
        let mut sql = String::new();
        for (i, e) in &entries {
            let step = format!("post:{i}");
            if !done.contains(&step) {
                // In its own tablespace: entries go in batches, on parallel sessions, by
                // table, so the setting pg_dump printed before them may be on another session.
                sql.push_str(&format!(
                    "{}\n;\n{};\n",
                    e.sql_in_its_tablespace(),
                    crate::ledger::mark_step(job_id, &step)
                ));
            }
        }
        sql.push_str("COMMIT");
        client.batch_execute(&sql).await
    }
    .await;
    if r.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    r
}

/// The first key of the advisory locks on a job's post-data entries (the second is the
/// entry's number): a hash of the job id. Two jobs that hash alike only wait for each other.
fn post_lock_key(job_id: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in job_id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// Cancel what a job's post-data sessions are running (an index build can take hours; a
/// cancelled job does not wait for one). Their transactions roll back.
pub(crate) async fn cancel_post_data(client: &Client, job_id: &str) -> anyhow::Result<()> {
    client
        .execute(
            "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_catalog.pg_backend_pid()",
            &[&post_application(job_id)],
        )
        .await
        .context("cancel the job's post-data statements on the target")?;
    Ok(())
}

/// The application name of a job's post-data sessions, so a later run can find them.
fn post_application(job_id: &str) -> String {
    let mut name = format!("haul-post-{job_id}");
    name.truncate(63);
    name
}

/// Wait until no session of an earlier post-data run of this job is inside a statement. A run
/// whose caller went away (its sender died, the receiver restarted) can leave a batch running
/// on the target, which then commits; reading the recorded steps before it ends would apply
/// its entries a second time.
pub async fn wait_for_earlier_post_data(client: &Client, job_id: &str) -> anyhow::Result<()> {
    let app = post_application(job_id);
    let mut said = false;
    loop {
        let busy: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid() AND state <> 'idle'",
                &[&app],
            )
            .await
            .context("look for an earlier post-data run on the target")?
            .get(0);
        if busy == 0 {
            return Ok(());
        }
        if !said {
            tracing::info!(
                job = job_id,
                sessions = busy,
                "waiting for the statements of an earlier post-data run to end on the target"
            );
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub(crate) async fn post_session(
    target: &DbUrl,
    preamble: &str,
    job_id: &str,
) -> anyhow::Result<Client> {
    let client = target.connect(&post_application(job_id)).await?;
    client.batch_execute(preamble).await.map_err(|e| {
        anyhow::anyhow!(
            "prepare post-data session: {}",
            haul_core::pg::db_error_line(&e)
        )
    })?;
    Ok(client)
}

pub async fn set_sequences(client: &Client, seqs: &[pb::SequenceValue]) -> anyhow::Result<()> {
    for batch in seqs.chunks(200) {
        let sql = batch
            .iter()
            .map(|s| {
                let name = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.name));
                format!(
                    "SELECT pg_catalog.setval({}, {}, {});",
                    quote_literal(&name),
                    s.last_value,
                    s.is_called
                )
            })
            .collect::<String>();
        if let Err(e) = client.batch_execute(&sql).await {
            return Err(fatal(format!(
                "cannot set sequences on target: {}",
                haul_core::pg::db_error_line(&e)
            )));
        }
    }
    Ok(())
}

pub async fn refresh_matviews(client: &Client, views: &[TableName]) -> anyhow::Result<()> {
    for v in views {
        client
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", v.quoted()))
            .await
            .map_err(|e| {
                fatal(format!(
                    "cannot refresh materialized view {v} on target: {}",
                    haul_core::pg::db_error_line(&e)
                ))
            })?;
    }
    Ok(())
}

/// Count and digest every table in `tables`, `parallel` at a time.
pub async fn digests(
    target: &DbUrl,
    tables: Vec<TableName>,
    parallel: usize,
) -> anyhow::Result<Vec<pb::TableDigest>> {
    let target = target.clone();
    let all = haul_core::digest::digest_all(tables, parallel, "", move || {
        let target = target.clone();
        async move { target.connect("haul-verify").await }
    })
    .await?;
    Ok(all
        .into_iter()
        .map(|d| pb::TableDigest {
            table: Some(d.table.to_wire()),
            rows: d.rows,
            digest: d.digest,
        })
        .collect())
}

/// Tables counted in one statement.
const COUNT_BATCH: usize = 100;

/// Count the rows of every table in `tables`, `parallel` at a time (large objects: the
/// objects), for tables whose contents were compared chunk by chunk.
pub async fn counts(
    target: &DbUrl,
    tables: Vec<TableName>,
    parallel: usize,
) -> anyhow::Result<Vec<pb::TableDigest>> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let queue = Arc::new(tokio::sync::Mutex::new(tables));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (queue, target) = (queue.clone(), target.clone());
        workers.spawn(async move {
            let client = target.connect("haul-verify").await?;
            let mut out = Vec::new();
            loop {
                // Many tables counted in one statement: one round trip for a batch of small
                // tables instead of one each.
                let batch: Vec<TableName> = {
                    let mut q = queue.lock().await;
                    let keep = q.len().saturating_sub(COUNT_BATCH);
                    q.split_off(keep)
                };
                if batch.is_empty() {
                    return anyhow::Ok(out);
                }
                let count_sql = |t: &TableName| {
                    if haul_core::large_object::is_large_objects(t) {
                        "SELECT count(*)::int8 FROM pg_catalog.pg_largeobject_metadata".to_string()
                    } else {
                        format!("SELECT count(*)::int8 FROM ONLY {}", t.quoted())
                    }
                };
                let sql = batch
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("SELECT {i}::int4, ({})", count_sql(t)))
                    .collect::<Vec<_>>()
                    .join(" UNION ALL ");
                let mut rows = vec![-1i64; batch.len()];
                match client.query(&sql, &[]).await {
                    Ok(found) => {
                        for r in found {
                            let (i, n): (i32, i64) = (r.get(0), r.get(1));
                            if let Some(slot) = rows.get_mut(i as usize) {
                                *slot = n;
                            }
                        }
                    }
                    // A table that cannot be counted (gone, say) is found one at a time.
                    Err(_) => {
                        for (slot, t) in rows.iter_mut().zip(&batch) {
                            if let Ok(r) = client.query_one(&count_sql(t), &[]).await {
                                *slot = r.get::<_, i64>(0);
                            }
                        }
                    }
                }
                for (t, rows) in batch.into_iter().zip(rows) {
                    out.push(pb::TableDigest {
                        table: Some(t.to_wire()),
                        rows,
                        digest: String::new(),
                    });
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("count worker")??);
    }
    Ok(all)
}
