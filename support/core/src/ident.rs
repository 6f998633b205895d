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

#[cfg(test)]
mod tests {
    use super::*;

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
