//! Drives real clusters through their whole life: start (two at once), SQL over TCP, stop and
//! restart on the same port, crash-like kill, password checks, and removal on drop.

use haul_pgcluster::{Cluster, ClusterOptions};

/// Connects with tokio-postgres, as the agents will, and returns `SELECT 1`.
fn tokio_select_one(url: &str) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(connection);
        let row = client.query_one("SELECT 1::int4", &[]).await?;
        drop(client);
        conn.await??;
        Ok(row.get(0))
    })
}

#[test]
fn two_clusters_run_side_by_side() -> anyhow::Result<()> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::start(ClusterOptions::default()));
        let b = s.spawn(|| Cluster::start(ClusterOptions::default()));
        (a.join(), b.join())
    });
    let a = a.map_err(|_| anyhow::anyhow!("cluster a thread panicked"))??;
    let b = b.map_err(|_| anyhow::anyhow!("cluster b thread panicked"))??;
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());

    a.create_database("Mixed Case")?;
    a.psql(
        "Mixed Case",
        "CREATE TABLE t (id int, s text); INSERT INTO t VALUES (1, 'one'), (2, 'two');",
    )?;
    assert_eq!(
        a.psql("Mixed Case", "SELECT id, s FROM t ORDER BY id")?,
        "1|one\n2|two"
    );
    // The database exists only in the cluster it was made in.
    assert_eq!(
        b.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'Mixed Case'"
        )?,
        "0"
    );
    assert_eq!(tokio_select_one(&a.url("Mixed Case"))?, 1);
    assert_eq!(tokio_select_one(&b.url("postgres"))?, 1);
    Ok(())
}

#[test]
fn settings_and_durability_are_applied() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        max_connections: Some(37),
        max_locks_per_transaction: Some(256),
        extra_conf: vec![("work_mem".into(), "7MB".into())],
        ..ClusterOptions::default()
    })?;
    let got = c.psql(
        "postgres",
        "SELECT current_setting('max_connections'), current_setting('max_locks_per_transaction'),
                current_setting('work_mem'), current_setting('fsync'),
                current_setting('listen_addresses'), current_user,
                pg_encoding_to_char(encoding), datcollate
         FROM pg_database WHERE datname = current_database()",
    )?;
    assert_eq!(got, "37|256|7MB|off|127.0.0.1|haul|UTF8|C");
    Ok(())
}

#[test]
fn stop_start_again_and_kill_keep_data_and_port() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions::default())?;
    let port = c.port();
    c.psql(
        "postgres",
        "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')",
    )?;

    c.stop()?;
    let err = c
        .psql("postgres", "SELECT 1")
        .expect_err("server is stopped");
    assert!(format!("{err:#}").contains("psql on database postgres failed"));
    c.stop()?; // stopping twice is harmless
    c.start_again()?;
    assert_eq!(c.port(), port);
    assert_eq!(c.psql("postgres", "SELECT v FROM kept")?, "x");

    c.psql("postgres", "INSERT INTO kept VALUES ('y')")?;
    c.kill()?;
    c.start_again()?;
    assert_eq!(
        c.psql("postgres", "SELECT string_agg(v, ',' ORDER BY v) FROM kept")?,
        "x,y"
    );
    assert!(c.log_tail(200).contains("database system was interrupted"));
    Ok(())
}

#[test]
fn password_is_required_over_tcp() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        password: "s3cret:/@".into(),
        ..ClusterOptions::default()
    })?;
    assert_eq!(tokio_select_one(&c.url("postgres"))?, 1);
    let wrong = format!("postgres://haul:nope@127.0.0.1:{}/postgres", c.port());
    let err = tokio_select_one(&wrong).expect_err("wrong password must be refused");
    assert!(
        format!("{err:#}").contains("password authentication failed"),
        "unexpected error: {err:#}"
    );
    Ok(())
}

#[test]
fn psql_errors_carry_psql_stderr() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let err = c
        .psql(
            "postgres",
            "SELECT 1; SELECT * FROM no_such_table; SELECT 2;",
        )
        .expect_err("bad SQL must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(r#"relation "no_such_table" does not exist"#),
        "{msg}"
    );
    assert!(c.create_database("postgres").is_err());
    Ok(())
}

#[test]
fn drop_removes_the_directory_unless_kept() -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    let opts = ClusterOptions {
        base_dir: Some(base.path().to_path_buf()),
        ..ClusterOptions::default()
    };

    let c = Cluster::start(opts.clone())?;
    let dir = c.dir().to_path_buf();
    assert!(dir.join("data/PG_VERSION").exists());
    assert!(dir.starts_with(base.path()));
    drop(c);
    assert!(!dir.exists(), "{} survived drop", dir.display());

    let mut c = Cluster::start(opts)?;
    let port = c.port();
    c.keep();
    let dir = c.dir().to_path_buf();
    drop(c);
    assert!(dir.join("data/PG_VERSION").exists());
    // The kept server was stopped: its port is free again.
    std::net::TcpListener::bind(("127.0.0.1", port))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
