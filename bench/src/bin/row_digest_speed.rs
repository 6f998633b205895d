//! How fast this CPU folds binary COPY data into row digests (`core::row_digest`), the work
//! verification adds on each end of a move. Reads binary COPY files, fed in 64 KiB pieces as
//! they come off a connection, and prints MB/s and ns per row for each.
//!
//!     psql -c "COPY t TO STDOUT (FORMAT binary)" > t.bin
//!     cargo build --release -p haul-bench
//!     ./target/release/row_digest_speed t.bin [more.bin ...]
//!
//! Every column is taken as a plain value (no type OIDs inside to zero).

use anyhow::Context;
use haul_core::row_digest::{CopyDigest, Shape};

fn main() -> anyhow::Result<()> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!files.is_empty(), "usage: row_digest_speed FILE.bin ...");
    for f in files {
        let data = std::fs::read(&f).with_context(|| format!("read {f}"))?;
        // The field count of the first row sizes the shapes.
        let columns = data
            .get(19..21)
            .map(|b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize)
            .context("not a binary COPY file")?;
        let mut best = f64::MAX;
        let mut rows = 0;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let mut d = CopyDigest::new(vec![Shape::Scalar; columns]);
            for piece in data.chunks(64 << 10) {
                d.update(piece)?;
            }
            let digest = d.finish()?;
            best = best.min(start.elapsed().as_secs_f64());
            rows = digest.rows;
        }
        println!(
            "{f}: {:.1} MB, {rows} rows: {:.0} MB/s, {:.0} ns/row (best of 3)",
            data.len() as f64 / 1e6,
            data.len() as f64 / 1e6 / best,
            best * 1e9 / rows.max(1) as f64
        );
    }
    Ok(())
}
