//! The fault harness shared by the integration tests and the benchmarks: a link emulator to put
//! between agents, and haul's roles as real processes that can be killed with SIGKILL and
//! restarted on the same state, and a whole move of three role processes to break things in.
//!
//! Invariant: nothing here knows haul's internals. It forwards bytes and runs the binary, so a
//! test that passes through it tests what an operator would run.

mod agent;
mod link;
pub mod moves;

pub use agent::{free_addr, Agent};
pub use link::Link;
