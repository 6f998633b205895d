//! Live progress of a real move: `haul status --wait` on a terminal (a pseudo-terminal made by
//! util-linux `script`) draws a bar for the job and one for each table in flight, each with
//! rows, bytes raw and on the wire, rate, ETA and retries, and the job's with the cap; off a
//! terminal the same command prints plain lines.

mod common;

use std::process::Command;

use common::moves::{self, Setup};
use common::procs::HAUL;

/// The screen as text: escape sequences out, carriage returns as line ends.
fn screen(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters final-byte. Colours and weights (final byte m) are
                // dropped; a cursor move or a line clear ends a line.
                let mut last = None;
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            last = Some(d);
                            break;
                        }
                    }
                }
                if last != Some('m') {
                    out.push('\n');
                }
            }
            '\r' => out.push('\n'),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn status_wait_draws_bars_on_a_terminal_and_lines_off_it() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        bulk_mb: 24,
        chunk_size: Some("2MB"),
        bwlimit: Some("4MB"),
        ..Default::default()
    })?;
    m.wait_for_chunks(2)?;
    let cmd = format!(
        "stty cols 200 rows 40; {HAUL} status --coordinator {} --certs {} --wait",
        m.coord, m.certs
    );
    let dir = tempfile::tempdir()?;
    let typescript = dir.path().join("typescript");
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd])
        .arg(&typescript)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "status --wait on a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(&typescript)?;
    let shown = screen(&raw);
    // Bars fill the terminal's width, so one may follow another on the same line of the
    // typescript: each is found by its start and read up to its last field.
    let bar = |start: &str, end: &str, must: &str| -> Option<String> {
        shown.match_indices(start).find_map(|(i, _)| {
            let rest = &shown[i..];
            let bar = &rest[..rest.find(end)? + end.len()];
            bar.contains(must).then(|| bar.to_string())
        })
    };
    let job_bar = bar("copying [", "cap 4", " MB/s read")
        .unwrap_or_else(|| panic!("no job bar while copying:\n{shown}"));
    for part in [
        "%",
        "chunks ",
        "rows ",
        "read, ",
        "on the wire",
        "ETA ",
        "retried ",
        "wire ",
    ] {
        assert!(job_bar.contains(part), "job bar lacks {part:?}: {job_bar}");
    }
    let table_bar = bar("public.bulk", "retried ", "in flight)")
        .unwrap_or_else(|| panic!("no bar for public.bulk in flight:\n{shown}"));
    for part in ["[", "chunks ", "rows ", "on the wire"] {
        assert!(
            table_bar.contains(part),
            "table bar lacks {part:?}: {table_bar}"
        );
    }
    assert!(shown.contains("result     done"), "no summary:\n{shown}");

    // Off a terminal: plain progress lines on stderr, no escape sequences.
    let out = Command::new(HAUL)
        .args([
            "status",
            "--coordinator",
            &m.coord,
            "--certs",
            &m.certs,
            "--wait",
        ])
        .output()?;
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "escape sequences off a terminal: {err:?}"
    );
    assert!(err.contains("done") && err.contains("retried 0"), "{err}");
    Ok(())
}
