//! Running the server programs as a non-root account.
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root. When we are root (containers, CI) we
//! run them as the `postgres` account that the distribution's package created, and hand it the
//! cluster directory. Without libc and without `unsafe`, the account is looked up in `/etc/passwd`
//! and the switch is done by `std::os::unix::process::CommandExt::{uid, gid}`, which also drops
//! root's supplementary groups.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

/// The account PostgreSQL packages create and that the server runs as when we are root.
const SERVER_ACCOUNT: &str = "postgres";

/// Who the server-side programs run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerUser {
    /// Run them as ourselves (we are not root).
    Current,
    /// Run them as this uid/gid (we are root; this is the `postgres` account).
    Switch { uid: u32, gid: u32 },
}

impl ServerUser {
    /// Decides who runs the server, given a directory we just created (its owner is our
    /// effective uid, which spares us a libc call to find it).
    pub(crate) fn for_dir(fresh_dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(fresh_dir)
            .with_context(|| format!("stat {}", fresh_dir.display()))?;
        if meta.uid() != 0 {
            return Ok(ServerUser::Current);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
        let (uid, gid) = find_account(&passwd, SERVER_ACCOUNT).with_context(|| {
            format!(
                "running as root, and PostgreSQL refuses root, but there is no usable \
                 `{SERVER_ACCOUNT}` account in /etc/passwd to run it as; create one or run as a \
                 non-root user"
            )
        })?;
        Ok(ServerUser::Switch { uid, gid })
    }

    /// Makes `cmd` run as this user.
    pub(crate) fn apply(self, cmd: &mut Command) {
        if let ServerUser::Switch { uid, gid } = self {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Gives `path` to this user so the server can write there.
    pub(crate) fn give(self, path: &Path) -> anyhow::Result<()> {
        if let ServerUser::Switch { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {} to {SERVER_ACCOUNT}", path.display()))?;
        }
        Ok(())
    }
}

/// Finds `name`'s uid and gid in the text of an `/etc/passwd` file.
fn find_account(passwd: &str, name: &str) -> anyhow::Result<(u32, u32)> {
    let line = passwd
        .lines()
        .find(|line| line.split(':').next() == Some(name))
        .with_context(|| format!("no `{name}` line"))?;
    let fields: Vec<&str> = line.split(':').collect();
    let uid = fields
        .get(2)
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("bad uid in `{line}`"))?;
    let gid = fields
        .get(3)
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("bad gid in `{line}`"))?;
    anyhow::ensure!(uid != 0, "`{name}` has uid 0");
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_account_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresx:x:7:7::/:/bin/false\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            find_account(passwd, "postgres").expect("present"),
            (101, 104)
        );
        assert!(find_account(passwd, "nobody").is_err());
        assert!(find_account("postgres:x:zz:1::/:/bin/sh", "postgres").is_err());
        assert!(find_account("postgres:x:0:0::/:/bin/sh", "postgres").is_err());
    }
}
