//! PostgreSQL connections for the agents: one place that connects, pins the session settings
//! haul relies on, and turns driver errors into one line an operator can act on.
//!
//! Invariant: passwords never appear in messages; URLs are shown as user@host:port/db.

use std::str::FromStr;

use anyhow::Context;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// Settings that make text output identical on both ends (verification digests) and keep
/// binary COPY and catalog reads predictable.
pub const DETERMINISTIC_SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET client_min_messages = 'warning'; SET statement_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0";

/// Which end a connection is for, to name it in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Side::Source => "--source",
            Side::Target => "--target",
        }
    }
}

/// A parsed database URL that can describe itself without its password.
#[derive(Clone)]
pub struct DbUrl {
    raw: String,
    config: Config,
    side: Side,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl DbUrl {
    pub fn parse(raw: &str, side: Side) -> anyhow::Result<DbUrl> {
        let config = Config::from_str(raw).map_err(|e| {
            anyhow::anyhow!(
                "{} database URL is not valid ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DBNAME",
                side.as_str()
            )
        })?;
        if config.get_dbname().is_none() {
            anyhow::bail!(
                "{} database URL names no database; expected postgres://USER:PASSWORD@HOST:PORT/DBNAME",
                side.as_str()
            );
        }
        Ok(DbUrl {
            raw: raw.to_string(),
            config,
            side,
        })
    }

    /// The URL as given (with password): only for handing to child tools like pg_dump.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// The parsed connection settings (for sessions tokio-postgres cannot open, replication).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("")
    }

    /// user@host:port/db, no password.
    pub fn redacted(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            self.config.get_user().unwrap_or("?"),
            self.dbname()
        )
    }

    /// Connect, pin session settings, and spawn the connection task.
    pub async fn connect(&self, application: &str) -> anyhow::Result<Client> {
        let mut config = self.config.clone();
        config.application_name(application);
        config.connect_timeout(std::time::Duration::from_secs(15));
        let (client, conn) = config
            .connect(NoTls)
            .await
            .map_err(|e| anyhow::anyhow!("{}", self.describe(&e)))?;
        let side = self.side.as_str();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("{side} connection ended: {e}");
            }
        });
        client
            .batch_execute(DETERMINISTIC_SESSION)
            .await
            .with_context(|| format!("set up session on {} database", self.side.as_str()))?;
        Ok(client)
    }

    /// One line saying what went wrong connecting and what to do.
    pub fn describe(&self, e: &tokio_postgres::Error) -> String {
        let side = self.side.as_str();
        let at = self.redacted();
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let what = match code {
                "28P01" => format!(
                    "password authentication failed; check the password in {}",
                    self.side.flag()
                ),
                "28000" => format!(
                    "the server refused this user or host ({}); check pg_hba.conf and the user in {}",
                    db.message(),
                    self.side.flag()
                ),
                "3D000" => format!(
                    "database {:?} does not exist; create it or fix {}",
                    self.dbname(),
                    self.side.flag()
                ),
                "53300" => "too many connections; raise max_connections or lower --jobs".to_string(),
                "57P03" => "the server is starting up or shutting down; retry shortly".to_string(),
                _ => format!("{} ({code})", db.message()),
            };
            return format!("cannot connect to {side} database {at}: {what}");
        }
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        format!(
            "cannot connect to {side} database {at}: {cause}; is PostgreSQL running there and reachable from this host?"
        )
    }
}

/// Describe any driver error in one line: the server's message and detail when there is one.
pub fn db_error_line(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut cause = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                cause = s.to_string();
                src = s.source();
            }
            cause
        }
    }
}

/// Every `name` program installed, newest PostgreSQL major first: `HAUL_PG_BIN`, then Debian's
/// one directory per major (`/usr/lib/postgresql/N/bin`), then `PATH`.
fn installed_tools(name: &str) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("HAUL_PG_BIN") {
        dirs.push(d.into());
    }
    let mut versioned: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versioned.into_iter().map(|(_, p)| p));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut out: Vec<std::path::PathBuf> = Vec::new();
    for p in dirs
        .into_iter()
        .map(|d| d.join(name))
        .filter(|p| p.is_file())
    {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The major version a `pg_dump --version` line names ("pg_dump (PostgreSQL) 15.14 (Debian…)").
pub fn parse_tool_major(version_line: &str) -> Option<u32> {
    let v = version_line.split(')').nth(1)?.split_whitespace().next()?;
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A server's major version from its `server_version_num` (150014 -> 15, 90624 -> 9).
pub fn server_major(version_num: i32) -> u32 {
    (version_num.max(0) / 10000) as u32
}

fn tool_major(path: &std::path::Path) -> Option<u32> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_tool_major(String::from_utf8_lossy(&out.stdout).trim())
}

/// The pg_dump to dump a source of `server_version_num`: `explicit` if given, else the newest
/// installed. pg_dump refuses servers newer than itself, so one older than the source is an
/// error that names the source's version and what to install.
pub fn pg_dump_for(
    source_version_num: i32,
    explicit: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    let need = server_major(source_version_num);
    let candidates: Vec<std::path::PathBuf> = match explicit {
        Some(p) => {
            if !p.is_file() {
                return Err(crate::status::fatal(format!(
                    "--pg-dump {} is not a file; give the path of a pg_dump program",
                    p.display()
                )));
            }
            vec![p.to_path_buf()]
        }
        None => installed_tools("pg_dump"),
    };
    let mut best: Option<(u32, std::path::PathBuf)> = None;
    for p in candidates {
        if let Some(v) = tool_major(&p) {
            if best.as_ref().is_none_or(|(b, _)| v > *b) {
                best = Some((v, p));
            }
        }
    }
    match best {
        Some((v, p)) if v >= need => Ok(p),
        Some((v, p)) => Err(crate::status::fatal(format!(
            "the source runs PostgreSQL {need} but the newest pg_dump {} is {v} ({}); pg_dump must be of the \
             source's major version or newer: install it (Debian/Ubuntu: apt-get install postgresql-client-{need}) \
             or pass --pg-dump PATH",
            if explicit.is_some() { "given" } else { "installed" },
            p.display()
        ))),
        None => Err(crate::status::fatal(format!(
            "pg_dump not found (the source runs PostgreSQL {need}): install the PostgreSQL client \
             (Debian/Ubuntu: apt-get install postgresql-client-{need}), pass --pg-dump PATH, or set HAUL_PG_BIN"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_major_of_a_tool_and_a_server() {
        assert_eq!(
            parse_tool_major("pg_dump (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_tool_major("nonsense"), None);
        assert_eq!(server_major(150014), 15);
        assert_eq!(server_major(90624), 9);
        assert_eq!(server_major(180000), 18);
    }

    use super::*;

    #[test]
    fn redacts_password() {
        let u = DbUrl::parse("postgres://app:s3cret@db.example:6543/shop", Side::Source)
            .expect("parse");
        assert_eq!(u.redacted(), "app@db.example:6543/shop");
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[test]
    fn rejects_bad_urls_in_one_line() {
        for bad in ["postgres://host:notaport/db", "postgres://u@h:5432"] {
            let e = DbUrl::parse(bad, Side::Target).expect_err(bad).to_string();
            assert!(e.starts_with("target database URL"), "{e}");
            assert!(!e.contains('\n'));
        }
    }
}
