//! The dashboard in a real headless browser (Debian's `chromium`) during a real move: the page
//! loads from the coordinator's `--http` port, shows the job's progress, tables and agents, and
//! its progress changes as the move goes on. A screenshot is kept at
//! `target/test-artifacts/dashboard.png`. Who may load it is tested with the metrics
//! (`tests/metrics.rs`): the same server, the same rule.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::moves::{self, Setup};
use common::procs::free_addr;

fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> anyhow::Result<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .map_err(|e| anyhow::anyhow!("run chromium (scripts/setup installs it): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The text inside the element with `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let Some(start) = dom.find(&format!("id=\"{id}\"")) else {
        return String::new();
    };
    let rest = &dom[start..];
    let open = rest.find('>').map_or(rest.len(), |i| i + 1);
    let close = rest[open..].find('<').map_or(0, |i| i);
    rest[open..open + close].trim().to_string()
}

#[test]
fn the_dashboard_shows_a_move_and_follows_it() -> anyhow::Result<()> {
    let http = free_addr();
    let m = moves::start(Setup {
        coordinator_args: vec!["--http".into(), http.clone()],
        bulk_mb: 16,
        ..Default::default()
    })?;
    let profile = tempfile::tempdir()?;
    let url = format!("http://{http}/");
    m.wait_for_chunks(2)?;

    let first = chromium(profile.path(), &["--dump-dom"], &url)?;
    let chunks_first = text_of(&first, "chunks");
    assert!(
        chunks_first.contains(" / "),
        "no progress rendered: {chunks_first:?}\n{first}"
    );
    assert!(text_of(&first, "phase").starts_with("copying"), "{first}");
    assert!(
        text_of(&first, "cap").contains("Mbit/s"),
        "cap: {}",
        text_of(&first, "cap")
    );
    for shown in ["public.bulk", ">sender", ">receiver", "raw-line"] {
        assert!(first.contains(shown), "{shown} not on the page:\n{first}");
    }

    // Progress changes as the move goes on.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut later;
    loop {
        std::thread::sleep(Duration::from_secs(2));
        later = chromium(profile.path(), &["--dump-dom"], &url)?;
        if text_of(&later, "raw") != text_of(&first, "raw") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the page never changed: {}",
            text_of(&later, "raw")
        );
    }
    // The throughput chart has points once there are two samples.
    let line = later
        .split("id=\"raw-line\"")
        .nth(1)
        .and_then(|r| r.split('>').next())
        .unwrap_or_default();
    assert!(
        line.contains("points=\"") && !line.contains("points=\"\""),
        "no chart drawn: {line}"
    );

    let shot_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&shot_dir)?;
    let shot = shot_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1500",
            "--hide-scrollbars",
        ],
        &url,
    )?;
    let png = std::fs::read(&shot)?;
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "screenshot of {} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    m.finish()?;
    Ok(())
}
