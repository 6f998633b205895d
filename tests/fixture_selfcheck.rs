//! Checks the test fixture and the independent comparison that every migration test relies on:
//! `rich.sql` loads, two loads are identical, and `compare_databases` notices a changed row, a
//! moved sequence and a dropped index.

mod common;

use common::{compare_databases, load_rich, Cluster, ClusterOptions};

#[test]
fn rich_fixture_is_deterministic_and_compare_sees_differences() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default())?;

    let started = std::time::Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| load_rich(&cluster, "a"));
        let b = s.spawn(|| load_rich(&cluster, "b"));
        (a.join(), b.join())
    });
    a.map_err(|_| anyhow::anyhow!("loading a panicked"))??;
    b.map_err(|_| anyhow::anyhow!("loading b panicked"))??;
    eprintln!("loaded rich.sql twice in {:?}", started.elapsed());

    // The fixture holds what the migration tests expect of it.
    let facts = cluster.psql(
        "a",
        r#"SELECT (SELECT count(*) FROM public.big_events),
                  (SELECT count(*) FROM public.audit_log),
                  (SELECT count(*) FROM "Sales"."Orders" WHERE note = 'trigger fired'),
                  (SELECT count(*) FROM public.blobs WHERE octet_length(big_bytes) > 1000000),
                  (SELECT count(*) FROM ONLY public.vehicles),
                  (SELECT count(*) FROM public.vehicles),
                  (SELECT count(*) FROM public.customer_totals) > 0"#,
    )?;
    assert_eq!(facts, "200000|50000|0|3|500|800|t");

    let (url_a, url_b) = (cluster.url("a"), cluster.url("b"));
    let started = std::time::Instant::now();
    let diffs = compare_databases(&url_a, &url_b)?;
    eprintln!("compared in {:?}", started.elapsed());
    assert!(
        diffs.is_empty(),
        "identical loads differ:\n{}",
        diffs.join("\n")
    );

    // One changed value in one row of 200k.
    cluster.psql(
        "b",
        "UPDATE public.big_events SET payload = 'changed' WHERE id = 4242",
    )?;
    let diffs = compare_databases(&url_a, &url_b)?;
    assert_eq!(diffs.len(), 1, "{diffs:#?}");
    assert!(
        diffs[0].starts_with("table public.big_events: source 200000 rows, digest "),
        "{diffs:#?}"
    );
    cluster.psql(
        "b",
        "UPDATE public.big_events
         SET payload = md5(4242::text) || md5(4243::text) || md5((4242 * 7)::text)
         WHERE id = 4242",
    )?;
    let diffs = compare_databases(&url_a, &url_b)?;
    assert!(diffs.is_empty(), "restored row still differs: {diffs:#?}");

    // A sequence moved on.
    cluster.psql("b", r#"SELECT nextval('"Sales".invoice_no')"#)?;
    let diffs = compare_databases(&url_a, &url_b)?;
    assert_eq!(
        diffs,
        vec![r#"sequence "Sales".invoice_no: source last_value=123456 is_called=true; target last_value=123461 is_called=true"#.to_string()]
    );

    // A missing index.
    cluster.psql("b", "DROP INDEX public.big_events_errors_idx")?;
    let diffs = compare_databases(&url_a, &url_b)?;
    assert!(
        diffs.iter().any(
            |d| d.starts_with("schema [Name: big_events_errors_idx; Type: INDEX;")
                && d.contains("only in source")
        ),
        "{diffs:#?}"
    );
    Ok(())
}
