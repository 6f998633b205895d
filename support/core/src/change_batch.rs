//! The bytes of a batch of source transactions on their way from a follower's sender to its
//! receiver: what the blocks of an `ApplyChanges` stream carry once decompressed, hashed with
//! blake3 like a chunk's bytes. A batch holds one or more whole transactions, in commit order:
//!
//! - `T` commit LSN (u64), end LSN (u64), commit time (i64, microseconds since 2000-01-01): a
//!   transaction begins; its position is what the receiver records and skips by;
//! - `S` length (u32), SQL text: one statement of it (`core::change_sql`);
//! - `P` length (u32), SQL text with parameters, their count (u16), and each parameter as a
//!   length (i32, -1 for NULL) and its text: one change as a statement the target prepares
//!   once for all the changes of its shape;
//! - `E`: it ends.
//!
//! Integers are big-endian. A record may be cut anywhere by a block boundary; [`Decoder`] takes
//! the bytes in whatever pieces they come and hands out whole records, keeping at most one
//! statement's bytes. The sender never holds a whole transaction: it writes each statement as
//! the replication stream decodes it, so a transaction of any size crosses in bounded memory.

use anyhow::bail;

/// The largest statement taken: a row of PostgreSQL holds at most 1 GB a value, and a literal
/// can be up to twice its value's size once quoted.
pub const MAX_STATEMENT_BYTES: usize = 2 << 30;

/// One record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Begin {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Statement(String),
    Prepared {
        sql: String,
        params: Vec<Option<String>>,
    },
    End,
}

/// Append a record's bytes to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Begin {
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.push(b'T');
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
        }
        Record::Statement(sql) => {
            out.push(b'S');
            out.extend_from_slice(&(sql.len() as u32).to_be_bytes());
            out.extend_from_slice(sql.as_bytes());
        }
        Record::Prepared { sql, params } => {
            out.push(b'P');
            out.extend_from_slice(&(sql.len() as u32).to_be_bytes());
            out.extend_from_slice(sql.as_bytes());
            out.extend_from_slice(&(params.len() as u16).to_be_bytes());
            for p in params {
                match p {
                    Some(v) => {
                        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(v.as_bytes());
                    }
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        Record::End => out.push(b'E'),
    }
}

/// A prepared record's bytes, if all of them are in `rest` (which starts at its tag): the
/// record and its length.
fn prepared(rest: &[u8]) -> anyhow::Result<Option<(Record, usize)>> {
    let text = |b: &[u8]| -> anyhow::Result<String> {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| anyhow::anyhow!("a change batch holds a statement that is not UTF-8"))
    };
    if rest.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
    if len > MAX_STATEMENT_BYTES {
        bail!("a change batch declares a statement of {len} bytes, more than the {MAX_STATEMENT_BYTES} allowed");
    }
    let mut at = 5 + len;
    if rest.len() < at + 2 {
        return Ok(None);
    }
    let sql = text(&rest[5..5 + len])?;
    let n = u16::from_be_bytes([rest[at], rest[at + 1]]) as usize;
    at += 2;
    let mut params = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < at + 4 {
            return Ok(None);
        }
        let l = i32::from_be_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        at += 4;
        if l < 0 {
            params.push(None);
            continue;
        }
        let l = l as usize;
        if l > MAX_STATEMENT_BYTES {
            bail!("a change batch declares a value of {l} bytes, more than the {MAX_STATEMENT_BYTES} allowed");
        }
        if rest.len() < at + l {
            return Ok(None);
        }
        params.push(Some(text(&rest[at..at + l])?));
        at += l;
    }
    Ok(Some((Record::Prepared { sql, params }, at)))
}

/// Whole records out of bytes that arrive in pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    pending: Vec<u8>,
    /// Inside a transaction: between a `T` and its `E`.
    open: bool,
}

impl Decoder {
    /// Take the next piece of the batch; returns the records it completed.
    pub fn push(&mut self, piece: &[u8]) -> anyhow::Result<Vec<Record>> {
        self.pending.extend_from_slice(piece);
        let mut out = Vec::new();
        let mut at = 0usize;
        loop {
            let rest = &self.pending[at..];
            let Some(&tag) = rest.first() else { break };
            let (record, used) = match tag {
                b'T' => {
                    if rest.len() < 25 {
                        break;
                    }
                    let u = |i: usize| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&rest[i..i + 8]);
                        b
                    };
                    (
                        Record::Begin {
                            commit_lsn: u64::from_be_bytes(u(1)),
                            end_lsn: u64::from_be_bytes(u(9)),
                            commit_time: i64::from_be_bytes(u(17)),
                        },
                        25,
                    )
                }
                b'S' => {
                    if rest.len() < 5 {
                        break;
                    }
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    if len > MAX_STATEMENT_BYTES {
                        bail!("a change batch declares a statement of {len} bytes, more than the {MAX_STATEMENT_BYTES} allowed");
                    }
                    if rest.len() < 5 + len {
                        break;
                    }
                    let sql = std::str::from_utf8(&rest[5..5 + len]).map_err(|_| {
                        anyhow::anyhow!("a change batch holds a statement that is not UTF-8")
                    })?;
                    (Record::Statement(sql.to_string()), 5 + len)
                }
                b'P' => match prepared(rest)? {
                    Some(r) => r,
                    None => break,
                },
                b'E' => (Record::End, 1),
                other => bail!("a change batch holds a record of unknown kind {other:#04x}"),
            };
            match (&record, self.open) {
                (Record::Begin { .. }, false) => self.open = true,
                (Record::End, true) => self.open = false,
                (Record::Statement(_) | Record::Prepared { .. }, true) => {}
                (Record::Begin { .. }, true) => {
                    bail!("a change batch begins a transaction inside another")
                }
                (_, false) => bail!("a change batch holds a change outside a transaction"),
            }
            out.push(record);
            at += used;
        }
        self.pending.drain(..at);
        Ok(out)
    }

    /// The batch is over: anything left means it was cut short.
    pub fn finish(&self) -> anyhow::Result<()> {
        if !self.pending.is_empty() || self.open {
            bail!("a change batch ended inside a transaction");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Vec<Record> {
        vec![
            Record::Begin {
                commit_lsn: 0x1_0000_0010,
                end_lsn: 0x1_0000_0040,
                commit_time: 123_456,
            },
            Record::Statement("INSERT INTO \"t\" VALUES ('é')".into()),
            Record::Statement("DELETE FROM \"t\" WHERE id = '1'".into()),
            Record::Prepared {
                sql: "UPDATE t SET a = $1::int, b = $2::text WHERE id = $3::int".into(),
                params: vec![Some("5".into()), None, Some("é".into())],
            },
            Record::Prepared {
                sql: "TRUNCATE t".into(),
                params: vec![],
            },
            Record::End,
            Record::Begin {
                commit_lsn: 0x1_0000_0080,
                end_lsn: 0x1_0000_00a0,
                commit_time: -5,
            },
            Record::End,
        ]
    }

    #[test]
    fn records_come_back_whatever_the_pieces() {
        let mut bytes = Vec::new();
        for r in batch() {
            encode(&r, &mut bytes);
        }
        for size in [1, 2, 3, 7, 25, 26, 1000] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(size) {
                got.extend(d.push(piece).expect("decode"));
            }
            d.finish().expect("whole");
            assert_eq!(got, batch(), "pieces of {size}");
        }
    }

    #[test]
    fn a_batch_cut_short_or_out_of_shape_is_refused() {
        let mut bytes = Vec::new();
        for r in batch() {
            encode(&r, &mut bytes);
        }
        let mut d = Decoder::default();
        d.push(&bytes[..bytes.len() - 1]).expect("prefix");
        assert!(d.finish().is_err(), "ended inside a transaction");

        let mut stray = Vec::new();
        encode(&Record::Statement("SELECT 1".into()), &mut stray);
        assert!(
            Decoder::default().push(&stray).is_err(),
            "outside a transaction"
        );

        let mut nested = Vec::new();
        encode(&batch()[0], &mut nested);
        encode(&batch()[0], &mut nested);
        assert!(Decoder::default().push(&nested).is_err(), "nested");

        assert!(Decoder::default().push(b"X").is_err(), "unknown kind");
        let mut huge = Vec::new();
        encode(&batch()[0], &mut huge);
        huge.push(b'S');
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Decoder::default().push(&huge).is_err(), "too long");
        let mut bad = Vec::new();
        encode(&batch()[0], &mut bad);
        bad.extend_from_slice(&[b'S', 0, 0, 0, 2, 0xff, 0xfe]);
        assert!(Decoder::default().push(&bad).is_err(), "not UTF-8");
    }
}
