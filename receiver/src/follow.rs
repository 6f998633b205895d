//! Following (issue 11, not yet used by jobs): each source transaction applied to the target
//! exactly once. Its commit position goes into `haul.follow_position` in the same transaction
//! as its changes; a transaction at or below the recorded position is skipped, so a stream
//! that starts again from an earlier position after any crash applies nothing twice.

use anyhow::Context;
use haul_core::pg::db_error_line;
use haul_core::pgoutput::Lsn;
use tokio_postgres::Client;

/// The last source position applied for `job_id`, if any.
pub async fn applied_position(client: &Client, job_id: &str) -> anyhow::Result<Option<Lsn>> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM haul.follow_position WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .context("read haul.follow_position")?;
    row.map(|r| r.get::<_, String>(0).parse()).transpose()
}

/// Apply one source transaction (its statements, in order) unless its commit position is
/// already applied; returns whether it was applied now. `client` must not be in a transaction.
pub async fn apply_transaction(
    client: &Client,
    job_id: &str,
    commit_lsn: Lsn,
    statements: &[String],
) -> anyhow::Result<bool> {
    client
        .batch_execute("BEGIN")
        .await
        .context("begin a followed transaction")?;
    let applied = async {
        // The row lock orders two appliers of one job; the first to commit wins.
        let at: Option<String> = client
            .query_opt(
                "SELECT lsn::text FROM haul.follow_position WHERE job_id = $1 FOR UPDATE",
                &[&job_id],
            )
            .await
            .context("read haul.follow_position")?
            .map(|r| r.get(0));
        if let Some(at) = at {
            if at.parse::<Lsn>()? >= commit_lsn {
                return anyhow::Ok(false);
            }
        }
        for sql in statements {
            client.batch_execute(sql).await.map_err(|e| {
                anyhow::anyhow!(
                    "apply the source transaction at {commit_lsn} on the target: {}: {sql}",
                    db_error_line(&e)
                )
            })?;
        }
        client
            .execute(
                "INSERT INTO haul.follow_position (job_id, lsn) VALUES ($1, $2::text::pg_lsn) \
                 ON CONFLICT (job_id) DO UPDATE SET lsn = excluded.lsn, applied_at = now()",
                &[&job_id, &commit_lsn.to_string()],
            )
            .await
            .context("record the followed position in haul.follow_position")?;
        Ok(true)
    }
    .await;
    match applied {
        Ok(true) => {
            client
                .batch_execute("COMMIT")
                .await
                .context("commit a followed transaction")?;
            Ok(true)
        }
        Ok(false) => {
            client.batch_execute("ROLLBACK").await.ok();
            Ok(false)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await.ok();
            Err(e)
        }
    }
}
