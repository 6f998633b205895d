//! Schema export: pg_dump inside the job's snapshot, streamed to the receiver.
//!
//! pg_dump is the reference for what a PostgreSQL schema is; re-implementing it would miss
//! objects. It runs beside the source with the sender's credentials and imports the job's
//! snapshot (`--snapshot`), so the schema and the rows describe the same instant. Its output is
//! streamed in pieces (bounded memory) and marked complete only when pg_dump exited cleanly.

use std::process::Stdio;

use anyhow::Context;
use haul_core::pg::DbUrl;
use haul_core::status::{fatal, from_status};
use haul_proto as pb;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_stream::wrappers::ReceiverStream;

use crate::peers::Peers;

const PIECE: usize = 256 * 1024;

pub struct SchemaUpload<'a> {
    pub job_id: &'a str,
    pub source: &'a DbUrl,
    pub snapshot_id: &'a str,
    pub receiver_addr: &'a str,
    /// Tables the job fills: the receiver checks them before anything is created.
    pub tables: Vec<pb::TableRef>,
    /// The job moves large objects (the receiver checks the target has none).
    pub large_objects: bool,
    pub create_schema: bool,
    /// Carry owners and privileges (pg_dump's default), or leave them out.
    pub owners: bool,
    pub privileges: bool,
    /// The roles the moved objects need, and whether the receiver may create missing ones.
    pub roles: Vec<pb::RoleDef>,
    pub create_roles: bool,
    /// The extensions the source uses.
    pub extensions: Vec<String>,
    /// The source's `server_version_num`: pg_dump must be of its major version or newer.
    pub source_version: i32,
    /// `--pg-dump`: this pg_dump and no other.
    pub pg_dump: Option<std::path::PathBuf>,
    /// `-t` patterns when only some tables move; empty means the whole database.
    pub only: Vec<String>,
    /// `--exclude-table` patterns (`--exclude-tables`): each one table, exactly.
    pub except: Vec<String>,
    /// `--schema` and `--exclude-schema` patterns (`--schemas`, `--exclude-schemas`): each one
    /// schema, exactly.
    pub schemas: Vec<String>,
    pub except_schemas: Vec<String>,
}

/// Dump `section` and send it; returns the receiver's count of applied or stored objects.
pub async fn send_section(
    peers: &Peers,
    up: &SchemaUpload<'_>,
    section: pb::SchemaSection,
) -> anyhow::Result<u32> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SchemaPart>(4);
    let mut client = peers.receiver(up.receiver_addr).await?;
    let call = tokio::spawn(async move { client.put_schema(ReceiverStream::new(rx)).await });

    let first = pb::SchemaPart {
        job_id: up.job_id.to_string(),
        section: section as i32,
        tables: if section == pb::SchemaSection::SectionPre {
            up.tables.clone()
        } else {
            vec![]
        },
        large_objects: up.large_objects && section == pb::SchemaSection::SectionPre,
        roles: if section == pb::SchemaSection::SectionPre {
            up.roles.clone()
        } else {
            vec![]
        },
        create_roles: up.create_roles,
        extensions: if section == pb::SchemaSection::SectionPre {
            up.extensions.clone()
        } else {
            vec![]
        },
        create_schema: up.create_schema,
        ..Default::default()
    };
    let produced = if up.create_schema {
        produce(up, section, first, &tx).await
    } else {
        tx.send(first).await.ok();
        Ok(())
    };
    match produced {
        Ok(()) => {
            let last = pb::SchemaPart {
                job_id: up.job_id.to_string(),
                section: section as i32,
                last: true,
                ..Default::default()
            };
            tx.send(last).await.ok();
            drop(tx);
            let reply = call
                .await
                .context("schema upload task")?
                .map_err(|s| from_status(s, "receiver refused schema"))?;
            Ok(reply.into_inner().objects)
        }
        Err(e) => {
            // Dropping the stream without `last` tells the receiver to discard what it got.
            drop(tx);
            call.abort();
            Err(e)
        }
    }
}

async fn produce(
    up: &SchemaUpload<'_>,
    section: pb::SchemaSection,
    first: pb::SchemaPart,
    tx: &tokio::sync::mpsc::Sender<pb::SchemaPart>,
) -> anyhow::Result<()> {
    let pg_dump = haul_core::pg::pg_dump_for(up.source_version, up.pg_dump.as_deref())?;
    let mut cmd = Command::new(&pg_dump);
    cmd.arg("--schema-only")
        .arg(match section {
            pb::SchemaSection::SectionPre => "--section=pre-data",
            pb::SchemaSection::SectionPost => "--section=post-data",
        })
        // Large objects move as chunks (`core::large_object`), never in the schema script.
        .args(["--no-subscriptions", "--no-blobs", "--exclude-schema=haul"])
        // The statements that drop what the script creates come first: the receiver keeps
        // them as the job's undo (`haul cancel`) and never runs them as part of the script.
        .args(["--clean", "--if-exists"])
        .arg(format!("--snapshot={}", up.snapshot_id))
        .arg(format!("--dbname={}", up.source.raw()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !up.owners {
        cmd.arg("--no-owner");
    }
    if !up.privileges {
        cmd.arg("--no-privileges");
    }
    for t in &up.only {
        cmd.arg(format!("--table={t}"));
    }
    for t in &up.except {
        cmd.arg(format!("--exclude-table={t}"));
    }
    for s in &up.schemas {
        cmd.arg(format!("--schema={s}"));
    }
    for s in &up.except_schemas {
        cmd.arg(format!("--exclude-schema={s}"));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", pg_dump.display()))?;
    let mut stdout = child.stdout.take().context("pg_dump stdout")?;
    let mut stderr = child.stderr.take().context("pg_dump stderr")?;
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_string(&mut s).await;
        s
    });

    let mut pending = Some(first);
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = stdout.read(&mut buf).await.context("read pg_dump output")?;
        if n == 0 {
            break;
        }
        let mut part = pending.take().unwrap_or_else(|| pb::SchemaPart {
            job_id: up.job_id.to_string(),
            section: section as i32,
            ..Default::default()
        });
        part.sql = buf[..n].to_vec();
        if tx.send(part).await.is_err() {
            break; // the receiver ended the call; its status says why
        }
    }
    if let Some(p) = pending {
        tx.send(p).await.ok();
    }
    let status = child.wait().await.context("wait for pg_dump")?;
    let stderr = err_task.await.unwrap_or_default();
    if !status.success() {
        let line = stderr
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or(stderr.lines().next().unwrap_or("no output"))
            .trim()
            .to_string();
        return Err(fatal(format!(
            "pg_dump of the source schema failed: {line}"
        )));
    }
    Ok(())
}
