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
