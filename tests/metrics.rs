//! The coordinator's `/metrics` during a real move, read with curl and parsed by a Prometheus
//! text-format parser; and who may read it: plain HTTP on loopback, HTTPS with an operator
//! certificate anywhere else (`--http-tls` here), refused without a certificate and with 403
//! for another role's.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::moves::{self, Setup};
use common::procs::{self, free_addr, haul};

/// `curl` a URL with extra arguments: (exit success, HTTP status, body).
fn curl(url: &str, extra: &[&str]) -> (bool, u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.success(),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

/// Samples of one scrape, by metric name: (labels, value).
type Samples = HashMap<String, Vec<(HashMap<String, String>, f64)>>;

fn scrape(addr: &str) -> anyhow::Result<Samples> {
    let (ok, code, body) = curl(&format!("http://{addr}/metrics"), &[]);
    anyhow::ensure!(ok && code == 200, "GET /metrics: {code} {body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines)?;
    let mut out = Samples::new();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let labels: HashMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.entry(s.metric).or_default().push((labels, value));
    }
    Ok(out)
}

fn one(s: &Samples, name: &str) -> f64 {
    s.get(name)
        .and_then(|v| v.first())
        .map_or(f64::NAN, |(_, v)| *v)
}

#[test]
fn metrics_during_a_move_parse_and_move_on() -> anyhow::Result<()> {
    let http = free_addr();
    let m = moves::start(Setup {
        coordinator_args: vec!["--http".into(), http.clone()],
        ..Default::default()
    })?;
    m.wait_for_chunks(2)?;
    let first = scrape(&http)?;
    let raw_first = one(&first, "haul_raw_bytes_total");
    assert!(raw_first > 0.0, "{first:?}");
    // Types as the text format declared them (the parser keeps them per sample).
    let ups = first.get("haul_agent_up").cloned().unwrap_or_default();
    for role in ["sender", "receiver"] {
        assert!(
            ups.iter()
                .any(|(l, v)| l.get("role").map(String::as_str) == Some(role) && *v == 1.0),
            "no {role} up: {ups:?}"
        );
    }
    let chunks = first.get("haul_chunks").cloned().unwrap_or_default();
    let total: f64 = chunks.iter().map(|(_, v)| v).sum();
    let status = m.status().unwrap_or_default();
    assert_eq!(
        total,
        status["chunks"].as_f64().unwrap_or(-1.0),
        "{chunks:?}"
    );
    assert!(
        one(&first, "haul_cap_bytes_per_second") > 0.0,
        "the move runs under a cap"
    );

    // The counters move on while the move does.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = scrape(&http)?;
        if one(&now, "haul_raw_bytes_total") > raw_first {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "raw bytes never grew: {now:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    m.finish()?;
    let end = scrape(&http)?;
    let done = end.get("haul_job_phase").cloned().unwrap_or_default();
    assert!(
        done.iter()
            .any(|(l, v)| l.get("phase").map(String::as_str) == Some("done") && *v == 1.0),
        "{done:?}"
    );
    assert_eq!(one(&end, "haul_job_paused"), 0.0);
    let (_, code, _) = curl(&format!("http://{http}/nothing"), &[]);
    assert_eq!(code, 404);
    Ok(())
}

#[test]
fn metrics_over_https_need_an_operator_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let certs = d("certs");
    assert!(
        haul(&["certs", "init", "--dir", &certs, "--host", "127.0.0.1"])
            .status
            .success()
    );
    let (coord, http) = (free_addr(), free_addr());
    let _coordinator = procs::spawn(
        dir.path(),
        "coordinator",
        &[
            "--listen",
            &coord,
            "--state",
            &d("cstate"),
            "--certs",
            &certs,
            "--http",
            &http,
            "--http-tls",
        ],
    )?;
    let url = format!("https://{http}/metrics");
    let ca = format!("{certs}/ca.pem");
    let as_role = |role: &str| {
        curl(
            &url,
            &[
                "--cacert",
                &ca,
                "--cert",
                &format!("{certs}/{role}.pem"),
                "--key",
                &format!("{certs}/{role}.key"),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ok, code, body) = loop {
        let r = as_role("operator");
        if r.1 == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ok && code == 200, "operator: {code} {body}");
    assert!(
        body.contains("# TYPE haul_raw_bytes_total counter"),
        "{body}"
    );

    // No client certificate: the handshake fails, no page at all.
    let (ok, code, _) = curl(&url, &["--cacert", &ca]);
    assert!(
        !ok && code == 0,
        "served without a client certificate: {code}"
    );
    // Another role's certificate: 403, naming what is needed.
    let (_, code, body) = as_role("sender");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("role operator"), "{body}");
    // The dashboard and its data, on the same port, under the same rule.
    for path in ["/", "/api/status"] {
        let url = format!("https://{http}{path}");
        let args = [
            "--cacert".to_string(),
            ca.clone(),
            "--cert".into(),
            format!("{certs}/sender.pem"),
            "--key".into(),
            format!("{certs}/sender.key"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, code, _) = curl(&url, &args);
        assert_eq!(code, 403, "{path} for a sender");
        let (ok, code, _) = curl(&url, &["--cacert", &ca]);
        assert!(!ok && code == 0, "{path} without a certificate: {code}");
    }
    // Plain HTTP on the TLS port gets nothing either.
    let (_, code, _) = curl(&format!("http://{http}/metrics"), &[]);
    assert_ne!(code, 200);
    Ok(())
}
