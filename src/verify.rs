//! `haul verify`: compare two databases chunk by chunk, with nothing of a job needed. The
//! source's catalog is measured and planned into chunks as a move would be; each chunk's rows
//! are read from both databases with the same binary COPY and folded into row digests
//! (`core::chunk_rows`), so a difference is named down to its table, chunk and key range.
//! Large objects are compared as chunks of oids (contents, owners, privileges, comments), and
//! sequences by their values.
//!
//! Both URLs are used in this one process, like `copy`. The databases should be quiet (after
//! the move, before writes resume): each chunk is read in its own transaction on each side.

use std::process::ExitCode;
use std::sync::Arc;

use haul_core::bandwidth::parse_size;
use haul_core::chunk::{plan, Range};
use haul_core::chunk_rows;
use haul_core::ident::TableName;
use haul_core::large_object;
use haul_core::pg::{DbUrl, Side};
use haul_core::row_digest::ShapeCache;
use haul_core::status::fatal;

use crate::agents::required;
use crate::cli::VerifyArgs;
use crate::operator::{jobs_flag, table_patterns, DEFAULT_CHUNK};

/// One comparison to make: a table's rows in `range`.
struct Piece {
    id: u64,
    table: TableName,
    columns: Vec<haul_core::chunk::Column>,
    range: Range,
}

pub async fn run(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let source = DbUrl::parse(&required(a.source, "source")?, Side::Source)?;
    let target = DbUrl::parse(&required(a.target, "target")?, Side::Target)?;
    let chunk_bytes = parse_size(a.chunk_size.as_deref().unwrap_or(DEFAULT_CHUNK))
        .map_err(|e| fatal(format!("--chunk-size: {e}")))?;
    let jobs = jobs_flag(a.jobs)?;
    let patterns = table_patterns(a.tables.as_deref());
    let meta = large_object::Metadata {
        owner: !a.no_owner,
        privileges: !a.no_privileges,
    };

    let src = source.connect("haul-verify").await?;
    let dst = target.connect("haul-verify").await?;
    let mut tables = haul_sender::catalog::measure_tables(&src, &patterns, chunk_bytes).await?;
    if patterns.is_empty() {
        tables.extend(haul_sender::catalog::measure_large_objects(&src, chunk_bytes).await?);
    }
    let mut differences: Vec<String> = Vec::new();

    // Tables the target lacks are differences on their own; they are not read.
    let names: Vec<String> = tables.iter().map(|t| t.table.quoted()).collect();
    let missing: Vec<String> = dst
        .query(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NULL",
            &[&names],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "look up tables on the target: {}",
                haul_core::pg::db_error_line(&e)
            )
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in &tables {
        if missing.contains(&t.table.quoted()) {
            differences.push(format!("{}: missing on the target", t.table));
        }
    }

    // Chunks as a move would cut them; a table cut by pages is compared whole (its rows sit
    // on other pages of the target).
    let mut pieces: Vec<Piece> = Vec::new();
    let mut whole: std::collections::HashSet<usize> = Default::default();
    for p in plan(&tables, chunk_bytes) {
        let t = &tables[p.table];
        if missing.contains(&t.table.quoted()) {
            continue;
        }
        let range = if chunk_rows::can_read_back(&p.range) {
            p.range
        } else if whole.insert(p.table) {
            Range::Whole
        } else {
            continue;
        };
        pieces.push(Piece {
            id: pieces.len() as u64 + 1,
            table: t.table.clone(),
            columns: t.columns.clone(),
            range,
        });
    }
    drop(src);
    drop(dst);

    let total = pieces.len();
    let queue = Arc::new(tokio::sync::Mutex::new(pieces));
    let (src_shapes, dst_shapes) = (
        Arc::new(ShapeCache::default()),
        Arc::new(ShapeCache::default()),
    );
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs.min(total.max(1) as u32) {
        let (queue, source, target) = (queue.clone(), source.clone(), target.clone());
        let (src_shapes, dst_shapes) = (src_shapes.clone(), dst_shapes.clone());
        workers.spawn(async move {
            let s = source.connect("haul-verify").await?;
            let d = target.connect("haul-verify").await?;
            let mut found = Vec::new();
            let mut rows = 0u64;
            loop {
                let next = queue.lock().await.pop();
                let Some(p) = next else {
                    return anyhow::Ok((found, rows));
                };
                let (a, b) = tokio::join!(
                    chunk_rows::digest(&s, &src_shapes, &p.table, &p.columns, &p.range, meta),
                    chunk_rows::digest(&d, &dst_shapes, &p.table, &p.columns, &p.range, meta)
                );
                let a = a?;
                match b {
                    Ok(b) => {
                        if !large_object::is_large_objects(&p.table) {
                            rows += a.rows;
                        }
                        if let Some(m) = chunk_rows::mismatch(&p.table, p.id, &p.range, &a, &b) {
                            found.push(m);
                        }
                    }
                    Err(e) => found.push(format!("{} chunk {}: {e:#}", p.table, p.id)),
                }
            }
        });
    }
    let mut rows = 0u64;
    while let Some(r) = workers.join_next().await {
        let (found, n) = r.map_err(|e| anyhow::anyhow!("verify worker ended: {e}"))??;
        differences.extend(found);
        rows += n;
    }

    // Sequences: their values on both sides.
    let src = source.connect("haul-verify").await?;
    let dst = target.connect("haul-verify").await?;
    let seqs = haul_sender::catalog::sequences(&src).await?;
    for s in &seqs {
        let name = format!(
            "{}.{}",
            haul_core::ident::quote_ident(&s.schema),
            haul_core::ident::quote_ident(&s.name)
        );
        let there = dst
            .query_opt(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await;
        match there {
            Ok(Some(r)) => {
                let (v, c): (i64, bool) = (r.get(0), r.get(1));
                if v != s.last_value || c != s.is_called {
                    differences.push(format!(
                        "sequence {}.{}: source {} (called {}), target {v} (called {c})",
                        s.schema, s.name, s.last_value, s.is_called
                    ));
                }
            }
            _ => differences.push(format!(
                "sequence {}.{}: missing on the target",
                s.schema, s.name
            )),
        }
    }

    differences.sort();
    let data_tables = tables
        .iter()
        .filter(|t| !large_object::is_large_objects(&t.table))
        .count();
    if differences.is_empty() {
        println!(
            "verified   {data_tables} tables in {total} chunks ({rows} rows{}) and {} sequences: equal",
            if tables.len() > data_tables {
                " and large objects"
            } else {
                ""
            },
            seqs.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for d in &differences {
        println!("MISMATCH   {d}");
    }
    eprintln!(
        "haul: verify found {} difference(s) between source and target",
        differences.len()
    );
    Ok(ExitCode::FAILURE)
}
