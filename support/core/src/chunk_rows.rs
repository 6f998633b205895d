//! A chunk's rows read from either end and folded into a row digest (`row_digest`), with
//! shapes from that end's own catalog. The receiver reads a chunk back after it commits and
//! compares with the digest the sender computed while reading the source (verification along
//! the way); `haul verify` reads the same chunk from two databases.
//!
//! Only chunks whose rows a predicate selects can be read this way on the target: a whole
//! table, a range of an integer key, a range of large-object oids. A chunk cut by ctid pages
//! cannot (its rows sit on other pages of the target); its table is compared whole instead.

use crate::chunk::{Column, Range};
use crate::ident::{quote_ident, TableName};
use crate::large_object;
use crate::row_digest::{column_types, CopyDigest, RowDigest, Shape, ShapeCache};
use anyhow::Context;
use futures::StreamExt;

/// Whether a chunk of `range` can be read back by predicate on the target.
pub fn can_read_back(range: &Range) -> bool {
    matches!(range, Range::Whole | Range::Key { .. })
}

/// Read a chunk's rows from `client`'s database and digest them.
pub async fn digest(
    client: &tokio_postgres::Client,
    shapes: &ShapeCache,
    table: &TableName,
    columns: &[Column],
    range: &Range,
    meta: large_object::Metadata,
) -> anyhow::Result<RowDigest> {
    let (select, shapes) = if large_object::is_large_objects(table) {
        (
            large_object::source_select(range.predicate().as_deref(), meta),
            vec![Shape::Scalar; large_object::COLUMNS.len()],
        )
    } else {
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        let oids = column_types(client, table, &names).await?;
        let cols: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
        (
            format!(
                "SELECT {} FROM ONLY {}{}",
                cols.join(", "),
                table.quoted(),
                range
                    .predicate()
                    .map(|p| format!(" WHERE {p}"))
                    .unwrap_or_default()
            ),
            shapes.for_types(client, &oids).await?,
        )
    };
    // Large objects are read with lo_open, which needs a transaction; rows need none but take
    // no harm from one.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .context("begin a read to verify a chunk")?;
    let result = async {
        let stream = client
            .copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "read {table} to verify it: {}",
                    crate::pg::db_error_line(&e)
                )
            })?;
        futures::pin_mut!(stream);
        let mut rows = CopyDigest::new(shapes);
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| {
                anyhow::anyhow!(
                    "read {table} to verify it: {}",
                    crate::pg::db_error_line(&e)
                )
            })?;
            rows.update(&piece)
                .with_context(|| format!("digest the rows of {table}"))?;
        }
        rows.finish()
    }
    .await;
    let _ = client.batch_execute("ROLLBACK").await;
    result
}

/// How a chunk read back differs from what the sender read, in one line naming it.
pub fn mismatch(
    table: &TableName,
    chunk_id: u64,
    range: &Range,
    source: &RowDigest,
    target: &RowDigest,
) -> Option<String> {
    if source == target {
        return None;
    }
    let what = if large_object::is_large_objects(table) {
        "large objects".to_string()
    } else {
        table.to_string()
    };
    Some(format!(
        "{what} chunk {chunk_id} ({}): source {} rows (digest {}), target {} rows (digest {}){}",
        range.describe(),
        source.rows,
        source.short(),
        target.rows,
        target.short(),
        if source.rows == target.rows {
            "; contents differ"
        } else {
            ""
        }
    ))
}
