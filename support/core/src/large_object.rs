//! Large objects as chunks. pg_dump carries large objects (their contents, owners, privileges
//! and comments); haul moves them through the same path as table rows, so they are chunked,
//! hashed before restore, spooled, resumable and applied exactly once through the ledger.
//!
//! A large-object chunk is a range of large-object oids. It travels under the pseudo table
//! `pg_catalog.pg_largeobject` with three columns, read on the source by one query inside the
//! job's snapshot (`lo_open` and `lo_get` read as of the transaction's snapshot):
//! - one row per object with `off = -1` whose `data` is the SQL that restores its metadata
//!   (owner, privileges, comment; empty when those are not carried);
//! - then its contents in slices of [`SLICE`] bytes, `off` being each slice's byte offset.
//!
//! The receiver copies the rows into a temporary table, creates each object, writes its slices
//! with `lo_put` and runs its metadata SQL, all in the chunk's transaction with its ledger row.
//! The slice size is independent of either cluster's `LOBLKSIZE`.

use crate::ident::TableName;

/// Bytes per content row: large enough to keep per-row overhead small, small enough that a
/// row is nowhere near a block.
pub const SLICE: i64 = 256 * 1024;

pub const SCHEMA: &str = "pg_catalog";
pub const NAME: &str = "pg_largeobject";

/// The key the chunk planner splits on (an `int8` view of the object's oid).
pub const KEY: &str = "oid";

/// The pseudo table large-object chunks travel under.
pub fn table() -> TableName {
    TableName::new(SCHEMA, NAME)
}

pub fn is_large_objects(t: &TableName) -> bool {
    t.schema == SCHEMA && t.name == NAME
}

/// The columns of a large-object chunk, as (name, type).
pub const COLUMNS: [(&str, &str); 3] = [("loid", "oid"), ("off", "bigint"), ("data", "bytea")];

/// What a large object's metadata row restores besides the object itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metadata {
    pub owner: bool,
    pub privileges: bool,
}

/// The query whose binary COPY is a large-object chunk. `predicate` is the chunk's range on
/// [`KEY`] (from `Range::predicate`), if any.
pub fn source_select(predicate: Option<&str>, meta: Metadata) -> String {
    let owner = if meta.owner {
        "format('ALTER LARGE OBJECT %s OWNER TO %I;', m.lo_oid, pg_catalog.pg_get_userbyid(m.lomowner))"
    } else {
        "''"
    };
    // An object with an ACL: take the owner's implicit rights away, then grant exactly what
    // the ACL lists (the owner's own entry included), as pg_dump does.
    let privileges = if meta.privileges {
        "CASE WHEN m.lomacl IS NULL THEN '' ELSE \
           format('REVOKE ALL ON LARGE OBJECT %s FROM PUBLIC;', m.lo_oid) || \
           (SELECT coalesce(string_agg(format('GRANT %s ON LARGE OBJECT %s TO %s%s;', a.privilege_type, m.lo_oid, \
                CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END, \
                CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END), '' ORDER BY pg_catalog.pg_get_userbyid(a.grantee), a.privilege_type), '') \
            FROM pg_catalog.aclexplode(m.lomacl) a) END"
    } else {
        "''"
    };
    format!(
        "SELECT m.lo_oid, s.off, \
           CASE WHEN s.off < 0 THEN pg_catalog.convert_to({owner} || {privileges} || \
                  coalesce(format('COMMENT ON LARGE OBJECT %s IS %L;', m.lo_oid, \
                    pg_catalog.obj_description(m.lo_oid, 'pg_largeobject')), ''), 'UTF8') \
                ELSE pg_catalog.lo_get(m.lo_oid, s.off, {SLICE}) END \
         FROM (SELECT oid::int8 AS {KEY}, oid AS lo_oid, lomowner, lomacl FROM pg_catalog.pg_largeobject_metadata) m \
         CROSS JOIN LATERAL (SELECT pg_catalog.lo_lseek64(pg_catalog.lo_open(m.lo_oid, 262144), 0, 2) AS size) z \
         CROSS JOIN LATERAL (SELECT -1::int8 UNION ALL SELECT pg_catalog.generate_series(0::int8, z.size - 1, {SLICE})) s(off) \
         {} ORDER BY m.lo_oid, s.off",
        predicate.map(|p| format!("WHERE {p}")).unwrap_or_default()
    )
}

/// The temporary table a large-object chunk is copied into on the target. It lives as long as
/// the pooled connection; its rows as long as the transaction.
pub const TARGET_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS haul_large_objects \
    (loid oid, off int8, data bytea) ON COMMIT DELETE ROWS";

/// COPY target for a large-object chunk.
pub const TARGET_COPY: &str =
    "COPY pg_temp.haul_large_objects (loid, off, data) FROM STDIN (FORMAT binary)";

/// Turn the copied rows into large objects, in the chunk's transaction. `lo_create` fails on an
/// object that already exists, so an object is never silently merged into another.
pub const TARGET_APPLY: &str = "SELECT count(pg_catalog.lo_create(loid)) FROM pg_temp.haul_large_objects WHERE off < 0; \
    SELECT count(pg_catalog.lo_put(loid, off, data)) FROM \
      (SELECT loid, off, data FROM pg_temp.haul_large_objects WHERE off >= 0 ORDER BY loid, off) x; \
    DO $$ DECLARE s text; BEGIN \
      FOR s IN SELECT pg_catalog.convert_from(data, 'UTF8') FROM pg_temp.haul_large_objects \
               WHERE off < 0 AND length(data) > 0 ORDER BY loid LOOP \
        EXECUTE s; \
      END LOOP; END $$";

/// Verification of large objects on either end: how many there are, and an order-independent
/// digest of each one's oid and contents (as `core::digest` does for rows).
pub const DIGEST: &str =
    "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5(m.oid::text || ':' || \
      md5(pg_catalog.lo_get(m.oid))), 1, 16))::bit(64)::int8::numeric), 0)::text \
    FROM pg_catalog.pg_largeobject_metadata m";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pseudo_table_is_recognised() {
        assert!(is_large_objects(&table()));
        assert!(!is_large_objects(&TableName::new("public", NAME)));
    }

    #[test]
    fn the_range_predicate_lands_in_the_where_clause() {
        let sql = source_select(
            Some("\"oid\" >= 10 AND \"oid\" < 20"),
            Metadata {
                owner: true,
                privileges: true,
            },
        );
        assert!(sql.contains("WHERE \"oid\" >= 10 AND \"oid\" < 20 ORDER BY"));
        assert!(sql.contains("OWNER TO"));
        assert!(sql.contains("aclexplode"));
        let bare = source_select(None, Metadata::default());
        assert!(!bare.contains("WHERE"));
        assert!(!bare.contains("OWNER TO"));
        assert!(!bare.contains("aclexplode"));
    }
}
