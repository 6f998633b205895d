//! Throwaway PostgreSQL clusters built from the machine's own PostgreSQL installation.
//!
//! `haul demo` and the integration tests both need real servers to move data between, and they
//! need many of them, side by side, without touching any cluster the machine already runs. This
//! crate makes one with `initdb` in a fresh temporary directory, starts it with `pg_ctl` on a free
//! loopback port, and tears it down on drop. The API is synchronous (plain `std::process`) so it
//! can be used from `main`, from sync tests and from inside async tests alike.
//!
//! PostgreSQL refuses to run as root, and our CI runs as root, so when the effective user is root
//! the server-side programs run as the `postgres` account instead (see [`account`]). Clients
//! (`psql`, `pg_dump`, the agents) always talk over TCP with a password, so they work whoever runs
//! them.

mod account;
mod bin;
mod cluster;
mod compare;

pub use bin::{other_major, pg_bin, OTHER_MAJORS_DIR};
pub use cluster::{Cluster, ClusterOptions};
pub use compare::{compare_databases, compare_databases_with, Compare};
