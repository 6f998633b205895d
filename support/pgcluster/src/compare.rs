//! An independent comparison of two databases, for tests and benchmarks that must prove a move
//! lost, duplicated or changed nothing.
//!
//! It deliberately shares no code with haul's transfer: it asks `pg_dump` for the schema and
//! PostgreSQL itself, through `psql`, for row counts and digests, so a bug in haul's own catalog
//! reading or hashing cannot hide a bug in its transfer.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::pg_bin;

/// Session settings for every comparison query and dump, so that the text of a value depends on
/// the value only, never on a server's or client's defaults. `row_security=off` makes a query
/// that row-level security would filter fail instead of silently returning fewer rows.
const PGOPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c bytea_output=hex -c row_security=off -c statement_timeout=0";

/// The schema haul keeps its own bookkeeping in on the target; the source has no such schema.
const HAUL_SCHEMA: &str = "haul";

/// Separates columns in psql's unaligned output; it cannot appear in an identifier or a digest.
const FIELD_SEP: &str = "\u{1f}";

/// Independent comparison of two databases, NOT using any haul crate except pgcluster: returns a
/// list of differences (empty = equal).
///
/// Compares the normalised `pg_dump --schema-only` output, owners and privileges included (without the
/// `haul` schema, which only the target has), then every table's row count and order-independent
/// digest (relkind `r`: ordinary, unlogged and partition tables, read with `FROM ONLY`), every
/// sequence's `last_value`/`is_called`, and every materialized view's row count and digest.
pub fn compare_databases(source_url: &str, target_url: &str) -> anyhow::Result<Vec<String>> {
    compare_databases_with(
        source_url,
        target_url,
        Compare {
            owners: true,
            schema_by_pg_dump: true,
        },
    )
}

/// What a comparison covers beyond schema and contents.
#[derive(Debug, Clone, Copy)]
pub struct Compare {
    /// Owners and privileges, of schema objects and of large objects (off for a move made
    /// with `--no-owner --no-privileges`).
    pub owners: bool,
    /// Compare the schema as pg_dump prints it. Off for a server newer than the machine's
    /// pg_dump, which refuses it: the schema is then compared as the catalog describes it
    /// (columns, defaults, constraints, indexes, triggers, views, policies, owners, grants).
    pub schema_by_pg_dump: bool,
}

/// The catalog's description of the schema, one line per object, for servers pg_dump cannot
/// dump: what `pg_get_*def` says of each object in the user's schemas.
const CATALOG_SCHEMA: &str = r#"
SELECT 'schema', k, v FROM (
  SELECT format('column %I.%I.%I', n.nspname, c.relname, a.attname) AS k,
         format('%s %s %s', format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'not null' ELSE '' END,
                coalesce(pg_get_expr(d.adbin, d.adrelid), '')) AS v
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT format('relation %I.%I', n.nspname, c.relname),
         format('kind %s owner %s acl %s rls %s', c.relkind, pg_get_userbyid(c.relowner),
                coalesce((SELECT string_agg(p, ',' ORDER BY p) FROM (
                  SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END || '=' || a.privilege_type AS p
                  FROM aclexplode(c.relacl) AS a WHERE a.privilege_type <> 'MAINTAIN') AS g), '-'),
                c.relrowsecurity)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT format('index %I.%I', schemaname, indexname), indexdef FROM pg_indexes
  WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'haul') AND schemaname !~ '^pg_'
  UNION ALL
  SELECT format('constraint %I.%I.%I', n.nspname, c.relname, o.conname), pg_get_constraintdef(o.oid)
  FROM pg_constraint o JOIN pg_class c ON c.oid = o.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT format('trigger %I.%I.%I', n.nspname, c.relname, t.tgname), pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE NOT t.tgisinternal AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul')
  UNION ALL
  SELECT format('view %I.%I', n.nspname, c.relname),
         regexp_replace(regexp_replace(pg_get_viewdef(c.oid), '\s+', ' ', 'g'), '\m[a-z_][a-z0-9_]*\.', '', 'g')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT format('policy %I.%I.%I', n.nspname, c.relname, p.polname), format('%s %s', p.polcmd, coalesce(pg_get_expr(p.polqual, p.polrelid), ''))
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  UNION ALL
  SELECT format('type %I.%I', n.nspname, t.typname), format('%s owner %s', t.typtype, pg_get_userbyid(t.typowner))
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
  WHERE t.typtype IN ('e', 'd', 'c') AND (t.typtype <> 'c' OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul') AND n.nspname !~ '^pg_'
) AS s;
"#;

/// [`compare_databases`], saying whether owners and privileges count.
pub fn compare_databases_with(
    source_url: &str,
    target_url: &str,
    how: Compare,
) -> anyhow::Result<Vec<String>> {
    let (source, target) = std::thread::scope(|s| {
        let source = s.spawn(|| Snapshot::take(source_url, how));
        let target = s.spawn(|| Snapshot::take(target_url, how));
        (source.join(), target.join())
    });
    let source = source
        .map_err(|_| anyhow::anyhow!("source snapshot thread panicked"))?
        .context("snapshot source database")?;
    let target = target
        .map_err(|_| anyhow::anyhow!("target snapshot thread panicked"))?
        .context("snapshot target database")?;

    let mut diffs = Vec::new();
    diff_schema(&source.schema, &target.schema, &mut diffs);
    for (kind, source, target) in [
        ("table", &source.tables, &target.tables),
        ("sequence", &source.sequences, &target.sequences),
        ("materialized view", &source.matviews, &target.matviews),
        (
            "large objects",
            &source.large_objects,
            &target.large_objects,
        ),
    ] {
        diff_values(kind, source, target, &mut diffs);
    }
    Ok(diffs)
}

/// What one database looks like, reduced to comparable text.
struct Snapshot {
    /// pg_dump's TOC header ("Name: x; Type: TABLE; Schema: public; ...") -> the entries' bodies.
    schema: BTreeMap<String, Vec<String>>,
    /// Qualified name -> "N rows, digest D".
    tables: BTreeMap<String, String>,
    /// Qualified name -> "last_value=N is_called=B".
    sequences: BTreeMap<String, String>,
    /// Qualified name -> "N rows, digest D" or "not populated".
    matviews: BTreeMap<String, String>,
    /// "all" -> "N objects, digest D" over every large object's oid, contents, comment and
    /// (when compared) owner and privileges.
    large_objects: BTreeMap<String, String>,
}

/// One line for all large objects: a digest over each object's oid, the md5 of its contents,
/// its comment and, with `owners`, its owner and its privileges (sorted, by role name).
fn large_object_query(owners: bool) -> String {
    let who = if owners {
        "|| ':' || pg_catalog.pg_get_userbyid(m.lomowner) || ':' || coalesce((SELECT string_agg(p, ',' ORDER BY p) \
           FROM (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END \
                        || '=' || a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END AS p \
                 FROM pg_catalog.aclexplode(m.lomacl) AS a) AS g), '-')"
    } else {
        ""
    };
    format!(
        "SELECT 'large_objects', 'all', count(*) || ' objects, digest ' || \
           coalesce(md5(string_agg(m.oid::text || ':' || md5(pg_catalog.lo_get(m.oid)) {who} || ':' || \
             coalesce(pg_catalog.obj_description(m.oid, 'pg_largeobject'), ''), ',' ORDER BY m.oid)), '-') \
         FROM pg_catalog.pg_largeobject_metadata AS m;\n"
    )
}

/// Makes one query per table, sequence and materialized view (run by `\gexec`), each printing
/// `kind, name, facts`. A digest is the md5 of each row's text form, split into two 64-bit
/// halves that are summed over all rows: order-independent, so physical row order does not
/// matter, yet every duplicate row counts. (Summing is twice as fast as sorting the row hashes
/// with `string_agg(... ORDER BY ...)`, which spills to disk at the default `work_mem`.)
const DATA_QUERIES: &str = r#"
SELECT CASE
         WHEN c.relkind = 'S' THEN
           format('SELECT %L, %L, ''last_value='' || last_value || '' is_called='' || is_called FROM %I.%I',
                  'sequence', format('%I.%I', n.nspname, c.relname), n.nspname, c.relname)
         WHEN c.relkind = 'm' AND NOT c.relispopulated THEN
           format('SELECT %L, %L, %L', 'matview', format('%I.%I', n.nspname, c.relname), 'not populated')
         ELSE
           format('SELECT %L, %L, count(*) || '' rows, digest '' || md5(coalesce(sum((''x'' || left(h, 16))::bit(64)::bigint::numeric), 0) || ''/'' || coalesce(sum((''x'' || right(h, 16))::bit(64)::bigint::numeric), 0)) FROM (SELECT md5(ROW(x.*)::text) AS h FROM ONLY %I.%I AS x) AS s',
                  CASE c.relkind WHEN 'r' THEN 'table' ELSE 'matview' END,
                  format('%I.%I', n.nspname, c.relname), n.nspname, c.relname)
       END
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'S', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haul')
  AND n.nspname !~ '^pg_'
ORDER BY n.nspname, c.relname
\gexec
"#;

impl Snapshot {
    fn take(url: &str, how: Compare) -> anyhow::Result<Snapshot> {
        let dump = if how.schema_by_pg_dump {
            let pg_dump = pg_bin("pg_dump")?;
            let mut cmd = Command::new(pg_dump);
            cmd.arg("--schema-only");
            if !how.owners {
                cmd.args(["--no-owner", "--no-privileges"]);
            }
            run(
                cmd.arg(format!("--exclude-schema={HAUL_SCHEMA}"))
                    .arg("-d")
                    .arg(url),
                None,
                "pg_dump --schema-only",
            )?
        } else {
            String::new()
        };

        let psql = pg_bin("psql")?;
        let data = run(
            Command::new(psql)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-F",
                    FIELD_SEP,
                ])
                .args(["-f", "-", "-d"])
                .arg(url),
            Some(&format!(
                "{DATA_QUERIES}{}{}",
                large_object_query(how.owners),
                if how.schema_by_pg_dump {
                    ""
                } else {
                    CATALOG_SCHEMA
                }
            )),
            "psql row digests",
        )?;

        let mut snapshot = Snapshot {
            schema: if how.schema_by_pg_dump {
                parse_dump(&dump)
            } else {
                BTreeMap::new()
            },
            tables: BTreeMap::new(),
            sequences: BTreeMap::new(),
            matviews: BTreeMap::new(),
            large_objects: BTreeMap::new(),
        };
        for line in data.lines().filter(|l| !l.is_empty()) {
            let mut fields = line.splitn(3, FIELD_SEP);
            let (Some(kind), Some(name), Some(facts)) =
                (fields.next(), fields.next(), fields.next())
            else {
                anyhow::bail!("unexpected digest line from psql: {line:?}");
            };
            let map = match kind {
                "table" => &mut snapshot.tables,
                "sequence" => &mut snapshot.sequences,
                "matview" => &mut snapshot.matviews,
                "large_objects" => &mut snapshot.large_objects,
                "schema" => {
                    snapshot
                        .schema
                        .entry(name.to_string())
                        .or_default()
                        .push(facts.to_string());
                    continue;
                }
                other => anyhow::bail!("unexpected object kind {other:?} from psql"),
            };
            map.insert(name.to_string(), facts.to_string());
        }
        Ok(snapshot)
    }
}

/// Splits a plain-format dump into its TOC entries, keyed by the `-- Name: ...` header, keeping
/// only the SQL: comments, blank lines, `SET`s, `set_config` calls and the per-run random
/// `\restrict`/`\unrestrict` keys (pg_dump 15.14+) are dropped, as is anything in the `haul`
/// schema. Keying by header makes the comparison blind to entry order, which is not significant.
fn parse_dump(dump: &str) -> BTreeMap<String, Vec<String>> {
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut header = String::from("(preamble)");
    let mut body: Vec<&str> = Vec::new();
    let mut flush = |header: &str, body: &mut Vec<&str>| {
        let text = body.join("\n");
        body.clear();
        let names_haul = header.contains(&format!("Schema: {HAUL_SCHEMA};"))
            || header.starts_with(&format!("Name: {HAUL_SCHEMA}; Type: SCHEMA;"))
            || text.contains(&format!("SCHEMA {HAUL_SCHEMA}"))
            || text.contains(&format!(" {HAUL_SCHEMA}."));
        if !text.is_empty() && !names_haul {
            entries.entry(header.to_string()).or_default().push(text);
        }
    };
    for line in dump.lines() {
        if let Some(h) = line.strip_prefix("-- ").filter(|h| h.starts_with("Name: ")) {
            flush(&header, &mut body);
            header = h.to_string();
            continue;
        }
        let skip = line.trim().is_empty()
            || line.starts_with("--")
            || line.starts_with("SET ")
            || line.starts_with("SELECT pg_catalog.set_config(")
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict");
        if !skip {
            body.push(line);
        }
    }
    flush(&header, &mut body);
    for bodies in entries.values_mut() {
        bodies.sort();
    }
    entries
}

fn diff_schema(
    source: &BTreeMap<String, Vec<String>>,
    target: &BTreeMap<String, Vec<String>>,
    diffs: &mut Vec<String>,
) {
    let empty = Vec::new();
    let keys: std::collections::BTreeSet<&String> = source.keys().chain(target.keys()).collect();
    for key in keys {
        let s = source.get(key).unwrap_or(&empty);
        let t = target.get(key).unwrap_or(&empty);
        if s == t {
            continue;
        }
        let s_lines: Vec<&str> = s.iter().flat_map(|b| b.lines()).collect();
        let t_lines: Vec<&str> = t.iter().flat_map(|b| b.lines()).collect();
        let only_s = multiset_minus(&s_lines, &t_lines);
        let only_t = multiset_minus(&t_lines, &s_lines);
        let mut msg = format!("schema [{key}]:");
        if s.is_empty() {
            msg.push_str(" only in target;");
        } else if t.is_empty() {
            msg.push_str(" only in source;");
        }
        if !only_s.is_empty() {
            msg.push_str(&format!(" source has `{}`;", only_s.join(" ")));
        }
        if !only_t.is_empty() {
            msg.push_str(&format!(" target has `{}`;", only_t.join(" ")));
        }
        if only_s.is_empty() && only_t.is_empty() {
            msg.push_str(" same lines in a different order;");
        }
        diffs.push(msg.trim_end_matches(';').to_string());
    }
}

/// Lines of `a` not matched by an equal line of `b`, each line of `b` matching once.
fn multiset_minus<'a>(a: &[&'a str], b: &[&str]) -> Vec<&'a str> {
    let mut remaining: BTreeMap<&str, usize> = BTreeMap::new();
    for line in b {
        *remaining.entry(line).or_default() += 1;
    }
    a.iter()
        .filter(|line| match remaining.get_mut(**line) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .copied()
        .collect()
}

fn diff_values(
    kind: &str,
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
    diffs: &mut Vec<String>,
) {
    let keys: std::collections::BTreeSet<&String> = source.keys().chain(target.keys()).collect();
    for name in keys {
        match (source.get(name), target.get(name)) {
            (Some(s), Some(t)) if s == t => {}
            (Some(s), Some(t)) => diffs.push(format!("{kind} {name}: source {s}; target {t}")),
            (Some(s), None) => diffs.push(format!("{kind} {name}: only in source ({s})")),
            (None, Some(t)) => diffs.push(format!("{kind} {name}: only in target ({t})")),
            (None, None) => {}
        }
    }
}

/// Runs a PostgreSQL client program with deterministic session settings, feeding it `stdin`,
/// and returns its stdout; fails with its stderr.
fn run(cmd: &mut Command, stdin: Option<&str>, what: &str) -> anyhow::Result<String> {
    let mut child = cmd
        .env("PGOPTIONS", PGOPTIONS)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: run {:?}", cmd.get_program()))?;
    let input = child.stdin.take();
    let output = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(text)) = (input, stdin) {
            // A write error means the program exited early; its stderr says why.
            s.spawn(move || pipe.write_all(text.as_bytes()));
        }
        child.wait_with_output()
    })
    .with_context(|| format!("{what}: wait"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).with_context(|| format!("{what}: decode output as UTF-8"))
}
