//! One throwaway PostgreSQL cluster: made by `initdb`, run by `pg_ctl`, removed on drop.
//!
//! Everything about it is chosen so that many can run at once on one machine and start quickly:
//! a fresh temporary directory each, a loopback-only TCP port picked by binding `127.0.0.1:0`
//! (the kernel knows which ports are free; guessing and sleeping does not), the Unix socket inside
//! the data directory rather than in `/var/run/postgresql`, and `fsync`/`full_page_writes` off
//! because nothing in a test cluster has to survive a power cut (a process crash it does survive:
//! see [`Cluster::kill`]).
//!
//! Layout of [`Cluster::dir`]:
//! - `data/` – the data directory (`PGDATA`), which also holds the Unix socket;
//! - `postgres.log` – the server log, tailed into error messages by [`Cluster::log_tail`].

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::Context;

use crate::account::ServerUser;
use crate::bin::pg_bin;

/// The superuser every cluster is made with.
const SUPERUSER: &str = "haul";

/// How many ports to try when another process grabs the one we picked before the server binds it.
const START_ATTEMPTS: usize = 5;

/// Seconds `pg_ctl -w` waits for the server to accept connections or to stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Lines of server log quoted in error messages.
const LOG_LINES_IN_ERRORS: usize = 20;

/// Longest path a Unix socket address can hold on Linux (`sun_path` minus the trailing NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How to make a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `max_locks_per_transaction`; raise it for databases with many thousands of tables.
    pub max_locks_per_transaction: Option<u32>,
    /// `max_connections`; the PostgreSQL default (100) when `None`.
    pub max_connections: Option<u32>,
    /// More `postgresql.conf` settings, appended last so they win. Values are written quoted,
    /// so pass them bare: `("wal_level", "logical")`.
    pub extra_conf: Vec<(String, String)>,
    /// Password of the superuser `haul`.
    pub password: String,
    /// Where to make the cluster's temporary directory; [`std::env::temp_dir`] when `None`.
    pub base_dir: Option<PathBuf>,
    /// The server programs (`initdb`, `pg_ctl`, `postgres`) to run, for a cluster of another
    /// major version than the machine's ([`crate::other_major`]); the machine's when `None`.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            max_locks_per_transaction: None,
            max_connections: None,
            extra_conf: Vec::new(),
            password: SUPERUSER.to_string(),
            base_dir: None,
            bin_dir: None,
        }
    }
}

/// A throwaway cluster, listening on `127.0.0.1` only, with the superuser `haul`.
///
/// Local (socket) connections are trusted; TCP connections need the password (scram-sha-256).
/// Dropping it stops the server (`pg_ctl -m immediate`) and removes its directory, unless
/// [`Cluster::keep`] was called.
#[derive(Debug)]
pub struct Cluster {
    /// Owns the directory's removal; `None` once [`Cluster::keep`] has been called.
    temp: Option<tempfile::TempDir>,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    password: String,
    user: ServerUser,
    pg_ctl: PathBuf,
    running: bool,
}

impl Cluster {
    /// Makes and starts a cluster.
    pub fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            !opts.password.is_empty() && !opts.password.contains(['\n', '\r']),
            "cluster password must be one non-empty line"
        );
        let (initdb, pg_ctl) = match &opts.bin_dir {
            Some(dir) => (dir.join("initdb"), dir.join("pg_ctl")),
            None => (pg_bin("initdb")?, pg_bin("pg_ctl")?),
        };

        let base = opts.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let temp = tempfile::Builder::new()
            .prefix("haul-pg-")
            .tempdir_in(&base)
            .with_context(|| format!("create cluster directory in {}", base.display()))?;
        let root = temp.path().to_path_buf();
        let user = ServerUser::for_dir(&root)?;
        user.give(&root)?;

        let data = root.join("data");
        let socket_len = data.as_os_str().len() + "/.s.PGSQL.65535".len();
        anyhow::ensure!(
            socket_len <= MAX_SOCKET_PATH,
            "cluster directory {} is too deep for a Unix socket path ({socket_len} > \
             {MAX_SOCKET_PATH} bytes); use a shorter base_dir",
            root.display()
        );

        let mut cluster = Cluster {
            temp: Some(temp),
            log: root.join("postgres.log"),
            root,
            data,
            port: 0,
            password: opts.password.clone(),
            user,
            pg_ctl,
            running: false,
        };
        cluster.initdb(&initdb)?;
        let base_conf = std::fs::read_to_string(cluster.data.join("postgresql.conf"))
            .context("read postgresql.conf written by initdb")?;

        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port()?;
            std::fs::write(
                cluster.data.join("postgresql.conf"),
                format!("{base_conf}{}", cluster.conf_block(&opts)),
            )
            .context("write postgresql.conf")?;
            let log_start = std::fs::metadata(&cluster.log)
                .map(|m| m.len())
                .unwrap_or(0);
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    tracing::debug!(port = cluster.port, dir = %cluster.root.display(), "postgres started");
                    return Ok(cluster);
                }
                Err(e) if attempt < START_ATTEMPTS && cluster.port_was_taken(log_start) => {
                    tracing::debug!(
                        port = cluster.port,
                        "port taken before postgres bound it, retrying: {e:#}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        anyhow::bail!("start postgres: no free port after {START_ATTEMPTS} attempts")
    }

    /// The TCP port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory: `data/` (the data directory) and `postgres.log` live here.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The data directory (`PGDATA`), `dir()/data`.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://haul:<pw>@127.0.0.1:<port>/<db>`, with the password and name percent-encoded.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{}",
            percent_encode(&self.password),
            self.port,
            percent_encode(db)
        )
    }

    /// Creates database `name` (quoted, so any spelling is kept).
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .with_context(|| format!("create database {name}"))?;
        Ok(())
    }

    /// Runs `sql` (any number of statements, fed on stdin) with
    /// `psql -X -q -v ON_ERROR_STOP=1 -At` over TCP, returning what it printed without the final
    /// newline: query results only, one row per line, columns separated by `|`.
    ///
    /// TCP with `PGPASSWORD` rather than the socket, so it works whichever user we are.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let psql = pg_bin("psql")?;
        let mut child = Command::new(&psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-A",
                "-t",
                "-f",
                "-",
                "-d",
            ])
            .arg(self.conninfo(db))
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", psql.display()))?;
        let mut stdin = child.stdin.take().context("open psql's stdin")?;
        // Feed stdin from another thread: psql may fill its stdout pipe before it has read all
        // of a long script, and we only drain stdout in `wait_with_output`.
        let output = std::thread::scope(|s| {
            s.spawn(move || {
                // A write error means psql exited early; its stderr says why.
                let _ = stdin.write_all(sql.as_bytes());
            });
            child.wait_with_output()
        })
        .context("wait for psql")?;
        if !output.status.success() {
            anyhow::bail!(
                "psql on database {db} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let mut stdout = String::from_utf8(output.stdout).context("decode psql output as UTF-8")?;
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(stdout)
    }

    /// Stops the server with `pg_ctl -m fast`, keeping the directory; see [`Cluster::start_again`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Starts the server again, on the same port, after [`Cluster::stop`] or [`Cluster::kill`].
    /// Does nothing if it is running.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.running {
            return Ok(());
        }
        self.pg_ctl_start()
    }

    /// Stops the server with `pg_ctl -m immediate`: no checkpoint, so the next start does crash
    /// recovery, as after `kill -9` of a production server. Every acknowledged commit survives
    /// (`synchronous_commit` is on and the OS still holds the unsynced writes).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_stop("immediate")
    }

    /// Keeps the directory when this is dropped (the server is still stopped, cleanly), so a
    /// failed run can be examined or restarted by hand with `pg_ctl -D <dir>/data start`.
    pub fn keep(&mut self) {
        if let Some(temp) = self.temp.take() {
            let path = temp.keep();
            tracing::info!(dir = %path.display(), "keeping postgres cluster directory");
        }
    }

    /// The last `lines` lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no server log at {}: {e})", self.log.display()),
        }
    }

    fn initdb(&self, initdb: &Path) -> anyhow::Result<()> {
        // initdb wants the password in a file; the directory is private to the server user.
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).context("write password file")?;
        self.user.give(&pwfile)?;
        let mut cmd = Command::new(initdb);
        cmd.arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        // Older initdb (before 14) has no --no-instructions; its instructions only go to the log.
        let version = Command::new(initdb)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let major: u32 = version
            .split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if major >= 14 {
            cmd.arg("--no-instructions");
        }
        let result = self.run_server_cmd(cmd, "initdb");
        let _ = std::fs::remove_file(&pwfile);
        if let (Err(e), ServerUser::Switch { .. }) = (&result, self.user) {
            anyhow::bail!(
                "{e:#} (as root, initdb runs as the postgres user, which must be able to reach {})",
                self.root.display()
            );
        }
        result?;
        Ok(())
    }

    /// The settings appended to initdb's `postgresql.conf`.
    fn conf_block(&self, opts: &ClusterOptions) -> String {
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.data.display().to_string(),
            ),
            // A test cluster never has to survive a crash of the machine, so nothing is fsynced.
            // `synchronous_commit` stays on: with fsync off it costs one write() per commit, and
            // it makes `kill()` behave like a real server crash, which keeps every acknowledged
            // commit. With it off, an immediate stop loses the last ~200ms of commits, and resume
            // tests would see "committed" rows vanish.
            ("fsync".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
        ];
        if let Some(n) = opts.max_connections {
            settings.push(("max_connections".into(), n.to_string()));
        }
        if let Some(n) = opts.max_locks_per_transaction {
            settings.push(("max_locks_per_transaction".into(), n.to_string()));
        }
        settings.extend(opts.extra_conf.iter().cloned());
        let mut block = String::from("\n# Added by haul-pgcluster for a throwaway test cluster.\n");
        for (key, value) in settings {
            block.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        block
    }

    fn pg_ctl_start(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.pg_ctl);
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s", "start"]);
        self.run_server_cmd(cmd, "start postgres")
            .with_context(|| {
                format!(
                    "server log {}:\n{}",
                    self.log.display(),
                    self.log_tail(LOG_LINES_IN_ERRORS)
                )
            })?;
        self.running = true;
        Ok(())
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = Command::new(&self.pg_ctl);
        cmd.arg("-D").arg(&self.data).args([
            "-m",
            mode,
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "-s",
            "stop",
        ]);
        self.run_server_cmd(cmd, "stop postgres")?;
        self.running = false;
        Ok(())
    }

    /// Whether the server log written since byte `from` says the port was already in use.
    fn port_was_taken(&self, from: u64) -> bool {
        let Ok(bytes) = std::fs::read(&self.log) else {
            return false;
        };
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
        let new = String::from_utf8_lossy(&bytes[from..]);
        new.contains("Address already in use") || new.contains("could not bind")
    }

    /// Runs a server-side program as the server user, from the cluster directory (the server
    /// user may not be able to see our working directory), failing with its stderr.
    fn run_server_cmd(&self, mut cmd: Command, what: &str) -> anyhow::Result<Output> {
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.user.apply(&mut cmd);
        let output = cmd
            .output()
            .with_context(|| format!("{what}: run {:?}", cmd.get_program()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            anyhow::bail!(
                "{what} failed ({}): {}",
                output.status,
                format!("{} {}", stderr.trim(), stdout.trim()).trim()
            );
        }
        Ok(output)
    }

    /// A libpq connection string for `db` over TCP, with everything spelled out so the caller's
    /// `PG*` environment cannot redirect it.
    fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} sslmode=disable dbname='{}'",
            self.port,
            db.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A kept directory gets a clean shutdown so it can be restarted without recovery.
        let mode = if self.temp.is_some() {
            "immediate"
        } else {
            "fast"
        };
        if let Err(e) = self.pg_ctl_stop(mode) {
            tracing::warn!(dir = %self.root.display(), "failed to stop postgres on drop: {e:#}");
        }
        // `temp` is dropped after this, removing the directory.
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1:0 to pick a port")?;
    Ok(listener.local_addr().context("read picked port")?.port())
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL user info and paths.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"We"ird"#), r#""We""ird""#);
        assert_eq!(percent_encode("p@ss:w/rd é"), "p%40ss%3Aw%2Frd%20%C3%A9");
        assert_eq!(percent_encode("haul"), "haul");
    }
}
