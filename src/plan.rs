//! `haul plan`: a dry run. It reads the source's catalog (and, with `--target`, checks the
//! target the way a receiver's preflight would) and prints what a move with the same flags
//! would do: the tables and partitions with their estimated rows and bytes, the chunks in the
//! order they would be leased, what the preflight would refuse, and how long the data would
//! take on the wire at the cap in force and at a link rate the operator states. It writes
//! nothing anywhere: it opens read-only transactions and sends no data.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use haul_core::chunk::{ChunkPlan, TableMeasure};
use haul_core::codec::CodecChoice;
use haul_core::pg::{DbUrl, Side};

use crate::agents::required;
use crate::cli::PlanArgs;
use crate::operator::{human_bytes, job_options};

/// At most this many raw bytes are read from the source to estimate the compression ratio.
const SAMPLE_BYTES: usize = 8 << 20;

pub async fn run(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let source = DbUrl::parse(&required(a.source, "source")?, Side::Source)?;
    let target = match &a.target {
        Some(t) => Some(DbUrl::parse(t, Side::Target)?),
        None => None,
    };
    let options = job_options(&a.job)?;
    let link_rate = match &a.link_rate {
        Some(r) => haul_core::bandwidth::parse_rate(r)
            .map_err(|e| haul_core::status::fatal(format!("--link-rate: {e:#}")))?,
        None => 0,
    };
    let client = source.connect("haul-plan").await?;
    client
        .batch_execute("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .context("open a read-only transaction on the source")?;
    let filter = haul_core::ident::TableFilter::of(&options);
    // Cut as the job would be: a small job finer than --chunk-size.
    let (mut tables, chunk_bytes) = haul_sender::catalog::measure_job_tables(
        &client,
        &filter,
        options.chunk_bytes,
        haul_core::chunk::in_flight_limit(options.jobs, options.connections),
    )
    .await?;
    let large_objects = if filter.whole_database() {
        haul_sender::catalog::measure_large_objects(&client, chunk_bytes).await?
    } else {
        None
    };
    let has_large_objects = large_objects.is_some();
    tables.extend(large_objects);
    let plans = haul_core::chunk::plan(&tables, chunk_bytes);
    let groups = haul_core::chunk::group_small(&plans, |p| {
        tables
            .get(p.table)
            .is_some_and(|m| !haul_core::large_object::is_large_objects(&m.table))
    });
    let codec = match a
        .job
        .codec
        .as_deref()
        .unwrap_or("auto")
        .parse::<CodecChoice>()
    {
        Ok(c) => c.resolve(),
        Err(_) => haul_core::codec::Codec::Zstd { level: 3 },
    };
    let ratio = sample_ratio(&client, &tables, codec).await?;

    // What the source side of planning would refuse.
    let mut refused = Vec::new();
    if options.create_schema {
        if let Err(e) = haul_sender::catalog::check_lock_capacity(&client).await {
            refused.push(haul_core::status::fatal_message(&e).unwrap_or_else(|| format!("{e:#}")));
        }
    }
    let (roles, extensions) = if options.create_schema {
        (
            haul_sender::catalog::needed_roles(
                &client,
                !options.no_owner,
                !options.no_privileges,
                false,
            )
            .await?,
            haul_sender::catalog::extensions(&client).await?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let _ = client.batch_execute("ROLLBACK").await;
    let target_checked = match &target {
        Some(t) => {
            let tc = t.connect("haul-plan").await?;
            tc.batch_execute("BEGIN READ ONLY")
                .await
                .context("open a read-only transaction on the target")?;
            let names: Vec<_> = tables
                .iter()
                .filter(|t| !haul_core::large_object::is_large_objects(&t.table))
                .map(|t| t.table.clone())
                .collect();
            refused.extend(
                haul_receiver::dry_preflight(
                    &tc,
                    &names,
                    options.create_schema,
                    has_large_objects,
                    &extensions,
                    &roles,
                    options.create_roles,
                )
                .await?,
            );
            let _ = tc.batch_execute("ROLLBACK").await;
            true
        }
        None => false,
    };

    let raw: u64 = plans.iter().map(|p| p.est_bytes).sum();
    let wire = (raw as f64 / ratio.max(1e-9)) as u64;
    let cap = haul_core::schedule::Schedule::parse(if options.bwlimit.is_empty() {
        "off"
    } else {
        &options.bwlimit
    })
    .map(|s| s.at(0).bytes_per_sec)
    .unwrap_or(0);
    let at = |rate: u64| (rate > 0).then(|| Duration::from_secs_f64(wire as f64 / rate as f64));
    let estimate_cap = at(cap);
    let estimate_link = at(if cap > 0 && link_rate > 0 {
        cap.min(link_rate)
    } else {
        link_rate
    });

    if a.json {
        let chunks: Vec<serde_json::Value> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| chunk_json(i, p, &tables, groups[i]))
            .collect();
        let v = serde_json::json!({
            "dry_run": true,
            "tables": tables.iter().map(|t| serde_json::json!({
                "table": t.table.to_string(), "est_rows": t.est_rows, "bytes": t.bytes,
                "chunks": plans.iter().filter(|p| tables[p.table].table == t.table).count(),
            })).collect::<Vec<_>>(),
            "chunks": chunks,
            "raw_bytes": raw,
            "compression_ratio": ratio,
            "codec": codec.to_string(),
            "wire_bytes": wire,
            "cap_bytes_per_sec": cap,
            "link_bytes_per_sec": link_rate,
            "estimate_secs_at_cap": estimate_cap.map(|d| d.as_secs_f64()),
            "estimate_secs_at_link": estimate_link.map(|d| d.as_secs_f64()),
            "target_checked": target_checked,
            "refused": refused,
        });
        println!("{v}");
    } else {
        print_plan(&tables, &plans, &groups, (raw, wire, ratio, codec));
        if !target_checked {
            println!("preflight  target not checked (give --target to check it)");
        }
        if refused.is_empty() {
            println!("preflight  nothing would be refused");
        } else {
            for r in &refused {
                println!("preflight  REFUSED: {r}");
            }
        }
        let show = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
            })
        };
        match estimate_cap {
            Some(d) => println!(
                "estimate   {} at the cap ({}) for the data on the wire",
                show(Some(d)),
                haul_core::bandwidth::show_rate(cap)
            ),
            None => println!("estimate   no cap in force"),
        }
        match estimate_link {
            Some(d) => println!(
                "estimate   {} at --link-rate {} (and the cap)",
                show(Some(d)),
                haul_core::bandwidth::show_rate(link_rate)
            ),
            None => println!("estimate   give --link-rate RATE for an estimate at your link"),
        }
        println!("dry run    nothing was written to the source or the target");
    }
    Ok(if refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn chunk_json(
    i: usize,
    p: &ChunkPlan,
    tables: &[TableMeasure],
    group: Option<usize>,
) -> serde_json::Value {
    serde_json::json!({
        "order": i + 1,
        "table": tables[p.table].table.to_string(),
        "range": p.range.describe(),
        "est_bytes": p.est_bytes,
        "group": group.map(|g| g + 1),
    })
}

fn print_plan(
    tables: &[TableMeasure],
    plans: &[ChunkPlan],
    groups: &[Option<usize>],
    (raw, wire, ratio, codec): (u64, u64, f64, haul_core::codec::Codec),
) {
    println!("plan (dry run)");
    let rows: i64 = tables.iter().map(|t| t.est_rows.max(0)).sum();
    println!(
        "tables     {} ({} rows estimated, {})",
        tables.len(),
        rows,
        human_bytes(tables.iter().map(|t| t.bytes).sum())
    );
    let mut by_size: Vec<&TableMeasure> = tables.iter().collect();
    by_size.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    for t in &by_size {
        let n = plans
            .iter()
            .filter(|p| tables[p.table].table == t.table)
            .count();
        println!(
            "  {:<40} {:>12} rows  {:>10}  {} chunk{}",
            t.table.to_string(),
            t.est_rows.max(0),
            human_bytes(t.bytes),
            n,
            if n == 1 { "" } else { "s" }
        );
    }
    let grouped = groups.iter().filter(|g| g.is_some()).count();
    let group_count = groups
        .iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    println!(
        "chunks     {} in lease order, largest first ({grouped} small tables in {group_count} groups)",
        plans.len()
    );
    for (i, p) in plans.iter().enumerate() {
        let g = groups[i]
            .map(|g| format!("  group {}", g + 1))
            .unwrap_or_default();
        println!(
            "  {:>5}  {:<40} {:<28} {:>10}{g}",
            i + 1,
            tables[p.table].table.to_string(),
            p.range.describe(),
            human_bytes(p.est_bytes)
        );
    }
    println!(
        "bytes      {} of table data; about {} on the wire with {codec} (ratio {ratio:.1} on a sample)",
        human_bytes(raw),
        human_bytes(wire)
    );
}

/// The compression ratio of `codec` on up to `SAMPLE_BYTES` of COPY data from the largest
/// tables (1.0 when there is nothing to sample).
async fn sample_ratio(
    client: &tokio_postgres::Client,
    tables: &[TableMeasure],
    codec: haul_core::codec::Codec,
) -> anyhow::Result<f64> {
    let mut by_size: Vec<&TableMeasure> = tables
        .iter()
        .filter(|t| !haul_core::large_object::is_large_objects(&t.table) && !t.columns.is_empty())
        .collect();
    by_size.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    let (mut raw, mut packed) = (0usize, 0usize);
    for t in by_size.iter().take(3) {
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|c| haul_core::ident::quote_ident(&c.name))
            .collect();
        let sql = format!(
            "COPY (SELECT {} FROM ONLY {} LIMIT 20000) TO STDOUT (FORMAT binary)",
            cols.join(", "),
            t.table.quoted()
        );
        let stream = client
            .copy_out(sql.as_str())
            .await
            .with_context(|| format!("sample {}", t.table))?;
        futures::pin_mut!(stream);
        let mut buf = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece.with_context(|| format!("sample {}", t.table))?;
            buf.extend_from_slice(&piece);
            if buf.len() >= SAMPLE_BYTES / 3 {
                break;
            }
        }
        for block in buf.chunks(haul_core::BLOCK_BYTES) {
            raw += block.len();
            packed += codec.encode(block)?.len();
        }
    }
    Ok(if packed == 0 {
        1.0
    } else {
        raw as f64 / packed as f64
    })
}
