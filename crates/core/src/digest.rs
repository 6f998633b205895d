//! Table digests for verification: a row count and an order-independent digest computed in SQL
//! on each side from that side's own catalog. Because both ends compute it the same way and
//! independently, a row lost, duplicated or altered anywhere shows up as a mismatch.
//!
//! The digest is the sum, as numeric, of the first 64 bits of md5 over each row's text form,
//! with the columns in name order (so physical column order does not matter). Session settings
//! that change text output are pinned by [`crate::pg::DETERMINISTIC_SESSION`].

use anyhow::Context;
use tokio_postgres::Client;

use crate::ident::{quote_ident, TableName};

/// Count and digest of one table, read by `client` (which must already be inside whatever
/// snapshot the caller wants).
pub async fn table_digest(client: &Client, table: &TableName) -> anyhow::Result<(i64, String)> {
    let cols = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attname",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("read columns of {table}"))?;
    let names: Vec<String> = cols
        .iter()
        .map(|r| quote_ident(&r.get::<_, String>(0)))
        .collect();
    let row_expr = if names.is_empty() {
        "''".to_string()
    } else {
        format!("ROW({})::text", names.join(", "))
    };
    let sql = format!(
        "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5({row_expr}), 1, 16))::bit(64)::int8::numeric), 0)::text \
         FROM ONLY {} t",
        table.quoted()
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .with_context(|| format!("digest {table}"))?;
    Ok((row.get(0), row.get(1)))
}
