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

/// Find a PostgreSQL client program: `$HAUL_PG_BIN`, then `PATH`, then the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout). A newer pg_dump can dump older servers.
pub fn find_tool(name: &str) -> anyhow::Result<std::path::PathBuf> {
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
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            crate::status::fatal(format!(
                "{name} not found: install the PostgreSQL client (Debian/Ubuntu: apt-get install postgresql-client) or set HAUL_PG_BIN to its bin directory"
            ))
        })
}

#[cfg(test)]
mod tests {
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
