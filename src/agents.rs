//! The long-running roles: validate flags into each crate's config, bind, and call its `run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use haul_certs::{Mtls, Role, TlsFiles};
use haul_core::pg::{DbUrl, Side};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{CoordinatorArgs, ReceiverArgs, SenderArgs};

/// A required flag, or a line saying which one is missing.
pub fn required<T>(v: Option<T>, flag: &str) -> anyhow::Result<T> {
    v.ok_or_else(|| {
        haul_core::status::fatal(format!(
            "missing --{flag} (give it on the command line or as `{}` in the --config file)",
            flag.replace('-', "_")
        ))
    })
}

/// The agent's certificate: CERTS/NAME.pem when the operator issued one by that name, else
/// the role's default from `haul certs init`.
pub fn load_tls(certs: &Path, role: Role, name: &str) -> anyhow::Result<Mtls> {
    let named = TlsFiles::named(certs, name);
    let files = if name != role.as_str() && named.cert.exists() {
        named
    } else {
        TlsFiles::for_role(certs, role)
    };
    Mtls::load(&files, role)
}

pub fn parse_listen(s: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    s.parse().map_err(|_| {
        haul_core::status::fatal(format!(
            "--{flag} {s:?} is not an address to listen on; use IP:PORT such as 0.0.0.0:7400"
        ))
    })
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        haul_core::status::fatal(format!("cannot listen on {addr} for the {what}: {e}"))
    })
}

/// A `host:port` to dial.
pub fn parse_dial(s: &str, flag: &str) -> anyhow::Result<String> {
    let ok = s
        .rsplit_once(':')
        .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .unwrap_or(false);
    if !ok {
        return Err(haul_core::status::fatal(format!(
            "--{flag} {s:?} is not an address; use HOST:PORT such as coord.example.com:7400"
        )));
    }
    Ok(s.to_string())
}

pub async fn coordinator(a: CoordinatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = parse_listen(&required(a.listen, "listen")?, "listen")?;
    let state: PathBuf = required(a.state, "state")?;
    let certs: PathBuf = required(a.certs, "certs")?;
    let lease_timeout = match a.lease_timeout {
        Some(s) => humantime::parse_duration(&s).map_err(|e| {
            haul_core::status::fatal(format!("--lease-timeout {s:?}: {e}; use e.g. 30m or 90s"))
        })?,
        None => Duration::from_secs(60),
    };
    // Plain HTTP only on loopback (this host); anywhere else HTTPS for operators only.
    let http = match a.http {
        Some(s) => {
            let addr = parse_listen(&s, "http")?;
            let tls = a.http_tls || !addr.ip().is_loopback();
            let listener = bind(addr, "metrics page (--http)").await?;
            tracing::info!(
                "metrics on {}://{}/metrics{}",
                if tls { "https" } else { "http" },
                listener.local_addr().context("local address")?,
                if tls {
                    " (client certificate of role operator required)"
                } else {
                    " (this host only)"
                }
            );
            Some(haul_coordinator::HttpListener { listener, tls })
        }
        None => None,
    };
    let time_zone_name = a.time_zone.unwrap_or_else(|| "UTC".to_string());
    let time_zone = haul_coordinator::time_zone(&time_zone_name)?;
    let tls = load_tls(&certs, Role::Coordinator, "coordinator")?;
    let listener = bind(listen, "coordinator").await?;
    tracing::info!(
        "coordinator listening on {}",
        listener.local_addr().context("local address")?
    );
    haul_coordinator::run(
        haul_coordinator::CoordinatorConfig {
            state_dir: state,
            tls,
            lease_timeout,
            time_zone,
            time_zone_name,
        },
        listener,
        http,
        shutdown,
    )
    .await
}

pub async fn receiver(a: ReceiverArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let listen = parse_listen(&required(a.listen, "listen")?, "listen")?;
    let target = DbUrl::parse(&required(a.target, "target")?, Side::Target)?;
    let state: PathBuf = required(a.state, "state")?;
    let spool: PathBuf = required(a.spool, "spool")?;
    let spool_bytes = size_flag("--spool-size", a.spool_size.as_deref(), 16_000_000_000)?;
    let certs: PathBuf = required(a.certs, "certs")?;
    let name = a.name.unwrap_or_else(|| "receiver".to_string());
    let tls = load_tls(&certs, Role::Receiver, &name)?;
    let listener = bind(listen, "receiver").await?;
    let local = listener.local_addr().context("local address")?;
    let advertise = match a.advertise {
        Some(s) => parse_dial(&s, "advertise")?,
        None if local.ip().is_unspecified() => {
            return Err(haul_core::status::fatal(format!(
                "--listen {local} is a wildcard address; pass --advertise HOST:PORT so senders know where to dial"
            )))
        }
        None => local.to_string(),
    };
    tracing::info!("receiver listening on {local}, advertised as {advertise}");
    haul_receiver::run(
        haul_receiver::ReceiverConfig {
            coordinator,
            advertise,
            target,
            state_dir: state,
            spool_dir: spool,
            spool_bytes,
            tls,
            name,
            slots: a.slots.unwrap_or(8).max(1),
        },
        listener,
        shutdown,
    )
    .await
}

pub async fn sender(a: SenderArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let coordinator = parse_dial(&required(a.coordinator, "coordinator")?, "coordinator")?;
    let source = DbUrl::parse(&required(a.source, "source")?, Side::Source)?;
    let state: PathBuf = required(a.state, "state")?;
    let certs: PathBuf = required(a.certs, "certs")?;
    let name = a.name.unwrap_or_else(|| "sender".to_string());
    let staging_bytes = size_flag("--staging-size", a.staging_size.as_deref(), 2_000_000_000)?;
    let tls = load_tls(&certs, Role::Sender, &name)?;
    haul_sender::run(
        haul_sender::SenderConfig {
            coordinator,
            source,
            state_dir: state,
            tls,
            name,
            slots: a.slots.unwrap_or(8).max(1),
            staging_bytes,
            pg_dump: a.pg_dump,
        },
        shutdown,
    )
    .await
}

/// A size flag, or its default.
fn size_flag(flag: &str, value: Option<&str>, default: u64) -> anyhow::Result<u64> {
    match value {
        Some(v) => haul_core::bandwidth::parse_size(v)
            .map_err(|e| haul_core::status::fatal(format!("{flag} {v:?}: {e:#}"))),
        None => Ok(default),
    }
}
