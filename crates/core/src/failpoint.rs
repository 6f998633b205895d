//! Named fault-injection points, for tests that must make a rare failure happen on purpose
//! (a spool file altered on disk between verification and restore, say). Armed only through
//! the environment: `HAUL_FAILPOINTS=name[,name...]`. Each armed point fires once per process.
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
            tracing::warn!("failpoint {name} fired");
            true
        }
        None => false,
    }
}
