//! Reading the source catalog inside the job's snapshot: which tables hold rows, their columns,
//! sizes and split keys; sequences; materialized views; and whether the server's lock table is
//! big enough for a schema dump.

use std::collections::HashMap;

use anyhow::Context;
use haul_core::chunk::{pieces, quantiles, Column, TableMeasure};
use haul_core::ident::{matches_pattern, schema_matches, TableFilter, TableName};
use haul_core::status::fatal;
use tokio_postgres::Client;

/// Schemas that are never moved.
const SKIP_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Tables belonging to an extension are recreated by the extension, not copied.
const NOT_EXTENSION: &str =
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
     AND d.objid = c.oid AND d.deptype = 'e')";

/// Every table that holds rows of its own (plain, unlogged, leaf partitions, inheritance parents
/// and children), measured. Partitioned parents hold no rows and are not listed.
/// The schemas (of those haul moves) that `patterns` name, for pg_dump's `--schema` and
/// `--exclude-schema`, each exactly.
pub async fn schemas_matching(client: &Client, patterns: &[String]) -> anyhow::Result<Vec<String>> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!("SELECT n.nspname::text FROM pg_namespace n WHERE {SKIP_SCHEMAS} ORDER BY 1"),
            &[],
        )
        .await
        .context("list source schemas")?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|s| patterns.iter().any(|p| schema_matches(p, s)))
        .collect())
}

/// The tables and partitioned tables (of the schemas haul moves) that `patterns` name, for
/// pg_dump's `--exclude-table`, each exactly.
pub async fn tables_matching(
    client: &Client,
    patterns: &[String],
) -> anyhow::Result<Vec<TableName>> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND {SKIP_SCHEMAS} AND {NOT_EXTENSION} \
                 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .context("list source tables")?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|t| patterns.iter().any(|p| matches_pattern(p, t)))
        .collect())
}

pub async fn measure_tables(
    client: &Client,
    filter: &TableFilter,
    chunk_bytes: u64,
) -> anyhow::Result<Vec<TableMeasure>> {
    let rows = client
        .query(
            &format!(
                "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relpages::int8, c.reltuples::float8, \
                        pg_relation_size(c.oid)::int8 + coalesce(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0)::int8 \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {SKIP_SCHEMAS} AND {NOT_EXTENSION} \
                 ORDER BY n.nspname, c.relname"
            ),
            &[],
        )
        .await
        .context("list source tables")?;
    let mut tables = Vec::new();
    let mut by_oid = HashMap::new();
    for r in rows {
        let table = TableName::new(r.get::<_, String>(1), r.get::<_, String>(2));
        if !filter.admits(&table) {
            continue;
        }
        let bytes: i64 = r.get(5);
        let block = 8192i64;
        by_oid.insert(r.get::<_, i64>(0), tables.len());
        tables.push(TableMeasure {
            table,
            columns: Vec::new(),
            bytes: bytes.max(0) as u64,
            est_rows: r.get::<_, f64>(4).max(0.0) as i64,
            split_key: None,
            key_cuts: Vec::new(),
            pages: (bytes / block).max(r.get::<_, i64>(3)),
        });
    }
    if tables.is_empty() && filter != &TableFilter::default() {
        return Err(fatal(if filter.whole_database() {
            format!(
                "{} leaves no table to move; narrow the patterns",
                filter.flags()
            )
        } else {
            format!(
                "no source table matches {}; list tables with psql's \\dt *.* and fix the pattern",
                filter.flags()
            )
        }));
    }

    // Columns: generated columns are computed by the target, so they are not copied.
    let cols = client
        .query(
            &format!(
                "SELECT c.oid::int8, a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8 \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {SKIP_SCHEMAS} \
                   AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY c.oid, a.attnum"
            ),
            &[],
        )
        .await
        .context("list source columns")?;
    for r in cols {
        if let Some(&i) = by_oid.get(&r.get::<_, i64>(0)) {
            tables[i].columns.push(Column {
                name: r.get(1),
                type_name: r.get(2),
                type_oid: r.get::<_, i64>(3) as u32,
            });
        }
    }

    // Single-column integer primary keys: the split key for big tables.
    let keys = client
        .query(
            "SELECT i.indrelid::int8, a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indisprimary AND i.indnatts = 1 \
               AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)",
            &[],
        )
        .await
        .context("list source primary keys")?;
    for r in keys {
        if let Some(&i) = by_oid.get(&r.get::<_, i64>(0)) {
            tables[i].split_key = Some(r.get(1));
        }
    }

    cut_tables(client, &mut tables, chunk_bytes).await?;
    Ok(tables)
}

/// The tables a job moves, measured and cut at the job's chunk size
/// (`core::chunk::job_chunk_bytes`: `--chunk-size`, or finer for a small job), with that size.
pub async fn measure_job_tables(
    client: &Client,
    filter: &TableFilter,
    chunk_bytes: u64,
    in_flight: usize,
) -> anyhow::Result<(Vec<TableMeasure>, u64)> {
    let mut tables = measure_tables(client, filter, 0).await?;
    let total = tables.iter().map(|t| t.bytes).sum();
    let chunk_bytes = haul_core::chunk::job_chunk_bytes(total, chunk_bytes, in_flight);
    cut_tables(client, &mut tables, chunk_bytes).await?;
    Ok((tables, chunk_bytes))
}

/// Key cuts for the tables bigger than `chunk_bytes` that have an integer key.
async fn cut_tables(
    client: &Client,
    tables: &mut [TableMeasure],
    chunk_bytes: u64,
) -> anyhow::Result<()> {
    for t in tables.iter_mut() {
        let n = pieces(t.bytes, chunk_bytes);
        if n > 1 {
            if let Some(key) = t.split_key.clone() {
                t.key_cuts = key_cuts(client, t, &key, n).await?;
            }
        }
    }
    Ok(())
}

/// The source's large objects as one pseudo table (`core::large_object`), if it has any:
/// their size from `pg_largeobject`'s, split on the objects' oids into ranges of about equal
/// count when they are bigger than a chunk.
pub async fn measure_large_objects(
    client: &Client,
    chunk_bytes: u64,
) -> anyhow::Result<Option<TableMeasure>> {
    use haul_core::large_object as lo;
    let row = client
        .query_one(
            "SELECT count(*)::int8, pg_total_relation_size('pg_catalog.pg_largeobject')::int8 \
             FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await
        .context("count source large objects")?;
    let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
    if count == 0 {
        return Ok(None);
    }
    let mut t = TableMeasure {
        table: lo::table(),
        columns: lo::COLUMNS
            .iter()
            .map(|(n, ty)| Column {
                name: n.to_string(),
                type_name: ty.to_string(),
                // Built-in scalars: their shape needs no catalog.
                type_oid: 0,
            })
            .collect(),
        bytes: bytes.max(0) as u64,
        est_rows: count,
        split_key: Some(lo::KEY.to_string()),
        key_cuts: Vec::new(),
        pages: 0,
    };
    let n = pieces(t.bytes, chunk_bytes);
    if n > 1 {
        let row = client
            .query_one(
                "SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY oid::int8) \
                 FROM pg_catalog.pg_largeobject_metadata",
                &[&quantiles(n)],
            )
            .await
            .context("split source large objects")?;
        let cuts: Option<Vec<Option<i64>>> = row.get(0);
        t.key_cuts = cuts.unwrap_or_default().into_iter().flatten().collect();
        t.key_cuts.sort_unstable();
        t.key_cuts.dedup();
    }
    Ok(Some(t))
}

/// Cut points that split `t` into `n` ranges of about equal row count, from a sample of the
/// key's real distribution (so skewed and sparse keys still split evenly).
async fn key_cuts(
    client: &Client,
    t: &TableMeasure,
    key: &str,
    n: u64,
) -> anyhow::Result<Vec<i64>> {
    let col = haul_core::ident::quote_ident(key);
    // Aim for ~100k sampled rows; SYSTEM sampling reads whole pages, so it is cheap.
    let pct = if t.est_rows > 0 {
        (100_000.0 / t.est_rows as f64 * 100.0).clamp(0.5, 100.0)
    } else {
        100.0
    };
    let q = quantiles(n);
    let sql = format!(
        "SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY {col}::int8) \
         FROM ONLY {} TABLESAMPLE SYSTEM ({pct}) REPEATABLE (7)",
        t.table.quoted()
    );
    let row = client
        .query_one(&sql, &[&q])
        .await
        .with_context(|| format!("sample key {key} of {}", t.table))?;
    let cuts: Option<Vec<Option<i64>>> = row.get(0);
    let mut cuts: Vec<i64> = cuts.unwrap_or_default().into_iter().flatten().collect();
    if cuts.is_empty() {
        // The sample came back empty (tiny sample of a sparse table): cut min..max evenly.
        let row = client
            .query_one(
                &format!(
                    "SELECT min({col})::int8, max({col})::int8 FROM ONLY {}",
                    t.table.quoted()
                ),
                &[],
            )
            .await
            .with_context(|| format!("read key bounds of {}", t.table))?;
        if let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
            let span = (hi as i128 - lo as i128).max(1);
            cuts = q
                .iter()
                .map(|f| (lo as i128 + (span as f64 * f) as i128) as i64)
                .collect();
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    Ok(cuts)
}

/// How many tables a schema dump will lock, and whether the lock table can take it. pg_dump
/// locks every table (plain and partitioned; not sequences or views) in one transaction; a lock table that is too small fails it halfway with
/// "out of shared memory", so we say so before starting.
pub async fn check_lock_capacity(client: &Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE c.relkind IN ('r', 'p') AND {SKIP_SCHEMAS})::int8, \
                        current_setting('max_locks_per_transaction')::int8, \
                        current_setting('max_connections')::int8, \
                        current_setting('max_prepared_transactions')::int8"
            ),
            &[],
        )
        .await
        .context("read lock settings of source")?;
    let (relations, per_tx, conns, prepared): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let capacity = per_tx * (conns + prepared);
    // Headroom for the server's other sessions and for our own.
    let needed = relations + 256;
    if needed > capacity {
        let want = (needed + conns + prepared - 1) / (conns + prepared).max(1);
        return Err(fatal(format!(
            "the source has {relations} tables but its lock table holds about {capacity} locks \
             (max_locks_per_transaction={per_tx} x (max_connections={conns} + max_prepared_transactions={prepared})); \
             the schema dump locks every table at once, so set max_locks_per_transaction to at least {want} \
             on the source and restart it"
        )));
    }
    Ok(())
}

/// Every sequence's current value, read from the sequence itself: `pg_sequences` shows NULL
/// for a sequence whose `is_called` is false, which would lose a `setval(.., false)`.
pub async fn sequences(
    client: &Client,
    filter: &TableFilter,
) -> anyhow::Result<Vec<haul_proto::SequenceValue>> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, tn.nspname::text, t.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
                      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
                 LEFT JOIN pg_class t ON t.oid = d.refobjid \
                 LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace \
                 WHERE c.relkind = 'S' AND {SKIP_SCHEMAS} AND {NOT_EXTENSION} ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .context("list source sequences")?;
    // The sequences that move: a table's own with its table, the others as pg_dump's switches
    // take them (its --table matches sequences by name too).
    let names: Vec<TableName> = rows
        .iter()
        .filter(|r| {
            let seq = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)) {
                (Some(s), Some(t)) => filter.admits(&TableName::new(s, t)),
                _ => filter.admits(&seq),
            }
        })
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    haul_core::sequence::values(client, &names)
        .await
        .context("read source sequence values")
}

/// Materialized views that are populated on the source, to be refreshed on the target.
pub async fn populated_matviews(
    client: &Client,
    filter: &TableFilter,
) -> anyhow::Result<Vec<TableName>> {
    let rows = client
        .query(
            "SELECT schemaname::text, matviewname::text FROM pg_matviews \
             WHERE ispopulated AND schemaname NOT IN ('haul') ORDER BY 1, 2",
            &[],
        )
        .await
        .context("list source materialized views")?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|v| filter.admits(v))
        .collect())
}

/// The roles the moved objects need on the target: owners (when owners are carried),
/// grantees (when privileges are), and roles named by row-security policies (always: a policy
/// cannot be created without them). Each comes with the `CREATE ROLE` that makes it as the
/// source has it, with its password hash only when `passwords` (which needs a superuser).
pub async fn needed_roles(
    client: &Client,
    owners: bool,
    privileges: bool,
    passwords: bool,
) -> anyhow::Result<Vec<haul_proto::RoleDef>> {
    // pg_shdepend records every dependency of this database's objects on a role, except on
    // the bootstrap superuser (oid 10), whose ownership is implicit: that one is added when it
    // owns something pg_dump will name.
    let rows = client
        .query(
            &format!(
                "WITH needed AS ( \
                   SELECT d.refobjid AS oid FROM pg_shdepend d \
                   WHERE d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND d.refclassid = 'pg_authid'::regclass \
                     AND (d.deptype = 'r' OR (d.deptype = 'o' AND $1) OR (d.deptype = 'a' AND $2)) \
                   UNION \
                   SELECT 10::oid WHERE $1 AND ( \
                     EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                             WHERE c.relowner = 10 AND {SKIP_SCHEMAS}) \
                     OR EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspowner = 10 AND {SKIP_SCHEMAS} AND n.nspname <> 'public') \
                     OR EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                                WHERE p.proowner = 10 AND {SKIP_SCHEMAS}) \
                     OR EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                                WHERE t.typowner = 10 AND {SKIP_SCHEMAS}))) \
                 SELECT r.rolname::text, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, \
                        r.rolcanlogin, r.rolreplication, r.rolbypassrls, r.rolconnlimit, \
                        to_char(r.rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00') \
                 FROM pg_roles r JOIN needed USING (oid) \
                 WHERE r.rolname !~ '^pg_' ORDER BY 1"
            ),
            &[&owners, &privileges],
        )
        .await
        .context("list the roles the source's objects need")?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.get(0);
        let flag = |i: usize, yes: &str, no: &str| -> String {
            if r.get::<_, bool>(i) { yes } else { no }.to_string()
        };
        let mut sql = format!(
            "CREATE ROLE {} WITH {} {} {} {} {} {} {} CONNECTION LIMIT {}",
            haul_core::ident::quote_ident(&name),
            flag(1, "SUPERUSER", "NOSUPERUSER"),
            flag(2, "INHERIT", "NOINHERIT"),
            flag(3, "CREATEROLE", "NOCREATEROLE"),
            flag(4, "CREATEDB", "NOCREATEDB"),
            flag(5, "LOGIN", "NOLOGIN"),
            flag(6, "REPLICATION", "NOREPLICATION"),
            flag(7, "BYPASSRLS", "NOBYPASSRLS"),
            r.get::<_, i32>(8)
        );
        if let Some(until) = r.get::<_, Option<String>>(9) {
            sql.push_str(&format!(
                " VALID UNTIL {}",
                haul_core::ident::quote_literal(&until)
            ));
        }
        if passwords {
            let hash = client
                .query_opt(
                    "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1",
                    &[&name],
                )
                .await
                .map_err(|e| {
                    fatal(format!(
                        "--role-passwords needs the source user to read pg_authid (a superuser): {}",
                        haul_core::pg::db_error_line(&e)
                    ))
                })?
                .and_then(|row| row.get::<_, Option<String>>(0));
            if let Some(hash) = hash {
                sql.push_str(&format!(
                    " PASSWORD {}",
                    haul_core::ident::quote_literal(&hash)
                ));
            }
        }
        out.push(haul_proto::RoleDef {
            name,
            create_sql: sql,
        });
    }
    Ok(out)
}

/// The extensions the source database uses (plpgsql, which every server has, aside).
pub async fn extensions(client: &Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await
        .context("list source extensions")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
