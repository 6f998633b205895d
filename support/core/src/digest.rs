//! Table digests for verification: a row count and an order-independent digest computed in SQL
//! on each side from that side's own catalog. Because both ends compute it the same way and
//! independently, a row lost, duplicated or altered anywhere shows up as a mismatch.
//!
//! The digest is the sum, as numeric, of the first 64 bits of md5 over each row's text form,
//! with the columns in name order (so physical column order does not matter). Session settings
//! that change text output are pinned by [`crate::pg::DETERMINISTIC_SESSION`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::ident::TableName;

/// One table's verification figures; `rows == -1` means the table could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub table: TableName,
    pub rows: i64,
    pub digest: String,
}

/// The quoted, name-ordered column list of every table, in one query.
async fn column_lists(
    client: &Client,
    tables: &[TableName],
) -> anyhow::Result<HashMap<String, String>> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            "SELECT u.t, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attname) \
             FROM unnest($1::text[]) AS u(t) \
             JOIN pg_attribute a ON a.attrelid = to_regclass(u.t) AND a.attnum > 0 AND NOT a.attisdropped \
             GROUP BY u.t",
            &[&names],
        )
        .await
        .context("read columns of tables to verify")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn digest_sql(table: &TableName, cols: &str) -> String {
    format!(
        "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5(ROW({cols})::text), 1, 16))::bit(64)::int8::numeric), 0)::text \
         FROM ONLY {} t",
        table.quoted()
    )
}

async fn digest_one(
    client: &Client,
    table: &TableName,
    cols: Option<&String>,
    suffix: &str,
) -> TableDigest {
    let sql = if crate::large_object::is_large_objects(table) {
        format!("{};{suffix}", crate::large_object::DIGEST)
    } else {
        let Some(cols) = cols else {
            return TableDigest {
                table: table.clone(),
                rows: -1,
                digest: "missing".into(),
            };
        };
        format!("{};{suffix}", digest_sql(table, cols))
    };
    digest_query(client, table, &sql).await
}

async fn digest_query(client: &Client, table: &TableName, sql: &str) -> TableDigest {
    let result = client.simple_query(sql).await;
    let row = result.ok().and_then(|msgs| {
        msgs.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(0).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1),
                r.get(1).unwrap_or("").to_string(),
            )),
            _ => None,
        })
    });
    match row {
        Some((rows, digest)) => TableDigest {
            table: table.clone(),
            rows,
            digest,
        },
        None => TableDigest {
            table: table.clone(),
            rows: -1,
            digest: "unreadable".into(),
        },
    }
}

/// Digest every table in `tables` with up to `parallel` connections made by `connect`.
/// `suffix` runs after each table's query in the same round trip (a source reader uses it to
/// roll back to its savepoint, releasing the table's lock).
pub async fn digest_all<F, Fut>(
    tables: Vec<TableName>,
    parallel: usize,
    suffix: &'static str,
    connect: F,
) -> anyhow::Result<Vec<TableDigest>>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Client>> + Send,
{
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let first = connect().await?;
    let cols = Arc::new(column_lists(&first, &tables).await?);
    let queue = Arc::new(tokio::sync::Mutex::new(tables));
    let mut workers = tokio::task::JoinSet::new();
    let mut first = Some(first);
    for _ in 0..parallel.max(1) {
        let (queue, cols, connect) = (queue.clone(), cols.clone(), connect.clone());
        let given = first.take();
        workers.spawn(async move {
            let client = match given {
                Some(c) => c,
                None => connect().await?,
            };
            let mut out = Vec::new();
            loop {
                let next = queue.lock().await.pop();
                let Some(t) = next else {
                    return anyhow::Ok(out);
                };
                out.push(digest_one(&client, &t, cols.get(&t.quoted()), suffix).await);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("verify worker")??);
    }
    Ok(all)
}
