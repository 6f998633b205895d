//! `haul cancel`: what a job wrote to the target, undone.
//!
//! Every stage that changes the target first records, in `haul.undo` and in its own committed
//! transaction, the statements that put the target back as the preflight found it. A cancel
//! runs the recorded stages last first, then surveys the target for what is still there, so the
//! operator hears exactly what was undone and what was left (and why).
//!
//! | stage | recorded | undone by |
//! |---|---|---|
//! | [`TABLES`] | at preflight | nothing: the job's tables, for the survey |
//! | [`ROLES`] | before pre-data, with `--roles` | `DROP OWNED BY` and `DROP ROLE` of the roles created |
//! | [`PRE_DATA`] | before pre-data | pg_dump's own `--clean` drops, less extensions the target had; default privileges taken back |
//! | [`ROWS`] | at preflight, with `--no-schema` | `TRUNCATE` of the job's tables (empty at preflight) |
//! | [`LARGE_OBJECTS`] | at preflight, when large objects move | `lo_unlink` of every large object (none at preflight) |
//! | [`POST_DATA`] | at finalize, before post-data is applied | pg_dump's `--clean` drops of indexes, keys, triggers |
//! | [`SEQUENCES`] | before sequences are set, with `--no-schema` | `setval` back to the values found |
//!
//! Materialized views refreshed into a `--no-schema` target keep their new contents; the
//! survey says so.

use haul_core::ident::{quote_ident, quote_literal, TableName};
use haul_core::pg::db_error_line;
use tokio_postgres::Client;

use crate::ledger;

pub const TABLES: i32 = 0;
pub const ROLES: i32 = 10;
pub const PRE_DATA: i32 = 20;
pub const ROWS: i32 = 30;
pub const LARGE_OBJECTS: i32 = 35;
pub const POST_DATA: i32 = 40;
pub const SEQUENCES: i32 = 50;

/// What "the job's tables" means in the [`TABLES`] record.
const CREATED: &str = "tables the job creates";
const LOADED: &str = "tables the job loads";

/// Record the job's tables (for the survey) and, for a target whose schema is already there,
/// how to empty them again; and how to remove the large objects it will write.
pub async fn record_preflight(
    client: &Client,
    job_id: &str,
    tables: &[TableName],
    create_schema: bool,
    large_objects: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let what = if create_schema { CREATED } else { LOADED };
    ledger::record_undo(client, job_id, TABLES, what, &names).await?;
    if !create_schema && !names.is_empty() {
        // One statement: tables that reference each other are emptied together.
        let truncate = format!("TRUNCATE ONLY {}", names.join(", "));
        ledger::record_undo(client, job_id, ROWS, "empty the loaded tables", &[truncate]).await?;
    }
    if large_objects {
        // The preflight found none: every large object there now is the job's.
        let unlink =
            "SELECT count(pg_catalog.lo_unlink(oid)) FROM pg_catalog.pg_largeobject_metadata";
        ledger::record_undo(
            client,
            job_id,
            LARGE_OBJECTS,
            "remove the large objects",
            &[unlink.to_string()],
        )
        .await?;
    }
    Ok(())
}

/// Record how to undo pre-data: pg_dump's drops, except those of extensions the target already
/// had (pg_dump creates extensions `IF NOT EXISTS`, so such a one was never the job's), and
/// the roles the job creates.
pub async fn record_pre_data(
    client: &Client,
    job_id: &str,
    script: &haul_core::schema_script::Script,
    created_roles: &[String],
) -> anyhow::Result<()> {
    let drops = &script.drops;
    let had: Vec<String> = client
        .query("SELECT extname::text FROM pg_catalog.pg_extension", &[])
        .await
        .map_err(|e| anyhow::anyhow!("list the target's extensions: {}", db_error_line(&e)))?
        .iter()
        .map(|r| quote_ident(r.get::<_, &str>(0)))
        .collect();
    let drops: Vec<String> = drops
        .iter()
        .filter(|d| {
            d.strip_prefix("DROP EXTENSION IF EXISTS ")
                .map(|e| e.trim_end_matches(';'))
                .is_none_or(|e| !had.iter().any(|h| h == e))
        })
        .cloned()
        .collect();
    let drops = with_default_privileges_undone(script, drops);
    if !created_roles.is_empty() {
        let statements: Vec<String> = created_roles
            .iter()
            .flat_map(|r| {
                // What the role owns or was granted here came with the job: it did not exist.
                [
                    format!(
                        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {}) \
                         THEN EXECUTE 'DROP OWNED BY ' || pg_catalog.quote_ident({}); END IF; END $$",
                        quote_literal(r),
                        quote_literal(r)
                    ),
                    format!("DROP ROLE IF EXISTS {}", quote_ident(r)),
                ]
            })
            .collect();
        ledger::record_undo(client, job_id, ROLES, "drop the roles created", &statements).await?;
    }
    if !drops.is_empty() {
        ledger::record_undo(
            client,
            job_id,
            PRE_DATA,
            "drop the objects pre-data created",
            &drops,
        )
        .await?;
    }
    Ok(())
}

/// Record how to undo post-data (indexes, keys, triggers first, so tables can go after).
pub async fn record_post_data(
    client: &Client,
    job_id: &str,
    script: &haul_core::schema_script::Script,
) -> anyhow::Result<()> {
    let drops = with_default_privileges_undone(script, script.drops.clone());
    if drops.is_empty() {
        return Ok(());
    }
    ledger::record_undo(
        client,
        job_id,
        POST_DATA,
        "drop the indexes, keys and triggers post-data created",
        &drops,
    )
    .await
}

/// Before sequences are set on a target the job did not create: the values they have now.
pub async fn record_sequences(
    client: &Client,
    job_id: &str,
    sequences: &[(String, String)],
) -> anyhow::Result<()> {
    let loaded = ledger::undo_stages(client, job_id)
        .await?
        .iter()
        .any(|(stage, _, _)| *stage == ROWS);
    if !loaded || sequences.is_empty() {
        return Ok(());
    }
    let mut statements = Vec::with_capacity(sequences.len());
    for batch in sequences.chunks(200) {
        let sql = batch
            .iter()
            .map(|(schema, name)| {
                let q = format!("{}.{}", quote_ident(schema), quote_ident(name));
                format!(
                    "SELECT {lit}, last_value, is_called FROM {q}",
                    lit = quote_literal(&q)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client.query(&sql, &[]).await.map_err(|e| {
            anyhow::anyhow!(
                "read the target's sequences before setting them: {}",
                db_error_line(&e)
            )
        })?;
        for r in rows {
            let (name, last, called): (String, i64, bool) = (r.get(0), r.get(1), r.get(2));
            statements.push(format!(
                "SELECT pg_catalog.setval({}, {last}, {called})",
                quote_literal(&name)
            ));
        }
    }
    ledger::record_undo(
        client,
        job_id,
        SEQUENCES,
        "set the sequences back",
        &statements,
    )
    .await
}

/// What a cancel did and found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub undone: Vec<String>,
    pub left: Vec<String>,
}

/// Run the job's undo stages (unless `keep_target`), then survey what of the job is still on
/// the target. A statement that fails is reported and the rest go on: the survey then names
/// what it left.
pub async fn run(client: &Client, job_id: &str, keep_target: bool) -> anyhow::Result<Outcome> {
    let stages = ledger::undo_stages(client, job_id).await?;
    let mut out = Outcome::default();
    if stages.is_empty() && !keep_target {
        // Recorded before anything is written, and dropped with the ledger once undone.
        out.undone.push(
            "nothing recorded to undo: the job wrote nothing to the target, or an earlier run of this cancel undid it already".to_string(),
        );
    }
    let tables: Vec<String> = stages
        .iter()
        .find(|(s, _, _)| *s == TABLES)
        .map(|(_, _, t)| t.clone())
        .unwrap_or_default();
    let created = stages
        .iter()
        .any(|(s, what, _)| *s == TABLES && what == CREATED);
    if !keep_target {
        // A statement that fails may only need a later one first (pg_dump's drops of a
        // partition's inherited key fail until the parent's goes): each is tried again once
        // the stages are through, and only what still fails is reported.
        let mut again = Vec::new();
        for (stage, what, statements) in stages.iter().filter(|(s, _, _)| *s != TABLES) {
            let mut failed = 0;
            for sql in statements {
                if client.batch_execute(sql).await.is_err() {
                    failed += 1;
                    again.push((what, sql));
                }
            }
            let n = statements.len() - failed;
            tracing::info!(job = %job_id, stage, what, statements = n, failed, "undone");
            if n > 0 {
                out.undone.push(match *stage {
                    PRE_DATA | POST_DATA => format!("{what} ({n} statements)"),
                    ROLES => format!("{what} ({})", statements.len() / 2),
                    SEQUENCES => format!("{what} ({n})"),
                    _ => what.clone(),
                });
            }
        }
        for (what, sql) in again {
            if let Err(e) = client.batch_execute(sql).await {
                out.left.push(format!(
                    "could not undo ({what}): {sql}: {}",
                    db_error_line(&e)
                ));
            }
        }
    }
    let refreshed = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM haul.finalize_applied WHERE job_id = $1 AND step = 'matviews')",
            &[&job_id],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    out.left
        .extend(survey(client, &tables, created, refreshed, &stages).await?);
    Ok(out)
}

/// What of the job is on the target now.
async fn survey(
    client: &Client,
    tables: &[String],
    created: bool,
    matviews_refreshed: bool,
    stages: &[(i32, String, Vec<String>)],
) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    let there: Vec<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) WHERE to_regclass(t) IS NOT NULL ORDER BY i",
            &[&tables],
        )
        .await
        .map_err(|e| anyhow::anyhow!("look up the job's tables on the target: {}", db_error_line(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if created && !there.is_empty() {
        left.push(format!(
            "{} table(s) the job created: {}",
            there.len(),
            list(&there)
        ));
    }
    let mut holding = Vec::new();
    for batch in there.chunks(200) {
        let sql = batch
            .iter()
            .map(|t| {
                format!(
                    "SELECT {} WHERE EXISTS (SELECT 1 FROM ONLY {t})",
                    quote_literal(t)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        for r in client.query(&sql, &[]).await.map_err(|e| {
            anyhow::anyhow!("look for rows in the job's tables: {}", db_error_line(&e))
        })? {
            holding.push(r.get::<_, String>(0));
        }
    }
    if !holding.is_empty() {
        left.push(format!(
            "rows in {} table(s): {}",
            holding.len(),
            list(&holding)
        ));
    }
    if stages.iter().any(|(s, _, _)| *s == LARGE_OBJECTS) {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
                &[],
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!("count large objects on the target: {}", db_error_line(&e))
            })?
            .get(0);
        if n > 0 {
            left.push(format!("{n} large object(s)"));
        }
    }
    if matviews_refreshed && stages.iter().any(|(s, _, _)| *s == ROWS) {
        let views: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_matviews WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("count materialized views: {}", db_error_line(&e)))?
            .get(0);
        if views > 0 {
            left.push(format!(
                "{views} materialized view(s) keep what a refresh at the end of the job put in them (REFRESH MATERIALIZED VIEW to redo)"
            ));
        }
    }
    Ok(left)
}

/// Up to ten names, then how many more.
fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        s.push_str(&format!(" and {} more", names.len() - 10));
    }
    s
}

/// Default privileges have no drop in pg_dump's `--clean` output: each grant of the script's
/// DEFAULT ACL entries is taken back (and each revoke given back), last first, ahead of `drops`
/// (before the schemas they name are dropped).
fn with_default_privileges_undone(
    script: &haul_core::schema_script::Script,
    drops: Vec<String>,
) -> Vec<String> {
    let mut undo: Vec<String> = script
        .entries
        .iter()
        .filter(|e| e.kind == "DEFAULT ACL")
        .flat_map(|e| e.sql.split(";\n").filter_map(reverse_default_privileges))
        .collect();
    undo.reverse();
    undo.extend(drops);
    undo
}

/// The statement that undoes one `ALTER DEFAULT PRIVILEGES ... GRANT ... TO ...` (a revoke) or
/// `... REVOKE ... FROM ...` (a grant) of pg_dump's; `None` for anything else.
fn reverse_default_privileges(statement: &str) -> Option<String> {
    // The statement as pg_dump prints it, less comment lines before it.
    let st: String = statement
        .lines()
        .skip_while(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    let st = st.trim().trim_end_matches(';').trim();
    let rest = st.strip_prefix("ALTER DEFAULT PRIVILEGES ")?;
    // The first GRANT or REVOKE keyword says which it is ("REVOKE GRANT OPTION FOR" revokes).
    let word = |w: &str| {
        rest.match_indices(w)
            .map(|(i, _)| i)
            .find(|&i| i == 0 || rest[..i].ends_with(' '))
    };
    let grant = match (word("GRANT "), word("REVOKE ")) {
        (Some(g), Some(r)) if g > r => None,
        (g, _) => g,
    };
    if let Some(at) = grant {
        let (scope, body) = (&rest[..at], &rest[at + "GRANT ".len()..]);
        let body = body.strip_suffix(" WITH GRANT OPTION").unwrap_or(body);
        let to = body.rfind(" TO ")?;
        return Some(format!(
            "ALTER DEFAULT PRIVILEGES {scope}REVOKE {} FROM {}",
            &body[..to],
            &body[to + " TO ".len()..]
        ));
    }
    let at = word("REVOKE ")?;
    let (scope, body) = (&rest[..at], &rest[at + "REVOKE ".len()..]);
    let (body, option) = match body.strip_prefix("GRANT OPTION FOR ") {
        Some(b) => (b, " WITH GRANT OPTION"),
        None => (body, ""),
    };
    let from = body.rfind(" FROM ")?;
    Some(format!(
        "ALTER DEFAULT PRIVILEGES {scope}GRANT {} TO {}{option}",
        &body[..from],
        &body[from + " FROM ".len()..]
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_ten_names_then_a_count() {
        let names: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
        assert_eq!(super::list(&names[..2]), "t0, t1");
        assert!(super::list(&names).ends_with("t9 and 2 more"));
    }

    #[test]
    fn default_privileges_are_taken_back() {
        let cases = [
            (
                "ALTER DEFAULT PRIVILEGES FOR ROLE haul IN SCHEMA public GRANT SELECT ON TABLES TO PUBLIC;",
                Some("ALTER DEFAULT PRIVILEGES FOR ROLE haul IN SCHEMA public REVOKE SELECT ON TABLES FROM PUBLIC"),
            ),
            (
                "ALTER DEFAULT PRIVILEGES FOR ROLE app GRANT ALL ON SEQUENCES TO \"Readers\" WITH GRANT OPTION",
                Some("ALTER DEFAULT PRIVILEGES FOR ROLE app REVOKE ALL ON SEQUENCES FROM \"Readers\""),
            ),
            (
                "--\n-- Name: DEFAULT PRIVILEGES FOR FUNCTIONS; Type: DEFAULT ACL\n--\n\nALTER DEFAULT PRIVILEGES FOR ROLE app REVOKE ALL ON FUNCTIONS FROM PUBLIC",
                Some("ALTER DEFAULT PRIVILEGES FOR ROLE app GRANT ALL ON FUNCTIONS TO PUBLIC"),
            ),
            (
                "ALTER DEFAULT PRIVILEGES FOR ROLE app REVOKE GRANT OPTION FOR USAGE ON TYPES FROM app",
                Some("ALTER DEFAULT PRIVILEGES FOR ROLE app GRANT USAGE ON TYPES TO app WITH GRANT OPTION"),
            ),
            ("GRANT SELECT ON TABLE t TO PUBLIC", None),
            ("", None),
        ];
        for (statement, undo) in cases {
            assert_eq!(
                super::reverse_default_privileges(statement).as_deref(),
                undo,
                "{statement}"
            );
        }
    }
}
