//! Following a source after a bulk copy (issue 11), the change path on its own: a real move,
//! then the sender's follower (`haul_sender::follow`) reading a real slot and sending batches
//! over mTLS to the real receiver process, which applies them with the job's follow position.
//! The source is written to only after the move, so the slot (created after the copy's
//! snapshot, before the first write) carries exactly what the copy did not.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use haul_certs::{Mtls, Role, TlsFiles};
use haul_core::bandwidth::Limiter;
use haul_core::codec::Codec;
use haul_core::pg::{DbUrl, Side};
use haul_core::pgoutput::Lsn;
use haul_faults::moves::{Move, Setup, DB};
use haul_sender::follow::{self, Position, Spec};

const FIXTURE: &str = "\
CREATE TABLE public.docs (id int PRIMARY KEY, n int, body text);
INSERT INTO public.docs SELECT g, g, 'doc ' || g FROM generate_series(1, 500) g;
CREATE TABLE public.nokey (a int, b text);
ALTER TABLE public.nokey REPLICA IDENTITY FULL;
INSERT INTO public.nokey SELECT g % 7, 'row ' || (g % 7) FROM generate_series(1, 70) g;
CREATE TABLE public.scratch (id int PRIMARY KEY, note text);
INSERT INTO public.scratch SELECT g, 'scratch' FROM generate_series(1, 50) g;
";

const TABLES: [&str; 3] = ["docs", "nokey", "scratch"];

/// Every row of a table, as text, in one order: what the source and target are compared by.
fn rows_of(cluster: &haul_pgcluster::Cluster, table: &str) -> anyhow::Result<String> {
    cluster.psql(
        DB,
        &format!(
            "SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM public.{table} t"
        ),
    )
}

fn assert_equal(m: &Move, when: &str) -> anyhow::Result<()> {
    for t in TABLES {
        let (s, d) = (rows_of(&m.source, t)?, rows_of(&m.target, t)?);
        assert!(
            s == d,
            "{when}: public.{t} differs\nsource: {s:.300}\ntarget: {d:.300}"
        );
    }
    Ok(())
}

struct Follower {
    source: DbUrl,
    tls: Mtls,
    receiver_addr: String,
    spec: Spec,
}

impl Follower {
    fn new(m: &Move, slot: &str) -> anyhow::Result<Follower> {
        let mut tables = HashMap::new();
        for t in TABLES {
            let cols = m.source.psql(
                DB,
                &format!(
                    "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
                     WHERE attrelid = 'public.{t}'::regclass AND attnum > 0 AND NOT attisdropped"
                ),
            )?;
            tables.insert(
                ("public".to_string(), t.to_string()),
                cols.split(',').map(str::to_string).collect(),
            );
        }
        let certs = std::path::Path::new(&m.certs);
        Ok(Follower {
            source: DbUrl::parse(&m.source.url(DB), Side::Source)?,
            tls: Mtls::load(&TlsFiles::for_role(certs, Role::Sender), Role::Sender)?,
            receiver_addr: m.receiver_addr.clone(),
            spec: Spec {
                job_id: "follow-test".into(),
                slot: slot.into(),
                publication: "haul_follow_test".into(),
                tables,
                codec: Codec::Zstd { level: 1 },
            },
        })
    }

    /// Follow until the target holds everything the source wrote up to `until`.
    fn run_until(&self, until: Lsn) -> anyhow::Result<Position> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let channel = haul_certs::connect_lazy(&self.receiver_addr, &self.tls, Role::Receiver)?;
            let receiver = haul_proto::receiver_client::ReceiverClient::new(channel)
                .max_decoding_message_size(haul_core::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(haul_core::MAX_MESSAGE_BYTES);
            let (position, watch) = tokio::sync::watch::channel(Position::default());
            let (_until_tx, until_rx) = tokio::sync::watch::channel(Some(until));
            let shutdown = tokio_util::sync::CancellationToken::new();
            let limiter = Limiter::new(0);
            tokio::time::timeout(
                Duration::from_secs(120),
                follow::run(
                    &self.source,
                    receiver,
                    &self.spec,
                    &limiter,
                    &position,
                    until_rx,
                    &shutdown,
                ),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the follower did not reach {until} in 2 minutes: {:?}",
                    *watch.borrow()
                )
            })??;
            let at = *watch.borrow();
            anyhow::Ok(at)
        })
    }
}

fn current_lsn(m: &Move) -> anyhow::Result<Lsn> {
    m.source
        .psql(DB, "SELECT pg_current_wal_lsn()::text")?
        .trim()
        .parse()
}

fn follow_position(m: &Move) -> anyhow::Result<String> {
    m.target.psql(
        DB,
        "SELECT lsn::text FROM haul.follow_position WHERE job_id = 'follow-test'",
    )
}

#[test]
fn changes_of_every_kind_reach_the_target_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(&fixture, FIXTURE)?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    m.finish()?;
    assert_equal(&m, "after the copy")?;

    // The publication, then two slots that see the same changes: the second replays them all
    // to a target that already holds them.
    m.source.psql(
        DB,
        "CREATE PUBLICATION haul_follow_test FOR TABLE public.docs, public.nokey, public.scratch",
    )?;
    for slot in ["haul_follow_a", "haul_follow_b"] {
        m.source.psql(
            DB,
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        )?;
    }

    // Every kind of change: inserts, an update that leaves a TOASTed value alone, an update
    // of a key, deletes, a table without a key (duplicate rows), a truncate, and one large
    // transaction that spans many blocks.
    m.source.psql(
        DB,
        "UPDATE public.docs SET body = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g) WHERE id = 7;",
    )?;
    m.source.psql(
        DB,
        "INSERT INTO public.docs VALUES (1001, 1, 'it''s new'), (1002, NULL, NULL);\n\
         UPDATE public.docs SET n = n + 1000 WHERE id = 7;\n\
         UPDATE public.docs SET id = 2000 WHERE id = 8;\n\
         DELETE FROM public.docs WHERE id BETWEEN 20 AND 40;\n\
         UPDATE public.nokey SET b = 'changed' WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = 3);\n\
         DELETE FROM public.nokey WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = 5);\n\
         INSERT INTO public.nokey VALUES (3, 'row 3');\n\
         TRUNCATE public.scratch;\n\
         INSERT INTO public.scratch VALUES (1, 'after the truncate');\n\
         BEGIN; INSERT INTO public.docs SELECT g, g, repeat('x', 200) || g FROM generate_series(10000, 49999) g; \
         UPDATE public.docs SET n = -n WHERE id BETWEEN 10000 AND 10100; COMMIT;",
    )?;
    let until = current_lsn(&m)?;

    let a = Follower::new(&m, "haul_follow_a")?;
    let reached = a.run_until(until)?;
    assert!(reached.confirmed >= until, "{reached:?} short of {until}");
    assert!(reached.transactions >= 11, "{reached:?}");
    assert_equal(&m, "after following")?;
    let toasted: i64 = m
        .target
        .psql(DB, "SELECT length(body) FROM public.docs WHERE id = 7")?
        .trim()
        .parse()?;
    assert_eq!(toasted, 400 * 32, "the unchanged TOASTed value was kept");
    let recorded = follow_position(&m)?;
    assert!(!recorded.trim().is_empty(), "no follow position recorded");

    // Followed again from the start by the other slot: every transaction is found applied
    // (the table without a key would show any duplicate), and the position stands.
    let b = Follower::new(&m, "haul_follow_b")?;
    let again = b.run_until(until)?;
    assert_eq!(again.statements, 0, "{again:?}");
    assert_equal(&m, "after replaying the same changes")?;
    assert_eq!(follow_position(&m)?, recorded);

    // More writes, and the first slot goes on from where it confirmed.
    m.source.psql(
        DB,
        "DELETE FROM public.nokey WHERE a = 1; INSERT INTO public.docs VALUES (3000, 3, 'later');",
    )?;
    let until = current_lsn(&m)?;
    let later = a.run_until(until)?;
    assert_eq!(
        later.transactions, 2,
        "only the new transactions: {later:?}"
    );
    assert_equal(&m, "after following the later writes")?;

    // A column added on the source while following: the follower stops with one line naming
    // the table, and nothing of that change reaches the target.
    m.source.psql(DB, "ALTER TABLE public.docs ADD COLUMN extra int; INSERT INTO public.docs VALUES (4000, 4, 'ddl', 1);")?;
    let until = current_lsn(&m)?;
    let err = match a.run_until(until) {
        Ok(p) => anyhow::bail!("followed past a schema change: {p:?}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("public.docs") && err.contains("changed on the source"),
        "{err}"
    );
    let n = m
        .target
        .psql(DB, "SELECT count(*) FROM public.docs WHERE id = 4000")?;
    assert_eq!(n.trim(), "0");

    for slot in ["haul_follow_a", "haul_follow_b"] {
        m.source
            .psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}')"))?;
    }
    Ok(())
}

/// Poll the job's status until `phase` (or the job is over), for at most `secs`.
fn wait_for_phase(m: &Move, phase: &str, secs: u64) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = m.status() {
            let now = s["phase"].as_str().unwrap_or_default().to_string();
            if now == phase || ["done", "failed", "cancelled"].contains(&now.as_str()) {
                return Ok(s);
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the job did not reach {phase} in {secs} s: {:?}\ncoordinator:\n{}\nsender:\n{}\nreceiver:\n{}",
            m.status(),
            m.coordinator.log_text(),
            m.sender.log_text(),
            m.receiver.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn slots_and_publications(m: &Move) -> anyhow::Result<String> {
    m.source.psql(
        DB,
        "SELECT (SELECT count(*) FROM pg_replication_slots) || ' slots, ' || \
                (SELECT count(*) FROM pg_publication) || ' publications'",
    )
}

/// `haul cutover --wait --timeout TIMEOUT [EXTRA]` on the move's coordinator: whether it
/// succeeded, and what it printed on stdout and stderr.
fn cutover(m: &Move, timeout: &str, extra: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = std::process::Command::new(&m.bin)
        .args([
            "cutover",
            "--coordinator",
            &m.coord,
            "--certs",
            &m.certs,
            "--wait",
            "--timeout",
            timeout,
        ])
        .args(extra)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `haul start --follow`: the copy reads the slot's snapshot while the application writes;
/// the job goes on to follow, status shows the lag; `haul cutover` catches up once the writes
/// stop, sets sequences, verifies, and leaves the target equal to the source with no slot,
/// publication or ledger behind.
#[test]
fn start_follow_then_cutover_leaves_the_target_equal() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(
        &fixture,
        format!(
            "{FIXTURE}CREATE TABLE public.counters (id serial PRIMARY KEY, v int);\n\
             INSERT INTO public.counters (v) SELECT g FROM generate_series(1, 10) g;\n\
             CREATE TABLE public.tags (t text, n int);\n\
             INSERT INTO public.tags SELECT 'tag' || (g % 3), g FROM generate_series(1, 30) g;\n"
        ),
    )?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        bulk_mb: 4,
        start_args: vec!["--follow", "--replica-identity-full"],
        drop_ledger: true,
        ..Default::default()
    })?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let following = std::thread::scope(|s| {
        // The application: writes of every kind, from before the copy ends until cutover.
        let writer = s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                m.source.psql(
                    DB,
                    &format!(
                        "INSERT INTO public.docs VALUES ({id}, {i}, 'w{i}');\n\
                         UPDATE public.docs SET n = n + 1 WHERE id = {upd};\n\
                         DELETE FROM public.docs WHERE id = {gone};\n\
                         INSERT INTO public.counters (v) VALUES ({i});\n\
                         UPDATE public.nokey SET b = 'w{i}' WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = {a});\n\
                         UPDATE public.tags SET n = n + 1 WHERE t = 'tag{a3}';\n\
                         DELETE FROM public.tags WHERE n = {i};\n\
                         {every_tenth}",
                        every_tenth = if i.is_multiple_of(10) {
                            // A TOASTed body, then an update that leaves it alone; a truncate.
                            format!(
                                "UPDATE public.docs SET body = (SELECT string_agg(md5(g::text || {i}), '') FROM generate_series(1, 300) g) WHERE id = 9;\n\
                                 UPDATE public.docs SET n = {i} WHERE id = 9;\n\
                                 TRUNCATE public.scratch;\n\
                                 INSERT INTO public.scratch VALUES ({i}, 'after truncate {i}');"
                            )
                        } else {
                            String::new()
                        },
                        id = 100_000 + i,
                        upd = i % 500 + 1,
                        gone = 100_000 + i.saturating_sub(3),
                        a = i % 7,
                        a3 = i % 3
                    ),
                )?;
            }
            anyhow::Ok(i)
        });
        let following = wait_for_phase(&m, "following", 180);
        // A little more while following, then the application stops writing.
        std::thread::sleep(Duration::from_secs(2));
        let status_while = m.status();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        anyhow::Ok((following?, status_while, writes))
    })?;
    let (reached, while_following, writes) = following;
    assert_eq!(reached["phase"], "following", "{reached}");
    let w = while_following.unwrap_or_default();
    assert!(
        w["lag_bytes"].is_u64() && w["lag_seconds"].is_number(),
        "status --json while following has no lag: {w}"
    );
    assert!(writes > 5, "the writer made only {writes} rounds");
    assert!(slots_and_publications(&m)?.starts_with("1 slots, 1 publications"));

    // Cut over: the writes have stopped.
    let (ok, stdout, stderr) = cutover(&m, "3m", &["--read-only-source"])?;
    assert!(
        ok,
        "cutover failed: {stdout}\n{stderr}\ncoordinator:\n{}\nsender:\n{}\nreceiver:\n{}",
        m.coordinator.log_text(),
        m.sender.log_text(),
        m.receiver.log_text()
    );
    assert!(stdout.contains("result     done"), "{stdout}");
    assert!(stdout.contains("cutover    caught up"), "{stdout}");
    assert!(
        stdout.contains("identity   set REPLICA IDENTITY FULL on the source: public.tags"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pieces compared, equal on source and target"),
        "{stdout}"
    );
    // --read-only-source: a new session of the source starts read only, and the summary says
    // how to undo it.
    assert!(
        stdout.contains("now refuses writes")
            && stdout.contains("RESET default_transaction_read_only"),
        "{stdout}"
    );
    let refused = m
        .source
        .psql(DB, "INSERT INTO public.docs VALUES (999999, 0, 'late')");
    assert!(
        refused.is_err_and(|e| format!("{e:#}").contains("read-only transaction")),
        "the source still takes writes"
    );

    // Independently: the same rows, schema and sequences; nothing of haul's left anywhere.
    let diffs = haul_pgcluster::compare_databases(&m.source.url(DB), &m.target.url(DB))?;
    assert!(diffs.is_empty(), "source and target differ: {diffs:#?}");
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    let haul_schema = m.target.psql(
        DB,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'haul'",
    )?;
    assert_eq!(haul_schema.trim(), "0", "the ledger is left on the target");
    Ok(())
}

/// A table without a primary key or replica identity: publishing it would break the source's
/// own UPDATE and DELETE, so without --replica-identity-full the job is refused in one line
/// naming it, before anything is written on either side.
#[test]
fn follow_refuses_a_table_without_replica_identity() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("nokey.sql");
    std::fs::write(
        &fixture,
        "CREATE TABLE public.docs (id int PRIMARY KEY, body text);\n\
         INSERT INTO public.docs SELECT g, 'd' FROM generate_series(1, 10) g;\n\
         CREATE TABLE public.loose (a int, b text);\n\
         INSERT INTO public.loose VALUES (1, 'x'), (1, 'x');\n",
    )?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        start_args: vec!["--follow"],
        ..Default::default()
    })?;
    let end = wait_for_phase(&m, "failed", 120)?;
    let error = end["error"].as_str().unwrap_or_default();
    assert_eq!(end["phase"], "failed", "{end}");
    assert!(
        error.contains("public.loose")
            && error.contains("--replica-identity-full")
            && !error.contains('\n'),
        "{error}"
    );
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    let tables = m.target.psql(
        DB,
        "SELECT count(*) FROM pg_class WHERE relname IN ('docs', 'loose')",
    )?;
    assert_eq!(tables.trim(), "0", "tables were created on the target");
    let identity = m.source.psql(
        DB,
        "SELECT relreplident FROM pg_class WHERE relname = 'loose'",
    )?;
    assert_eq!(identity.trim(), "d", "the source table was changed");
    Ok(())
}

/// `haul cancel` of a following job: its slot and publication go from the source with the
/// rest of what it did, so nothing keeps holding the source's WAL.
#[test]
fn cancel_while_following_drops_slot_and_publication() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(&fixture, FIXTURE)?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        start_args: vec!["--follow"],
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    let s = wait_for_phase(&m, "following", 120)?;
    assert_eq!(s["phase"], "following", "{s}");
    assert!(slots_and_publications(&m)?.starts_with("1 slots, 1 publications"));
    let out = std::process::Command::new(&m.bin)
        .args(["cancel", "--coordinator", &m.coord, "--certs", &m.certs])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cancel failed: {stdout}");
    assert!(
        stdout.contains("dropped replication slot haul_"),
        "{stdout}"
    );
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    let tables = m
        .target
        .psql(DB, "SELECT count(*) FROM pg_class WHERE relname = 'docs'")?;
    assert_eq!(tables.trim(), "0", "the cancel left the target's tables");
    Ok(())
}

/// Restart whichever role a failpoint killed (each fires once across restarts).
fn revive(agents: [&mut haul_faults::Agent; 3]) -> anyhow::Result<()> {
    for agent in agents {
        if agent.exited() {
            agent.restart()?;
        }
    }
    Ok(())
}

/// `haul status --json`, or null.
fn status_of(bin: &std::path::Path, coord: &str, certs: &str) -> serde_json::Value {
    std::process::Command::new(bin)
        .args(["status", "--coordinator", coord, "--certs", certs, "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default()
}

/// Every role killed while following, and the sender at two points of its own: after the
/// target committed a batch but before the source was told (the batch comes again and must
/// apply nothing twice: the table without a key would show a duplicate), and halfway through
/// cutover. The application writes throughout; the job still ends done and equal, with no
/// slot, publication or ledger left.
#[test]
fn kills_while_following_and_during_cutover_lose_and_repeat_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(&fixture, FIXTURE)?;
    let mut m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        start_args: vec!["--follow"],
        bwlimit: Some("0"),
        failpoints: Some("die-after-change-batch,die-in-cutover"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (bin, coord, certs) = (m.bin.clone(), m.coord.clone(), m.certs.clone());
    let Move {
        source,
        sender,
        receiver,
        coordinator,
        ..
    } = &mut m;
    let source = &*source;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                source.psql(
                    DB,
                    &format!(
                        "INSERT INTO public.docs VALUES ({id}, {i}, 'w{i}');\n\
                         UPDATE public.docs SET n = n + 1 WHERE id = {upd};\n\
                         INSERT INTO public.nokey VALUES ({a}, 'w{i}');\n\
                         DELETE FROM public.nokey WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = {a2});",
                        id = 200_000 + i,
                        upd = i % 500 + 1,
                        a = i % 7,
                        a2 = (i + 3) % 7
                    ),
                )?;
                std::thread::sleep(Duration::from_millis(20));
            }
            anyhow::Ok(i)
        });
        let result = (|| {
            // Following, with the sender's own death after its first batch along the way.
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            loop {
                revive([&mut *sender, &mut *receiver, &mut *coordinator])?;
                let s = status_of(&bin, &coord, &certs);
                anyhow::ensure!(s["phase"] != "failed", "the job failed: {s}");
                if s["phase"] == "following"
                    && s["follow"]["transactions"].as_u64().unwrap_or(0) > 20
                {
                    break;
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "not following: {s}");
                std::thread::sleep(Duration::from_millis(200));
            }
            // Each role killed in turn while the writes go on.
            for role in ["receiver", "coordinator", "sender"] {
                let agent = match role {
                    "receiver" => &mut *receiver,
                    "coordinator" => &mut *coordinator,
                    _ => &mut *sender,
                };
                agent.kill9();
                std::thread::sleep(Duration::from_millis(700));
                agent.restart()?;
                std::thread::sleep(Duration::from_millis(1500));
            }
            anyhow::Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        result?;
        anyhow::ensure!(writes > 20, "only {writes} rounds of writes");
        anyhow::Ok(())
    })?;

    // Cutover; the sender dies halfway through it and is brought back.
    let cutover = std::thread::spawn(move || {
        std::process::Command::new(&bin)
            .args([
                "cutover",
                "--coordinator",
                &coord,
                "--certs",
                &certs,
                "--wait",
                "--timeout",
                "4m",
            ])
            .output()
    });
    // Once the cutover is asked for, the coordinator and the receiver die too.
    let (bin, coord, certs) = (m.bin.clone(), m.coord.clone(), m.certs.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cutover.is_finished() && std::time::Instant::now() < deadline {
        let s = status_of(&bin, &coord, &certs);
        if s["follow"]["cutover"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for agent in [&mut m.coordinator, &mut m.receiver] {
        agent.kill9();
        std::thread::sleep(Duration::from_millis(500));
        agent.restart()?;
    }
    while !cutover.is_finished() {
        revive([&mut m.sender, &mut m.receiver, &mut m.coordinator])?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cutover
        .join()
        .map_err(|_| anyhow::anyhow!("the cutover thread panicked"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cutover failed: {stdout}\n{}\nsender:\n{}\nreceiver:\n{}\ncoordinator:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.sender.log_text(),
        m.receiver.log_text(),
        m.coordinator.log_text()
    );
    let sender_log = m.sender.log_text();
    for point in ["die-after-change-batch", "die-in-cutover"] {
        assert!(
            sender_log.contains(&format!("failpoint {point} fired")),
            "{point} never fired:\n{sender_log}"
        );
    }
    let diffs = haul_pgcluster::compare_databases(&m.source.url(DB), &m.target.url(DB))?;
    assert!(diffs.is_empty(), "source and target differ: {diffs:#?}");
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    Ok(())
}

/// A column added on the source while following: the job pauses with one line naming the
/// table, applies nothing of the change, and keeps the slot; once the operator adds the same
/// column on the target, `haul resume` follows on, and cutover ends equal.
#[test]
fn a_column_added_while_following_pauses_until_the_target_has_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(&fixture, FIXTURE)?;
    let m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        start_args: vec!["--follow"],
        bwlimit: Some("0"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let s = wait_for_phase(&m, "following", 120)?;
    assert_eq!(s["phase"], "following", "{s}");
    m.source.psql(
        DB,
        "ALTER TABLE public.docs ADD COLUMN extra int;\n\
         INSERT INTO public.docs VALUES (5000, 5, 'after the ddl', 42);",
    )?;
    // Paused, with the line that names the table and says what to do.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let paused = loop {
        let s = m.status().unwrap_or_default();
        if s["paused"] == true {
            break s;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "not paused: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let warning = paused["error"].as_str().unwrap_or_default().to_string()
        + paused["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("public.docs") && warning.contains("haul resume"),
        "{paused}"
    );
    let n = m
        .target
        .psql(DB, "SELECT count(*) FROM public.docs WHERE id = 5000")?;
    assert_eq!(n.trim(), "0", "the changed table's row was applied");
    assert!(slots_and_publications(&m)?.starts_with("1 slots"));

    // The operator makes the same change on the target and resumes.
    m.target
        .psql(DB, "ALTER TABLE public.docs ADD COLUMN extra int")?;
    let out = std::process::Command::new(&m.bin)
        .args(["resume", "--coordinator", &m.coord, "--certs", &m.certs])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, stdout, _) = cutover(&m, "2m", &[])?;
    assert!(
        ok,
        "cutover failed: {stdout}\nsender:\n{}",
        m.sender.log_text()
    );
    let row = m
        .target
        .psql(DB, "SELECT extra FROM public.docs WHERE id = 5000")?;
    assert_eq!(row.trim(), "42");
    let diffs = haul_pgcluster::compare_databases(&m.source.url(DB), &m.target.url(DB))?;
    assert!(diffs.is_empty(), "source and target differ: {diffs:#?}");
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    Ok(())
}

/// The target restarted and the link between sender and receiver cut while following, with
/// the application writing: the follower retries from the slot's confirmed position, and
/// cutover ends equal.
#[test]
fn a_restarted_target_and_a_cut_link_while_following_lose_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = dir.path().join("follow.sql");
    std::fs::write(&fixture, FIXTURE)?;
    let mut m = Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture),
        link_to_receiver: true,
        start_args: vec!["--follow"],
        bwlimit: Some("0"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let s = wait_for_phase(&m, "following", 120)?;
    assert_eq!(s["phase"], "following", "{s}");
    let write = |m: &Move, from: u64, n: u64| -> anyhow::Result<()> {
        for i in from..from + n {
            m.source.psql(
                DB,
                &format!(
                    "INSERT INTO public.docs VALUES ({id}, {i}, 'w');\n\
                     UPDATE public.docs SET n = n + 1 WHERE id = {upd};\n\
                     INSERT INTO public.nokey VALUES ({a}, 'w{i}');",
                    id = 300_000 + i,
                    upd = i % 500 + 1,
                    a = i % 7
                ),
            )?;
        }
        Ok(())
    };
    write(&m, 0, 20)?;
    // The target goes down while writes go on, and comes back.
    m.target.stop()?;
    write(&m, 20, 20)?;
    std::thread::sleep(Duration::from_secs(1));
    m.target.start_again()?;
    write(&m, 40, 20)?;
    // The link drops every connection through it, twice.
    for k in 0..2 {
        m.to_receiver.as_ref().expect("a link").reset();
        write(&m, 60 + 10 * k, 10)?;
        std::thread::sleep(Duration::from_millis(500));
    }
    write(&m, 100, 20)?;
    let (ok, stdout, _) = cutover(&m, "3m", &[])?;
    assert!(
        ok,
        "cutover failed: {stdout}\nsender:\n{}\nreceiver:\n{}",
        m.sender.log_text(),
        m.receiver.log_text()
    );
    let log = m.sender.log_text();
    assert!(
        log.contains("failed to follow"),
        "the follower never met the faults:\n{log}"
    );
    let diffs = haul_pgcluster::compare_databases(&m.source.url(DB), &m.target.url(DB))?;
    assert!(diffs.is_empty(), "source and target differ: {diffs:#?}");
    assert_eq!(slots_and_publications(&m)?, "0 slots, 0 publications");
    Ok(())
}
