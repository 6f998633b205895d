//! The replication session against a real cluster (wal_level = logical): a slot's exported
//! snapshot sees exactly what came before it, the stream after it carries every change made
//! since as pgoutput (an UPDATE that leaves a TOASTed value alone sends it as unchanged), and a
//! confirmed position reaches the slot.

use haul_core::pg::{DbUrl, Side};
use haul_core::pgoutput::{decode, Lsn, Message, Value};
use haul_pgcluster::{Cluster, ClusterOptions};
use haul_sender::replication::{Event, Replication};

fn logical_cluster() -> anyhow::Result<Cluster> {
    Cluster::start(ClusterOptions {
        extra_conf: vec![("wal_level".into(), "logical".into())],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_snapshot_and_its_stream_meet_with_no_gap_and_no_overlap() -> anyhow::Result<()> {
    let c = logical_cluster()?;
    c.create_database("src")?;
    c.psql(
        "src",
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text); \
         INSERT INTO docs SELECT g, g, 'short ' || g FROM generate_series(1, 3) g; \
         CREATE PUBLICATION haul_p FOR TABLE docs;",
    )?;
    let url = DbUrl::parse(&c.url("src"), Side::Source)?;
    let mut repl = Replication::connect(&url, "haul-test").await?;
    let ident = repl.command("IDENTIFY_SYSTEM").await?;
    assert_eq!(ident.len(), 1, "{ident:?}");
    let slot = repl.create_slot("haul_test", false).await?;
    assert!(slot.consistent_point > Lsn(0));

    // After the slot: two inserts, one of a TOASTed body, an update that leaves it alone, a
    // delete.
    c.psql(
        "src",
        "INSERT INTO docs VALUES (4, 4, 'four'); \
         INSERT INTO docs SELECT 5, 5, string_agg(md5(g::text), '') FROM generate_series(1, 400) g; \
         UPDATE docs SET n = 50 WHERE id = 5; \
         DELETE FROM docs WHERE id = 1;",
    )?;

    // The snapshot sees the three rows from before, not what came after.
    let client = url.connect("haul-test").await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{}'",
            slot.snapshot
        ))
        .await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM docs", &[])
        .await?
        .get(0);
    assert_eq!(n, 3);
    client.batch_execute("COMMIT").await?;

    // A target with what the snapshot saw, to apply the stream to.
    c.create_database("dst")?;
    c.psql(
        "dst",
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text); \
         INSERT INTO docs SELECT g, g, 'short ' || g FROM generate_series(1, 3) g;",
    )?;
    let dst = DbUrl::parse(&c.url("dst"), Side::Target)?
        .connect("haul-test")
        .await?;
    let mut relations = haul_core::change_sql::Relations::default();
    let mut pending = Vec::new();

    repl.start(&slot.slot, slot.consistent_point, &["haul_p".to_string()])
        .await?;
    let (mut inserts, mut updates, mut deletes, mut commits) = (Vec::new(), Vec::new(), 0, 0);
    let mut last_commit = Lsn(0);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while commits < 4 {
        let event = tokio::time::timeout_at(deadline, repl.next()).await??;
        let Event::Data { message, .. } = event else {
            continue;
        };
        let m = decode(&message)?;
        relations.learn(&m);
        if let Some(sql) = relations.statement(&m)? {
            pending.push(sql);
        }
        if let Message::Commit { .. } = m {
            // One source transaction, one target transaction.
            dst.batch_execute(&format!("BEGIN; {}; COMMIT", pending.join("; ")))
                .await?;
            pending.clear();
        }
        match m {
            Message::Insert { new, .. } => inserts.push(new),
            Message::Update { new, .. } => updates.push(new),
            Message::Delete { old, .. } => {
                assert_eq!(old[0], Value::Text("1".into()));
                deletes += 1;
            }
            Message::Commit { end_lsn, .. } => {
                commits += 1;
                last_commit = end_lsn;
            }
            _ => {}
        }
    }
    assert_eq!(inserts.len(), 2);
    assert_eq!(inserts[0][0], Value::Text("4".into()));
    assert!(matches!(&inserts[1][2], Value::Text(b) if b.len() == 12_800));
    assert_eq!(
        updates,
        vec![vec![
            Value::Text("5".into()),
            Value::Text("50".into()),
            Value::Unchanged
        ]]
    );
    assert_eq!(deletes, 1);
    // Applied in order, the target equals the source (the TOASTed body kept, not nulled).
    let rows = "SELECT string_agg(id || ':' || n || ':' || md5(body), ',' ORDER BY id) FROM docs";
    let want: String = client.query_one(rows, &[]).await?.get(0);
    let got: String = dst.query_one(rows, &[]).await?.get(0);
    assert_eq!(got, want);
    assert!(got.starts_with("2:2:"), "{got}");

    repl.confirm(last_commit).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let confirmed: Option<String> = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'haul_test'",
                &[],
            )
            .await?
            .get(0);
        let confirmed: Lsn = confirmed.unwrap_or_default().parse().unwrap_or_default();
        if confirmed >= last_commit {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never took {last_commit} (it has {confirmed})"
        );
        // Keepalives make the server read the status.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), repl.next()).await;
        repl.confirm(last_commit).await?;
    }
    drop(repl);
    // The slot is free once the session is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while client
        .batch_execute("SELECT pg_drop_replication_slot('haul_test')")
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed active"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_is_one_clear_line() -> anyhow::Result<()> {
    let c = logical_cluster()?;
    let good = c.url("postgres");
    let bad = good.replacen(&format!(":{}@", c.password()), ":not-the-password@", 1);
    assert_ne!(bad, good);
    let url = DbUrl::parse(&bad, Side::Source)?;
    let err = match Replication::connect(&url, "haul-test").await {
        Ok(_) => anyhow::bail!("a wrong password was taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("password authentication failed") || err.contains("SCRAM"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-password"),
        "the password was printed: {err}"
    );
    Ok(())
}
