//! `haul plan`, the dry run, on the rich fixture: it lists the tables with their estimates and
//! the chunks in lease order, says what the preflight would refuse, estimates the time at the
//! cap and at a stated link rate, and leaves source and target exactly as they were.

mod common;

use common::procs::haul;
use common::{load_rich, Cluster, ClusterOptions};

/// What a dry run must not change: every relation, schema and slot of a database.
fn footprint(c: &Cluster, db: &str) -> anyhow::Result<String> {
    c.psql(
        db,
        "SELECT (SELECT count(*) FROM pg_class), (SELECT count(*) FROM pg_namespace), \
         (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_namespace WHERE nspname = 'haul')",
    )
}

#[test]
fn a_dry_run_lists_the_move_and_writes_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    load_rich(&c, "src")?;
    c.create_database("dst")?;
    let (src_before, dst_before) = (footprint(&c, "src")?, footprint(&c, "dst")?);
    let (src, dst) = (c.url("src"), c.url("dst"));
    let base = [
        "plan",
        "--source",
        &src,
        "--target",
        &dst,
        "--chunk-size",
        "4MB",
        "--bwlimit",
        "20Mbit",
        "--link-rate",
        "100Mbit",
    ];

    let out = haul(&base);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    for line in [
        "plan (dry run)",
        "public.big_events",
        "Sales.Orders",
        "in lease order, largest first",
        "preflight  nothing would be refused",
        "at the cap (2.5 MB/s",
        "at --link-rate 12.5 MB/s",
        "dry run    nothing was written",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }

    let mut json_args = base.to_vec();
    json_args.push("--json");
    let out = haul(&json_args);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let chunks = v["chunks"].as_array().cloned().unwrap_or_default();
    assert!(chunks.len() > 10, "{v}");
    let order: Vec<u64> = chunks.iter().filter_map(|c| c["order"].as_u64()).collect();
    assert_eq!(order, (1..=chunks.len() as u64).collect::<Vec<_>>());
    let sum: u64 = chunks.iter().filter_map(|c| c["est_bytes"].as_u64()).sum();
    assert_eq!(sum, v["raw_bytes"].as_u64().unwrap_or(0));
    // Largest first, groups of small tables aside.
    let sizes: Vec<u64> = chunks
        .iter()
        .filter(|c| c["group"].is_null())
        .filter_map(|c| c["est_bytes"].as_u64())
        .collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
    let at_cap = v["estimate_secs_at_cap"].as_f64().unwrap_or(0.0);
    let at_link = v["estimate_secs_at_link"].as_f64().unwrap_or(0.0);
    assert!(at_cap > 0.0 && at_link > 0.0, "{v}");
    // The link estimate is under the cap too, so it cannot be faster than the cap allows.
    assert!((at_link - at_cap).abs() < 1e-6, "{at_link} vs {at_cap}");
    assert!(v["compression_ratio"].as_f64().unwrap_or(0.0) > 1.0, "{v}");

    // A target that would be refused: one of the tables already exists there.
    c.psql("dst", "CREATE TABLE public.customers (id int)")?;
    let dst_refusing = footprint(&c, "dst")?;
    let out = haul(&base);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("preflight  REFUSED:") && text.contains("customers"),
        "{text}"
    );

    assert_eq!(footprint(&c, "src")?, src_before, "the source changed");
    assert_ne!(dst_before, dst_refusing);
    assert_eq!(footprint(&c, "dst")?, dst_refusing, "the target changed");
    Ok(())
}
