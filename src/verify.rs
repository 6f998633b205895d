//! `haul verify`: compare two databases chunk by chunk, with nothing of a job needed. The
//! source's catalog is measured and planned into chunks as a move would be; each chunk's rows
//! are read from both databases with the same binary COPY and folded into row digests
//! (`core::chunk_rows`), so a difference is named down to its table, chunk and key range.
//! Large objects are compared as chunks of oids (contents, owners, privileges, comments), and
//! sequences by their values.
//!
//! Both URLs are used in this one process, like `copy`. The databases should be quiet (after
//! the move, before writes resume): each chunk is read in its own transaction on each side.
//!
//! With `--coordinator`, a finished job is compared instead through its agents: the job's own
//! chunks are the pieces, a sender reads the source and the receiver the target
//! (`haul_sender::compare`), and this process only follows the run, as an operator.

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

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haul_proto as pb;
use haul_sender::compare::{compare, LocalTarget, Piece, Progress, TargetReader};

use crate::agents::{parse_dial, required};
use crate::cli::VerifyArgs;
use crate::operator::{client, jobs_flag, table_patterns, DEFAULT_CHUNK};

pub async fn run(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    if a.coordinator.is_some() {
        return through_agents(a).await;
    }
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
    let filter = haul_core::ident::TableFilter {
        tables: patterns.clone(),
        ..Default::default()
    };
    let mut tables = haul_sender::catalog::measure_tables(&src, &filter, chunk_bytes).await?;
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

    let total = pieces.len() as u64;
    let progress = Arc::new(Progress::default());
    let shapes = Arc::new(ShapeCache::default());
    let open = {
        let target = target.clone();
        move || {
            let (target, shapes) = (target.clone(), shapes.clone());
            async move {
                Ok(Box::new(LocalTarget::open(&target, shapes).await?) as Box<dyn TargetReader>)
            }
        }
    };
    differences.extend(compare(&source, pieces, jobs, meta, open, progress.clone()).await?);

    // Sequences: their values on both sides.
    let src = source.connect("haul-verify").await?;
    let dst = target.connect("haul-verify").await?;
    let seqs = haul_sender::catalog::sequences(&src, &filter).await?;
    let names: Vec<TableName> = seqs
        .iter()
        .map(|v| TableName::new(v.schema.clone(), v.name.clone()))
        .collect();
    let there = haul_core::sequence::values(&dst, &names).await?;
    differences.extend(haul_core::sequence::differences(&seqs, &there));

    let data_tables = tables
        .iter()
        .filter(|t| !large_object::is_large_objects(&t.table))
        .count() as u32;
    Ok(outcome(
        differences,
        Summary {
            tables: data_tables,
            large_objects: tables.len() as u32 > data_tables,
            pieces: total,
            rows: progress.rows.load(Ordering::Relaxed),
            sequences: seqs.len() as u32,
        },
    ))
}

/// What was compared, for the line that says it was equal.
struct Summary {
    tables: u32,
    large_objects: bool,
    pieces: u64,
    rows: u64,
    sequences: u32,
}

/// Print the result: one "verified" line naming what was compared, or one line per difference
/// and a non-zero exit.
fn outcome(mut differences: Vec<String>, s: Summary) -> ExitCode {
    differences.sort();
    if differences.is_empty() {
        println!(
            "verified   {} tables in {} chunks ({} rows{}) and {} sequences: equal",
            s.tables,
            s.pieces,
            s.rows,
            if s.large_objects {
                " and large objects"
            } else {
                ""
            },
            s.sequences
        );
        return ExitCode::SUCCESS;
    }
    for d in &differences {
        println!("MISMATCH   {d}");
    }
    crate::operator::say_error(&format!(
        "verify found {} difference(s) between source and target",
        differences.len()
    ));
    ExitCode::FAILURE
}

/// A finished job compared again by its agents, followed from here until the run ends.
async fn through_agents(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let certs = required(a.certs, "certs")?;
    let jobs = match a.jobs {
        Some(_) => jobs_flag(a.jobs)?,
        None => 0,
    };
    let mut c = client(&coordinator, &certs).await?;
    let started = c
        .start_verify(pb::StartVerifyRequest {
            job_id: a.job.unwrap_or_default(),
            tables: table_patterns(a.tables.as_deref()),
            jobs,
        })
        .await
        .map_err(|s| fatal(s.message().to_string()))?
        .into_inner();
    crate::operator::say(&format!(
        "verifying job {} through its agents: {} chunks of {} tables{}",
        started.job_id,
        started.pieces,
        started.tables,
        if started.large_objects {
            " and large objects"
        } else {
            ""
        }
    ));
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = c
            .verify_status(pb::VerifyStatusRequest {
                verify_id: started.verify_id.clone(),
            })
            .await
            .map_err(|s| fatal(s.message().to_string()))?
            .into_inner();
        if terminal && matches!(s.state.as_str(), "done" | "failed") {
            eprintln!();
        }
        match s.state.as_str() {
            "done" => {
                return Ok(outcome(
                    s.mismatches,
                    Summary {
                        tables: s.tables,
                        large_objects: s.large_objects,
                        pieces: s.pieces,
                        rows: s.rows,
                        sequences: s.sequences,
                    },
                ))
            }
            "failed" => {
                return Err(fatal(format!(
                    "verify of job {} could not finish: {}",
                    s.job_id, s.error
                )))
            }
            _ => {}
        }
        if terminal || last_line.elapsed() >= Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            let state = if s.state == "waiting" {
                "waiting for a sender".to_string()
            } else {
                format!("{} by {}", s.state, s.agent)
            };
            let error = if s.error.is_empty() {
                String::new()
            } else {
                format!("  (retrying after: {})", s.error)
            };
            let line = format!(
                "verify {}: {state}, {}/{} chunks, {} rows{error}",
                s.job_id, s.pieces_done, s.pieces, s.rows
            );
            if terminal {
                eprint!("\r\x1b[2K{line}");
            } else {
                crate::operator::say(&line);
            }
        }
    }
}
