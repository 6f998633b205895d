//! Opening an agent's sled state. The state only makes resume fast (decision 1 of the brief:
//! the target's ledger is the authority), so state that cannot be opened (corrupt, or written
//! by an incompatible version) is moved aside with a warning and started afresh rather than
//! stopping the agent.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Open the sled database at `path`; if it cannot be opened, move it aside, say so, and open
/// an empty one. `what` names the state and what is lost, for the warning.
pub fn open_or_rebuild(path: &Path, what: &str, lost: &str) -> anyhow::Result<sled::Db> {
    match open(path) {
        Ok(db) => Ok(db),
        Err(e) => {
            let aside = aside_path(path);
            tracing::warn!(
                "{what} {} is unreadable ({e:#}); moved it to {} and started afresh: {lost}",
                path.display(),
                aside.display()
            );
            std::fs::rename(path, &aside)
                .with_context(|| format!("move unreadable {what} {} aside", path.display()))?;
            open(path)
        }
    }
}

fn open(path: &Path) -> anyhow::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(8 << 20)
        .open()
        .with_context(|| {
            format!(
                "open {} (is another agent using this --state directory?)",
                path.display()
            )
        })
}

fn aside_path(path: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".unreadable-{stamp}"));
    path.with_file_name(name)
}

/// A sled key for one chunk of a job: the job id, a zero byte, the chunk id big-endian (so a
/// job's chunks are one prefix scan).
pub fn chunk_key(job_id: &str, chunk_id: u64) -> Vec<u8> {
    let mut k = job_prefix(job_id);
    k.extend_from_slice(&chunk_id.to_be_bytes());
    k
}

pub fn job_prefix(job_id: &str) -> Vec<u8> {
    let mut k = job_id.as_bytes().to_vec();
    k.push(0);
    k
}

pub fn parse_chunk_key(k: &[u8]) -> Option<(String, u64)> {
    let zero = k.iter().position(|&b| b == 0)?;
    let job = std::str::from_utf8(&k[..zero]).ok()?.to_string();
    let id: [u8; 8] = k.get(zero + 1..)?.try_into().ok()?;
    Some((job, u64::from_be_bytes(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = chunk_key("job-1", 42);
        assert_eq!(parse_chunk_key(&k), Some(("job-1".to_string(), 42)));
        assert_eq!(parse_chunk_key(b"no-separator"), None);
        assert_eq!(parse_chunk_key(b"job\0short"), None);
    }
}
