//! pgoutput, PostgreSQL's logical replication output, decoded (protocol version 1): what a
//! follower reads from a slot. Pure decoding of one message's bytes; the replication
//! connection that carries them is `haul_sender::replication`.
//!
//! Column values arrive as text (protocol 1), SQL NULL, or "unchanged": a TOASTed value an
//! UPDATE did not touch, which pgoutput leaves out. An apply must keep the target's value for
//! it, never write NULL over it.

use anyhow::{bail, Context};

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Lsn> {
        let (hi, lo) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a WAL position (like 16/B374D848)"))?;
        let hi = u32::from_str_radix(hi, 16).with_context(|| format!("{s:?}: bad high half"))?;
        let lo = u32::from_str_radix(lo, 16).with_context(|| format!("{s:?}: bad low half"))?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

/// One column's value in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: not sent; the target's stands.
    Unchanged,
    Text(String),
}

/// A column of a relation, as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Part of the replica identity (the key an UPDATE or DELETE names its row by).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// Sent before the first change of a relation in a session, and again when it changes.
    Relation {
        id: u32,
        schema: String,
        name: String,
        /// `d` default (primary key), `n` nothing, `f` full row, `i` an index.
        replica_identity: u8,
        columns: Vec<RelColumn>,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or the whole old row (`O`, with REPLICA IDENTITY FULL), when sent.
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relations: Vec<u32>,
    },
    /// A type's name, sent before a relation uses a non-builtin type.
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    /// `pg_logical_emit_message`, when asked for.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A cursor over one message's bytes; every read checks what is left.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        if self.b.len() < n {
            bail!(
                "pgoutput message ends early: {n} bytes wanted, {} left",
                self.b.len()
            );
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> anyhow::Result<i32> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn lsn(&mut self) -> anyhow::Result<Lsn> {
        Ok(Lsn(self.u64()?))
    }
    fn cstr(&mut self) -> anyhow::Result<String> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .context("pgoutput string without its terminating zero")?;
        let s = std::str::from_utf8(&self.b[..end])
            .context("pgoutput string is not UTF-8")?
            .to_string();
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> anyhow::Result<Vec<Value>> {
        let n = self.u16()? as usize;
        let mut values = Vec::with_capacity(n.min(1600));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    if len < 0 {
                        bail!("pgoutput column value of length {len}");
                    }
                    let raw = self.take(len as usize)?;
                    Value::Text(
                        String::from_utf8(raw.to_vec())
                            .context("pgoutput text value is not UTF-8")?,
                    )
                }
                b'b' => {
                    bail!("pgoutput sent a binary column value; haul asks for text (protocol 1)")
                }
                k => bail!("pgoutput column value of unknown kind {:?}", k as char),
            });
        }
        Ok(values)
    }
    fn done(&self, what: &str) -> anyhow::Result<()> {
        if !self.b.is_empty() {
            bail!(
                "pgoutput {what} message has {} bytes too many",
                self.b.len()
            );
        }
        Ok(())
    }
}

/// Decode one pgoutput message (the payload of one XLogData).
pub fn decode(b: &[u8]) -> anyhow::Result<Message> {
    let mut r = Reader { b };
    let m = match r.u8()? {
        b'B' => Message::Begin {
            final_lsn: r.lsn()?,
            commit_time: r.u64()? as i64,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_time: r.u64()? as i64,
            }
        }
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                columns.push(RelColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            }
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => {}
                k => bail!("pgoutput insert with tuple kind {:?}", k as char),
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let (old, new) = match r.u8()? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    match r.u8()? {
                        b'N' => {}
                        k => bail!("pgoutput update with tuple kind {:?}", k as char),
                    }
                    (Some(old), r.tuple()?)
                }
                b'N' => (None, r.tuple()?),
                k => bail!("pgoutput update with tuple kind {:?}", k as char),
            };
            Message::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => {}
                k => bail!("pgoutput delete with tuple kind {:?}", k as char),
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(100_000));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            schema: r.cstr()?,
            name: r.cstr()?,
        },
        b'O' => Message::Origin {
            lsn: r.lsn()?,
            name: r.cstr()?,
        },
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        k => bail!("pgoutput message of unknown kind {:?}", k as char),
    };
    r.done("a")?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(v: &mut Vec<u8>, s: &str) {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }

    #[test]
    fn lsns_read_and_print_as_postgres_does() {
        let l: Lsn = "16/B374D848".parse().expect("lsn");
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16-B3".parse::<Lsn>().is_err());
        assert!(Lsn(5) < Lsn(6));
    }

    #[test]
    fn decodes_a_transaction_with_every_kind_of_value() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut rel, "public");
        cstr(&mut rel, "docs");
        rel.push(b'd');
        rel.extend_from_slice(&2u16.to_be_bytes());
        rel.push(1);
        cstr(&mut rel, "id");
        rel.extend_from_slice(&23u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.push(0);
        cstr(&mut rel, "body");
        rel.extend_from_slice(&25u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        match decode(&rel).expect("relation") {
            Message::Relation {
                id,
                schema,
                name,
                columns,
                ..
            } => {
                assert_eq!(
                    (id, schema.as_str(), name.as_str()),
                    (16384, "public", "docs")
                );
                assert!(columns[0].key && !columns[1].key);
                assert_eq!(columns[1].name, "body");
            }
            m => panic!("{m:?}"),
        }

        // UPDATE with the key sent and the TOASTed body unchanged.
        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend_from_slice(&2u16.to_be_bytes());
        upd.push(b't');
        upd.extend_from_slice(&1i32.to_be_bytes());
        upd.push(b'7');
        upd.push(b'n');
        upd.push(b'N');
        upd.extend_from_slice(&2u16.to_be_bytes());
        upd.push(b't');
        upd.extend_from_slice(&1i32.to_be_bytes());
        upd.push(b'8');
        upd.push(b'u');
        assert_eq!(
            decode(&upd).expect("update"),
            Message::Update {
                relation: 16384,
                old: Some(vec![Value::Text("7".into()), Value::Null]),
                new: vec![Value::Text("8".into()), Value::Unchanged],
            }
        );

        let mut trunc = vec![b'T'];
        trunc.extend_from_slice(&2u32.to_be_bytes());
        trunc.push(2);
        trunc.extend_from_slice(&1u32.to_be_bytes());
        trunc.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            decode(&trunc).expect("truncate"),
            Message::Truncate {
                cascade: false,
                restart_identity: true,
                relations: vec![1, 2]
            }
        );
    }

    #[test]
    fn a_short_or_padded_message_is_refused_not_misread() {
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&1u64.to_be_bytes());
        begin.extend_from_slice(&2u64.to_be_bytes());
        begin.extend_from_slice(&3u32.to_be_bytes());
        assert!(matches!(decode(&begin), Ok(Message::Begin { xid: 3, .. })));
        assert!(decode(&begin[..begin.len() - 1]).is_err());
        let mut padded = begin.clone();
        padded.push(0);
        assert!(decode(&padded).is_err());
        assert!(decode(b"Z").is_err());
        assert!(decode(&[]).is_err());
        // A value longer than the message.
        let mut ins = vec![b'I'];
        ins.extend_from_slice(&1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend_from_slice(&1u16.to_be_bytes());
        ins.push(b't');
        ins.extend_from_slice(&1000i32.to_be_bytes());
        assert!(decode(&ins).is_err());
    }
}
