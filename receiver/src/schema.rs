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
pub async fn apply_pre(client: &Client, script: &Script, job_id: &str) -> anyhow::Result<u32> {
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

/// Apply post-data with up to `parallel` connections; returns the number of entries.
pub async fn apply_post(target: &DbUrl, script: &Script, parallel: usize) -> anyhow::Result<u32> {
    let (wave1, wave2): (Vec<&Entry>, Vec<&Entry>) = script
        .entries
        .iter()
        .partition(|e| Script::is_independent_post(e));
    let queue = Arc::new(tokio::sync::Mutex::new(
        wave1.into_iter().cloned().collect::<Vec<Entry>>(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let queue = queue.clone();
        let target = target.clone();
        let preamble = script.preamble.clone();
        workers.spawn(async move {
            let client = target.connect("haul-post-data").await?;
            client.batch_execute(&preamble).await.map_err(|e| {
                anyhow::anyhow!(
                    "prepare post-data session: {}",
                    haul_core::pg::db_error_line(&e)
                )
            })?;
            loop {
                let next = queue.lock().await.pop();
                let Some(e) = next else { return anyhow::Ok(()) };
                client
                    .batch_execute(&e.sql)
                    .await
                    .map_err(|err| entry_error("create", &e, &err))?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("post-data worker")??;
    }
    let client = target.connect("haul-post-data").await?;
    client.batch_execute(&script.preamble).await.map_err(|e| {
        anyhow::anyhow!(
            "prepare post-data session: {}",
            haul_core::pg::db_error_line(&e)
        )
    })?;
    for e in wave2 {
        client
            .batch_execute(&e.sql)
            .await
            .map_err(|err| entry_error("create", e, &err))?;
    }
    Ok(script.entries.len() as u32)
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
