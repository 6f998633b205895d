//! Fuzzes `haul_core::codec::decode`, the one block decoder every received frame goes through.
//!
//! Input layout: `[selector: u8][n: u32 LE][payload ...]`. `selector % 3` picks the codec
//! (none, lz4, zstd:3); `selector / 3 % 4` picks how `raw_len` is derived from `n`:
//! 0 = small (`n & 0xffff`), 1 = any u32 (mostly beyond the cap), 2 = within 2 of
//! `MAX_BLOCK_BYTES`, 3 = round trip (the payload is raw data: encode, then decode).
//!
//! Checks: no panic; an accepted block has exactly `raw_len <= MAX_BLOCK_BYTES` bytes; decoding
//! allocates no more than the cap plus a copy of the payload; `decode(encode(x), x.len()) == x`
//! and a frame that lies about its length by one byte either way is refused.

#![no_main]

use haul_core::codec::{decode, Codec};
use haul_core::MAX_BLOCK_BYTES;
use libfuzzer_sys::fuzz_target;

#[path = "common/alloc_meter.rs"]
mod alloc_meter;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// Room for error messages and other small bookkeeping on top of the block itself.
const SLACK: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((n, payload)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let n = u32::from_le_bytes(*n);
    let codec = match selector % 3 {
        0 => Codec::None,
        1 => Codec::Lz4,
        _ => Codec::Zstd { level: 3 },
    };
    let raw_len = match selector / 3 % 4 {
        0 => (n & 0xffff) as usize,
        1 => n as usize,
        2 => MAX_BLOCK_BYTES - 2 + (n % 5) as usize,
        _ => return round_trip(codec, payload),
    };
    check_decode(codec, payload, raw_len);
});

/// Decode one frame and check the cap, whatever the outcome.
fn check_decode(codec: Codec, payload: &[u8], raw_len: usize) -> Option<Vec<u8>> {
    let (result, usage) = alloc_meter::measure(|| decode(codec, payload, raw_len));
    let bound = MAX_BLOCK_BYTES.min(raw_len) + payload.len() + SLACK;
    assert!(
        usage.peak_above_start <= bound,
        "{codec}: decoding {} payload bytes declared as {raw_len} raw peaked at {} bytes (bound {bound})",
        payload.len(),
        usage.peak_above_start
    );
    assert!(
        usage.largest_single <= MAX_BLOCK_BYTES.max(payload.len()),
        "{codec}: one allocation of {} bytes",
        usage.largest_single
    );
    let out = result.ok()?;
    assert!(raw_len <= MAX_BLOCK_BYTES, "{codec}: accepted raw_len {raw_len} over the cap");
    assert_eq!(out.len(), raw_len, "{codec}: accepted a block of the wrong length");
    if codec == Codec::None {
        assert_eq!(out, payload, "none: output differs from payload");
    }
    Some(out)
}

fn round_trip(codec: Codec, raw: &[u8]) {
    let enc = codec
        .encode(raw)
        .unwrap_or_else(|e| panic!("{codec}: encode of {} bytes failed: {e:#}", raw.len()));
    let dec = check_decode(codec, &enc, raw.len());
    assert!(
        dec.as_deref() == Some(raw),
        "{codec}: decode(encode(x)) != x for {} bytes (got {:?})",
        raw.len(),
        dec.map(|d| d.len())
    );
    assert!(
        check_decode(codec, &enc, raw.len() + 1).is_none(),
        "{codec}: accepted a frame declaring one byte more than it holds"
    );
    if let Some(short) = raw.len().checked_sub(1) {
        assert!(
            check_decode(codec, &enc, short).is_none(),
            "{codec}: accepted a frame declaring one byte less than it holds"
        );
    }
}
