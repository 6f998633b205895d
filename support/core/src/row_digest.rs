//! Order-independent digests of rows, computed from binary COPY bytes as they stream past.
//!
//! The sender folds every row of a chunk into a [`RowDigest`] while it reads the chunk; after the
//! chunk commits, the receiver reads the same rows back from the target with the same binary
//! COPY and folds them the same way. Equal digests mean the same multiset of rows: each row's
//! 128-bit XXH3 is added into two 64-bit lanes (wrapping), so row order does not matter and
//! every duplicate counts. Digests of a table's chunks add up to the table's digest.
//!
//! Why XXH3 and not blake3 here: this guards against loss and corruption, not against an
//! adversary (the chunk bytes themselves are blake3-checked end to end), and it runs once per
//! row on both ends, where blake3's per-call cost on short inputs would be most of the work.
//! Each row's bytes (normalised) are gathered into one buffer and hashed in one call; a row
//! too big for the buffer streams into an XXH3 state instead, which gives the same hash.
//!
//! Binary values embed type OIDs (an array's element type, each field of a composite), and
//! OIDs of user-defined types differ between two clusters. Each column's [`Shape`], read from
//! each side's own catalog, says where those OIDs are; they are zeroed before hashing, so the
//! digest depends on values only. Scalar fields stream straight into the hash; a field with
//! OIDs inside is held until complete (arrays and composites are small next to a chunk).

use anyhow::{bail, Context};

/// Where a column's binary form embeds type OIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// No OIDs inside (int, text, bytea, numeric, jsonb, enum labels, ...).
    Scalar,
    /// `array_send`: ndim, flags, element OID, dimensions, then elements.
    Array(Box<Shape>),
    /// `record_send`: field count, then per field its type OID, length and value.
    Composite(Vec<Shape>),
    /// `range_send`: flags, then the bounds present, each a length and a subtype value.
    Range(Box<Shape>),
    /// `multirange_send`: a count, then ranges, each a length and a range value.
    Multirange(Box<Shape>),
}

impl Shape {
    fn is_scalar(&self) -> bool {
        matches!(self, Shape::Scalar)
    }
}

/// A multiset digest of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowDigest {
    lanes: [u64; 2],
    pub rows: u64,
}

impl RowDigest {
    fn add_hash(&mut self, h: u128) {
        self.lanes[0] = self.lanes[0].wrapping_add(h as u64);
        self.lanes[1] = self.lanes[1].wrapping_add((h >> 64) as u64);
        self.rows += 1;
    }

    /// Add another digest's rows (a table's digest is the sum of its chunks').
    pub fn combine(&mut self, other: &RowDigest) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes) {
            *a = a.wrapping_add(b);
        }
        self.rows += other.rows;
    }

    /// The 16 bytes that travel: the two lanes, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lanes.iter().flat_map(|l| l.to_le_bytes()).collect()
    }

    pub fn from_bytes(rows: u64, b: &[u8]) -> anyhow::Result<RowDigest> {
        if b.len() != DIGEST_BYTES {
            bail!("a row digest is {DIGEST_BYTES} bytes, not {}", b.len());
        }
        let mut lanes = [0u64; 2];
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *lane = u64::from_le_bytes(w);
        }
        Ok(RowDigest { lanes, rows })
    }

    /// Short hex form for messages.
    pub fn short(&self) -> String {
        format!("{:016x}", self.lanes[0] ^ self.lanes[1])
    }
}

/// The size of [`RowDigest::to_bytes`].
pub const DIGEST_BYTES: usize = 16;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// A row's bytes gathered for one hash call; past [`ROW_BUFFER`] they stream into an XXH3
/// state, so a row with a huge value costs no more memory than this.
const ROW_BUFFER: usize = 1 << 20;

#[derive(Default)]
struct RowHasher {
    buf: Vec<u8>,
    stream: Option<Box<xxhash_rust::xxh3::Xxh3>>,
}

impl RowHasher {
    fn update(&mut self, b: &[u8]) {
        if let Some(s) = self.stream.as_mut() {
            s.update(b);
        } else if self.buf.len() + b.len() > ROW_BUFFER {
            let mut s = Box::new(xxhash_rust::xxh3::Xxh3::new());
            s.update(&self.buf);
            s.update(b);
            self.buf.clear();
            self.stream = Some(s);
        } else {
            self.buf.extend_from_slice(b);
        }
    }

    /// The row's hash; ready for the next row.
    fn finish(&mut self) -> u128 {
        let h = match self.stream.take() {
            Some(s) => s.digest128(),
            None => xxhash_rust::xxh3::xxh3_128(&self.buf),
        };
        self.buf.clear();
        h
    }
}

#[derive(Debug)]
enum State {
    /// The 19-byte header and its extension area.
    Header,
    /// A tuple's field count (or the -1 trailer).
    Tuple,
    /// Field `i` of `n`: its length.
    FieldLen {
        i: usize,
        n: usize,
    },
    /// Field `i`'s bytes still to come; `held` for fields with OIDs inside.
    Field {
        i: usize,
        n: usize,
        left: usize,
    },
    Done,
}

/// Incremental parser of a binary COPY stream that folds each row into a [`RowDigest`]. A
/// row's hash covers its bytes as COPY sends them (field count, then each field's length and
/// bytes, so the encoding delimits itself), with the type OIDs inside values zeroed. A row
/// that lies whole in one piece of input is hashed in place; one cut by a piece boundary is
/// gathered field by field into the same bytes.
pub struct CopyDigest {
    shapes: Vec<Shape>,
    /// No column holds type OIDs: a row's bytes are hashed as they are.
    all_scalar: bool,
    /// A whole row copied out to zero the OIDs inside it (fast path, some shapes not scalar).
    scratch: Vec<u8>,
    state: State,
    /// Bytes of a length or header not yet complete, or of a held field.
    pending: Vec<u8>,
    row: RowHasher,
    digest: RowDigest,
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl CopyDigest {
    /// `shapes` has one entry per copied column, in COPY order.
    pub fn new(shapes: Vec<Shape>) -> CopyDigest {
        CopyDigest {
            all_scalar: shapes.iter().all(Shape::is_scalar),
            shapes,
            scratch: Vec::new(),
            state: State::Header,
            pending: Vec::new(),
            row: RowHasher::default(),
            digest: RowDigest::default(),
        }
    }

    fn shape(&self, i: usize) -> &Shape {
        self.shapes.get(i).unwrap_or(&Shape::Scalar)
    }

    /// Take `need` bytes into `pending` from `input`; true once `pending` holds them.
    fn fill(&mut self, input: &mut &[u8], need: usize) -> bool {
        let take = need.saturating_sub(self.pending.len()).min(input.len());
        self.pending.extend_from_slice(&input[..take]);
        *input = &input[take..];
        self.pending.len() >= need
    }

    /// Feed the next bytes of the stream.
    pub fn update(&mut self, mut input: &[u8]) -> anyhow::Result<()> {
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    if !self.fill(&mut input, 19) {
                        continue;
                    }
                    if &self.pending[..11] != SIGNATURE {
                        bail!("not a binary COPY stream (bad signature)");
                    }
                    let ext = be_i32(&self.pending[15..19]);
                    if ext < 0 {
                        bail!("binary COPY header has a negative extension length");
                    }
                    if !self.fill(&mut input, 19 + ext as usize) {
                        continue;
                    }
                    self.pending.clear();
                    self.state = State::Tuple;
                }
                State::Tuple => {
                    // Fast path: rows that lie whole in this piece are hashed where they lie.
                    if self.pending.is_empty() {
                        if let Some(len) = whole_row(input)? {
                            self.hash_row(&input[..len])?;
                            input = &input[len..];
                            continue;
                        }
                    }
                    if !self.fill(&mut input, 2) {
                        continue;
                    }
                    let n = i16::from_be_bytes([self.pending[0], self.pending[1]]);
                    if n == -1 {
                        self.pending.clear();
                        self.state = State::Done;
                    } else if n < 0 {
                        bail!("binary COPY tuple with {n} fields");
                    } else {
                        self.row.update(&self.pending);
                        self.pending.clear();
                        self.state = self.next_field(0, n as usize);
                    }
                }
                State::FieldLen { i, n } => {
                    if !self.fill(&mut input, 4) {
                        continue;
                    }
                    let len = be_i32(&self.pending);
                    if len < -1 {
                        bail!("binary COPY field with length {len}");
                    }
                    self.row.update(&self.pending);
                    self.pending.clear();
                    if len == -1 {
                        self.state = self.next_field(i + 1, n);
                    } else {
                        self.state = if len == 0 {
                            self.next_field(i + 1, n)
                        } else {
                            State::Field {
                                i,
                                n,
                                left: len as usize,
                            }
                        };
                    }
                }
                State::Field { i, n, left } => {
                    if self.shape(i).is_scalar() {
                        let take = left.min(input.len());
                        self.row.update(&input[..take]);
                        input = &input[take..];
                        self.state = if take == left {
                            self.next_field(i + 1, n)
                        } else {
                            State::Field {
                                i,
                                n,
                                left: left - take,
                            }
                        };
                    } else {
                        let total = self.pending.len() + left;
                        if !self.fill(&mut input, total) {
                            let left = total - self.pending.len();
                            self.state = State::Field { i, n, left };
                            continue;
                        }
                        let mut value = std::mem::take(&mut self.pending);
                        let shape = self.shape(i).clone();
                        normalize(&mut value, &shape)
                            .with_context(|| format!("column {} of a row", i + 1))?;
                        self.row.update(&value);
                        self.state = self.next_field(i + 1, n);
                    }
                }
                State::Done => bail!("bytes after the binary COPY trailer"),
            }
        }
        Ok(())
    }

    /// Fold one whole row (as [`whole_row`] measured it) into the digest: its bytes as they
    /// are, or a copy with the OIDs inside its values zeroed.
    fn hash_row(&mut self, row: &[u8]) -> anyhow::Result<()> {
        if self.all_scalar {
            self.digest.add_hash(xxhash_rust::xxh3::xxh3_128(row));
            return Ok(());
        }
        let mut b = std::mem::take(&mut self.scratch);
        b.clear();
        b.extend_from_slice(row);
        let n = i16::from_be_bytes([b[0], b[1]]) as usize;
        let mut at = 2;
        for i in 0..n {
            let len = be_i32(&b[at..at + 4]);
            at += 4;
            if len > 0 {
                let end = at + len as usize;
                let shape = self.shape(i);
                if !shape.is_scalar() {
                    let shape = shape.clone();
                    normalize(&mut b[at..end], &shape)
                        .with_context(|| format!("column {} of a row", i + 1))?;
                }
                at = end;
            }
        }
        self.digest.add_hash(xxhash_rust::xxh3::xxh3_128(&b));
        self.scratch = b;
        Ok(())
    }

    /// The state after field `i - 1`; a row is complete after its last field.
    fn next_field(&mut self, i: usize, n: usize) -> State {
        if i < n {
            State::FieldLen { i, n }
        } else {
            let h = self.row.finish();
            self.digest.add_hash(h);
            State::Tuple
        }
    }

    /// The digest of a stream that ended with its trailer.
    pub fn finish(self) -> anyhow::Result<RowDigest> {
        match self.state {
            State::Done => Ok(self.digest),
            _ => bail!("binary COPY stream ended before its trailer"),
        }
    }

    /// The digest so far, whatever the state (for a stream cut short on purpose).
    pub fn rows(&self) -> u64 {
        self.digest.rows
    }
}

/// The length of the row at the start of `input` when all of it is there (its field count,
/// then each field's length and bytes); `None` when it runs past the end, or when `input`
/// starts with the trailer (the slow path handles both).
fn whole_row(input: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(head) = input.get(..2) else {
        return Ok(None);
    };
    let n = i16::from_be_bytes([head[0], head[1]]);
    if n < 0 {
        return Ok(None);
    }
    let mut at = 2usize;
    for _ in 0..n {
        let Some(l) = input.get(at..at + 4) else {
            return Ok(None);
        };
        let len = be_i32(l);
        if len < -1 {
            bail!("binary COPY field with length {len}");
        }
        at += 4 + len.max(0) as usize;
        if at > input.len() {
            return Ok(None);
        }
    }
    Ok(Some(at))
}

/// A bounds-checked reader over one value's bytes.
struct Cursor<'a> {
    b: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn i32(&mut self) -> anyhow::Result<i32> {
        let end = self.at + 4;
        if end > self.b.len() {
            bail!("value ends inside a length");
        }
        let v = be_i32(&self.b[self.at..end]);
        self.at = end;
        Ok(v)
    }
    fn zero4(&mut self) -> anyhow::Result<()> {
        let end = self.at + 4;
        if end > self.b.len() {
            bail!("value ends inside a type oid");
        }
        self.b[self.at..end].fill(0);
        self.at = end;
        Ok(())
    }
    fn skip(&mut self, n: usize) -> anyhow::Result<()> {
        if self.at + n > self.b.len() {
            bail!("value ends early");
        }
        self.at += n;
        Ok(())
    }
    /// A length-prefixed element (-1 = NULL), normalised in place with `shape`.
    fn element(&mut self, shape: &Shape) -> anyhow::Result<()> {
        let len = self.i32()?;
        if len < -1 {
            bail!("element with length {len}");
        }
        if len > 0 {
            let len = len as usize;
            if self.at + len > self.b.len() {
                bail!("element longer than its value");
            }
            normalize(&mut self.b[self.at..self.at + len], shape)?;
            self.at += len;
        }
        Ok(())
    }
}

const RANGE_EMPTY: u8 = 0x01;
const RANGE_LB_INF: u8 = 0x08;
const RANGE_UB_INF: u8 = 0x10;

/// Zero the type OIDs inside one value of `shape`, in place.
pub fn normalize(b: &mut [u8], shape: &Shape) -> anyhow::Result<()> {
    let mut c = Cursor { b, at: 0 };
    match shape {
        Shape::Scalar => {}
        Shape::Array(elem) => {
            let ndim = c.i32()?;
            if !(0..=6).contains(&ndim) {
                bail!("array with {ndim} dimensions");
            }
            c.skip(4)?; // has-nulls flag
            c.zero4()?;
            let mut count: i64 = if ndim == 0 { 0 } else { 1 };
            for _ in 0..ndim {
                let dim = c.i32()?;
                if dim < 0 {
                    bail!("array dimension {dim}");
                }
                count = count.saturating_mul(dim as i64);
                c.skip(4)?; // lower bound
            }
            for _ in 0..count {
                c.element(elem)?;
            }
        }
        Shape::Composite(fields) => {
            let n = c.i32()?;
            if n < 0 {
                bail!("composite with {n} fields");
            }
            for i in 0..n as usize {
                c.zero4()?;
                c.element(fields.get(i).unwrap_or(&Shape::Scalar))?;
            }
        }
        Shape::Range(sub) => {
            if c.b.is_empty() {
                bail!("empty range value");
            }
            let flags = c.b[0];
            c.at = 1;
            if flags & (RANGE_EMPTY | RANGE_LB_INF) == 0 {
                c.element(sub)?;
            }
            if flags & (RANGE_EMPTY | RANGE_UB_INF) == 0 {
                c.element(sub)?;
            }
        }
        Shape::Multirange(range) => {
            let n = c.i32()?;
            if n < 0 {
                bail!("multirange with {n} ranges");
            }
            let as_range = Shape::Range(range.clone());
            for _ in 0..n {
                c.element(&as_range)?;
            }
        }
    }
    Ok(())
}

/// Shapes of types by oid, read from one cluster's catalog and kept: a type's shape does not
/// change while a move runs, and most chunks then need no catalog query at all.
#[derive(Default)]
pub struct ShapeCache {
    memo: std::sync::Mutex<std::collections::HashMap<u32, Shape>>,
}

impl ShapeCache {
    /// Each column's shape, from `client`'s own catalog; `type_oids` are the columns' types
    /// there (0: a built-in scalar).
    pub async fn for_types(
        &self,
        client: &tokio_postgres::Client,
        type_oids: &[u32],
    ) -> anyhow::Result<Vec<Shape>> {
        let mut memo = match self.memo.lock() {
            Ok(m) => m.clone(),
            Err(_) => Default::default(),
        };
        let known = memo.len();
        let mut out = Vec::with_capacity(type_oids.len());
        for &t in type_oids {
            out.push(shape_of(client, t, &mut memo, 0).await?);
        }
        if memo.len() > known {
            if let Ok(mut m) = self.memo.lock() {
                m.extend(memo);
            }
        }
        Ok(out)
    }
}

/// The type oids of `columns` of `table` in `client`'s catalog, in the order given.
pub async fn column_types(
    client: &tokio_postgres::Client,
    table: &crate::ident::TableName,
    columns: &[&str],
) -> anyhow::Result<Vec<u32>> {
    let rows = client
        .query(
            "SELECT a.atttypid::int8 FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = $2::text::regclass AND a.attname = u.n \
             ORDER BY u.i",
            &[&columns, &table.quoted()],
        )
        .await
        .with_context(|| format!("read column types of {table}"))?;
    if rows.len() != columns.len() {
        bail!("{table} lacks some of the chunk's columns");
    }
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u32).collect())
}

fn shape_of<'a>(
    client: &'a tokio_postgres::Client,
    oid: u32,
    memo: &'a mut std::collections::HashMap<u32, Shape>,
    depth: u32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Shape>> + Send + 'a>> {
    Box::pin(async move {
        if oid == 0 {
            return Ok(Shape::Scalar);
        }
        if let Some(s) = memo.get(&oid) {
            return Ok(s.clone());
        }
        if depth > 16 {
            bail!("type {oid} nests more than 16 levels deep");
        }
        let row = client
            .query_opt(
                "SELECT t.typtype::text, t.typelem::int8, t.typlen::int4, t.typrelid::int8, t.typbasetype::int8, \
                        (SELECT r.rngsubtype::int8 FROM pg_catalog.pg_range r WHERE r.rngtypid = t.oid) \
                 FROM pg_catalog.pg_type t WHERE t.oid = $1::int8::oid",
                &[&(oid as i64)],
            )
            .await
            .context("read a column type for row digests")?;
        let Some(row) = row else {
            return Ok(Shape::Scalar);
        };
        let typtype: String = row.get(0);
        let (elem, typlen, relid, base): (i64, i32, i64, i64) =
            (row.get(1), row.get(2), row.get(3), row.get(4));
        let shape = match typtype.as_str() {
            "d" => shape_of(client, base as u32, memo, depth + 1).await?,
            "c" => {
                let attrs = client
                    .query(
                        "SELECT atttypid::int8 FROM pg_catalog.pg_attribute \
                         WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&relid],
                    )
                    .await
                    .context("read composite fields for row digests")?;
                let mut fields = Vec::with_capacity(attrs.len());
                for a in attrs {
                    fields
                        .push(shape_of(client, a.get::<_, i64>(0) as u32, memo, depth + 1).await?);
                }
                Shape::Composite(fields)
            }
            "r" => match row.get::<_, Option<i64>>(5) {
                Some(sub) => Shape::Range(Box::new(
                    shape_of(client, sub as u32, memo, depth + 1).await?,
                )),
                None => Shape::Scalar,
            },
            // Multiranges exist from PostgreSQL 14, as does pg_range.rngmultitypid.
            "m" => match client
                .query_opt(
                    "SELECT rngtypid::int8 FROM pg_catalog.pg_range WHERE rngmultitypid = $1::int8::oid",
                    &[&(oid as i64)],
                )
                .await
                .context("read a multirange type for row digests")?
                .map(|r| r.get::<_, i64>(0))
            {
                Some(range) => match shape_of(client, range as u32, memo, depth + 1).await? {
                    Shape::Range(sub) => Shape::Multirange(sub),
                    _ => Shape::Scalar,
                },
                None => Shape::Scalar,
            },
            // A true array (varlena with an element type); fixed-size types with an element
            // type (point, name) send no array header.
            _ if elem != 0 && typlen == -1 => Shape::Array(Box::new(
                shape_of(client, elem as u32, memo, depth + 1).await?,
            )),
            _ => Shape::Scalar,
        };
        memo.insert(oid, shape.clone());
        Ok(shape)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend_from_slice(&0i32.to_be_bytes());
        v.extend_from_slice(&0i32.to_be_bytes());
        v
    }

    fn field(v: &mut Vec<u8>, bytes: Option<&[u8]>) {
        match bytes {
            None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                v.extend_from_slice(b);
            }
        }
    }

    fn int_array(elem_oid: u32, items: &[i32]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&1i32.to_be_bytes());
        a.extend_from_slice(&0i32.to_be_bytes());
        a.extend_from_slice(&elem_oid.to_be_bytes());
        a.extend_from_slice(&(items.len() as i32).to_be_bytes());
        a.extend_from_slice(&1i32.to_be_bytes());
        for i in items {
            field(&mut a, Some(&i.to_be_bytes()));
        }
        a
    }

    fn stream(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut v = header();
        for r in rows {
            v.extend_from_slice(&(r.len() as i16).to_be_bytes());
            for f in r {
                field(&mut v, f.as_deref());
            }
        }
        v.extend_from_slice(&(-1i16).to_be_bytes());
        v
    }

    fn digest(bytes: &[u8], shapes: Vec<Shape>, piece: usize) -> RowDigest {
        let mut d = CopyDigest::new(shapes);
        for p in bytes.chunks(piece.max(1)) {
            d.update(p).expect("parse");
        }
        d.finish().expect("finish")
    }

    #[test]
    fn order_does_not_matter_and_duplicates_count() {
        let a = vec![Some(b"1".to_vec()), Some(b"x".to_vec())];
        let b = vec![Some(b"2".to_vec()), None];
        let shapes = || vec![Shape::Scalar, Shape::Scalar];
        let ab = digest(&stream(&[a.clone(), b.clone()]), shapes(), 7);
        let ba = digest(&stream(&[b.clone(), a.clone()]), shapes(), 3);
        assert_eq!(ab, ba);
        assert_eq!(ab.rows, 2);
        let aab = digest(&stream(&[a.clone(), a.clone(), b.clone()]), shapes(), 5);
        assert_ne!(aab, ab);
        // NULL and empty differ; a value moved to another column differs.
        let empty = digest(
            &stream(&[vec![Some(b"2".to_vec()), Some(vec![])]]),
            shapes(),
            4,
        );
        let null = digest(&stream(std::slice::from_ref(&b)), shapes(), 4);
        assert_ne!(empty, null);
        let swapped = digest(
            &stream(&[vec![Some(b"x".to_vec()), Some(b"1".to_vec())]]),
            shapes(),
            1,
        );
        assert_ne!(swapped, digest(&stream(&[a]), shapes(), 1));
    }

    #[test]
    fn rows_cut_by_piece_boundaries_hash_as_whole_rows_do() {
        // Whole rows take the fast path; a piece of 1..13 bytes cuts every row somewhere.
        let rows: Vec<Vec<Option<Vec<u8>>>> = (0..40)
            .map(|i: i32| {
                vec![
                    Some(i.to_be_bytes().to_vec()),
                    (i % 3 != 0).then(|| int_array(23 + i as u32, &[i, i + 1])),
                    (i % 5 != 0).then(|| vec![b'x'; i as usize]),
                ]
            })
            .collect();
        let bytes = stream(&rows);
        for shapes in [
            vec![
                Shape::Scalar,
                Shape::Array(Box::new(Shape::Scalar)),
                Shape::Scalar,
            ],
            vec![Shape::Scalar; 3],
        ] {
            let whole = digest(&bytes, shapes.clone(), bytes.len());
            for piece in 1..14 {
                assert_eq!(
                    digest(&bytes, shapes.clone(), piece),
                    whole,
                    "piece {piece}"
                );
            }
            assert_eq!(whole.rows, 40);
        }
        // Zeroed element OIDs: the arrays above differ only in them.
        let a = digest(
            &stream(&rows[1..2]),
            vec![
                Shape::Scalar,
                Shape::Array(Box::new(Shape::Scalar)),
                Shape::Scalar,
            ],
            1000,
        );
        let mut other = rows[1..2].to_vec();
        other[0][1] = Some(int_array(999, &[1, 2]));
        let b = digest(
            &stream(&other),
            vec![
                Shape::Scalar,
                Shape::Array(Box::new(Shape::Scalar)),
                Shape::Scalar,
            ],
            1000,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn chunk_digests_add_up_to_the_table_digest() {
        let rows: Vec<Vec<Option<Vec<u8>>>> = (0..10)
            .map(|i: i32| vec![Some(i.to_be_bytes().to_vec())])
            .collect();
        let whole = digest(&stream(&rows), vec![Shape::Scalar], 9);
        let mut sum = digest(&stream(&rows[..4]), vec![Shape::Scalar], 9);
        sum.combine(&digest(&stream(&rows[4..]), vec![Shape::Scalar], 2));
        assert_eq!(sum, whole);
        let back = RowDigest::from_bytes(whole.rows, &whole.to_bytes()).expect("16 bytes");
        assert_eq!(back, whole);
    }

    #[test]
    fn a_row_too_big_for_the_buffer_hashes_as_if_it_were_not() {
        let big: Vec<u8> = (0..(3 * ROW_BUFFER as u32))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut whole = RowHasher::default();
        whole.update(&big);
        let mut pieces = RowHasher::default();
        for p in big.chunks(4099) {
            pieces.update(p);
        }
        let one_shot = xxhash_rust::xxh3::xxh3_128(&big);
        assert_eq!(whole.finish(), one_shot);
        assert_eq!(pieces.finish(), one_shot);
        // And the buffer is ready for the next row.
        let mut h = RowHasher::default();
        h.update(&big);
        h.finish();
        h.update(b"small");
        assert_eq!(h.finish(), xxhash_rust::xxh3::xxh3_128(b"small"));
    }

    #[test]
    fn element_type_oids_do_not_count() {
        let shape = || vec![Shape::Array(Box::new(Shape::Scalar))];
        let here = stream(&[vec![Some(int_array(16400, &[1, 2, 3]))]]);
        let there = stream(&[vec![Some(int_array(24001, &[1, 2, 3]))]]);
        assert_eq!(digest(&here, shape(), 5), digest(&there, shape(), 11));
        let other = stream(&[vec![Some(int_array(16400, &[1, 2, 4]))]]);
        assert_ne!(digest(&here, shape(), 5), digest(&other, shape(), 5));
        // As a scalar the OIDs would count: the shape is what makes them not matter.
        assert_ne!(
            digest(&here, vec![Shape::Scalar], 5),
            digest(&there, vec![Shape::Scalar], 5)
        );
    }

    #[test]
    fn composite_field_oids_do_not_count() {
        let record = |oid: u32, elem_oid: u32| {
            let mut r = Vec::new();
            r.extend_from_slice(&2i32.to_be_bytes());
            r.extend_from_slice(&23u32.to_be_bytes());
            field(&mut r, Some(&7i32.to_be_bytes()));
            r.extend_from_slice(&oid.to_be_bytes());
            field(&mut r, Some(&int_array(elem_oid, &[5])));
            r
        };
        let shape = || {
            vec![Shape::Composite(vec![
                Shape::Scalar,
                Shape::Array(Box::new(Shape::Scalar)),
            ])]
        };
        let a = stream(&[vec![Some(record(16500, 16400))]]);
        let b = stream(&[vec![Some(record(30500, 30400))]]);
        assert_eq!(digest(&a, shape(), 3), digest(&b, shape(), 6));
    }

    #[test]
    fn range_bounds_are_walked() {
        let range = |flags: u8, lo: i32, hi: i32| {
            let mut r = vec![flags];
            field(&mut r, Some(&lo.to_be_bytes()));
            field(&mut r, Some(&hi.to_be_bytes()));
            r
        };
        let mut v = range(0x02, 1, 5);
        normalize(&mut v, &Shape::Range(Box::new(Shape::Scalar))).expect("range");
        let mut empty = vec![RANGE_EMPTY];
        normalize(&mut empty, &Shape::Range(Box::new(Shape::Scalar))).expect("empty range");
        let mut bad = vec![0x02, 0, 0];
        assert!(normalize(&mut bad, &Shape::Range(Box::new(Shape::Scalar))).is_err());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut d = CopyDigest::new(vec![]);
        assert!(d.update(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0").is_err());
        let mut truncated = stream(&[vec![Some(b"abc".to_vec())]]);
        truncated.truncate(truncated.len() - 4);
        let mut d = CopyDigest::new(vec![Shape::Scalar]);
        d.update(&truncated).expect("a prefix parses");
        assert!(d.finish().is_err());
        let mut arr = int_array(1, &[1, 2]);
        arr.truncate(arr.len() - 2);
        assert!(normalize(&mut arr, &Shape::Array(Box::new(Shape::Scalar))).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&1i32.to_be_bytes());
        huge.extend_from_slice(&0i32.to_be_bytes());
        huge.extend_from_slice(&0i32.to_be_bytes());
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        huge.extend_from_slice(&1i32.to_be_bytes());
        assert!(normalize(&mut huge, &Shape::Array(Box::new(Shape::Scalar))).is_err());
    }
}
