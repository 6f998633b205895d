//! Bad input gets one clear line naming what is wrong and what to do, a non-zero exit, no
//! panic, and nothing half-restored on the target.

mod common;

use common::procs::{failure_line, haul};
use common::Cluster;

fn clusters() -> anyhow::Result<(Cluster, Cluster)> {
    common::two_clusters()
}

const SMALL: &str = "CREATE TABLE items (id int PRIMARY KEY, name text); \
    INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g; \
    CREATE TABLE notes (body text); INSERT INTO notes VALUES ('a'), ('b');";

fn copy(source: &str, target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["copy", "--source", source, "--target", target];
    args.extend_from_slice(extra);
    haul(&args)
}

/// Every table of the target's public schema with its row count: "nothing half-restored".
fn target_state(c: &Cluster) -> anyhow::Result<String> {
    c.psql(
        "db",
        "SELECT coalesce(string_agg(format('%s=%s', c.relname, \
            (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM public.%I', c.relname), false, true, '')))[1]::text), \
            ',' ORDER BY c.relname), '') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'",
    )
}

#[test]
fn bad_input_gets_one_clear_line() -> anyhow::Result<()> {
    let (source, target) = clusters()?;
    source.create_database("db")?;
    source.psql("db", SMALL)?;
    target.create_database("db")?;
    let src = source.url("db");
    let dst = target.url("db");

    // Wrong password.
    let bad_pw = src.replacen(":haul@", ":wrong@", 1);
    let line = failure_line(&copy(&bad_pw, &dst, &[]));
    assert!(
        line.contains("password authentication failed") && line.contains("--source"),
        "{line}"
    );
    assert!(
        !line.contains("wrong"),
        "the password leaked into the message: {line}"
    );

    // A database that does not exist.
    let line = failure_line(&copy(&source.url("nosuchdb"), &dst, &[]));
    assert!(line.contains("\"nosuchdb\" does not exist"), "{line}");

    // Nothing listening there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let line = failure_line(&copy(
        &src,
        &format!("postgres://haul:haul@127.0.0.1:{closed}/db"),
        &[],
    ));
    assert!(line.contains("cannot connect to target database"), "{line}");

    // Not a URL.
    let line = failure_line(&copy("postgres://x@host:notaport/db", &dst, &[]));
    assert!(line.contains("source database URL is not valid"), "{line}");

    // A table pattern that matches nothing.
    let line = failure_line(&copy(&src, &dst, &["--tables", "no_such_table"]));
    assert!(
        line.contains("no source table matches --tables no_such_table"),
        "{line}"
    );

    // Malformed flags.
    let line = failure_line(&copy(&src, &dst, &["--codec", "gzip"]));
    assert!(line.contains("unknown codec"), "{line}");
    let line = failure_line(&copy(&src, &dst, &["--bwlimit", "10 parsecs"]));
    assert!(
        line.contains("--bwlimit") && line.contains("unknown unit"),
        "{line}"
    );
    let line = failure_line(&copy(&src, &dst, &["--jobs", "0"]));
    assert!(line.contains("--jobs"), "{line}");

    // A malformed config file, and one with a misspelt key.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[copy\nsource = 1")?;
    let line = failure_line(&haul(&["--config", &bad.display().to_string(), "copy"]));
    assert!(line.contains("not valid TOML"), "{line}");
    std::fs::write(&bad, "[copy]\nsorce = \"x\"\n")?;
    let line = failure_line(&haul(&["--config", &bad.display().to_string(), "copy"]));
    assert!(line.contains("unknown key \"sorce\""), "{line}");

    // Nothing above touched the target.
    assert_eq!(target_state(&target)?, "");

    // The target already has one of the tables: refused before anything is created. (Names are
    // qualified: the test superuser is called haul, so "$user" in search_path finds the ledger's
    // schema first.)
    target.psql("db", "CREATE TABLE public.notes (body text)")?;
    let line = failure_line(&copy(&src, &dst, &[]));
    assert!(
        line.contains("target already has table public.notes") && line.contains("--no-schema"),
        "{line}"
    );
    assert_eq!(
        target_state(&target)?,
        "notes=0",
        "the failed move left something behind"
    );

    // --no-schema into a table that already holds rows: refused before any row is loaded.
    target.psql(
        "db",
        "CREATE TABLE public.items (id int PRIMARY KEY, name text); INSERT INTO public.notes VALUES ('keep')",
    )?;
    let line = failure_line(&copy(&src, &dst, &["--no-schema"]));
    assert!(
        line.contains("target table public.notes already holds rows"),
        "{line}"
    );
    assert_eq!(target_state(&target)?, "items=0,notes=1");

    // --no-schema when a table is missing on the target.
    target.psql("db", "DROP TABLE public.items; TRUNCATE public.notes")?;
    let line = failure_line(&copy(&src, &dst, &["--no-schema"]));
    assert!(line.contains("target has no table public.items"), "{line}");
    assert_eq!(target_state(&target)?, "notes=0");

    // And once the target is right, the same command works.
    target.psql(
        "db",
        "CREATE TABLE public.items (id int PRIMARY KEY, name text)",
    )?;
    let out = copy(&src, &dst, &["--no-schema"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(target_state(&target)?, "items=100,notes=2");
    Ok(())
}

#[test]
fn agents_refuse_bad_flags_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    // No certificates where the flag points.
    let line = failure_line(&haul(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--state",
        &d,
        "--certs",
        &d,
    ]));
    assert!(line.contains("haul certs init"), "{line}");
    // A listen address that is not one.
    let line = failure_line(&haul(&[
        "coordinator",
        "--listen",
        "localhost",
        "--state",
        &d,
        "--certs",
        &d,
    ]));
    assert!(line.contains("--listen"), "{line}");
    // A required flag missing.
    let line = failure_line(&haul(&[
        "sender",
        "--coordinator",
        "127.0.0.1:1",
        "--state",
        &d,
        "--certs",
        &d,
    ]));
    assert!(line.contains("missing --source"), "{line}");
    // Wrong role: the operator's files handed to a sender.
    assert!(haul(&["certs", "init", "--dir", &format!("{d}/certs")])
        .status
        .success());
    std::fs::copy(
        format!("{d}/certs/operator.pem"),
        format!("{d}/certs/sender.pem"),
    )
    .expect("copy");
    std::fs::copy(
        format!("{d}/certs/operator.key"),
        format!("{d}/certs/sender.key"),
    )
    .expect("copy");
    let line = failure_line(&haul(&[
        "sender",
        "--coordinator",
        "127.0.0.1:1",
        "--source",
        "postgres://u:p@127.0.0.1:1/db",
        "--state",
        &d,
        "--certs",
        &format!("{d}/certs"),
    ]));
    assert!(line.contains("operator certificate"), "{line}");
}
