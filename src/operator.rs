//! Operator commands: start a job and follow it. Progress goes to stderr (bars on a terminal,
//! `crate::progress`; a line every few seconds otherwise); the summary goes to stdout.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use haul_certs::Role;
use haul_core::bandwidth::{parse_size, show_rate};
use haul_core::codec::CodecChoice;
use haul_core::status::fatal;
use haul_proto as pb;
use haul_proto::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::agents::{load_tls, parse_dial, required};
use crate::cli::{BwlimitArgs, CancelArgs, CutoverArgs, JobArgs, StartArgs, StatusArgs, SteerArgs};

pub const DEFAULT_CHUNK: &str = "256MB";

pub fn job_options(a: &JobArgs) -> anyhow::Result<pb::JobOptions> {
    let codec: CodecChoice = a
        .codec
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(|e: anyhow::Error| fatal(format!("--codec: {e}")))?;
    let codec_auto = matches!(codec, CodecChoice::Auto | CodecChoice::Adaptive);
    let (codec, level) = codec.resolve().to_wire();
    let bwlimit = a.bwlimit.clone().unwrap_or_default();
    let schedule =
        haul_core::schedule::Schedule::parse(if bwlimit.is_empty() { "off" } else { &bwlimit })
            .map_err(|e| fatal(format!("--bwlimit: {e:#}")))?;
    // A constant cap also goes as bytes, for coordinators from before timetables.
    let bw = if schedule.is_constant() {
        schedule.at(0).bytes_per_sec
    } else {
        0
    };
    let chunk = parse_size(a.chunk_size.as_deref().unwrap_or(DEFAULT_CHUNK))
        .map_err(|e| fatal(format!("--chunk-size: {e}")))?;
    let jobs = jobs_flag(a.jobs)?;
    let connections = match a.connections {
        None => 0,
        Some(n @ 1..=64) => n,
        Some(n) => {
            return Err(fatal(format!(
                "--connections {n} is out of range; use 1 to 64"
            )))
        }
    };
    let tables = table_patterns(a.tables.as_deref());
    let exclude_tables = table_patterns(a.exclude_tables.as_deref());
    Ok(pb::JobOptions {
        codec: codec as i32,
        zstd_level: level,
        chunk_bytes: chunk,
        bwlimit_bytes: bw,
        bwlimit,
        connections,
        codec_auto,
        exclude_tables,
        schemas: table_patterns(a.schemas.as_deref()),
        exclude_schemas: table_patterns(a.exclude_schemas.as_deref()),
        create_schema: !a.no_schema,
        verify: !a.no_verify,
        tables,
        jobs,
        keep_ledger: a.keep_ledger,
        no_owner: a.no_owner,
        no_privileges: a.no_privileges,
        create_roles: a.roles,
        role_passwords: a.role_passwords,
        // Set by `start --follow` (see `follow_options`).
        follow: false,
        replica_identity_full: false,
    })
}

/// `--jobs`, 4 by default, within 1 to 256.
pub fn jobs_flag(jobs: Option<u32>) -> anyhow::Result<u32> {
    let jobs = jobs.unwrap_or(4);
    if jobs == 0 || jobs > 256 {
        return Err(fatal(format!(
            "--jobs {jobs} is out of range; use 1 to 256"
        )));
    }
    Ok(jobs)
}

/// `--tables`: comma-separated globs, empty ones dropped.
pub fn table_patterns(tables: Option<&str>) -> Vec<String> {
    tables
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub async fn client(coordinator: &str, certs: &Path) -> anyhow::Result<CoordinatorClient<Channel>> {
    let tls = load_tls(certs, Role::Operator, "operator")?;
    let channel = haul_certs::connect(coordinator, &tls, Role::Coordinator).await?;
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(64 << 20))
}

pub async fn start(a: StartArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let certs = required(a.certs, "certs")?;
    let mut options = job_options(&a.job)?;
    options.follow = a.follow;
    options.replica_identity_full = a.replica_identity_full;
    let mut c = client(&coordinator, &certs).await?;
    let job_id = start_job(&mut c, options).await?;
    println!("started {job_id}");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let end = follow(&mut c, &job_id).await?;
    print_summary(&end);
    Ok(exit_code(&end))
}

/// `haul bwlimit`: change a running job's cap; every sender follows within about a second.
pub async fn bwlimit(a: BwlimitArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let certs = required(a.certs, "certs")?;
    haul_core::schedule::Schedule::parse(&a.spec).map_err(|e| fatal(format!("{e:#}")))?;
    let mut c = client(&coordinator, &certs).await?;
    let r = c
        .set_bandwidth(pb::SetBandwidthRequest {
            job_id: a.job.unwrap_or_default(),
            spec: a.spec,
        })
        .await
        .map_err(|s| fatal(s.message().to_string()))?
        .into_inner();
    println!("job {}: cap now {}", r.job_id, r.cap);
    Ok(ExitCode::SUCCESS)
}

/// `haul pause` and `haul resume`.
pub async fn steer(a: SteerArgs, steer: pb::Steer) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let certs = required(a.certs, "certs")?;
    let mut c = client(&coordinator, &certs).await?;
    let r = c
        .steer_job(pb::SteerJobRequest {
            job_id: a.job.unwrap_or_default(),
            steer: steer as i32,
            keep_target: false,
            read_only_source: false,
        })
        .await
        .map_err(|s| fatal(s.message().to_string()))?
        .into_inner();
    if r.paused {
        println!(
            "job {}: paused while {}; {} lease(s) revoked; `haul resume` continues it where it stopped",
            r.job_id, r.phase, r.leases_revoked
        );
    } else {
        println!("job {}: resumed ({})", r.job_id, r.phase);
    }
    Ok(ExitCode::SUCCESS)
}

/// A following job's state for `status --json`.
fn follow_json(f: &pb::FollowStatus) -> serde_json::Value {
    serde_json::json!({
        "slot": f.slot, "publication": f.publication, "applied_lsn": f.applied_lsn,
        "source_lsn": f.source_lsn, "apply_rate": f.apply_rate, "transactions": f.transactions,
        "retained_bytes": f.retained_bytes, "warning": f.warning, "cutover": f.cutover,
        "cutover_lsn": f.cutover_lsn, "writes_stopped_secs": f.writes_stopped_secs,
        "identity_full": f.identity_full, "cutover_pieces": f.cutover_pieces,
        "cutover_sequences": f.cutover_sequences, "read_only_source": f.read_only_source,
    })
}

/// `haul cutover`: the operator has stopped the application's writes; the job's follower
/// catches up with the source's position, sets the sequences, compares source and target and
/// drops the slot, publication and ledger. With `--wait`, this follows it to the end.
pub async fn cutover(a: CutoverArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(
        &required(a.steer.coordinator, "coordinator")?,
        "coordinator",
    )?;
    let certs = required(a.steer.certs, "certs")?;
    let timeout = a
        .timeout
        .as_deref()
        .map(|t| {
            humantime::parse_duration(t).map_err(|e| {
                fatal(format!(
                    "--timeout {t:?}: {e}; use a duration such as 90s or 10m"
                ))
            })
        })
        .transpose()?;
    let mut c = client(&coordinator, &certs).await?;
    let request = pb::SteerJobRequest {
        job_id: a.steer.job.unwrap_or_default(),
        steer: pb::Steer::Cutover as i32,
        keep_target: false,
        read_only_source: a.read_only_source,
    };
    // Asking twice is asking once: a coordinator that restarts just as it takes the request
    // (its reply lost) is asked again, for up to half a minute.
    let mut attempts = 0;
    let r = loop {
        match c.steer_job(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if attempts < 30
                    && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
            {
                attempts += 1;
                tracing::debug!("cutover request failed, asking again: {}", s.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(s) => return Err(fatal(s.message().to_string())),
        }
    };
    println!(
        "job {}: cutting over ({}); the target catches up with the source's position now",
        r.job_id, r.phase
    );
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let end = match timeout {
        Some(t) => match tokio::time::timeout(t, follow(&mut c, &r.job_id)).await {
            Ok(end) => end?,
            Err(_) => {
                return Err(fatal(format!(
                    "job {}: cutover not finished after {}; it goes on (haul status shows it)",
                    r.job_id,
                    humantime::format_duration(t)
                )))
            }
        },
        None => follow(&mut c, &r.job_id).await?,
    };
    print_summary(&end);
    Ok(exit_code(&end))
}

/// `haul cancel`: the coordinator revokes the job's leases and has a sender carry its undo to
/// the receiver; this follows it to the end and prints what was undone and what was left.
pub async fn cancel(a: CancelArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(
        &required(a.steer.coordinator, "coordinator")?,
        "coordinator",
    )?;
    let certs = required(a.steer.certs, "certs")?;
    let mut c = client(&coordinator, &certs).await?;
    let r = c
        .steer_job(pb::SteerJobRequest {
            job_id: a.steer.job.unwrap_or_default(),
            steer: pb::Steer::Cancel as i32,
            keep_target: a.keep_target,
            read_only_source: false,
        })
        .await
        .map_err(|s| fatal(s.message().to_string()))?
        .into_inner();
    println!(
        "job {}: cancelling; {} lease(s) revoked",
        r.job_id, r.leases_revoked
    );
    if a.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let s = follow(&mut c, &r.job_id).await?;
    print_summary(&s);
    if s.phase == "cancelled" {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(exit_code(&s))
    }
}

/// Whether a job in this phase is over (nothing more will happen to it).
pub fn is_over(phase: &str) -> bool {
    matches!(phase, "done" | "failed" | "cancelled")
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let certs = required(a.certs, "certs")?;
    let mut c = client(&coordinator, &certs).await?;
    let job_id = a.job.unwrap_or_default();
    let s = if a.wait {
        let id = fetch(&mut c, &job_id, false).await?.job_id;
        follow(&mut c, &id).await?;
        fetch(&mut c, &id, a.json).await?
    } else {
        fetch(&mut c, &job_id, a.json).await?
    };
    if a.json {
        println!("{}", to_json(&s));
    } else {
        print_summary(&s);
    }
    if s.phase == "done" || (!a.wait && s.phase != "failed") {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(exit_code(&s))
    }
}

/// Start a job with `options` and return its id.
pub async fn start_job(
    c: &mut CoordinatorClient<Channel>,
    options: pb::JobOptions,
) -> anyhow::Result<String> {
    Ok(c.start_job(pb::StartJobRequest {
        options: Some(options),
    })
    .await
    .map_err(|s| fatal(format!("coordinator refused the job: {}", s.message())))?
    .into_inner()
    .job_id)
}

/// One status reply; `detail` adds per-table progress (one entry per table: keep it for
/// `--json`, not for the progress loop).
async fn fetch(
    c: &mut CoordinatorClient<Channel>,
    job_id: &str,
    detail: bool,
) -> anyhow::Result<pb::JobStatusReply> {
    c.job_status(pb::JobStatusRequest {
        job_id: job_id.to_string(),
        detail,
        in_flight_tables: false,
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| fatal(format!("status: {}", s.message())))
}

/// Poll until the job is over, showing progress on stderr.
pub async fn follow(
    c: &mut CoordinatorClient<Channel>,
    job_id: &str,
) -> anyhow::Result<pb::JobStatusReply> {
    let tty = std::io::stderr().is_terminal();
    let mut bars = tty.then(crate::progress::Bars::new);
    let mut last_print = std::time::Instant::now() - Duration::from_secs(60);
    let mut failures = 0;
    loop {
        let polled = c
            .job_status(pb::JobStatusRequest {
                job_id: job_id.to_string(),
                detail: false,
                in_flight_tables: tty,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| fatal(format!("status: {}", s.message())));
        let s = match polled {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e) if failures < 30 => {
                failures += 1;
                tracing::debug!("status poll failed: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let over = is_over(&s.phase);
        if let Some(b) = bars.as_mut() {
            b.update(&s);
            if over {
                if let Some(b) = bars.take() {
                    b.finish();
                }
            }
        } else if over || last_print.elapsed() >= Duration::from_secs(5) {
            if json_logs() {
                tracing::info!(
                    job = %s.job_id,
                    phase = %s.phase,
                    step = %s.step,
                    percent = (done_fraction(&s) * 1000.0).round() / 10.0,
                    chunks_done = s.chunks_done,
                    chunks = s.chunks,
                    retries = s.retries,
                    rows = s.rows_done,
                    raw_bytes = s.raw_bytes_done,
                    wire_bytes = s.wire_bytes_done,
                    wire_rate = s.wire_rate,
                    cap_bytes_per_sec = s.cap_bytes_per_sec,
                    "progress"
                );
            } else {
                eprintln!("{}", progress_line(&s));
            }
            last_print = std::time::Instant::now();
        }
        if over {
            return Ok(s);
        }
        // Polled often, printed less often off a terminal: the end of the job is seen within
        // a quarter second (a `copy` would otherwise idle up to a second at its end).
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Fraction of the planned bytes whose chunks are done.
fn done_fraction(s: &pb::JobStatusReply) -> f64 {
    if s.est_bytes_total > 0 {
        s.est_bytes_done as f64 / s.est_bytes_total as f64
    } else if s.chunks > 0 {
        s.chunks_done as f64 / s.chunks as f64
    } else {
        0.0
    }
}

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Logs are JSON lines (`--log-format json`): what would be a plain line on stderr becomes a
/// log event, so stderr stays one JSON object a line.
pub fn set_json_logs(on: bool) {
    JSON_LOGS.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A line for the operator on stderr: as it is, or as a log event with JSON logs.
pub fn say(line: &str) {
    if json_logs() {
        tracing::info!("{line}");
    } else {
        eprintln!("{line}");
    }
}

/// An error line for the operator on stderr: `haul: …`, or an error event with JSON logs.
pub fn say_error(line: &str) {
    if json_logs() {
        tracing::error!("{line}");
    } else {
        eprintln!("haul: {line}");
    }
}

pub fn progress_line(s: &pb::JobStatusReply) -> String {
    let frac = done_fraction(s);
    let rate = if s.elapsed_secs > 0.0 {
        s.raw_bytes_done as f64 / s.elapsed_secs
    } else {
        0.0
    };
    let eta = if s.phase == "copying" && frac > 0.01 && frac < 1.0 {
        let left = s.elapsed_secs * (1.0 - frac) / frac;
        format!(
            "  ETA {}",
            humantime::format_duration(Duration::from_secs(left.round() as u64))
        )
    } else {
        String::new()
    };
    let phase = if s.paused {
        format!("{} (paused)", s.phase)
    } else if s.step.is_empty() {
        s.phase.clone()
    } else {
        format!("{} ({})", s.phase, s.step)
    };
    let mut line = format!(
        "{} {:<10} {:>5.1}%  chunks {}/{}  rows {}  {} read, {} on the wire  {}/s{}",
        s.job_id,
        phase,
        frac * 100.0,
        s.chunks_done,
        s.chunks,
        s.rows_done,
        human_bytes(s.raw_bytes_done),
        human_bytes(s.wire_bytes_done),
        human_bytes(rate as u64),
        eta
    );
    line.push_str(&format!("  retried {}", s.retries));
    if !s.codecs.is_empty() && s.phase == "copying" {
        line.push_str(&format!("  codec {}", s.codecs));
    }
    if s.cap_bytes_per_sec > 0 && s.phase == "copying" {
        line.push_str(&format!(
            "  wire {} of cap {}",
            show_rate(s.wire_rate as u64)
                .split(" (")
                .next()
                .unwrap_or_default(),
            show_rate(s.cap_bytes_per_sec)
        ));
    }
    if let Some(f) = s.follow.as_ref().filter(|_| s.phase == "following") {
        line = format!(
            "{} {:<10} lag {} ({:.1} s)  applied {} of {}  {:.1} tx/s  {} transactions  slot holds {}{}",
            s.job_id,
            phase,
            human_bytes(f.lag_bytes),
            f.lag_seconds,
            f.applied_lsn,
            f.source_lsn,
            f.apply_rate,
            f.transactions,
            human_bytes(f.retained_bytes),
            if f.cutover {
                format!("  cutting over to {}", f.cutover_lsn)
            } else {
                String::new()
            }
        );
        if !f.warning.is_empty() {
            line.push_str(&format!("  WARNING {}", f.warning));
        }
    }
    if !s.error.is_empty() && s.phase != "failed" {
        line.push_str(&format!("  ({})", s.error));
    }
    line
}

pub fn print_summary(s: &pb::JobStatusReply) {
    println!("job        {}", s.job_id);
    println!("result     {}", s.phase);
    if !s.error.is_empty() {
        println!("error      {}", s.error);
    }
    println!("tables     {} ({} chunks)", s.tables, s.chunks);
    println!("rows       {}", s.rows_done);
    let ratio = if s.wire_bytes_done > 0 {
        s.raw_bytes_done as f64 / s.wire_bytes_done as f64
    } else {
        0.0
    };
    println!(
        "bytes      {} read, {} on the wire ({ratio:.1}x smaller)",
        human_bytes(s.raw_bytes_done),
        human_bytes(s.wire_bytes_done)
    );
    if !s.codecs.is_empty() {
        println!("codecs     {} (chunks)", s.codecs);
    }
    if s.resumed_bytes_done > 0 || s.resent_bytes_done > 0 {
        println!(
            "resumed    {} not sent again after interruptions; {} reached the receiver twice",
            human_bytes(s.resumed_bytes_done),
            human_bytes(s.resent_bytes_done)
        );
    }
    println!("time       {:.1} s", s.elapsed_secs);
    if let Some(f) = &s.follow {
        println!(
            "following  slot {} and publication {}; {} transactions applied, up to {}",
            f.slot, f.publication, f.transactions, f.applied_lsn
        );
        if !f.identity_full.is_empty() {
            println!(
                "identity   set REPLICA IDENTITY FULL on the source: {}",
                f.identity_full.join(", ")
            );
        }
        if s.phase == "following" {
            println!(
                "lag        {} ({:.1} s) behind the source at {}; {:.1} transactions/s",
                human_bytes(f.lag_bytes),
                f.lag_seconds,
                f.source_lsn,
                f.apply_rate
            );
        }
        if f.cutover && (s.phase == "done" || s.phase == "failed") {
            println!(
                "cutover    caught up to {} (lag 0); writes were stopped for {:.1} s, from the cutover request to the end",
                f.cutover_lsn, f.writes_stopped_secs
            );
        }
        if !f.read_only_source.is_empty() {
            println!("source     {}", f.read_only_source);
        }
        if f.cutover && s.phase == "done" {
            if s.verified {
                println!(
                    "cutover    after catching up: {} pieces compared, equal on source and target; {} sequences set from the source",
                    f.cutover_pieces, f.cutover_sequences
                );
            } else {
                println!(
                    "cutover    after catching up: not compared (--no-verify); {} sequences set from the source",
                    f.cutover_sequences
                );
            }
        }
    }
    if s.phase == "done" {
        if s.verified {
            let objects = if s.large_objects_checked > 0 {
                format!(" and {} large objects", s.large_objects_checked)
            } else {
                String::new()
            };
            println!(
                "verified   {} tables{objects}: counts and digests equal on source and target ({} of {} chunks compared during the move, the rest table by table at the end); {} sequences set",
                s.tables_checked, s.chunks_checked, s.chunks, s.sequences
            );
        } else {
            println!("verified   no (--no-verify)");
        }
        if s.ledger_dropped {
            println!("ledger     dropped from the target (schema haul); the job's summary stays with the coordinator");
        } else {
            println!("ledger     kept on the target in schema haul (--keep-ledger); drop it with DROP SCHEMA haul CASCADE");
        }
    }
    if s.phase == "cancelled" || s.phase == "cancelling" {
        if s.undone.is_empty() && s.phase == "cancelled" {
            println!("undone     nothing");
        }
        for line in &s.undone {
            println!("undone     {line}");
        }
        if s.left.is_empty() && s.phase == "cancelled" {
            println!("left       nothing: the target is as the preflight found it");
        }
        for line in &s.left {
            println!("left       {line}");
        }
    }
    match s.snapshots.len() {
        0 => {}
        1 => println!(
            "snapshot   every chunk read under one snapshot ({})",
            s.snapshots[0].snapshot_id
        ),
        n => {
            let uses: Vec<String> = s
                .snapshots
                .iter()
                .map(|u| format!("{} chunks under {}", u.chunks, u.snapshot_id))
                .collect();
            println!(
                "snapshot   NOT one snapshot: a snapshot holder restarted, so chunks were read under {n} snapshots ({}); \
                 rows written to the source meanwhile may differ (see status --json for chunk ids)",
                uses.join(", ")
            );
        }
    }
    for m in &s.chunk_mismatches {
        println!("MISMATCH   {m}");
    }
    for m in &s.mismatches {
        let t = m
            .table
            .as_ref()
            .map(|t| {
                if t.schema == "pg_catalog" && t.name == "pg_largeobject" {
                    "large objects".to_string()
                } else {
                    format!("{}.{}", t.schema, t.name)
                }
            })
            .unwrap_or_default();
        println!(
            "MISMATCH   {t}: source {} rows, target {} rows{}",
            m.source_rows,
            m.target_rows,
            if m.source_rows == m.target_rows {
                " (contents differ)"
            } else {
                ""
            }
        );
    }
}

/// Success only for a finished (and, unless skipped, verified) job; a failed job's reason is
/// the last line on stderr.
pub fn exit_code(s: &pb::JobStatusReply) -> ExitCode {
    if s.phase == "done" {
        ExitCode::SUCCESS
    } else if s.phase == "cancelled" {
        say_error(&format!("{} was cancelled", s.job_id));
        ExitCode::FAILURE
    } else {
        say_error(&format!(
            "{} failed: {}",
            s.job_id,
            s.error.replace('\n', " ")
        ));
        ExitCode::FAILURE
    }
}

pub fn to_json(s: &pb::JobStatusReply) -> String {
    let tables: Vec<serde_json::Value> = s
        .table_progress
        .iter()
        .map(|t| {
            let name = t
                .table
                .as_ref()
                .map(|t| format!("{}.{}", t.schema, t.name))
                .unwrap_or_default();
            serde_json::json!({
                "table": name, "chunks": t.chunks, "chunks_done": t.chunks_done,
                "chunks_in_flight": t.chunks_in_flight, "bytes": t.bytes, "rows_done": t.rows_done,
                "raw_bytes_done": t.raw_bytes_done, "wire_bytes_done": t.wire_bytes_done,
                "est_bytes": t.est_bytes, "est_bytes_done": t.est_bytes_done, "retries": t.retries,
            })
        })
        .collect();
    let snapshots: Vec<serde_json::Value> = s
        .snapshots
        .iter()
        .map(|u| serde_json::json!({"snapshot_id": u.snapshot_id, "chunks": u.chunks, "chunk_ids": u.chunk_ids}))
        .collect();
    let mismatches: Vec<serde_json::Value> = s
        .mismatches
        .iter()
        .map(|m| {
            let name = m.table.as_ref().map(|t| format!("{}.{}", t.schema, t.name)).unwrap_or_default();
            serde_json::json!({"table": name, "source_rows": m.source_rows, "target_rows": m.target_rows})
        })
        .collect();
    serde_json::json!({
        "job_id": s.job_id, "phase": s.phase, "error": s.error, "tables": s.tables,
        "chunks": s.chunks, "chunks_done": s.chunks_done, "rows_done": s.rows_done,
        "raw_bytes_done": s.raw_bytes_done, "wire_bytes_done": s.wire_bytes_done,
        "planned_bytes": s.planned_bytes, "elapsed_secs": s.elapsed_secs, "verified": s.verified,
        "tables_checked": s.tables_checked, "sequences": s.sequences, "snapshot_id": s.snapshot_id,
        "consistent": s.consistent, "snapshots": snapshots,
        "resumed_bytes_done": s.resumed_bytes_done, "resent_bytes_done": s.resent_bytes_done,
        "in_flight": s.in_flight, "step": s.step, "ledger_dropped": s.ledger_dropped,
        "large_objects_checked": s.large_objects_checked,
        "chunks_checked": s.chunks_checked, "chunk_mismatches": s.chunk_mismatches,
        "table_progress": tables, "mismatches": mismatches,
        "cap_bytes_per_sec": s.cap_bytes_per_sec, "cap": s.cap, "wire_rate": s.wire_rate,
        "codecs": s.codecs,
        "lag_seconds": s.follow.as_ref().map(|f| f.lag_seconds),
        "lag_bytes": s.follow.as_ref().map(|f| f.lag_bytes),
        "follow": s.follow.as_ref().map(follow_json),
        "paused": s.paused, "retries": s.retries,
        "undone": s.undone, "left": s.left,
    })
    .to_string()
}
