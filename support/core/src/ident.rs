//! SQL identifiers: quoting and qualified table names, so every statement haul builds survives
//! mixed case, spaces and quotes in names.

use std::fmt;

use haul_proto as pb;

/// Quote an identifier the way PostgreSQL's `quote_ident` does, always.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A schema-qualified table.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    pub fn to_wire(&self) -> pb::TableRef {
        pb::TableRef {
            schema: self.schema.clone(),
            name: self.name.clone(),
        }
    }
}

impl From<&pb::TableRef> for TableName {
    fn from(t: &pb::TableRef) -> Self {
        TableName::new(&t.schema, &t.name)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Does `schema.table` match a glob pattern (`*` any run, `?` one char)? A pattern without a
/// dot matches the table name in any schema.
pub fn matches_pattern(pattern: &str, table: &TableName) -> bool {
    if pattern.contains('.') {
        glob(pattern.as_bytes(), table.to_string().as_bytes())
    } else {
        glob(pattern.as_bytes(), table.name.as_bytes())
    }
}

/// Does a schema's name match a glob pattern (`*`, `?`)?
pub fn schema_matches(pattern: &str, schema: &str) -> bool {
    glob(pattern.as_bytes(), schema.as_bytes())
}

/// Which tables a job moves: globs to include and to leave out, on tables (`schema.table` or
/// `table`) and on schemas. A table moves when it matches an include of each kind given and no
/// exclude.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFilter {
    pub tables: Vec<String>,
    pub exclude_tables: Vec<String>,
    pub schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
}

impl TableFilter {
    pub fn of(o: &pb::JobOptions) -> TableFilter {
        TableFilter {
            tables: o.tables.clone(),
            exclude_tables: o.exclude_tables.clone(),
            schemas: o.schemas.clone(),
            exclude_schemas: o.exclude_schemas.clone(),
        }
    }

    pub fn admits(&self, t: &TableName) -> bool {
        (self.tables.is_empty() || self.tables.iter().any(|p| matches_pattern(p, t)))
            && (self.schemas.is_empty()
                || self.schemas.iter().any(|p| schema_matches(p, &t.schema)))
            && !self.exclude_tables.iter().any(|p| matches_pattern(p, t))
            && !self
                .exclude_schemas
                .iter()
                .any(|p| schema_matches(p, &t.schema))
    }

    /// Nothing is named to include: the whole database moves (less what is excluded), large
    /// objects with it, as pg_dump carries them only then.
    pub fn whole_database(&self) -> bool {
        self.tables.is_empty() && self.schemas.is_empty()
    }

    /// The flags as the operator wrote them, for messages: `--tables a,b --exclude-schemas c`.
    pub fn flags(&self) -> String {
        [
            ("--tables", &self.tables),
            ("--schemas", &self.schemas),
            ("--exclude-tables", &self.exclude_tables),
            ("--exclude-schemas", &self.exclude_schemas),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(f, v)| format!("{f} {}", v.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative glob with single-star backtracking: linear in practice, no recursion.
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The replication slot and publication of a `--follow` job: `haul_` and the job id, made fit
/// for a slot name (lower-case letters, digits and underscores, at most 63 bytes).
pub fn follow_names(job_id: &str) -> (String, String) {
    let id: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let name: String = format!("haul_{id}").chars().take(63).collect();
    (name.clone(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_moves_when_every_kind_of_include_takes_it_and_no_exclude_does() {
        let t = |s: &str, n: &str| TableName::new(s, n);
        let f = TableFilter {
            schemas: vec!["sales*".into()],
            exclude_tables: vec!["*_old".into()],
            ..Default::default()
        };
        assert!(f.admits(&t("sales", "orders")));
        assert!(f.admits(&t("sales_eu", "orders")));
        assert!(!f.admits(&t("hr", "orders")));
        assert!(!f.admits(&t("sales", "orders_old")));
        assert!(!f.whole_database());
        let g = TableFilter {
            tables: vec!["orders".into()],
            exclude_schemas: vec!["hr".into()],
            ..Default::default()
        };
        assert!(g.admits(&t("sales", "orders")));
        assert!(!g.admits(&t("hr", "orders")));
        assert!(!g.admits(&t("sales", "items")));
        assert_eq!(g.flags(), "--tables orders --exclude-schemas hr");
        assert!(TableFilter::default().whole_database());
        assert!(TableFilter::default().admits(&t("any", "thing")));
    }

    #[test]
    fn quotes_awkward_names() {
        assert_eq!(quote_ident("Order Lines"), "\"Order Lines\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(TableName::new("Sales", "x").quoted(), "\"Sales\".\"x\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn globs() {
        let t = TableName::new("public", "events_2024");
        let table = [
            ("events_*", true),
            ("public.events_*", true),
            ("other.events_*", false),
            ("*", true),
            ("events_202?", true),
            ("events", false),
            ("*.*_2024", true),
        ];
        for (p, want) in table {
            assert_eq!(matches_pattern(p, &t), want, "{p}");
        }
    }
}
