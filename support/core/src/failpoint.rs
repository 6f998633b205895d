//! Named fault-injection points, for tests that must make a rare failure happen on purpose
//! (a spool file altered on disk between verification and restore, say). Armed only through
//! the environment: `HAUL_FAILPOINTS=name[,name...]`. Each armed point fires once per process;
//! with `HAUL_FAILPOINTS_ONCE_DIR=dir` it fires once across restarts too (a marker file in `dir`
//! remembers it), so a test can kill a role at a point and restart it with the same environment.
//! Unarmed, a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static ARMED: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
static ANY: AtomicBool = AtomicBool::new(true);

/// True exactly once for each point named in `HAUL_FAILPOINTS`.
pub fn fire(name: &str) -> bool {
    if !ANY.load(Ordering::Relaxed) {
        return false;
    }
    let armed = ARMED.get_or_init(|| {
        let list: Vec<String> = std::env::var("HAUL_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Mutex::new(list)
    });
    let Ok(mut list) = armed.lock() else {
        return false;
    };
    if list.is_empty() {
        ANY.store(false, Ordering::Relaxed);
        return false;
    }
    match list.iter().position(|n| n == name) {
        Some(i) => {
            list.remove(i);
            if let Some(dir) = std::env::var_os("HAUL_FAILPOINTS_ONCE_DIR") {
                let marker = std::path::Path::new(&dir).join(format!("{name}.fired"));
                if std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&marker)
                    .is_err()
                {
                    return false;
                }
            }
            tracing::warn!("failpoint {name} fired");
            true
        }
        None => false,
    }
}

/// At an armed point, end the process on the spot, as `kill -9` would: no flushing, no
/// draining, no goodbye to peers.
pub fn die(name: &str) {
    if fire(name) {
        std::process::abort();
    }
}

/// At an armed point, hold this task still for a few seconds (`HAUL_FAILPOINT_STALL_MS`,
/// default 5000), so a test can kill another role while this one is in the middle of a step.
pub async fn stall(name: &str) {
    if fire(name) {
        let ms = std::env::var("HAUL_FAILPOINT_STALL_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(5000);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
