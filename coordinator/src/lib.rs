//! The coordinator: accepts jobs from operators, has a sender plan them, hands chunks out as
//! leases (largest first), tracks progress and the final verification, and keeps all of it in
//! sled so a restart resumes every job.
//!
//! Invariant: the coordinator never touches payload bytes and holds no database credentials.

mod cap;
mod http;
mod job;
mod service;
mod store;
mod verify_run;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use haul_certs::Mtls;
use haul_proto as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use job::Phase;

#[derive(Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub tls: Mtls,
    /// A lease not reported within this long goes to another sender.
    pub lease_timeout: Duration,
    /// Where timetables of caps are evaluated, and its name as status shows it.
    pub time_zone: jiff::tz::TimeZone,
    pub time_zone_name: String,
}

/// The time zone `name` (IANA, e.g. Europe/Berlin, or UTC), from the database built into haul.
pub fn time_zone(name: &str) -> anyhow::Result<jiff::tz::TimeZone> {
    jiff::tz::TimeZone::get(name).map_err(|e| {
        haul_core::status::fatal(format!(
            "--time-zone {name:?}: {e}; use an IANA name such as UTC or Europe/Berlin"
        ))
    })
}

/// `--http`: where metrics are served, and whether as HTTPS for operators only (see `http`).
pub struct HttpListener {
    pub listener: TcpListener,
    pub tls: bool,
}

/// Serve on `listener` (and `http`) until `shutdown` is cancelled.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    http: Option<HttpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = store::Store::open(&config.state_dir)?;
    let inner = Arc::new(service::Inner::new(
        store,
        config.lease_timeout,
        config.time_zone.clone(),
        config.time_zone_name.clone(),
    )?);
    let svc = pb::coordinator_server::CoordinatorServer::new(service::CoordinatorService {
        inner: inner.clone(),
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let routes = tonic::service::Routes::new(svc);
    let expiry = {
        let (inner, shutdown) = (inner.clone(), shutdown.clone());
        tokio::spawn(async move { inner.expire_loop(shutdown).await })
    };
    let web = http.map(|h| {
        let (inner, shutdown) = (inner.clone(), shutdown.clone());
        let tls = h.tls.then(|| config.tls.clone());
        tokio::spawn(async move { http::serve(inner, h.listener, tls, shutdown).await })
    });
    let served = haul_certs::serve(routes, listener, &config.tls, shutdown.clone()).await;
    shutdown.cancel();
    let _ = expiry.await;
    if let Some(web) = web {
        let _ = web.await;
    }
    inner.store.flush().await?;
    served
}
