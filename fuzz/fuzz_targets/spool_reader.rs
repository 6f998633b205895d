//! Fuzzes the reading of frame files (`haul_core::frames::FrameReader`, then the one capped
//! decoder), which is how the receiver reads its spool back before rows are restored (and
//! before it offers a resume offset), and how the sender reads its staging area.
//!
//! Input layout: `[codec: u8][spool file ...]`; the file is frames of
//! `[raw_len: u32 LE][payload_len: u32 LE][payload]`.
//!
//! Checks: reading never panics or loops forever; every block returned is at most
//! `MAX_BLOCK_BYTES`; no single allocation exceeds `MAX_MESSAGE_BYTES`.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use haul_core::codec::{decode, Codec};
use haul_core::frames::FrameReader;
use haul_core::{MAX_BLOCK_BYTES, MAX_MESSAGE_BYTES};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "common/alloc_meter.rs"]
mod alloc_meter;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build tokio runtime")
    })
}

fn spool_path() -> &'static PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        DIR.get_or_init(|| tempfile::tempdir().expect("create temp dir"))
            .path()
            .join("chunk.spool")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let codec = match selector % 3 {
        0 => Codec::None,
        1 => Codec::Lz4,
        _ => Codec::Zstd { level: 3 },
    };
    let path = spool_path();
    std::fs::write(path, file).expect("write spool file");

    let (blocks, usage) = alloc_meter::measure(|| {
        runtime().block_on(async {
            let mut r = FrameReader::open(path).await.expect("open spool file");
            let mut blocks = 0usize;
            // Every frame consumes at least its 8-byte header, so a file of n bytes yields
            // at most n / 8 + 1 results before the end or an error.
            for _ in 0..=file.len() / 8 + 1 {
                match r.next_frame().await {
                    Ok(Some(frame)) => {
                        let codec = frame.codec_or(codec);
                        let Ok(block) = decode(codec, &frame.payload, frame.raw_len as usize)
                        else {
                            return blocks;
                        };
                        assert!(block.len() <= MAX_BLOCK_BYTES, "block of {} bytes", block.len());
                        blocks += 1;
                    }
                    Ok(None) | Err(_) => return blocks,
                }
            }
            panic!("spool reader did not finish a {}-byte file", file.len());
        })
    });
    assert!(
        usage.largest_single <= MAX_MESSAGE_BYTES,
        "one allocation of {} bytes reading {blocks} blocks",
        usage.largest_single
    );
});
