//! The coordinator: accepts jobs from operators, has a sender plan them, hands chunks out as
//! leases (largest first), tracks progress and the final verification, and keeps all of it in
//! sled so a restart resumes every job.
//!
//! Invariant: the coordinator never touches payload bytes and holds no database credentials.

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
}

/// Serve on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = store::Store::open(&config.state_dir)?;
    let inner = Arc::new(service::Inner::new(store, config.lease_timeout)?);
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
    let served = haul_certs::serve(routes, listener, &config.tls, shutdown.clone()).await;
    shutdown.cancel();
    let _ = expiry.await;
    inner.store.flush().await?;
    served
}
