//! Long, lossy links: one TCP flow on such a path gets only about MSS / (RTT * sqrt(loss)),
//! which the link emulator models as a cap per connection. Chunk streams spread over several
//! connections (`--connections`) then move the same data in a fraction of the time.

mod common;

use std::time::Instant;

use haul_faults::moves::{Move, Setup};

/// Move 6 MB, uncompressed, through a link that gives each TCP connection 1 MB/s. Returns the
/// seconds from start to done and the connections the link saw.
fn move_with(connections: &'static str) -> anyhow::Result<(f64, u64)> {
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        link_to_receiver: true,
        link_connection_rate: 1_000_000,
        connections: Some(connections),
        bulk_mb: 6,
        chunk_size: Some("512kB"),
        jobs: Some("4"),
        bwlimit: Some("0"),
        codec: Some("none"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let start = Instant::now();
    m.finish()?;
    let secs = start.elapsed().as_secs_f64();
    let link = m.to_receiver.as_ref().expect("a link to the receiver");
    Ok((secs, link.connections()))
}

#[test]
fn several_connections_fill_a_path_one_flow_cannot() -> anyhow::Result<()> {
    let (one, one_conns) = move_with("1")?;
    let (four, four_conns) = move_with("4")?;
    assert!(
        four_conns >= 4,
        "4 connections asked, the link saw {four_conns}"
    );
    assert!(
        one_conns < four_conns,
        "{one_conns} connections with --connections 1"
    );
    assert!(
        one / four > 1.8,
        "1 connection: {one:.1} s, 4 connections: {four:.1} s"
    );
    Ok(())
}

/// `--codec adaptive` on a slow link: the streams wait on the wire far longer than they compress,
/// so the sender climbs to a better ratio, and status says which codecs the chunks took.
#[test]
fn codec_adaptive_climbs_to_a_better_ratio_on_a_slow_link() -> anyhow::Result<()> {
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        link_to_receiver: true,
        bulk_mb: 32,
        chunk_size: Some("1MB"),
        jobs: Some("2"),
        bwlimit: Some("0"),
        codec: Some("adaptive"),
        drop_ledger: true,
        ..Default::default()
    })?;
    m.to_receiver
        .as_ref()
        .expect("a link to the receiver")
        .set_rate(1_000_000);
    let end = m.finish()?;
    let codecs = end["codecs"].as_str().unwrap_or_default().to_string();
    assert!(
        codecs.contains("zstd:6") || codecs.contains("zstd:9"),
        "codecs used: {codecs}"
    );
    Ok(())
}
