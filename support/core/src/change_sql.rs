//! Changes decoded from pgoutput (`crate::pgoutput`), as statements for the target: what a
//! follower's receiver runs, in commit order, inside the transaction that also records the
//! source position in the ledger.
//!
//! - Values are pgoutput's text forms, written as literals; the target's column types parse
//!   them (an untyped literal takes its column's type).
//! - A column pgoutput marks unchanged (a TOASTed value the UPDATE did not touch) is left out
//!   of the `SET`: the target keeps its value, never NULL.
//! - An UPDATE or DELETE finds its row by the replica identity: the key columns of the old
//!   key the source sent (or of the new row, when the key did not change), or with REPLICA
//!   IDENTITY FULL every column of the old row, one row only (`ctid` of the first match), as
//!   a table without a key may hold duplicates.

use std::collections::HashMap;

use anyhow::{bail, Context};

use crate::ident::{quote_ident, quote_literal};
use crate::pgoutput::{Message, RelColumn, Value};

/// A source relation as its last Relation message described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
    /// Each column's type as SQL names it (`format_type`), when the follower looked them up:
    /// then changes go as prepared statements whose text parameters are cast to these.
    pub types: Vec<String>,
}

impl Relation {
    fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// The relations a change stream has described so far, by the source's relation id.
#[derive(Debug, Default)]
pub struct Relations {
    by_id: HashMap<u32, Relation>,
}

impl Relations {
    /// Take a Relation message (any other message is ignored); returns whether it was one.
    pub fn learn(&mut self, m: &Message) -> bool {
        if let Message::Relation {
            id,
            schema,
            name,
            replica_identity,
            columns,
        } = m
        {
            self.by_id.insert(
                *id,
                Relation {
                    schema: schema.clone(),
                    name: name.clone(),
                    replica_identity: *replica_identity,
                    columns: columns.clone(),
                    types: Vec::new(),
                },
            );
            return true;
        }
        false
    }

    pub fn get(&self, id: u32) -> anyhow::Result<&Relation> {
        self.by_id.get(&id).with_context(|| {
            format!("a change names relation {id}, which the stream has not described")
        })
    }

    /// Give relation `id` its columns' type names (one per column, in order).
    pub fn set_types(&mut self, id: u32, types: Vec<String>) {
        if let Some(r) = self.by_id.get_mut(&id) {
            if types.len() == r.columns.len() {
                r.types = types;
            }
        }
    }

    /// The statement that applies one change (INSERT, UPDATE, DELETE or TRUNCATE), values
    /// written as literals; `None` for a message that changes no rows.
    pub fn statement(&self, m: &Message) -> anyhow::Result<Option<String>> {
        Ok(self.build(m, false)?.map(|(sql, _)| sql))
    }

    /// The same change as a statement with parameters (`$1::TYPE`, sent as text, NULL as
    /// none) and their values, when the relation's types are known: one statement text per
    /// table, kind and set of unchanged columns, which the target prepares once and plans
    /// once, instead of parsing and planning every change. Otherwise, as `statement`, with no
    /// parameters.
    pub fn prepared(&self, m: &Message) -> anyhow::Result<Option<(String, Vec<Option<String>>)>> {
        self.build(m, true)
    }

    fn build(
        &self,
        m: &Message,
        params: bool,
    ) -> anyhow::Result<Option<(String, Vec<Option<String>>)>> {
        let sink = |rel: &Relation| Sink {
            types: (params && rel.types.len() == rel.columns.len()).then(|| rel.types.clone()),
            params: Vec::new(),
        };
        let (sql, sink) = match m {
            Message::Insert { relation, new } => {
                let rel = self.get(*relation)?;
                let mut k = sink(rel);
                (insert(rel, new, &mut k)?, k)
            }
            Message::Update { relation, old, new } => {
                let rel = self.get(*relation)?;
                let mut k = sink(rel);
                (update(rel, old.as_deref(), new, &mut k)?, k)
            }
            Message::Delete { relation, old } => {
                let rel = self.get(*relation)?;
                let mut k = sink(rel);
                (delete(rel, old, &mut k)?, k)
            }
            Message::Truncate {
                cascade,
                restart_identity,
                relations,
            } => {
                let names = relations
                    .iter()
                    .map(|id| self.get(*id).map(Relation::quoted))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                (
                    format!(
                        "TRUNCATE ONLY {}{}{}",
                        names.join(", "),
                        if *restart_identity {
                            " RESTART IDENTITY"
                        } else {
                            ""
                        },
                        if *cascade { " CASCADE" } else { "" }
                    ),
                    Sink {
                        types: None,
                        params: Vec::new(),
                    },
                )
            }
            _ => return Ok(None),
        };
        Ok(Some((sql, sink.params)))
    }
}

/// Where a change's values go: into the SQL as literals, or out as parameters cast to their
/// columns' types.
struct Sink {
    types: Option<Vec<String>>,
    params: Vec<Option<String>>,
}

impl Sink {
    /// The SQL for column `i`'s value; `None` for one left unchanged.
    fn value(&mut self, i: usize, v: &Value) -> Option<String> {
        match (&self.types, v) {
            (_, Value::Unchanged) => None,
            (None, v) => literal(v),
            (Some(types), v) => {
                self.params.push(match v {
                    Value::Text(t) => Some(t.clone()),
                    _ => None,
                });
                Some(format!("${}::{}", self.params.len(), types[i]))
            }
        }
    }
}

fn literal(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("NULL".to_string()),
        Value::Text(t) => Some(quote_literal(t)),
        Value::Unchanged => None,
    }
}

fn check_width(rel: &Relation, values: &[Value]) -> anyhow::Result<()> {
    if values.len() != rel.columns.len() {
        bail!(
            "a change to {}.{} carries {} columns, its relation {}: the source's table changed shape; \
             stop, bring the target's table to the same columns, and follow again",
            rel.schema,
            rel.name,
            values.len(),
            rel.columns.len()
        );
    }
    Ok(())
}

fn insert(rel: &Relation, new: &[Value], sink: &mut Sink) -> anyhow::Result<String> {
    check_width(rel, new)?;
    let mut cols = Vec::with_capacity(new.len());
    let mut vals = Vec::with_capacity(new.len());
    for (i, (c, v)) in rel.columns.iter().zip(new).enumerate() {
        let Some(l) = sink.value(i, v) else {
            bail!(
                "an insert into {}.{} left column {} unchanged",
                rel.schema,
                rel.name,
                c.name
            );
        };
        cols.push(quote_ident(&c.name));
        vals.push(l);
    }
    Ok(format!(
        "INSERT INTO {} ({}) VALUES ({})",
        rel.quoted(),
        cols.join(", "),
        vals.join(", ")
    ))
}

/// The condition that finds the row a change names.
fn locate(
    rel: &Relation,
    old: Option<&[Value]>,
    new: &[Value],
    sink: &mut Sink,
) -> anyhow::Result<String> {
    let full = rel.replica_identity == b'f';
    let row = match old {
        Some(o) => {
            check_width(rel, o)?;
            o
        }
        None => new,
    };
    let mut parts = Vec::new();
    for (i, (c, v)) in rel.columns.iter().zip(row).enumerate() {
        if !(full || c.key) {
            continue;
        }
        match sink.value(i, v) {
            Some(l) if full => {
                parts.push(format!("{} IS NOT DISTINCT FROM {l}", quote_ident(&c.name)))
            }
            Some(l) => parts.push(format!("{} = {l}", quote_ident(&c.name))),
            // A TOASTed key column left out: nothing to match on for it.
            None => bail!(
                "a change to {}.{} names its row without column {}",
                rel.schema,
                rel.name,
                c.name
            ),
        }
    }
    if parts.is_empty() {
        bail!(
            "{}.{} has no replica identity: its updates and deletes cannot name a row \
             (give it a primary key, or REPLICA IDENTITY FULL)",
            rel.schema,
            rel.name
        );
    }
    let cond = parts.join(" AND ");
    Ok(if full {
        // Duplicates are possible: change one of them, as the source did.
        format!(
            "ctid = (SELECT ctid FROM ONLY {} WHERE {cond} LIMIT 1)",
            rel.quoted()
        )
    } else {
        cond
    })
}

fn update(
    rel: &Relation,
    old: Option<&[Value]>,
    new: &[Value],
    sink: &mut Sink,
) -> anyhow::Result<String> {
    check_width(rel, new)?;
    let sets: Vec<String> = rel
        .columns
        .iter()
        .zip(new)
        .enumerate()
        .filter_map(|(i, (c, v))| {
            sink.value(i, v)
                .map(|l| format!("{} = {l}", quote_ident(&c.name)))
        })
        .collect();
    if sets.is_empty() {
        bail!("an update of {}.{} changes no column", rel.schema, rel.name);
    }
    Ok(format!(
        "UPDATE ONLY {} SET {} WHERE {}",
        rel.quoted(),
        sets.join(", "),
        locate(rel, old, new, sink)?
    ))
}

fn delete(rel: &Relation, old: &[Value], sink: &mut Sink) -> anyhow::Result<String> {
    Ok(format!(
        "DELETE FROM ONLY {} WHERE {}",
        rel.quoted(),
        locate(rel, Some(old), old, sink)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, key: bool) -> RelColumn {
        RelColumn {
            key,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        }
    }

    fn rels(identity: u8) -> Relations {
        let mut r = Relations::default();
        r.learn(&Message::Relation {
            id: 7,
            schema: "Sales".into(),
            name: "docs".into(),
            replica_identity: identity,
            columns: vec![col("id", identity == b'd'), col("body", false)],
        });
        r
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn inserts_updates_and_deletes_by_key_keep_unchanged_values() {
        let r = rels(b'd');
        let ins = Message::Insert {
            relation: 7,
            new: vec![t("1"), t("it's")],
        };
        assert_eq!(
            r.statement(&ins).expect("sql").as_deref(),
            Some(r#"INSERT INTO "Sales"."docs" ("id", "body") VALUES ('1', 'it''s')"#)
        );
        // The TOASTed body left alone, the key unchanged (no old key sent).
        let upd = Message::Update {
            relation: 7,
            old: None,
            new: vec![t("1"), Value::Unchanged],
        };
        assert_eq!(
            r.statement(&upd).expect("sql").as_deref(),
            Some(r#"UPDATE ONLY "Sales"."docs" SET "id" = '1' WHERE "id" = '1'"#)
        );
        // The key changed: the old key finds the row.
        let moved = Message::Update {
            relation: 7,
            old: Some(vec![t("1"), Value::Null]),
            new: vec![t("2"), Value::Null],
        };
        assert_eq!(
            r.statement(&moved).expect("sql").as_deref(),
            Some(r#"UPDATE ONLY "Sales"."docs" SET "id" = '2', "body" = NULL WHERE "id" = '1'"#)
        );
        let del = Message::Delete {
            relation: 7,
            old: vec![t("2"), Value::Null],
        };
        assert_eq!(
            r.statement(&del).expect("sql").as_deref(),
            Some(r#"DELETE FROM ONLY "Sales"."docs" WHERE "id" = '2'"#)
        );
        let tr = Message::Truncate {
            cascade: false,
            restart_identity: true,
            relations: vec![7],
        };
        assert_eq!(
            r.statement(&tr).expect("sql").as_deref(),
            Some(r#"TRUNCATE ONLY "Sales"."docs" RESTART IDENTITY"#)
        );
        assert_eq!(
            r.statement(&Message::Origin {
                lsn: Default::default(),
                name: "x".into()
            })
            .expect("none"),
            None
        );
    }

    #[test]
    fn with_types_known_a_change_is_one_statement_text_and_its_values() {
        let mut r = rels(b'd');
        // Types unknown: literals, no parameters.
        let upd = Message::Update {
            relation: 7,
            old: None,
            new: vec![t("1"), Value::Unchanged],
        };
        assert_eq!(
            r.prepared(&upd).expect("sql"),
            Some((
                r#"UPDATE ONLY "Sales"."docs" SET "id" = '1' WHERE "id" = '1'"#.to_string(),
                vec![]
            ))
        );
        r.set_types(7, vec!["integer".into(), "text".into()]);
        assert_eq!(
            r.prepared(&upd).expect("sql"),
            Some((
                r#"UPDATE ONLY "Sales"."docs" SET "id" = $1::integer WHERE "id" = $2::integer"#
                    .to_string(),
                vec![Some("1".into()), Some("1".into())]
            ))
        );
        // Two inserts, one with a NULL: the same text, so one prepared statement.
        let a = r
            .prepared(&Message::Insert {
                relation: 7,
                new: vec![t("1"), t("x")],
            })
            .expect("sql")
            .expect("some");
        let b = r
            .prepared(&Message::Insert {
                relation: 7,
                new: vec![t("2"), Value::Null],
            })
            .expect("sql")
            .expect("some");
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.0,
            r#"INSERT INTO "Sales"."docs" ("id", "body") VALUES ($1::integer, $2::text)"#
        );
        assert_eq!(b.1, vec![Some("2".to_string()), None]);
        // A wrong count of types is not taken.
        let mut r = rels(b'f');
        r.set_types(7, vec!["integer".into()]);
        let del = Message::Delete {
            relation: 7,
            old: vec![t("1"), Value::Null],
        };
        assert!(r.prepared(&del).expect("sql").expect("some").1.is_empty());
        r.set_types(7, vec!["integer".into(), "text".into()]);
        assert_eq!(
            r.prepared(&del).expect("sql").expect("some").0,
            r#"DELETE FROM ONLY "Sales"."docs" WHERE ctid = (SELECT ctid FROM ONLY "Sales"."docs" WHERE "id" IS NOT DISTINCT FROM $1::integer AND "body" IS NOT DISTINCT FROM $2::text LIMIT 1)"#
        );
    }

    #[test]
    fn a_table_without_a_key_changes_one_matching_row_or_is_refused() {
        let full = rels(b'f');
        let del = Message::Delete {
            relation: 7,
            old: vec![t("1"), Value::Null],
        };
        assert_eq!(
            full.statement(&del).expect("sql").as_deref(),
            Some(
                r#"DELETE FROM ONLY "Sales"."docs" WHERE ctid = (SELECT ctid FROM ONLY "Sales"."docs" WHERE "id" IS NOT DISTINCT FROM '1' AND "body" IS NOT DISTINCT FROM NULL LIMIT 1)"#
            )
        );
        let nothing = rels(b'n');
        let err = nothing.statement(&del).expect_err("no identity");
        assert!(err.to_string().contains("has no replica identity"), "{err}");
        // A change of another shape than its relation says stops, naming the table.
        let wide = Message::Insert {
            relation: 7,
            new: vec![t("1"), t("2"), t("3")],
        };
        let err = rels(b'd').statement(&wide).expect_err("shape");
        assert!(
            err.to_string().contains("Sales.docs carries 3 columns"),
            "{err}"
        );
        assert!(rels(b'd')
            .statement(&Message::Insert {
                relation: 8,
                new: vec![]
            })
            .is_err());
    }
}
