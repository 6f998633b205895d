//! The finalize task, run by the sender holding the job's snapshot once every chunk is applied:
//! read sequences and the source side of verification inside the snapshot, then ask the
//! receiver for post-data, sequences, materialized views and the target side, and report both
//! sides to the coordinator, which compares them. Then the snapshot is released.

use std::sync::Arc;

use anyhow::Context;
use haul_core::digest::digest_all;
use haul_core::ident::TableName;
use haul_core::status::from_status;
use haul_proto as pb;

use crate::catalog;
use crate::snapshot::SnapshotReader;
use crate::worker::{try_deliver, Shared};

pub async fn run(shared: &Arc<Shared>, task: pb::FinalizeTask) -> anyhow::Result<()> {
    let job_id = task.job_id.clone();
    let slot = shared
        .finalized
        .lock()
        .await
        .entry(job_id.clone())
        .or_default()
        .clone();
    let mut reported = slot.lock().await;
    if *reported {
        tracing::info!(job = %job_id, "finalize task again, after this sender reported it; nothing to do");
        return Ok(());
    }
    run_once(shared, task).await?;
    *reported = true;
    Ok(())
}

async fn run_once(shared: &Arc<Shared>, task: pb::FinalizeTask) -> anyhow::Result<()> {
    let options = task.options.clone().unwrap_or_default();
    let job_id = task.job_id.clone();
    let holder = shared
        .snapshot(&job_id)
        .await
        .with_context(|| format!("this sender no longer holds the snapshot of job {job_id}"))?;
    let client = &holder.client;

    let filter = haul_core::ident::TableFilter::of(&options);
    let sequences = catalog::sequences(client, &filter).await?;
    let matviews = catalog::populated_matviews(client, &filter).await?;
    let mut tables = catalog::measure_tables(client, &filter, 0).await?;
    // Large objects are verified as one more "table": their count and contents.
    if filter.whole_database() {
        tables.extend(catalog::measure_large_objects(client, 0).await?);
    }

    // Tables whose every chunk was compared along the way need only their counts checked;
    // the rest (chunks cut by pages, chunks found applied after a restart) are compared whole.
    let whole: std::collections::HashSet<TableName> =
        task.full_verify.iter().map(TableName::from).collect();
    let expected: std::collections::HashSet<TableName> = task
        .expect
        .iter()
        .filter_map(|e| e.table.as_ref().map(TableName::from))
        .collect();
    let (full, counted): (Vec<_>, Vec<_>) = tables
        .iter()
        .map(|t| t.table.clone())
        .filter(|t| !expected.contains(t))
        .partition(|t| whole.contains(t));

    // The source side, in parallel on readers of the job's snapshot.
    let source = if options.verify && !full.is_empty() {
        let (src, job, snap) = (
            shared.config.source.clone(),
            job_id.clone(),
            holder.snapshot_id.clone(),
        );
        digest_all(
            full.clone(),
            options.jobs.max(1) as usize,
            "ROLLBACK TO SAVEPOINT haul_chunk",
            move || {
                let (src, job, snap) = (src.clone(), job.clone(), snap.clone());
                async move { Ok(SnapshotReader::open(&src, &job, &snap).await?.client) }
            },
        )
        .await?
    } else {
        Vec::new()
    };

    // Test point: the source side is read, the receiver not yet asked.
    haul_core::failpoint::die("die-before-receiver-finalize");
    let mut receiver = shared.peers.receiver(&task.receiver_addr).await?;
    let reply = receiver
        .finalize(pb::FinalizeRequest {
            job_id: job_id.clone(),
            sequences: sequences.clone(),
            matviews: matviews.iter().map(TableName::to_wire).collect(),
            verify_tables: if options.verify {
                full.iter().map(TableName::to_wire).collect()
            } else {
                vec![]
            },
            count_tables: if options.verify {
                counted.iter().map(TableName::to_wire).collect()
            } else {
                vec![]
            },
            expect: if options.verify {
                task.expect.clone()
            } else {
                vec![]
            },
            large_object_owner: !options.no_owner,
            large_object_privileges: !options.no_privileges,
            parallel: options.jobs.max(1),
        })
        .await
        .map_err(|s| from_status(s, "receiver could not finalize"))?
        .into_inner();

    let mut checks = Vec::new();
    let targets: std::collections::HashMap<TableName, &pb::TableDigest> = reply
        .digests
        .iter()
        .filter_map(|d| d.table.as_ref().map(|t| (TableName::from(t), d)))
        .collect();
    for d in source {
        let target = targets.get(&d.table);
        checks.push(pb::TableCheck {
            table: Some(d.table.to_wire()),
            source_rows: d.rows,
            source_digest: d.digest,
            target_rows: target.map_or(-1, |d| d.rows),
            target_digest: target.map(|d| d.digest.clone()).unwrap_or_default(),
        });
    }
    // Digested whole on the target, against the sum of the chunks' digests from the sender.
    let digested: std::collections::HashMap<TableName, &pb::TableDigest> = reply
        .row_digests
        .iter()
        .filter_map(|d| d.table.as_ref().map(|t| (TableName::from(t), d)))
        .collect();
    if options.verify {
        for e in &task.expect {
            let Some(t) = e.table.as_ref().map(TableName::from) else {
                continue;
            };
            let target = digested.get(&t);
            checks.push(pb::TableCheck {
                table: Some(t.to_wire()),
                source_rows: e.rows as i64,
                source_digest: hex(&e.row_digest),
                target_rows: target.map_or(-1, |d| d.rows),
                target_digest: target.map(|d| d.digest.clone()).unwrap_or_default(),
            });
        }
    }
    // Counted only: the coordinator knows the source's rows (what the chunks carried).
    if options.verify {
        for t in &counted {
            let target = targets.get(t);
            checks.push(pb::TableCheck {
                table: Some(t.to_wire()),
                source_rows: -1,
                source_digest: String::new(),
                target_rows: target.map_or(-1, |d| d.rows),
                target_digest: String::new(),
            });
        }
    }
    let report = pb::FinalReport {
        job_id: job_id.clone(),
        verified: options.verify,
        checks,
        sequences: sequences.len() as u32,
        post_data_objects: reply.post_data_objects,
        chunk_mismatches: reply.chunk_mismatches.clone(),
    };
    // Test point: the target is finalized, the coordinator not yet told.
    haul_core::failpoint::die("die-before-final-report");
    try_deliver(|| {
        let mut c = shared.peers.coordinator();
        let report = report.clone();
        async move { c.report_final(report).await.map(|_| ()) }
    })
    .await
    .map_err(|s| from_status(s, "coordinator refused the final report"))?;
    shared.release_snapshot(&job_id).await;
    tracing::info!(job = %job_id, "finalized");
    Ok(())
}

/// The cleanup task: ask the receiver to remove the job's ledger (unless kept) and spool, then
/// tell the coordinator the job is done. Both calls are idempotent. For a cancelled job the
/// receiver first undoes what the job wrote (or only surveys it, with `keep_target`), and the
/// report says what it undid and what is left.
pub async fn cleanup(shared: &Arc<Shared>, task: pb::CleanupTask) -> anyhow::Result<()> {
    // A --follow job's slot holds WAL on the source for as long as it exists: it goes first.
    let mut left_on_source = Vec::new();
    if !task.follow_slot.is_empty() {
        let client = shared
            .config
            .source
            .connect(&format!("haul-cleanup-{}", task.job_id))
            .await?;
        crate::follow::drop_slot_and_publication(
            &client,
            &task.follow_slot,
            &task.follow_publication,
        )
        .await?;
        left_on_source.push(format!(
            "dropped replication slot {} and publication {} on the source",
            task.follow_slot, task.follow_publication
        ));
    }
    if task.source_only {
        let report = pb::CleanupReport {
            job_id: task.job_id.clone(),
            source_only: true,
            undone: left_on_source,
            ..Default::default()
        };
        try_deliver(|| {
            let mut c = shared.peers.coordinator();
            let report = report.clone();
            async move { c.report_cleanup(report).await.map(|_| ()) }
        })
        .await
        .map_err(|s| from_status(s, "coordinator refused the cleanup report"))?;
        return Ok(());
    }
    let mut receiver = shared.peers.receiver(&task.receiver_addr).await?;
    let reply = receiver
        .cleanup(pb::CleanupRequest {
            job_id: task.job_id.clone(),
            keep_ledger: task.keep_ledger,
            undo: task.undo,
            keep_target: task.keep_target,
        })
        .await
        .map_err(|s| from_status(s, "receiver could not clean up"))?
        .into_inner();
    // Test point: the target is clean, the coordinator not yet told.
    haul_core::failpoint::die("die-before-cleanup-report");
    if task.undo {
        // What this sender staged of a cancelled job will never be sent.
        shared.staging.remove_job(&task.job_id).await;
    }
    let report = pb::CleanupReport {
        job_id: task.job_id.clone(),
        source_only: false,
        undo: task.undo,
        undone: left_on_source
            .into_iter()
            .chain(reply.undone.iter().cloned())
            .collect(),
        left: reply.left.clone(),
    };
    try_deliver(|| {
        let mut c = shared.peers.coordinator();
        let report = report.clone();
        async move { c.report_cleanup(report).await.map(|_| ()) }
    })
    .await
    .map_err(|s| from_status(s, "coordinator refused the cleanup report"))?;
    tracing::info!(job = %task.job_id, schema_dropped = reply.schema_dropped, "cleaned up");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
