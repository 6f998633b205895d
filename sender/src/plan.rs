//! The plan task: open the job's snapshot, measure the catalog, put the schema on the target,
//! and report the measurements to the coordinator, which turns them into chunks.

use std::sync::Arc;

use anyhow::Context;
use haul_core::ident::TableFilter;
use haul_core::status::from_status;
use haul_proto as pb;

use crate::catalog;
use crate::dump::{self, SchemaUpload};
use crate::snapshot::SnapshotHolder;
use crate::worker::Shared;

pub async fn run(shared: &Arc<Shared>, task: pb::PlanTask) -> anyhow::Result<()> {
    let options = task.options.clone().unwrap_or_default();
    let job_id = task.job_id.clone();
    tracing::info!(job = %job_id, "planning");

    let filter = TableFilter::of(&options);
    // A --follow job reads the snapshot its slot exported, so the copy and the change stream
    // meet at one position. The publication must exist before the slot, so the table list
    // is read first outside the snapshot, and checked again inside it.
    let (holder, follow) = if options.follow {
        let source = &shared.config.source;
        let client = source.connect(&format!("haul-plan-{job_id}")).await?;
        let mut outside: Vec<_> = catalog::measure_tables(&client, &filter, 0)
            .await?
            .into_iter()
            .map(|t| t.table)
            .collect();
        outside.sort_by_key(|t| t.to_string());
        if outside.is_empty() {
            return Err(haul_core::status::fatal(
                "no table to follow: a --follow job needs at least one table",
            ));
        }
        let identity_full = crate::follow::replica_identity_preflight(
            &client,
            &outside,
            options.replica_identity_full,
        )
        .await?;
        let (repl, created, publication) =
            crate::follow::create_slot(source, &client, &job_id, &outside).await?;
        let holder = SnapshotHolder::from_slot(source, &job_id, repl, created.snapshot).await?;
        let mut inside: Vec<_> = catalog::measure_tables(&holder.client, &filter, 0)
            .await?
            .into_iter()
            .map(|t| t.table)
            .collect();
        inside.sort_by_key(|t| t.to_string());
        if inside != outside {
            drop(holder);
            crate::follow::drop_slot_and_publication(&client, &created.slot, &publication)
                .await
                .ok();
            anyhow::bail!(
                "the source's tables changed while the job was being planned; planning again"
            );
        }
        let plan = pb::FollowPlan {
            slot: created.slot,
            publication,
            start_lsn: created.consistent_point.0,
            identity_full,
        };
        (holder, Some(plan))
    } else {
        (
            SnapshotHolder::open(&shared.config.source, &job_id).await?,
            None,
        )
    };
    let snapshot_id = holder.snapshot_id.clone();
    if options.create_schema {
        catalog::check_lock_capacity(&holder.client).await?;
    }
    let (mut tables, chunk_bytes) = catalog::measure_job_tables(
        &holder.client,
        &filter,
        options.chunk_bytes,
        haul_core::chunk::in_flight_limit(options.jobs, options.connections),
    )
    .await?;
    // Large objects belong to the database, not to a table: they move with a whole-database
    // job, as pg_dump carries them only then.
    let large_objects = if filter.whole_database() {
        catalog::measure_large_objects(&holder.client, chunk_bytes).await?
    } else {
        None
    };

    // What the target must offer before the schema can go in: roles and extensions.
    let (roles, extensions) = if options.create_schema {
        (
            catalog::needed_roles(
                &holder.client,
                !options.no_owner,
                !options.no_privileges,
                options.role_passwords,
            )
            .await?,
            catalog::extensions(&holder.client).await?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let source_version: i32 = holder
        .client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .context("read source server version")?
        .get(0);
    // Named tables go to pg_dump one by one (it then ignores schema switches, so the list is
    // already cut by them); named schemas go whole, their functions and types with them.
    let only: Vec<String> = if options.tables.is_empty() {
        vec![]
    } else {
        with_partition_ancestors(&holder.client, &tables).await?
    };
    let schemas = catalog::schemas_matching(&holder.client, &options.schemas).await?;
    let except_schemas =
        catalog::schemas_matching(&holder.client, &options.exclude_schemas).await?;
    if !options.schemas.is_empty() && schemas.is_empty() {
        return Err(haul_core::status::fatal(format!(
            "no source schema matches --schemas {}; list schemas with psql's \\dn and fix the pattern",
            options.schemas.join(",")
        )));
    }
    let except = catalog::tables_matching(&holder.client, &options.exclude_tables)
        .await?
        .iter()
        .map(|t| format!("{}.{}", dump_pattern(&t.schema), dump_pattern(&t.name)))
        .collect();
    // Keep the snapshot alive for the chunk readers and the finalize step.
    shared.hold_snapshot(&job_id, holder).await;

    let upload = SchemaUpload {
        job_id: &job_id,
        source: &shared.config.source,
        snapshot_id: &snapshot_id,
        receiver_addr: &task.receiver_addr,
        tables: tables.iter().map(|t| t.table.to_wire()).collect(),
        large_objects: large_objects.is_some(),
        create_schema: options.create_schema,
        owners: !options.no_owner,
        privileges: !options.no_privileges,
        roles,
        create_roles: options.create_roles,
        extensions,
        source_version,
        pg_dump: shared.config.pg_dump.clone(),
        only,
        except,
        schemas: schemas.iter().map(|s| dump_pattern(s)).collect(),
        except_schemas: except_schemas.iter().map(|s| dump_pattern(s)).collect(),
    };
    // Post-data is only stored by the receiver, so it is dumped while pre-data is applied.
    let pre = dump::send_section(&shared.peers, &upload, pb::SchemaSection::SectionPre);
    let post = async {
        if options.create_schema {
            dump::send_section(&shared.peers, &upload, pb::SchemaSection::SectionPost).await
        } else {
            Ok(0)
        }
    };
    let (objects, _) = tokio::try_join!(pre, post)?;
    tracing::info!(job = %job_id, objects, "pre-data on target");
    tables.extend(large_objects);

    let report = pb::PlanReport {
        job_id: job_id.clone(),
        snapshot_id,
        chunk_bytes,
        schema_bytes: 0,
        follow,
        tables: tables
            .into_iter()
            .map(|t| pb::PlannedTable {
                table: Some(t.table.to_wire()),
                columns: t.columns.iter().map(|c| c.to_wire()).collect(),
                bytes: t.bytes,
                est_rows: t.est_rows,
                split_key: t.split_key.unwrap_or_default(),
                key_cuts: t.key_cuts,
                pages: t.pages,
            })
            .collect(),
    };
    // Test point: the schema is on the target, the plan not yet with the coordinator.
    haul_core::failpoint::die("die-before-plan-report");
    shared
        .peers
        .coordinator()
        .report_plan(report)
        .await
        .map_err(|s| from_status(s, "coordinator refused the plan"))?;
    Ok(())
}

/// pg_dump `--table` patterns for the chosen tables plus their partition ancestors (a leaf
/// partition cannot be created without its parent).
async fn with_partition_ancestors(
    client: &tokio_postgres::Client,
    tables: &[haul_core::chunk::TableMeasure],
) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for t in tables {
        names.push(format!(
            "{}.{}",
            dump_pattern(&t.table.schema),
            dump_pattern(&t.table.name)
        ));
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_partition_ancestors($1::text::regclass) a \
                 JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
                &[&t.table.quoted()],
            )
            .await
            .with_context(|| format!("read partition ancestors of {}", t.table))?;
        for r in rows {
            let (s, n): (String, String) = (r.get(0), r.get(1));
            names.push(format!("{}.{}", dump_pattern(&s), dump_pattern(&n)));
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Quote a name for pg_dump's pattern syntax: inside double quotes only `"` is special.
fn dump_pattern(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The job's snapshot died with the sender that held it: export a new one here, hold it, and
/// report it. Chunks done so far keep the snapshot they were read under (the ledger records
/// it); the job's status says it is no longer consistent as of one snapshot.
pub async fn resnapshot(shared: &Arc<Shared>, task: pb::SnapshotTask) -> anyhow::Result<()> {
    let holder = SnapshotHolder::open(&shared.config.source, &task.job_id).await?;
    let snapshot_id = holder.snapshot_id.clone();
    shared.hold_snapshot(&task.job_id, holder).await;
    tracing::warn!(job = %task.job_id, snapshot = %snapshot_id, "exported a new snapshot for the remaining chunks");
    shared
        .peers
        .coordinator()
        .report_snapshot(pb::SnapshotReport {
            job_id: task.job_id,
            snapshot_id,
        })
        .await
        .map_err(|s| from_status(s, "coordinator refused the new snapshot"))?;
    Ok(())
}
