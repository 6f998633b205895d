//! Chunks: the unit of transfer, lease and exactly-once restore. A chunk is one table (or leaf
//! partition) or one range of a big table. Planning is pure logic so it is tested without a
//! database: the sender measures the catalog, the coordinator turns the measurements into chunks.

use anyhow::{bail, Context};
use haul_proto as pb;

use crate::ident::{quote_ident, TableName};

/// Which rows of its table a chunk holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Range {
    /// Every row.
    Whole,
    /// An integer key range `[lo, hi)`; `None` is unbounded.
    Key {
        column: String,
        lo: Option<i64>,
        hi: Option<i64>,
    },
    /// A physical page range `[lo, hi)` by ctid; the last range is open so pages added after
    /// measuring are still covered.
    Pages { lo: i64, hi: Option<i64> },
}

impl Range {
    /// The `WHERE` condition selecting this range, if any.
    pub fn predicate(&self) -> Option<String> {
        match self {
            Range::Whole => None,
            Range::Key { column, lo, hi } => {
                let col = quote_ident(column);
                let mut parts = Vec::new();
                if let Some(lo) = lo {
                    parts.push(format!("{col} >= {lo}"));
                }
                if let Some(hi) = hi {
                    parts.push(format!("{col} < {hi}"));
                }
                if parts.is_empty() {
                    None
                } else {
                    Some(parts.join(" AND "))
                }
            }
            Range::Pages { lo, hi } => {
                let mut p = format!("ctid >= '({lo},0)'::tid");
                if let Some(hi) = hi {
                    p.push_str(&format!(" AND ctid < '({hi},0)'::tid"));
                }
                Some(p)
            }
        }
    }

    pub fn to_wire(&self) -> pb::ChunkRange {
        use pb::chunk_range::Kind;
        let kind = match self {
            Range::Whole => Kind::Whole(pb::Empty {}),
            Range::Key { column, lo, hi } => Kind::Key(pb::KeyRange {
                column: column.clone(),
                lo: *lo,
                hi: *hi,
            }),
            Range::Pages { lo, hi } => Kind::Pages(pb::PageRange { lo: *lo, hi: *hi }),
        };
        pb::ChunkRange { kind: Some(kind) }
    }

    pub fn from_wire(r: Option<&pb::ChunkRange>) -> anyhow::Result<Range> {
        use pb::chunk_range::Kind;
        match r.and_then(|r| r.kind.as_ref()) {
            None | Some(Kind::Whole(_)) => Ok(Range::Whole),
            Some(Kind::Key(k)) => {
                if k.column.is_empty() {
                    bail!("key range without a column");
                }
                Ok(Range::Key {
                    column: k.column.clone(),
                    lo: k.lo,
                    hi: k.hi,
                })
            }
            Some(Kind::Pages(p)) => Ok(Range::Pages { lo: p.lo, hi: p.hi }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Range::Whole => "whole".into(),
            Range::Key { column, lo, hi } => format!(
                "{column} in [{}, {})",
                lo.map_or("-inf".into(), |v| v.to_string()),
                hi.map_or("+inf".into(), |v| v.to_string())
            ),
            Range::Pages { lo, hi } => format!(
                "pages [{lo}, {})",
                hi.map_or("end".into(), |v| v.to_string())
            ),
        }
    }
}

/// A column copied by a chunk (generated columns are not: the target computes them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Column {
    pub name: String,
    pub type_name: String,
    /// The type's oid in the source catalog (0 when unknown).
    #[serde(default)]
    pub type_oid: u32,
}

/// What the sender measured about one table.
#[derive(Debug, Clone)]
pub struct TableMeasure {
    pub table: TableName,
    pub columns: Vec<Column>,
    pub bytes: u64,
    pub est_rows: i64,
    /// A single-column integer primary key, with cut points from its sampled distribution.
    pub split_key: Option<String>,
    pub key_cuts: Vec<i64>,
    pub pages: i64,
}

/// One planned chunk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkPlan {
    /// Index into the measured tables.
    pub table: usize,
    pub range: Range,
    pub est_bytes: u64,
}

/// How many pieces a table of `bytes` needs so that no piece exceeds `chunk_bytes`.
pub fn pieces(bytes: u64, chunk_bytes: u64) -> u64 {
    if chunk_bytes == 0 || bytes <= chunk_bytes {
        1
    } else {
        bytes.div_ceil(chunk_bytes)
    }
}

/// Turn measured tables into chunks, largest first (ties keep catalog order). A table above
/// `chunk_bytes` is split by its integer key cuts when it has them, else by ctid page ranges.
pub fn plan(tables: &[TableMeasure], chunk_bytes: u64) -> Vec<ChunkPlan> {
    let mut out = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let n = pieces(t.bytes, chunk_bytes);
        if n <= 1 {
            out.push(ChunkPlan {
                table: i,
                range: Range::Whole,
                est_bytes: t.bytes,
            });
            continue;
        }
        if let (Some(key), false) = (&t.split_key, t.key_cuts.is_empty()) {
            let mut cuts = t.key_cuts.clone();
            cuts.sort_unstable();
            cuts.dedup();
            let per = t.bytes / (cuts.len() as u64 + 1);
            let mut lo = None;
            for c in cuts.iter().copied().chain(std::iter::once(i64::MAX)) {
                let hi = if c == i64::MAX { None } else { Some(c) };
                out.push(ChunkPlan {
                    table: i,
                    range: Range::Key {
                        column: key.clone(),
                        lo,
                        hi,
                    },
                    est_bytes: per,
                });
                lo = hi;
            }
        } else if t.pages > 1 {
            let n = n.min(t.pages as u64).max(1) as i64;
            let step = (t.pages + n - 1) / n;
            let per = t.bytes / n as u64;
            let mut lo = 0;
            while lo < t.pages {
                let hi = lo + step;
                out.push(ChunkPlan {
                    table: i,
                    range: Range::Pages {
                        lo,
                        hi: if hi >= t.pages { None } else { Some(hi) },
                    },
                    est_bytes: per,
                });
                lo = hi;
            }
        } else {
            out.push(ChunkPlan {
                table: i,
                range: Range::Whole,
                est_bytes: t.bytes,
            });
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.est_bytes));
    out
}

/// Chunks in flight from one sender with `--connections` left to haul: enough streams, each on
/// its own TCP connection, to fill a long fat path whose every flow is held to a fraction of it
/// (16 flows of 50 Mbit/s fill 800 Mbit/s). Only chunks read whole from the source and still
/// crossing take the places beyond `--jobs`, so a link that keeps up never sees more.
pub const AUTO_IN_FLIGHT: usize = 16;

/// How many chunks a sender may have in flight for a job: `--jobs` of them reading the source,
/// the rest read whole and still crossing the link. As many as `--connections` when it is
/// given, else [`AUTO_IN_FLIGHT`]; never fewer than `--jobs`.
pub fn in_flight_limit(jobs: u32, connections: u32) -> usize {
    let jobs = jobs.max(1) as usize;
    match connections {
        0 => AUTO_IN_FLIGHT.max(jobs),
        n => (n as usize).max(jobs),
    }
}

/// The smallest chunk [`job_chunk_bytes`] cuts a small job into.
pub const MIN_JOB_CHUNK_BYTES: u64 = 16 << 20;

/// The chunk size a job's tables are cut at: `--chunk-size`, or less for a job of fewer than
/// two chunks for every place in flight, so that every stream has work until near the end and
/// the last chunks, each on one flow of a slow path, are short (down to
/// [`MIN_JOB_CHUNK_BYTES`], never below, and never above `--chunk-size`). `total`: the bytes of
/// the job's tables.
pub fn job_chunk_bytes(total: u64, chunk_bytes: u64, in_flight: usize) -> u64 {
    if chunk_bytes == 0 {
        return 0;
    }
    let fair = total / (2 * in_flight.max(1) as u64);
    chunk_bytes.min(fair.max(MIN_JOB_CHUNK_BYTES))
}

/// Tables at most this big (planned bytes) are grouped with others into one lease.
pub const SMALL_TABLE_BYTES: u64 = 1 << 20;
/// A group holds at most this many tables (each one lock in the reader's snapshot transaction,
/// one ledger row in the target's) ...
pub const GROUP_TABLES: usize = 64;
/// ... and at most this many planned bytes.
pub const GROUP_BYTES: u64 = 8 << 20;

/// Group small whole-table chunks so that each group is one lease, one stream and one target
/// transaction. `plans` are in lease order; `groupable` says whether a chunk's table may share
/// a stream (large objects may not). Returns, for each plan, the index of its group's first
/// plan, or `None` for a chunk leased alone. Groups are runs of consecutive plans, so a group's
/// members stay together in lease order; a group of one is no group.
pub fn group_small(
    plans: &[ChunkPlan],
    groupable: impl Fn(&ChunkPlan) -> bool,
) -> Vec<Option<usize>> {
    let mut out = vec![None; plans.len()];
    let small =
        |p: &ChunkPlan| p.range == Range::Whole && p.est_bytes <= SMALL_TABLE_BYTES && groupable(p);
    let mut i = 0;
    while i < plans.len() {
        if !small(&plans[i]) {
            i += 1;
            continue;
        }
        let (start, mut bytes) = (i, 0u64);
        while i < plans.len()
            && small(&plans[i])
            && i - start < GROUP_TABLES
            && (i == start || bytes + plans[i].est_bytes <= GROUP_BYTES)
        {
            bytes += plans[i].est_bytes;
            i += 1;
        }
        if i - start > 1 {
            for slot in &mut out[start..i] {
                *slot = Some(start);
            }
        }
    }
    out
}

/// The quantile fractions a sender samples the key at, for a table needing `n` pieces.
pub fn quantiles(n: u64) -> Vec<f64> {
    (1..n).map(|i| i as f64 / n as f64).collect()
}

impl Column {
    pub fn to_wire(&self) -> pb::Column {
        pb::Column {
            name: self.name.clone(),
            type_name: self.type_name.clone(),
            type_oid: self.type_oid,
        }
    }
    pub fn from_wire(c: &pb::Column) -> anyhow::Result<Column> {
        if c.name.is_empty() {
            bail!("column without a name");
        }
        Ok(Column {
            name: c.name.clone(),
            type_name: c.type_name.clone(),
            type_oid: c.type_oid,
        })
    }
}

/// A chunk's table from the wire, refusing an empty name.
pub fn table_from_wire(t: Option<&pb::TableRef>) -> anyhow::Result<TableName> {
    let t = t.context("message names no table")?;
    if t.name.is_empty() || t.schema.is_empty() {
        bail!("message names an empty table");
    }
    Ok(TableName::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_job_is_cut_finer_but_never_below_the_floor_or_above_the_flag() {
        const MB: u64 = 1 << 20;
        // 400 MiB, 16 in flight: 12.5 MiB would be fair, the floor is 16 MiB.
        assert_eq!(job_chunk_bytes(400 * MB, 64 * MB, 16), MIN_JOB_CHUNK_BYTES);
        // 1200 MiB: 37.5 MiB each.
        assert_eq!(job_chunk_bytes(1200 * MB, 64 * MB, 16), 1200 * MB / 32);
        // A big job keeps --chunk-size.
        assert_eq!(job_chunk_bytes(1 << 40, 256 * MB, 16), 256 * MB);
        // A flag below the floor stands.
        assert_eq!(job_chunk_bytes(400 * MB, 4 * MB, 16), 4 * MB);
        // No splitting asked for: none.
        assert_eq!(job_chunk_bytes(400 * MB, 0, 16), 0);
    }

    #[test]
    fn chunks_in_flight_are_at_least_the_readers() {
        assert_eq!(in_flight_limit(4, 0), AUTO_IN_FLIGHT);
        assert_eq!(in_flight_limit(32, 0), 32);
        assert_eq!(in_flight_limit(4, 8), 8);
        assert_eq!(in_flight_limit(4, 2), 4);
        assert_eq!(in_flight_limit(0, 0), AUTO_IN_FLIGHT);
    }

    fn t(name: &str, bytes: u64, key: bool, cuts: Vec<i64>, pages: i64) -> TableMeasure {
        TableMeasure {
            table: TableName::new("public", name),
            columns: vec![],
            bytes,
            est_rows: 0,
            split_key: key.then(|| "id".to_string()),
            key_cuts: cuts,
            pages,
        }
    }

    #[test]
    fn small_tables_are_whole_and_largest_goes_first() {
        let p = plan(
            &[t("a", 10, false, vec![], 1), t("b", 30, false, vec![], 1)],
            100,
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].table, 1);
        assert_eq!(p[0].range, Range::Whole);
    }

    #[test]
    fn big_table_splits_on_key_cuts_covering_everything() {
        let p = plan(&[t("big", 400, true, vec![300, 100, 200, 200], 50)], 100);
        let ranges: Vec<_> = p.iter().map(|c| c.range.clone()).collect();
        let key = |lo, hi| Range::Key {
            column: "id".into(),
            lo,
            hi,
        };
        assert_eq!(
            ranges,
            vec![
                key(None, Some(100)),
                key(Some(100), Some(200)),
                key(Some(200), Some(300)),
                key(Some(300), None)
            ]
        );
    }

    #[test]
    fn keyless_table_splits_on_pages_with_open_end() {
        let p = plan(&[t("heap", 1000, false, vec![], 10)], 300);
        let ranges: Vec<_> = p.iter().map(|c| c.range.clone()).collect();
        assert_eq!(
            ranges,
            vec![
                Range::Pages { lo: 0, hi: Some(3) },
                Range::Pages { lo: 3, hi: Some(6) },
                Range::Pages { lo: 6, hi: Some(9) },
                Range::Pages { lo: 9, hi: None },
            ]
        );
    }

    #[test]
    fn predicates_quote_columns() {
        let r = Range::Key {
            column: "Order Id".into(),
            lo: Some(5),
            hi: None,
        };
        assert_eq!(r.predicate().as_deref(), Some("\"Order Id\" >= 5"));
        assert_eq!(Range::Whole.predicate(), None);
        let w = Range::from_wire(Some(&r.to_wire())).expect("round trip");
        assert_eq!(w, r);
    }

    #[test]
    fn small_whole_tables_form_groups_in_lease_order() {
        let whole = |table, est_bytes| ChunkPlan {
            table,
            range: Range::Whole,
            est_bytes,
        };
        let mut plans = vec![
            whole(0, 100 << 20),
            ChunkPlan {
                table: 1,
                range: Range::Pages { lo: 0, hi: None },
                est_bytes: 10,
            },
        ];
        // 130 tiny tables, one of which may not share a stream.
        plans.extend((2..132).map(|t| whole(t, 8192)));
        let g = group_small(&plans, |p| p.table != 70);
        assert_eq!(g[0], None, "a big table is leased alone");
        assert_eq!(g[1], None, "a page range is never grouped");
        assert!(g[2..70].iter().take(GROUP_TABLES).all(|s| *s == Some(2)));
        assert_eq!(
            g[2 + GROUP_TABLES],
            Some(2 + GROUP_TABLES),
            "a full group starts the next"
        );
        assert_eq!(g[70], None, "an ungroupable table is leased alone");
        assert_eq!(g[71], Some(71));
        assert!(g[71..].iter().all(|s| *s == Some(71)));
        // Bytes bound a group too, and a lone small table is no group.
        let plans: Vec<ChunkPlan> = (0..5).map(|t| whole(t, 1 << 20)).collect();
        let g = group_small(&plans, |_| true);
        assert_eq!(g, vec![Some(0); 5]);
        let plans: Vec<ChunkPlan> = (0..10).map(|t| whole(t, 1 << 20)).collect();
        let g = group_small(&plans, |_| true);
        assert_eq!(&g[..8], &[Some(0); 8]);
        assert_eq!(g[8], Some(8));
        assert_eq!(g[9], Some(8));
        assert_eq!(group_small(&[whole(0, 10)], |_| true), vec![None]);
    }

    #[test]
    fn quantiles_split_evenly() {
        assert_eq!(quantiles(4), vec![0.25, 0.5, 0.75]);
        assert!(quantiles(1).is_empty());
        assert_eq!(pieces(1000, 300), 4);
        assert_eq!(pieces(1000, 0), 1);
    }
}
