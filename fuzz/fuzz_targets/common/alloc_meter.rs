//! A global allocator that measures what the code under test allocates, so a target can assert
//! a memory bound itself. libFuzzer's own `-malloc_limit_mb` needs sanitizer malloc hooks, which
//! a `--sanitizer none` build (all a stable toolchain can do) does not have.
//!
//! Only Rust allocations are seen: memory that C code (libzstd) takes with `malloc` is not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

/// What one measured call allocated: its peak above the live bytes at the start, and its
/// largest single request.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub peak_above_start: usize,
    pub largest_single: usize,
}

/// Run `f` and report how much it allocated.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    let start = LIVE.load(Relaxed);
    PEAK.store(start, Relaxed);
    LARGEST.store(0, Relaxed);
    let out = f();
    let usage = Usage {
        peak_above_start: PEAK.load(Relaxed).saturating_sub(start),
        largest_single: LARGEST.load(Relaxed),
    };
    (out, usage)
}
