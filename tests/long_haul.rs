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

/// One source reader (`--jobs 1`), 40 MB uncompressed in chunks big enough to be staged (4 MB
/// and more, five or six of them), through a link that holds each TCP connection to 2 MB/s.
fn one_reader_slow_flows() -> anyhow::Result<Move> {
    Move::new(Setup {
        bin: common::procs::HAUL.into(),
        link_to_receiver: true,
        link_connection_rate: 2_000_000,
        bulk_mb: 40,
        chunk_size: Some("8MB"),
        jobs: Some("1"),
        bwlimit: Some("0"),
        codec: Some("none"),
        ..Default::default()
    })
}

/// Chunks read whole keep crossing while their worker reads the next: with one source reader
/// (`--jobs 1`) on a path that holds each TCP connection to 2 MB/s, several chunks cross at
/// once, each on a connection of its own (haul's choice of connections), once the first
/// receipts show that the flows, not the receiver or a cap, hold the streams back.
#[test]
fn chunks_read_whole_cross_while_the_next_chunk_is_read() -> anyhow::Result<()> {
    let m = one_reader_slow_flows()?;
    m.finish()?;
    let sender_log = m.sender.log_text();
    let link = m.to_receiver.as_ref().expect("a link to the receiver");
    assert!(
        link.connections() >= 3,
        "one source reader, yet chunks should cross side by side on their own connections; the link saw {} connections",
        link.connections()
    );
    assert!(
        sender_log.contains("crosses on its own"),
        "the sender never let a chunk cross on its own"
    );
    Ok(())
}

/// A sender killed while chunks cross on their own (their reader already on the next chunk)
/// loses none of them: after its restart the job ends equal, each chunk once in the ledger
/// (`Move::finish` compares source and target outside haul and reads the ledger).
#[test]
fn a_sender_killed_while_chunks_cross_on_their_own_loses_none() -> anyhow::Result<()> {
    let mut m = one_reader_slow_flows()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !m.sender.log_text().contains("crosses on its own") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no chunk crossed on its own within 60 s:\n{}",
            m.sender.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m.sender.restart()?;
    let end = m.finish()?;
    assert_eq!(end["phase"], "done", "{end}");
    Ok(())
}

/// `--codec auto` (the default) on a slow link: the streams wait on the wire far longer than
/// they compress, so the sender climbs to a better ratio, and status says which codecs the
/// chunks took.
#[test]
fn codec_auto_climbs_to_a_better_ratio_on_a_slow_link() -> anyhow::Result<()> {
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        link_to_receiver: true,
        bulk_mb: 32,
        chunk_size: Some("1MB"),
        jobs: Some("2"),
        bwlimit: Some("0"),
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

/// `--codec auto` judges each table on its own: a table of random bytes (already-compressed
/// files, ciphertext) crosses uncompressed, so no CPU goes to compressing it, while the table
/// beside it, which shrinks, is compressed.
#[test]
fn codec_auto_sends_a_table_that_does_not_compress_uncompressed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("random.sql");
    // 6000 rows of 1 KB of md5 output decoded to bytes: as good as random to any codec.
    std::fs::write(
        &fixture,
        "CREATE TABLE public.files (id int PRIMARY KEY, body bytea NOT NULL);\n\
         INSERT INTO public.files SELECT g, (SELECT decode(string_agg(md5(random()::text || g || i), ''), 'hex') \
         FROM generate_series(1, 64) AS i) FROM generate_series(1, 6000) AS g;\n",
    )?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        bulk_mb: 6,
        chunk_size: Some("64MB"),
        bwlimit: Some("8MB"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let end = m.finish()?;
    let table = |name: &str| {
        end["table_progress"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["table"] == name))
            .map(|t| {
                (
                    t["raw_bytes_done"].as_u64().unwrap_or(0),
                    t["wire_bytes_done"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default()
    };
    let (files_raw, files_wire) = table("public.files");
    let (bulk_raw, bulk_wire) = table("public.bulk");
    assert!(files_raw > 6_000_000, "files moved {files_raw} raw bytes");
    assert!(
        bulk_wire * 3 < bulk_raw,
        "the table that compresses crossed as {bulk_wire} of {bulk_raw} bytes"
    );
    let log = m.sender.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("does not compress") && l.contains("public.files")),
        "the sender did not judge public.files:\n{log}"
    );
    let codecs = end["codecs"].as_str().unwrap_or_default();
    assert!(codecs.contains("none"), "codecs used: {codecs}");
    // What the judgement saves is CPU, not bytes: uncompressed, the table crosses at its size.
    assert!(
        files_wire <= files_raw + files_raw / 50,
        "files crossed as {files_wire} of {files_raw} bytes"
    );
    Ok(())
}
