//! Pieces shared by the roles: the block codec, identifiers and quoting, chunk planning,
//! schema-script handling, table digests, bandwidth limits and PostgreSQL connection helpers.
//!
//! Invariant: this crate knows no role. It holds pure logic and thin PostgreSQL helpers that
//! sender and receiver both need, so that both ends of the wire agree by construction.

pub mod bandwidth;
pub mod change_batch;
pub mod change_sql;
pub mod chunk;
pub mod chunk_rows;
pub mod codec;
pub mod digest;
pub mod failpoint;
pub mod frames;
pub mod ident;
pub mod large_object;
pub mod pg;
pub mod pgoutput;
pub mod row_digest;
pub mod schedule;
pub mod schema_script;
pub mod sequence;
pub mod state;
pub mod status;

/// Raw bytes per block: what a sender accumulates before compressing and sending one frame.
/// Large enough that compression ratios are good and per-frame overhead is negligible; small
/// enough that a resend after a cut costs little and memory per stream stays bounded.
pub const BLOCK_BYTES: usize = 1 << 20;

/// The largest raw block any decoder accepts. A frame claiming more is corrupt or hostile.
pub const MAX_BLOCK_BYTES: usize = 8 << 20;

/// gRPC message cap on both sides: one compressed block plus framing.
pub const MAX_MESSAGE_BYTES: usize = MAX_BLOCK_BYTES + (1 << 20);
