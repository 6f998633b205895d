//! Every kind of object pg_dump carries comes across, not only tables: large objects (contents,
//! owners, privileges, comments), owners and grants of schema objects, and the roles they need.
//! What the target cannot take (missing roles, missing extensions) is refused in one line
//! before anything is written.

mod common;

use common::procs::{failure_line, haul};
use common::{compare_databases, two_clusters, Cluster};

/// A database whose objects belong to roles other than the connecting superuser, with grants,
/// comments and large objects that a table refers to.
const OWNED: &str = "
CREATE ROLE app_owner LOGIN;
CREATE ROLE app_reader NOLOGIN;
CREATE SCHEMA app AUTHORIZATION app_owner;
CREATE TABLE app.files (id int PRIMARY KEY, name text NOT NULL, content oid NOT NULL);
ALTER TABLE app.files OWNER TO app_owner;
GRANT SELECT ON app.files TO app_reader;
GRANT USAGE ON SCHEMA app TO app_reader;
COMMENT ON TABLE app.files IS 'files, whose contents are large objects';
COMMENT ON COLUMN app.files.name IS 'the file name';
SELECT count(lo_from_bytea(700000 + g, convert_to(repeat('file ' || g || ' ', 1000 * g), 'UTF8')))
FROM generate_series(1, 200) AS g;
INSERT INTO app.files SELECT g, 'file' || g || '.txt', 700000 + g FROM generate_series(1, 200) AS g;
ALTER LARGE OBJECT 700001 OWNER TO app_owner;
ALTER LARGE OBJECT 700002 OWNER TO app_owner;
GRANT SELECT ON LARGE OBJECT 700002 TO app_reader;
COMMENT ON LARGE OBJECT 700003 IS 'the third file';
";

fn copy(source: &str, target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["copy", "--source", source, "--target", target];
    args.extend_from_slice(extra);
    haul(&args)
}

fn target_is_untouched(target: &Cluster) -> anyhow::Result<()> {
    let left = target.psql(
        "db",
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname IN ('app', 'haul')) \
              + (SELECT count(*) FROM pg_largeobject_metadata) \
              + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'app_%')",
    )?;
    anyhow::ensure!(left.trim() == "0", "the target was written to: {left}");
    Ok(())
}

#[test]
fn large_objects_owners_grants_and_comments_move_equal() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", OWNED)?;
    target.create_database("db")?;
    let (src, dst) = (source.url("db"), target.url("db"));

    // The target lacks the roles: refused in one line naming them and the flag, nothing written.
    let line = failure_line(&copy(&src, &dst, &[]));
    assert!(
        line.contains("app_owner") && line.contains("app_reader") && line.contains("--roles"),
        "{line}"
    );
    target_is_untouched(&target)?;

    // With --roles they are created (without passwords) and everything comes across.
    let out = copy(&src, &dst, &["--roles", "--chunk-size", "64kB"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("and 200 large objects: counts and digests equal"),
        "{stdout}"
    );
    // The independent comparison covers owners, grants, comments and every large object's
    // contents, owner, privileges and comment.
    let diffs = compare_databases(&src, &dst)?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let facts = target.psql(
        "db",
        "SELECT (SELECT rolcanlogin AND rolpassword IS NULL FROM pg_authid WHERE rolname = 'app_owner'), \
                (SELECT count(*) FROM app.files f JOIN pg_largeobject_metadata m ON m.oid = f.content), \
                (SELECT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata WHERE oid = 700002), \
                (SELECT lomacl::text LIKE '%app_reader=r/app_owner%' FROM pg_largeobject_metadata WHERE oid = 700002), \
                obj_description(700003, 'pg_largeobject'), \
                (SELECT tableowner FROM pg_tables WHERE tablename = 'files')",
    )?;
    assert_eq!(
        facts.trim(),
        "t|200|app_owner|t|the third file|app_owner",
        "role made without password, every reference resolves, owner, grant and comment kept"
    );
    Ok(())
}

#[test]
fn no_owner_and_no_privileges_leave_them_behind() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", OWNED)?;
    target.create_database("db")?;
    let out = copy(
        &source.url("db"),
        &target.url("db"),
        &["--no-owner", "--no-privileges"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let facts = target.psql(
        "db",
        "SELECT (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'app_%'), \
                (SELECT tableowner FROM pg_tables WHERE tablename = 'files'), \
                (SELECT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata WHERE oid = 700002), \
                (SELECT count(*) FROM pg_largeobject_metadata)",
    )?;
    assert_eq!(facts.trim(), "0|haul|haul|200");
    let diffs = common::compare_databases_with(
        &source.url("db"),
        &target.url("db"),
        common::Compare {
            owners: false,
            schema_by_pg_dump: true,
        },
    )?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    Ok(())
}

#[test]
fn a_missing_extension_is_refused_in_one_line() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    target.create_database("db")?;
    // An extension installed on the source whose files the server no longer has: what the
    // target sees when its server lacks the extension's package. Both test clusters run from
    // one installation, so the files are made for the source and removed before the move.
    let sharedir = source.psql(
        "db",
        "SELECT setting FROM pg_config WHERE name = 'SHAREDIR'",
    )?;
    let ext = format!("haul_test_ext_{}", std::process::id());
    let dir = std::path::Path::new(sharedir.trim()).join("extension");
    let control = dir.join(format!("{ext}.control"));
    let script = dir.join(format!("{ext}--1.0.sql"));
    std::fs::write(&control, "default_version = '1.0'\nrelocatable = true\n")?;
    std::fs::write(
        &script,
        "CREATE FUNCTION haul_test_one() RETURNS int LANGUAGE sql AS 'SELECT 1';\n",
    )?;
    let created = source.psql(
        "db",
        &format!("CREATE EXTENSION {ext}; CREATE TABLE t (id int)"),
    );
    let _ = std::fs::remove_file(&control);
    let _ = std::fs::remove_file(&script);
    created?;

    let line = failure_line(&copy(&source.url("db"), &target.url("db"), &[]));
    assert!(
        line.contains("cannot create extensions") && line.contains(&ext),
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

#[test]
fn role_passwords_come_across_only_when_asked() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE ROLE app_login LOGIN PASSWORD 'secret one'; \
         CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO app_login;",
    )?;
    target.create_database("db")?;
    target.create_database("db2")?;
    let hash = |c: &Cluster| {
        c.psql(
            "db",
            "SELECT coalesce(rolpassword, 'none') FROM pg_authid WHERE rolname = 'app_login'",
        )
    };
    let out = copy(&source.url("db"), &target.url("db"), &["--roles"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hash(&target)?.trim(),
        "none",
        "no password without --role-passwords"
    );
    // The role now exists on the target cluster: drop it to have it made again.
    target.psql("db", "DROP TABLE t; DROP ROLE app_login")?;
    let out = copy(
        &source.url("db"),
        &target.url("db2"),
        &["--roles", "--role-passwords"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, t) = (hash(&source)?, hash(&target)?);
    assert!(s.trim().starts_with("SCRAM-SHA-256$"), "{s}");
    assert_eq!(s.trim(), t.trim(), "the source's hash, not a new password");
    Ok(())
}
