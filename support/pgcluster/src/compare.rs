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
/// Compares the normalised `pg_dump --schema-only --no-owner --no-privileges` output (without the
/// `haul` schema, which only the target has), then every table's row count and order-independent
/// digest (relkind `r`: ordinary, unlogged and partition tables, read with `FROM ONLY`), every
/// sequence's `last_value`/`is_called`, and every materialized view's row count and digest.
pub fn compare_databases(source_url: &str, target_url: &str) -> anyhow::Result<Vec<String>> {
    let (source, target) = std::thread::scope(|s| {
        let source = s.spawn(|| Snapshot::take(source_url));
        let target = s.spawn(|| Snapshot::take(target_url));
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
    fn take(url: &str) -> anyhow::Result<Snapshot> {
        let pg_dump = pg_bin("pg_dump")?;
        let dump = run(
            Command::new(pg_dump)
                .args(["--schema-only", "--no-owner", "--no-privileges"])
                .arg(format!("--exclude-schema={HAUL_SCHEMA}"))
                .arg("-d")
                .arg(url),
            None,
            "pg_dump --schema-only",
        )?;

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
            Some(DATA_QUERIES),
            "psql row digests",
        )?;

        let mut snapshot = Snapshot {
            schema: parse_dump(&dump),
            tables: BTreeMap::new(),
            sequences: BTreeMap::new(),
            matviews: BTreeMap::new(),
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
