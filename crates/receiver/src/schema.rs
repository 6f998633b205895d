//! Schema on the target: the preflight that refuses a target that is not ready, pre-data before
//! any rows, and at the end post-data, sequences and materialized views.
//!
//! Pre-data runs in one transaction when the target's lock table can hold it (nothing is
//! half-created if any statement fails), otherwise in batches of entries, since creating ten
//! thousand tables in one transaction needs ten thousand locks. Post-data runs in two waves:
//! indexes and key constraints in parallel, then the entries that depend on them in order.

use std::sync::Arc;

use anyhow::Context;
use haul_core::digest::table_digest;
use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::pg::DbUrl;
use haul_core::schema_script::{Entry, Script};
use haul_core::status::fatal;
use haul_proto as pb;
use tokio_postgres::Client;

const BATCH: usize = 500;

/// Refuse a target that would make the move unsafe: with schema creation, a table that already
/// exists; without it, a table that is missing or already holds rows.
pub async fn preflight(
    client: &Client,
    tables: &[TableName],
    create_schema: bool,
) -> anyhow::Result<()> {
    for t in tables {
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted()])
            .await
            .context("look up target table")?
            .get::<_, bool>(0);
        if create_schema && exists {
            return Err(fatal(format!(
                "target already has table {t}; drop it, use an empty target database, or pass --no-schema to load into the existing tables"
            )));
        }
        if !create_schema {
            if !exists {
                return Err(fatal(format!(
                    "target has no table {t} and --no-schema was given; create the schema first or drop --no-schema"
                )));
            }
            let has_rows = client
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM ONLY {})", t.quoted()),
                    &[],
                )
                .await
                .with_context(|| format!("check target table {t}"))?
                .get::<_, bool>(0);
            if has_rows {
                return Err(fatal(format!(
                    "target table {t} already holds rows; empty it (TRUNCATE) or use another target database"
                )));
            }
        }
    }
    Ok(())
}

/// Apply pre-data; returns the number of entries applied.
pub async fn apply_pre(client: &Client, script: &Script) -> anyhow::Result<u32> {
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
    for group in script.entries.chunks(batch) {
        client
            .batch_execute("BEGIN")
            .await
            .context("begin schema batch")?;
        for e in group {
            if let Err(err) = client.batch_execute(&e.sql).await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(entry_error("create", e, &err));
            }
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
    for s in seqs {
        let name = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.name));
        let sql = format!(
            "SELECT pg_catalog.setval({}, {}, {})",
            quote_literal(&name),
            s.last_value,
            s.is_called
        );
        client.batch_execute(&sql).await.map_err(|e| {
            fatal(format!(
                "cannot set sequence {}.{} on target: {}",
                s.schema,
                s.name,
                haul_core::pg::db_error_line(&e)
            ))
        })?;
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
    let queue = Arc::new(tokio::sync::Mutex::new(tables));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let queue = queue.clone();
        let target = target.clone();
        workers.spawn(async move {
            let client = target.connect("haul-verify").await?;
            let mut out = Vec::new();
            loop {
                let next = queue.lock().await.pop();
                let Some(t) = next else {
                    return anyhow::Ok(out);
                };
                // A table the target lacks or cannot read is a mismatch to report, not a crash.
                let (rows, digest) = match table_digest(&client, &t).await {
                    Ok(v) => v,
                    Err(e) => (-1, format!("unreadable: {e:#}")),
                };
                out.push(pb::TableDigest {
                    table: Some(t.to_wire()),
                    rows,
                    digest,
                });
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("verify worker")??);
    }
    Ok(all)
}
