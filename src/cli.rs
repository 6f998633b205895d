//! The command line. Every flag of the agent and operator commands can also come from a TOML
//! file given with `--config`: top-level keys apply to every command, a table named after the
//! command (`[sender]`, `[start]`, ...) to that command only; a flag on the command line wins.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "haul",
    version,
    about = "Move PostgreSQL databases between datacenters: compressed, verified, resumable, over mTLS gRPC",
    propagate_version = true
)]
pub struct Cli {
    /// A TOML file with defaults for any flag (see README).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. info, debug, haul_sender=debug (also RUST_LOG).
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// How log lines are written: text for people, or json (one object a line: timestamp,
    /// level, message and fields such as job, chunk and agent) for log collectors.
    #[arg(long, global = true, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make or extend the certificate authority every agent trusts.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the coordinator: plans jobs, leases chunks, tracks progress.
    Coordinator(CoordinatorArgs),
    /// Run a receiver beside the target database.
    Receiver(ReceiverArgs),
    /// Run a sender beside the source database.
    Sender(SenderArgs),
    /// Start a move on a running coordinator.
    Start(StartArgs),
    /// Show a job's progress and result.
    Status(StatusArgs),
    /// Change a running job's bandwidth cap: a rate, off, or a timetable.
    Bwlimit(BwlimitArgs),
    /// Pause a running job: its leases are revoked and nothing more of it is sent, until
    /// `haul resume`.
    Pause(SteerArgs),
    /// Resume a paused job: chunks continue at the byte offsets the receivers hold.
    Resume(SteerArgs),
    /// Cancel a job for good: its leases are revoked and what it wrote to the target is undone,
    /// so the target is as the preflight found it; prints what was undone and anything left.
    Cancel(CancelArgs),
    /// End a --follow job, once the application's writes to the source are stopped: apply
    /// everything up to the source's current position, set the sequences, verify, drop the
    /// slot, publication and ledger.
    Cutover(CutoverArgs),
    /// A dry run: what a move with these flags would do (tables, chunks in order, what the
    /// preflight would refuse, an estimate), writing nothing anywhere.
    Plan(PlanArgs),
    /// Move a database on one host: all three roles in this process, still over mTLS on loopback.
    Copy(CopyArgs),
    /// Compare two databases chunk by chunk (row digests), and their large objects and
    /// sequences, or a finished job's source and target through its agents (--coordinator);
    /// exits non-zero on any difference.
    Verify(VerifyArgs),
    /// Throwaway clusters, sample data, a whole move across three processes, verified.
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a CA and one certificate per role (coordinator, sender, receiver, operator).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A DNS name or IP the servers are reached by (repeatable). Default: localhost, loopback and this host's name.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Certificate validity in days.
        #[arg(long, default_value_t = haul_certs::DEFAULT_DAYS)]
        days: u32,
        /// Replace an existing CA (every agent must get new certificates).
        #[arg(long)]
        force: bool,
    },
    /// Issue one more agent certificate from the CA in DIR (written to DIR/NAME.pem and DIR/NAME.key).
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// coordinator, sender, receiver or operator.
        #[arg(long)]
        role: String,
        /// The agent's name; pass it to the agent as --name.
        #[arg(long)]
        name: String,
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = haul_certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Revoke the certificate DIR/NAME.pem: add it to the CA's revocation list DIR/crl.pem.
    Revoke {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A role (sender, receiver, …) or a name given to `haul certs issue`.
        #[arg(long)]
        name: String,
    },
}

#[derive(Args, Debug, Default)]
pub struct CoordinatorArgs {
    /// Address to listen on, e.g. 0.0.0.0:7400.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory for the coordinator's sled state.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Directory with ca.pem and this agent's certificate.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics on this address: plain HTTP on a loopback
    /// address (this host only), anywhere else HTTPS that requires an operator certificate.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Serve --http as HTTPS with operator certificates even on a loopback address.
    #[arg(long)]
    pub http_tls: bool,
    /// A chunk lease not renewed within this long goes to another sender, e.g. 60s (the default).
    #[arg(long, value_name = "DURATION")]
    pub lease_timeout: Option<String>,
    /// The time zone bandwidth timetables are read in (IANA name, e.g. Europe/Berlin); UTC by
    /// default.
    #[arg(long, value_name = "NAME")]
    pub time_zone: Option<String>,
}

#[derive(Args, Debug, Default)]
pub struct ReceiverArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Address to listen on for senders.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address senders dial, if not the listen address (NAT, 0.0.0.0).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Target database URL, postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long, value_name = "URL", env = "HAUL_TARGET")]
    pub target: Option<String>,
    /// Directory for this agent's local state.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Directory where arriving chunks are spooled before restore.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// The most the spool may hold (default 16GB; 0 = only the disk's size). A full spool holds
    /// streams back until chunks are restored.
    #[arg(long, value_name = "SIZE")]
    pub spool_size: Option<String>,
    /// Directory with ca.pem (and crl.pem, if any) and this agent's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Agent name; its certificate is CERTS/NAME.pem if that exists, else CERTS/receiver.pem.
    #[arg(long)]
    pub name: Option<String>,
    /// Chunks restored at once (target connections).
    #[arg(long)]
    pub slots: Option<usize>,
}

#[derive(Args, Debug, Default)]
pub struct SenderArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Source database URL, postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long, value_name = "URL", env = "HAUL_SOURCE")]
    pub source: Option<String>,
    /// Directory for this agent's local state.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Directory with ca.pem (and crl.pem, if any) and this agent's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Agent name; its certificate is CERTS/NAME.pem if that exists, else CERTS/sender.pem.
    #[arg(long)]
    pub name: Option<String>,
    /// Chunks read at once (source connections; a chunk still crossing a slow link on its own
    /// keeps its connection, idle, until it ends).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Local disk for staging chunks ahead of the link, so a restarted sender continues them
    /// instead of reading them again under a new snapshot (default 2GB; 0 turns staging off).
    #[arg(long, value_name = "SIZE")]
    pub staging_size: Option<String>,
    /// The pg_dump to use (default: the newest installed; it must be of the source's major
    /// version or newer).
    #[arg(long, value_name = "PATH")]
    pub pg_dump: Option<PathBuf>,
}

/// What to move and how: shared by `start` and `copy`.
#[derive(Args, Debug, Default, Clone)]
pub struct JobArgs {
    /// Chunks each sender reads from the source at once. On a path where each TCP flow is
    /// slow, a chunk read whole goes on crossing while its reader takes the next, up to
    /// --connections chunks in flight.
    #[arg(long)]
    pub jobs: Option<u32>,
    /// auto (each sender picks per block and per table, from the wire and its CPU), zstd,
    /// zstd:LEVEL, lz4 or none. `adaptive` is an old name for auto.
    #[arg(long)]
    pub codec: Option<String>,
    /// TCP connections from each sender to each receiver (1 to 64), and the chunks it may
    /// have in flight (at least --jobs); each stream goes on the least busy connection.
    /// Default: up to 16, one per stream in flight.
    #[arg(long, value_name = "N")]
    pub connections: Option<u32>,
    /// One cap on wire bytes per second for the whole job, divided among its senders: a rate
    /// (50MB, 400Mbit), off, or a timetable such as
    /// "Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off" (in the coordinator's time zone).
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
    /// Only these tables: comma-separated globs on schema.table or table.
    #[arg(long, value_name = "PATTERN")]
    pub tables: Option<String>,
    /// Leave these tables out (comma-separated globs on schema.table or table); the rest of
    /// the database moves, as with pg_dump --exclude-table.
    #[arg(long, value_name = "PATTERN")]
    pub exclude_tables: Option<String>,
    /// Only these schemas: comma-separated globs on schema names. Their tables move, and their
    /// other objects (functions, types, views) with them, as with pg_dump --schema.
    #[arg(long, value_name = "PATTERN")]
    pub schemas: Option<String>,
    /// Leave these schemas out, with everything in them (comma-separated globs), as with
    /// pg_dump --exclude-schema.
    #[arg(long, value_name = "PATTERN")]
    pub exclude_schemas: Option<String>,
    /// Split tables larger than this into chunks, e.g. 256MB (a job smaller than 32 chunks of
    /// it is cut finer, down to 16MiB, so the last chunks do not trail on single flows).
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// The target already has the schema: load rows only (tables must exist and be empty).
    #[arg(long)]
    pub no_schema: bool,
    /// Skip the final row-count and digest comparison.
    #[arg(long)]
    pub no_verify: bool,
    /// Leave the `haul` schema (the ledger of applied chunks) on the target when the job is
    /// done; by default it is dropped once the move is verified.
    #[arg(long)]
    pub keep_ledger: bool,
    /// Do not carry owners: every object belongs to the target user (pg_dump --no-owner).
    #[arg(long)]
    pub no_owner: bool,
    /// Do not carry privileges: no GRANT or REVOKE (pg_dump --no-privileges).
    #[arg(long)]
    pub no_privileges: bool,
    /// Create the roles the moved objects need (owners, grantees) when the target lacks them,
    /// without passwords.
    #[arg(long)]
    pub roles: bool,
    /// With --roles: give the created roles their source password hashes (needs a superuser
    /// on the source).
    #[arg(long, requires = "roles")]
    pub role_passwords: bool,
}

#[derive(Args, Debug, Default)]
pub struct StartArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory with ca.pem (and crl.pem, if any) and this agent's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    #[command(flatten)]
    pub job: JobArgs,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub wait: bool,
    /// After the bulk copy, keep applying the source's changes (from a logical replication
    /// slot whose snapshot the copy reads) until `haul cutover`. Needs wal_level = logical on
    /// the source and a source user with REPLICATION that owns the tables.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: give tables without a primary key or replica identity REPLICA IDENTITY
    /// FULL on the source (else the job refuses them, as publishing them would make the
    /// source's own UPDATE and DELETE on them fail).
    #[arg(long, requires = "follow")]
    pub replica_identity_full: bool,
}

#[derive(Args, Debug, Default)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub steer: SteerArgs,
    /// Wait until the target has caught up, is verified and the job is done, then print the
    /// final lag, the verification result and how long writes were stopped.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long (e.g. 10m); the cutover goes on.
    #[arg(long, value_name = "DURATION", requires = "wait")]
    pub timeout: Option<String>,
    /// First make the source database refuse new writes: its new sessions start read only
    /// (default_transaction_read_only) and its other sessions are ended. The summary says how
    /// to undo it.
    #[arg(long)]
    pub read_only_source: bool,
}

#[derive(Args, Debug, Default)]
pub struct StatusArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory with ca.pem (and crl.pem, if any) and this agent's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Job id; default the latest.
    #[arg(long)]
    pub job: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug, Default)]
pub struct BwlimitArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory with ca.pem and the operator's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Job id; default the latest.
    #[arg(long)]
    pub job: Option<String>,
    /// A rate (200Mbit, 25MB), off, or a timetable such as
    /// "Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off" (in the coordinator's time zone).
    #[arg(value_name = "RATE|off|TIMETABLE")]
    pub spec: String,
}

#[derive(Args, Debug, Default)]
pub struct SteerArgs {
    /// The coordinator to talk to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory with ca.pem and the operator's certificate and key.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Job id; default the latest.
    #[arg(long)]
    pub job: Option<String>,
}

#[derive(Args, Debug, Default)]
pub struct CancelArgs {
    #[command(flatten)]
    pub steer: SteerArgs,
    /// Undo nothing: leave the target as the job left it, and say what is there.
    #[arg(long)]
    pub keep_target: bool,
    /// Return once the coordinator has the cancel, without waiting for the undo.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug, Default)]
pub struct PlanArgs {
    #[arg(long, value_name = "URL", env = "HAUL_SOURCE")]
    pub source: Option<String>,
    /// Check this target as a receiver's preflight would (read only).
    #[arg(long, value_name = "URL", env = "HAUL_TARGET")]
    pub target: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
    /// The link's rate, for an estimate at it (e.g. 100Mbit, 25MB).
    #[arg(long, value_name = "RATE")]
    pub link_rate: Option<String>,
    /// Print the plan as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default)]
pub struct CopyArgs {
    #[arg(long, value_name = "URL", env = "HAUL_SOURCE")]
    pub source: Option<String>,
    #[arg(long, value_name = "URL", env = "HAUL_TARGET")]
    pub target: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
    /// Keep state, spool and certificates here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The pg_dump to use (default: the newest installed; it must be of the source's major
    /// version or newer).
    #[arg(long, value_name = "PATH")]
    pub pg_dump: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
pub struct VerifyArgs {
    #[arg(long, value_name = "URL", env = "HAUL_SOURCE")]
    pub source: Option<String>,
    #[arg(long, value_name = "URL", env = "HAUL_TARGET")]
    pub target: Option<String>,
    /// Verify a finished job through its agents instead: the coordinator, HOST:PORT (its
    /// sender reads the source, its receiver the target; no URL is needed here).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["source", "target", "chunk_size", "no_owner", "no_privileges"])]
    pub coordinator: Option<String>,
    /// With --coordinator: the directory with ca.pem and the operator's certificate and key.
    #[arg(long, value_name = "DIR", requires = "coordinator")]
    pub certs: Option<PathBuf>,
    /// With --coordinator: the job to verify; default the latest.
    #[arg(long, requires = "coordinator")]
    pub job: Option<String>,
    /// Only these tables: comma-separated globs on schema.table or table.
    #[arg(long, value_name = "PATTERN")]
    pub tables: Option<String>,
    /// Compare tables larger than this in chunks of about this size (by integer key).
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Chunks compared at once (connections to each database).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Large objects' owners are not compared (the move was made with --no-owner).
    #[arg(long)]
    pub no_owner: bool,
    /// Large objects' privileges are not compared (the move was made with --no-privileges).
    #[arg(long)]
    pub no_privileges: bool,
}

#[derive(Args, Debug, Default)]
pub struct DemoArgs {
    /// Rows in the demo's big table (it is split into chunks).
    #[arg(long, default_value_t = 400_000)]
    pub rows: u64,
    /// Leave the clusters and files in place and print where they are.
    #[arg(long)]
    pub keep: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
