//! Helpers shared by the certificate tests: a tiny gRPC-shaped service that
//! reports who called it, a server on 127.0.0.1:0 serving it, and bare rustls
//! clients for credentials `Mtls::load` would refuse.

// Each test file uses its own subset.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use haul_certs::{init, peer, serve, InitOptions, Mtls, Role, TlsFiles};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

/// Answers every call with an empty OK and an `x-peer` header naming the
/// caller as `peer()` sees it.
#[derive(Clone)]
pub struct WhoAmI;

impl NamedService for WhoAmI {
    const NAME: &'static str = "haul.test.WhoAmI";
}

impl Service<http::Request<Body>> for WhoAmI {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let who = match peer(&tonic::Request::from_http(req)) {
            Ok(identity) => identity.to_string(),
            Err(status) => format!("error: {}", status.message()),
        };
        let mut resp = http::Response::new(Body::empty());
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        if let Ok(value) = http::HeaderValue::from_str(&who) {
            resp.headers_mut().insert("x-peer", value);
        }
        ready(Ok(resp))
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(tls: &Mtls) -> anyhow::Result<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let tls = tls.clone();
        let token = shutdown.clone();
        let task =
            tokio::spawn(async move { serve(Routes::new(WhoAmI), listener, &tls, token).await });
        Ok(TestServer {
            addr,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("serve did not return after shutdown")?
            .context("join serve task")?
    }
}

/// Makes one call and returns the `x-peer` header the server answered with.
pub async fn who_am_i(channel: Channel, addr: SocketAddr) -> anyhow::Result<String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/haul.test.WhoAmI/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::empty())?;
    let resp = channel.oneshot(req).await?;
    let who = resp
        .headers()
        .get("x-peer")
        .ok_or_else(|| anyhow!("no x-peer header"))?
        .to_str()?
        .to_owned();
    Ok(who)
}

pub fn init_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    init(dir.path(), &InitOptions::default())?;
    Ok(dir)
}

pub fn load(dir: &Path, role: Role) -> anyhow::Result<Mtls> {
    Mtls::load(&TlsFiles::for_role(dir, role), role)
}

/// A bare rustls client trusting `ca` and presenting `client` (if any), for
/// credentials `Mtls::load` would refuse to build.
pub fn raw_client(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_file(key)?,
        )?,
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Handshakes with `connector` and reads; the server must send no data, only
/// an alert (or a close).
pub async fn assert_refused(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1")?;
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return Ok(e.to_string()),
    };
    let mut buf = [0u8; 1024];
    match tls.read(&mut buf).await {
        Ok(0) => Ok("closed".to_owned()),
        Ok(n) => Err(anyhow!("server accepted the connection and sent {n} bytes")),
        Err(e) => Ok(e.to_string()),
    }
}
