//! A logical replication connection to the source (`replication=database`), spoken on the
//! wire protocol itself: tokio-postgres has no streaming replication (no CopyBoth). Frontend
//! messages and SCRAM come from `postgres-protocol`, the crate tokio-postgres is built on; the
//! backend messages replication needs (CopyBothResponse among them) are read here.
//!
//! What it does: run replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT … LOGICAL
//! pgoutput EXPORT_SNAPSHOT`, `DROP_REPLICATION_SLOT`), then `START_REPLICATION` and read the
//! stream: pgoutput messages (`haul_core::pgoutput`) in XLogData, and keepalives; and report
//! the position applied (a standby status update), so the slot keeps every change not yet
//! applied. A slot's exported snapshot lives while this connection stays idle after creating
//! it: the bulk copy reads under it, and the change stream starts where it ends.
//!
//! Plain TCP or a Unix socket, as the rest of haul's source connections (no TLS yet).

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use haul_core::pg::DbUrl;
use haul_core::pgoutput::Lsn;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::Host;

/// The largest backend message taken (a row of pgoutput can carry values up to 1 GB).
const MAX_MESSAGE: usize = 1 << 30;

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A replication session with the source.
pub struct Replication {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    /// In the CopyBoth stream of START_REPLICATION.
    streaming: bool,
}

/// A slot just created: where its changes start, and the snapshot that sees everything before.
#[derive(Debug, Clone)]
pub struct SlotCreated {
    pub slot: String,
    pub consistent_point: Lsn,
    pub snapshot: String,
}

/// What the stream carried.
#[derive(Debug)]
pub enum Event {
    /// One pgoutput message, at `wal_start`; `wal_end` is the server's WAL end when sent.
    Data {
        wal_start: Lsn,
        wal_end: Lsn,
        message: Bytes,
    },
    /// The server is alive at `wal_end`; with `reply`, it wants a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
    /// The server ended the stream.
    End,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

fn now_pg_micros() -> i64 {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_US
}

/// An ErrorResponse's fields as one line: severity, message, detail.
fn error_line(body: &[u8]) -> String {
    let (mut message, mut detail, mut code) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'M' => message = text,
            b'D' => detail = text,
            b'C' => code = text,
            _ => {}
        }
    }
    let mut line = message;
    if !detail.is_empty() {
        line.push_str(&format!(" ({detail})"));
    }
    if !code.is_empty() {
        line.push_str(&format!(" [SQLSTATE {code}]"));
    }
    line
}

impl Replication {
    /// Open a replication session to the database `url` names, authenticated as its user
    /// (trust, password, md5 or SCRAM-SHA-256).
    pub async fn connect(url: &DbUrl, application: &str) -> anyhow::Result<Replication> {
        let config = url.config();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let stream = match config.get_hosts().first() {
            Some(Host::Unix(dir)) => Stream::Unix(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .with_context(|| format!("connect for replication to {}", url.redacted()))?,
            ),
            Some(Host::Tcp(h)) => Stream::Tcp(
                tokio::net::TcpStream::connect((h.as_str(), port))
                    .await
                    .with_context(|| format!("connect for replication to {}", url.redacted()))?,
            ),
            None => Stream::Tcp(
                tokio::net::TcpStream::connect(("localhost", port))
                    .await
                    .with_context(|| format!("connect for replication to {}", url.redacted()))?,
            ),
        };
        let mut r = Replication {
            stream,
            read: BytesMut::with_capacity(64 << 10),
            write: BytesMut::new(),
            streaming: false,
        };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let password = config.get_password().map(<[u8]>::to_vec);
        frontend::startup_message(
            [
                ("user", user.as_str()),
                ("database", url.dbname()),
                ("replication", "database"),
                ("application_name", application),
            ],
            &mut r.write,
        )?;
        r.flush().await?;
        let need_password = || {
            password.clone().with_context(|| {
                format!(
                    "the source asks {} for a password and the URL has none",
                    url.redacted()
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = r.message().await?;
            match tag {
                b'R' => match body
                    .try_get_i32()
                    .context("the source sent a short authentication message")?
                {
                    0 => {}
                    3 => {
                        frontend::password_message(&need_password()?, &mut r.write)?;
                        r.flush().await?;
                    }
                    5 => {
                        let mut salt = [0u8; 4];
                        body.try_copy_to_slice(&mut salt)
                            .context("the source sent a short md5 salt")?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            &need_password()?,
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut r.write)?;
                        r.flush().await?;
                    }
                    10 => {
                        let offered = String::from_utf8_lossy(&body).into_owned();
                        if !offered.split('\0').any(|m| m == SCRAM_SHA_256) {
                            bail!("the source offers no SASL mechanism haul speaks ({offered:?})");
                        }
                        let s = ScramSha256::new(&need_password()?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut r.write)?;
                        r.flush().await?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().context("SASL continue before SASL began")?;
                        s.update(&body).context("SCRAM with the source")?;
                        frontend::sasl_response(s.message(), &mut r.write)?;
                        r.flush().await?;
                    }
                    12 => {
                        let s = scram.as_mut().context("SASL final before SASL began")?;
                        s.finish(&body)
                            .context("the source's SCRAM signature does not check out")?;
                    }
                    code => {
                        bail!("the source asks for authentication haul does not speak ({code})")
                    }
                },
                b'E' => bail!(
                    "the source refused a replication session for {}: {}",
                    url.redacted(),
                    error_line(&body)
                ),
                b'Z' => return Ok(r),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let buf = self.write.split();
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(&buf).await,
            Stream::Unix(s) => s.write_all(&buf).await,
        }
        .context("write to the source's replication session")
    }

    /// The next backend message: its tag and body.
    async fn message(&mut self) -> anyhow::Result<(u8, Bytes)> {
        loop {
            if self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    bail!("the source sent a message of {len} bytes on the replication session");
                }
                if self.read.len() > len {
                    let tag = self.read[0];
                    let mut m = self.read.split_to(1 + len);
                    m.advance(5);
                    return Ok((tag, m.freeze()));
                }
                self.read.reserve(1 + len - self.read.len());
            }
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read_buf(&mut self.read).await,
                Stream::Unix(s) => s.read_buf(&mut self.read).await,
            }
            .context("read from the source's replication session")?;
            if n == 0 {
                bail!("the source closed the replication session");
            }
        }
    }

    /// Run one command; its rows, each column as text (None for NULL).
    pub async fn command(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        if self.streaming {
            bail!("the replication session is streaming; no command can run");
        }
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let (mut rows, mut error) = (Vec::new(), None);
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'D' => {
                    let n = body
                        .try_get_u16()
                        .context("the source sent a short data row")?
                        as usize;
                    let mut row = Vec::with_capacity(n);
                    for _ in 0..n {
                        let len = body
                            .try_get_i32()
                            .context("the source sent a short data row")?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let len = len as usize;
                            if body.len() < len {
                                bail!("the source sent a short data row");
                            }
                            row.push(Some(
                                String::from_utf8_lossy(&body.split_to(len)).into_owned(),
                            ));
                        }
                    }
                    rows.push(row);
                }
                b'E' => error = Some(error_line(&body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(anyhow::anyhow!("{sql}: {e}")),
                        None => Ok(rows),
                    }
                }
                // RowDescription, CommandComplete, NoticeResponse, EmptyQueryResponse.
                _ => {}
            }
        }
    }

    /// Create a logical slot for pgoutput whose exported snapshot sees everything before its
    /// first change. The snapshot lives while this session runs nothing else.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        temporary: bool,
    ) -> anyhow::Result<SlotCreated> {
        let rows = self
            .command(&format!(
                "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
                haul_core::ident::quote_ident(slot),
                if temporary { " TEMPORARY" } else { "" }
            ))
            .await?;
        let row = rows
            .first()
            .context("CREATE_REPLICATION_SLOT returned no row")?;
        let col = |i: usize, what: &str| -> anyhow::Result<String> {
            row.get(i)
                .cloned()
                .flatten()
                .with_context(|| format!("CREATE_REPLICATION_SLOT returned no {what}"))
        };
        Ok(SlotCreated {
            slot: col(0, "slot name")?,
            consistent_point: col(1, "consistent point")?.parse()?,
            snapshot: col(2, "snapshot")?,
        })
    }

    /// Stream the slot's changes from `from` on, of the publications named.
    pub async fn start(
        &mut self,
        slot: &str,
        from: Lsn,
        publications: &[String],
    ) -> anyhow::Result<()> {
        let names = publications
            .iter()
            .map(|p| haul_core::ident::quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', publication_names {})",
            haul_core::ident::quote_ident(slot),
            haul_core::ident::quote_literal(&names)
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => {
                    self.streaming = true;
                    return Ok(());
                }
                b'E' => bail!("{sql}: {}", error_line(&body)),
                _ => {}
            }
        }
    }

    /// The next thing the stream carries.
    pub async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'd' => match body.first().copied() {
                    Some(b'w') if body.len() >= 25 => {
                        body.advance(1);
                        let wal_start = Lsn(body.get_u64());
                        let wal_end = Lsn(body.get_u64());
                        let _sent_at = body.get_i64();
                        return Ok(Event::Data {
                            wal_start,
                            wal_end,
                            message: body,
                        });
                    }
                    Some(b'k') if body.len() >= 18 => {
                        body.advance(1);
                        let wal_end = Lsn(body.get_u64());
                        let _sent_at = body.get_i64();
                        return Ok(Event::Keepalive {
                            wal_end,
                            reply: body.get_u8() == 1,
                        });
                    }
                    other => bail!(
                        "the source sent a replication message haul does not know ({:?}, {} bytes)",
                        other.map(|c| c as char),
                        body.len()
                    ),
                },
                b'c' => {
                    self.streaming = false;
                    return Ok(Event::End);
                }
                b'E' => bail!("the replication stream failed: {}", error_line(&body)),
                _ => {}
            }
        }
    }

    /// Tell the source that everything up to `applied` is applied (written, flushed and
    /// applied on the target): the slot may let go of the WAL before it.
    pub async fn confirm(&mut self, applied: Lsn) -> anyhow::Result<()> {
        self.status(applied, false).await
    }

    /// A standby status update at `applied`; with `reply`, the source answers with a
    /// keepalive at once, which tells how far it has sent (a follower waiting to reach a
    /// position on an idle source asks this way instead of waiting for the next keepalive).
    pub async fn status(&mut self, applied: Lsn, reply: bool) -> anyhow::Result<()> {
        let mut m = Vec::with_capacity(34);
        m.push(b'r');
        for _ in 0..3 {
            m.extend_from_slice(&applied.0.to_be_bytes());
        }
        m.extend_from_slice(&now_pg_micros().to_be_bytes());
        m.push(u8::from(reply));
        frontend::CopyData::new(&m[..])?.write(&mut self.write);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers the startup with a truncated authentication message: an error,
    /// not a panic.
    #[tokio::test]
    async fn a_short_message_from_the_server_is_an_error() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut startup = [0u8; 256];
                let _ = s.read(&mut startup).await;
                let _ = s.write_all(b"R\0\0\0\x04").await;
                let _ = s.read(&mut startup).await;
            }
        });
        let url = haul_core::pg::DbUrl::parse(
            &format!("postgres://u:p@127.0.0.1:{port}/db"),
            haul_core::pg::Side::Source,
        )?;
        let err = match super::Replication::connect(&url, "test").await {
            Ok(_) => anyhow::bail!("a truncated message was taken"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("short authentication message"), "{err}");
        Ok(())
    }

    #[test]
    fn error_fields_read_as_one_line() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        assert_eq!(
            super::error_line(body),
            "replication slot \"x\" does not exist [SQLSTATE 42704]"
        );
    }
}
