//! Fuzzes `haul_core::schema_script::Script::parse`, which cuts a pg_dump plain-text schema
//! script into TOC entries. The input is any bytes, read as UTF-8 (lossily).
//!
//! Checks: no panic; every entry's `sql` is non-empty, not just whitespace, ends in a newline and
//! does not end in a blank, `--` or "dump complete" line; header fields are single lines; the
//! preamble holds no comments or blank lines; and nothing is invented: every line of the
//! preamble and of every entry is a line of the input (ignoring trailing carriage returns:
//! `str::lines` strips a `\r\n` pair, so a line ending in a stray `\r` may lose it on the way).

#![no_main]

use std::collections::HashSet;

use haul_core::schema_script::Script;
use libfuzzer_sys::fuzz_target;

/// A line without the carriage returns that end it.
fn bare(line: &str) -> &str {
    line.trim_end_matches('\r')
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let script = Script::parse(&text);
    let input_lines: HashSet<&str> = text.lines().map(bare).collect();

    for line in script.preamble.split_terminator('\n').map(bare) {
        assert!(!line.trim().is_empty(), "blank line in preamble");
        assert!(!line.starts_with("--"), "comment in preamble: {line:?}");
        assert!(input_lines.contains(line), "preamble line not in input: {line:?}");
    }
    assert!(script.preamble.is_empty() || script.preamble.ends_with('\n'));

    for e in &script.entries {
        assert!(!e.sql.is_empty(), "empty sql in {e:?}");
        assert!(!e.sql.trim().is_empty(), "whitespace-only sql in {e:?}");
        assert!(e.sql.ends_with('\n'), "sql without final newline in {e:?}");
        let last = e.sql.lines().last().unwrap_or_default();
        assert!(
            !last.trim().is_empty()
                && last.trim() != "--"
                && !last.starts_with("-- PostgreSQL database dump complete"),
            "untrimmed tail {last:?} in {e:?}"
        );
        for field in [&e.kind, &e.name, &e.schema] {
            assert!(!field.contains('\n'), "multi-line header field in {e:?}");
        }
        for line in e.sql.split_terminator('\n').map(bare) {
            assert!(input_lines.contains(line), "sql line not in input: {line:?}");
        }
    }
});
