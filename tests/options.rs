//! Job options end to end: `--tables` moves only matching tables (bringing partition parents
//! along), every codec produces an identical target, and `--bwlimit`/`--no-verify` are honoured.

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

    // Every codec gives an identical database; the capped run still finishes.
    for (db, extra) in [
        ("plain", vec!["--codec", "none", "--bwlimit", "1MB"]),
        ("zstd9", vec!["--codec", "zstd:9"]),
    ] {
        c.create_database(db)?;
        let (src, dst) = (c.url("src"), c.url(db));
        let mut args = vec!["copy", "--source", &src, "--target", &dst];
        args.extend(extra);
        let stdout = run(&args);
        assert!(stdout.contains("verified"), "{stdout}");
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
