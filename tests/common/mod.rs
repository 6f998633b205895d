//! Shared helpers for haul's integration tests: throwaway clusters, the `rich.sql` fixture, the
//! independent database comparison (in `haul-pgcluster`, so benchmarks use it too) and process
//! helpers.
//!
//! The comparison deliberately uses nothing from haul except `haul-pgcluster` (which only makes
//! clusters): it asks `pg_dump` for the schema and PostgreSQL itself for row counts and digests,
//! so a bug in haul's own catalog reading or hashing cannot hide a bug in its transfer.
//!
//! Each test file includes this with `mod common;` and uses part of it, hence the blanket
//! `dead_code` allowance.
#![allow(dead_code)]

use anyhow::Context;

#[allow(unused_imports)]
pub use haul_pgcluster::{
    compare_databases, compare_databases_with, Cluster, ClusterOptions, Compare,
};

/// The fixture every end-to-end test migrates.
pub const RICH_SQL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rich.sql");

/// Creates database `db` in `cluster` and loads `tests/fixtures/rich.sql` into it.
pub fn load_rich(cluster: &Cluster, db: &str) -> anyhow::Result<()> {
    let sql = std::fs::read_to_string(RICH_SQL).with_context(|| format!("read {RICH_SQL}"))?;
    cluster.create_database(db)?;
    cluster
        .psql(db, &sql)
        .with_context(|| format!("load rich.sql into database {db}"))?;
    Ok(())
}

#[allow(unused_imports)]
pub use haul_faults::moves::two_clusters;

pub mod moves;
pub mod procs;
