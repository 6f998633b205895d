//! The finalize task, run by the sender holding the job's snapshot once every chunk is applied:
//! read sequences and the source side of verification inside the snapshot, then ask the
//! receiver for post-data, sequences, materialized views and the target side, and report both
//! sides to the coordinator, which compares them. Then the snapshot is released.

use std::sync::Arc;

use anyhow::Context;
use haul_core::digest::table_digest;
use haul_core::ident::TableName;
use haul_core::status::from_status;
use haul_proto as pb;

use crate::catalog;
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

    let mut source = Vec::new();
    if options.verify {
        for t in &tables {
            let (rows, digest) = table_digest(client, &t.table).await?;
            source.push((t.table.clone(), rows, digest));
        }
    }

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
    for (table, rows, digest) in source {
        let target = reply
            .digests
            .iter()
            .find(|d| d.table.as_ref().map(TableName::from).as_ref() == Some(&table));
        checks.push(pb::TableCheck {
            table: Some(table.to_wire()),
            source_rows: rows,
            source_digest: digest,
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
