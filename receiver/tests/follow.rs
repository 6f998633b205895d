//! Followed transactions are applied exactly once, against a real target: a transaction at or
//! below the recorded position is skipped, and one that fails leaves neither its changes nor
//! its position behind.

use haul_core::pg::{DbUrl, Side};
use haul_core::pgoutput::Lsn;
use haul_pgcluster::{Cluster, ClusterOptions};
use haul_receiver::follow::{applied_position, apply_transaction};

#[tokio::test]
async fn each_source_transaction_is_applied_once() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    c.create_database("dst")?;
    c.psql("dst", "CREATE TABLE t (id int PRIMARY KEY, v text)")?;
    let client = DbUrl::parse(&c.url("dst"), Side::Target)?
        .connect("haul-test")
        .await?;
    haul_receiver::ledger::ensure(&client).await?;
    let job = "job-follow";
    assert_eq!(applied_position(&client, job).await?, None);

    let first = vec!["INSERT INTO t VALUES (1, 'a')".to_string()];
    assert!(apply_transaction(&client, job, Lsn(0x100), &first).await?);
    // The same transaction again (a stream restarted from an earlier position), and an older
    // one: skipped.
    assert!(!apply_transaction(&client, job, Lsn(0x100), &first).await?);
    let older = vec!["INSERT INTO t VALUES (9, 'old')".to_string()];
    assert!(!apply_transaction(&client, job, Lsn(0x80), &older).await?);

    // A transaction that fails halfway leaves nothing: not its first change, not its position.
    let bad = vec![
        "INSERT INTO t VALUES (2, 'b')".to_string(),
        "INSERT INTO t VALUES (1, 'duplicate')".to_string(),
    ];
    let err = apply_transaction(&client, job, Lsn(0x200), &bad)
        .await
        .expect_err("a duplicate key");
    assert!(format!("{err:#}").contains("0/200"), "{err:#}");
    assert_eq!(applied_position(&client, job).await?, Some(Lsn(0x100)));

    let next = vec![
        "INSERT INTO t VALUES (2, 'b')".to_string(),
        "UPDATE t SET v = 'a2' WHERE id = 1".to_string(),
    ];
    assert!(apply_transaction(&client, job, Lsn(0x200), &next).await?);
    assert_eq!(applied_position(&client, job).await?, Some(Lsn(0x200)));
    let rows: String = client
        .query_one(
            "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rows, "1=a2,2=b");
    Ok(())
}
