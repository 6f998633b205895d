//! Job options end to end: `--tables` moves only matching tables (bringing partition parents
//! along), `--exclude-tables` leaves tables out, every codec produces an identical target, `--bwlimit` holds the wire rate down, and
//! `--no-verify` says so.

mod common;

use common::procs::haul;
use common::{compare_databases, Cluster, ClusterOptions};

const SOURCE: &str = "CREATE TABLE public.items (id int PRIMARY KEY, name text); \
    INSERT INTO public.items SELECT g, repeat('item ' || g, 20) FROM generate_series(1, 5000) g; \
    CREATE TABLE public.notes (body text); INSERT INTO public.notes VALUES ('a'), ('b'); \
    CREATE TABLE public.m (k int, v text) PARTITION BY RANGE (k); \
    CREATE TABLE public.m_1 PARTITION OF public.m FOR VALUES FROM (0) TO (100); \
    CREATE TABLE public.m_2 PARTITION OF public.m FOR VALUES FROM (100) TO (200); \
    INSERT INTO public.m SELECT g % 200, 'v' || g FROM generate_series(1, 1000) g;";

fn run(args: &[&str]) -> String {
    let out = haul(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "haul {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn tables_codecs_and_caps() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    c.create_database("src")?;
    c.psql("src", SOURCE)?;

    // Only items and the leaf partitions of m: m itself comes along, notes does not.
    c.create_database("some")?;
    run(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("some"),
        "--tables",
        "items,public.m_*",
        "--codec",
        "lz4",
    ]);
    let got = c.psql(
        "some",
        "SELECT (SELECT count(*) FROM public.items), (SELECT count(*) FROM public.m), to_regclass('public.notes') IS NULL",
    )?;
    assert_eq!(got.trim(), "5000|1000|t");

    // Everything but notes and items: the rest of the database (a view on m included) moves
    // and verifies; the excluded tables do not exist on the target.
    c.psql("src", "CREATE VIEW public.m_view AS SELECT k FROM public.m")?;
    c.create_database("except")?;
    let stdout = run(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("except"),
        "--exclude-tables",
        "notes,public.item*",
    ]);
    assert!(stdout.contains("verified"), "{stdout}");
    let got = c.psql(
        "except",
        "SELECT (SELECT count(*) FROM public.m_view), to_regclass('public.notes') IS NULL, to_regclass('public.items') IS NULL",
    )?;
    assert_eq!(got.trim(), "1000|t|t");
    c.psql("src", "DROP VIEW public.m_view")?;
    // Excluding every table is refused before anything is written.
    c.create_database("none")?;
    let out = haul(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("none"),
        "--exclude-tables",
        "*",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leaves no table to move"), "{err}");
    let left = c.psql(
        "none",
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'",
    )?;
    assert_eq!(left.trim(), "0", "objects were created on the target");

    // Every codec gives an identical database.
    for (db, extra) in [
        ("plain", vec!["--codec", "none", "--bwlimit", "256KB"]),
        ("zstd9", vec!["--codec", "zstd:9"]),
    ] {
        c.create_database(db)?;
        let (src, dst) = (c.url("src"), c.url(db));
        let mut args = vec!["copy", "--source", &src, "--target", &dst];
        args.extend(extra);
        let stdout = run(&args);
        assert!(stdout.contains("verified"), "{stdout}");
        if db == "plain" {
            // The cap is a lower bound on time: the move cannot be faster than its wire bytes at
            // 256 KB/s, less the limiter's burst of a tenth of a second (and print rounding).
            let wire = summary_bytes(&stdout, "on the wire");
            let secs = summary_secs(&stdout);
            let floor = (wire - 25_600.0) / 256_000.0 - 0.1;
            assert!(
                wire > 300_000.0,
                "too little data to test the cap: {stdout}"
            );
            assert!(
                secs >= floor,
                "{wire} bytes crossed in {secs} s, faster than the 256KB/s cap allows\n{stdout}"
            );
        }
        let diffs = compare_databases(&c.url("src"), &c.url(db))?;
        assert!(diffs.is_empty(), "{db}: {}", diffs.join("\n"));
    }

    // --no-verify says so instead of claiming a verification.
    c.create_database("nov")?;
    let stdout = run(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("nov"),
        "--no-verify",
    ]);
    assert!(stdout.contains("verified   no (--no-verify)"), "{stdout}");
    Ok(())
}

/// `--schemas` moves whole schemas (their tables, and their functions, types, views and
/// sequences with them); `--exclude-schemas` leaves schemas out with everything in them.
#[test]
fn schema_filters_move_or_leave_whole_schemas() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    c.create_database("src")?;
    c.psql(
        "src",
        "CREATE SCHEMA sales; CREATE SCHEMA sales_eu; CREATE SCHEMA hr; \
         CREATE TYPE sales.state AS ENUM ('open', 'paid'); \
         CREATE FUNCTION sales.total(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'; \
         CREATE TABLE sales.orders (id serial PRIMARY KEY, s sales.state, n int); \
         INSERT INTO sales.orders (s, n) SELECT 'paid', g FROM generate_series(1, 3000) g; \
         CREATE VIEW sales.big AS SELECT * FROM sales.orders WHERE n > 100; \
         CREATE TABLE sales_eu.orders (id int PRIMARY KEY); INSERT INTO sales_eu.orders SELECT generate_series(1, 10); \
         CREATE TABLE hr.people (id int PRIMARY KEY, name text); INSERT INTO hr.people VALUES (1, 'a'); \
         CREATE TABLE public.notes (body text); INSERT INTO public.notes VALUES ('x');",
    )?;
    c.create_database("only")?;
    let stdout = run(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("only"),
        "--schemas",
        "sales*",
    ]);
    assert!(stdout.contains("verified   2 tables"), "{stdout}");
    let got = c.psql(
        "only",
        "SELECT (SELECT count(*) FROM sales.orders), (SELECT count(*) FROM sales.big), sales.total(21), \
                (SELECT count(*) FROM sales_eu.orders), to_regnamespace('hr') IS NULL, \
                to_regclass('public.notes') IS NULL, (SELECT last_value FROM sales.orders_id_seq)",
    )?;
    assert_eq!(got.trim(), "3000|2900|42|10|t|t|3000");

    c.create_database("except")?;
    let stdout = run(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("except"),
        "--exclude-schemas",
        "sales*",
    ]);
    assert!(stdout.contains("verified   2 tables"), "{stdout}");
    let got = c.psql(
        "except",
        "SELECT to_regnamespace('sales') IS NULL, to_regnamespace('sales_eu') IS NULL, \
                (SELECT count(*) FROM hr.people), (SELECT count(*) FROM public.notes)",
    )?;
    assert_eq!(got.trim(), "t|t|1|1");

    // A pattern no schema matches is refused in one line, with nothing written.
    c.create_database("none")?;
    let out = haul(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("none"),
        "--schemas",
        "nosuch*",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no source table matches --schemas nosuch*"),
        "{err}"
    );
    let left = c.psql(
        "none",
        "SELECT count(*) FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('public', 'information_schema')",
    )?;
    assert_eq!(left.trim(), "0", "objects were created on the target");
    Ok(())
}

/// Bytes from the summary's "bytes ... X read, Y on the wire" line (`which` picks the figure).
fn summary_bytes(stdout: &str, which: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("bytes"))
        .unwrap_or("");
    let part = line.split(',').find(|p| p.contains(which)).unwrap_or("");
    let words: Vec<&str> = part.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.parse::<f64>().is_ok())
        .unwrap_or(0);
    let n: f64 = words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0.0);
    let unit = match words.get(i + 1).copied().unwrap_or("B") {
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => 1.0,
    };
    n * unit
}

/// Seconds from the summary's "time X s" line.
fn summary_secs(stdout: &str) -> f64 {
    stdout
        .lines()
        .find(|l| l.starts_with("time"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `--log-format json`: every log line is one JSON object with a level and a message, and the
/// lines about a chunk carry the job and chunk as fields a collector can filter on.
#[test]
fn logs_as_json_lines_name_job_and_chunk() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    c.create_database("src")?;
    c.psql("src", SOURCE)?;
    c.create_database("dst")?;
    let out = haul(&[
        "copy",
        "--source",
        &c.url("src"),
        "--target",
        &c.url("dst"),
        "--log",
        "info",
        "--log-format",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut chunk_lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not a JSON line ({e}): {line}"))?;
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        if v["message"] == "chunk applied" || v["message"] == "group of small tables applied" {
            assert!(v["job"].is_string() && v["chunk"].is_u64(), "{line}");
            chunk_lines += 1;
        }
    }
    assert!(chunk_lines > 0, "no chunk lines logged:\n{stderr}");
    // And a bad format is refused in one line.
    let bad = haul(&["status", "--log-format", "xml"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("xml"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}
