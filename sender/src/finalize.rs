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
use crate::worker::Shared;

pub async fn run(shared: &Arc<Shared>, task: pb::FinalizeTask) -> anyhow::Result<()> {
    let options = task.options.clone().unwrap_or_default();
    let job_id = task.job_id.clone();
    let holder = shared
        .snapshot(&job_id)
        .await
        .with_context(|| format!("this sender no longer holds the snapshot of job {job_id}"))?;
    let client = &holder.client;

    let sequences = catalog::sequences(client).await?;
    let matviews = catalog::populated_matviews(client).await?;
    let tables = catalog::measure_tables(client, &options.tables, 0).await?;

    // The source side, in parallel on readers of the job's snapshot.
    let source = if options.verify {
        let (src, job, snap) = (
            shared.config.source.clone(),
            job_id.clone(),
            holder.snapshot_id.clone(),
        );
        let names: Vec<TableName> = tables.iter().map(|t| t.table.clone()).collect();
        digest_all(
            names,
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

    let mut receiver = shared.peers.receiver(&task.receiver_addr).await?;
    let reply = receiver
        .finalize(pb::FinalizeRequest {
            job_id: job_id.clone(),
            sequences: sequences.clone(),
            matviews: matviews.iter().map(TableName::to_wire).collect(),
            verify_tables: if options.verify {
                tables.iter().map(|t| t.table.to_wire()).collect()
            } else {
                vec![]
            },
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
    shared
        .peers
        .coordinator()
        .report_final(pb::FinalReport {
            job_id: job_id.clone(),
            verified: options.verify,
            checks,
            sequences: sequences.len() as u32,
            post_data_objects: reply.post_data_objects,
        })
        .await
        .map_err(|s| from_status(s, "coordinator refused the final report"))?;
    shared.release_snapshot(&job_id).await;
    tracing::info!(job = %job_id, "finalized");
    Ok(())
}
