//! Sequence values read by name, on either end: the sender reads the source's to set them on
//! the target, and a comparison reads both sides' to check them.

use crate::ident::TableName;
use anyhow::Context;
use haul_proto as pb;

/// The current value of each named sequence that exists in `client`'s database, in the order
/// given; names that do not resolve to a sequence are left out. One round trip per few hundred
/// sequences rather than one each.
pub async fn values(
    client: &tokio_postgres::Client,
    names: &[TableName],
) -> anyhow::Result<Vec<pb::SequenceValue>> {
    let quoted: Vec<String> = names.iter().map(TableName::quoted).collect();
    let present: std::collections::HashSet<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) AS t \
             WHERE (SELECT relkind FROM pg_class WHERE oid = to_regclass(t)) = 'S'",
            &[&quoted],
        )
        .await
        .map_err(|e| anyhow::anyhow!("look up sequences: {}", crate::pg::db_error_line(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let names: Vec<&TableName> = names
        .iter()
        .filter(|n| present.contains(&n.quoted()))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for batch in names.chunks(200) {
        let sql = batch
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "SELECT {i}, last_value::int8, is_called FROM {}",
                    n.quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(&sql, &[])
            .await
            .context("read sequence values")?;
        for r in rows {
            let i: i32 = r.get(0);
            let Some(name) = batch.get(i as usize) else {
                continue;
            };
            out.push(pb::SequenceValue {
                schema: name.schema.clone(),
                name: name.name.clone(),
                last_value: r.get(1),
                is_called: r.get(2),
            });
        }
    }
    Ok(out)
}

/// How the target's sequences differ from the source's, one line each.
pub fn differences(source: &[pb::SequenceValue], target: &[pb::SequenceValue]) -> Vec<String> {
    let there: std::collections::HashMap<(&str, &str), &pb::SequenceValue> = target
        .iter()
        .map(|v| ((v.schema.as_str(), v.name.as_str()), v))
        .collect();
    let mut out = Vec::new();
    for s in source {
        let name = TableName::new(s.schema.clone(), s.name.clone());
        match there.get(&(s.schema.as_str(), s.name.as_str())) {
            None => out.push(format!("sequence {name}: missing on the target")),
            Some(t) if t.last_value != s.last_value || t.is_called != s.is_called => {
                out.push(format!(
                    "sequence {name}: source {} (called {}), target {} (called {})",
                    s.last_value, s.is_called, t.last_value, t.is_called
                ))
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, last_value: i64, is_called: bool) -> pb::SequenceValue {
        pb::SequenceValue {
            schema: "public".into(),
            name: name.into(),
            last_value,
            is_called,
        }
    }

    #[test]
    fn differences_name_missing_and_changed_sequences() {
        let source = [v("a", 5, true), v("b", 1, false), v("c", 9, true)];
        let target = [v("a", 5, true), v("b", 1, true)];
        assert_eq!(
            differences(&source, &target),
            [
                "sequence public.b: source 1 (called false), target 1 (called true)",
                "sequence public.c: missing on the target"
            ]
        );
        assert!(differences(&source[..1], &target).is_empty());
    }
}
