//! Revocation, live reload and expiry, end to end: real servers on
//! 127.0.0.1:0 that keep running while the files under them change.
//!
//! Reloads happen on the first handshake after `RELOAD_INTERVAL`, so tests
//! poll for the expected outcome instead of sleeping a fixed time.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail};
use haul_certs::{
    connect, issue, issue_with_validity, revoke, Mtls, Role, TlsFiles, RELOAD_INTERVAL,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use common::{assert_refused, init_dir, load, raw_client, who_am_i, TestServer};

/// Longest a test waits for a reload: a few intervals, generous for slow CI.
const PATIENCE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// Calls `attempt` until it returns `Some`, or fails after [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(found) = attempt().await? {
            return Ok(found);
        }
        if start.elapsed() > PATIENCE {
            bail!("{what}: not seen within {}s", PATIENCE.as_secs());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The error of `connect`, or `None` if it connected.
async fn connect_error(addr: SocketAddr, tls: &Mtls, expect: Role) -> Option<String> {
    connect(&addr.to_string(), tls, expect)
        .await
        .err()
        .map(|e| e.to_string())
}

/// The certificate the server at `addr` presents to a sender.
async fn served_certificate(dir: &Path, addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let connector = raw_client(
        &dir.join("ca.pem"),
        Some((&dir.join("sender.pem"), &dir.join("sender.key"))),
    )?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| anyhow!("server presented no certificate"))?;
    Ok(leaf.as_ref().to_vec())
}

fn first_cert(path: &Path) -> anyhow::Result<Vec<u8>> {
    let der = CertificateDer::pem_file_iter(path)?
        .next()
        .ok_or_else(|| anyhow!("no certificate in {}", path.display()))??;
    Ok(der.as_ref().to_vec())
}

/// Replaces `path` the way operators should: write beside it, rename over it.
fn replace(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn expired_window() -> (SystemTime, SystemTime) {
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    (now - 10 * day, now - day)
}

#[test]
fn reload_interval_is_a_few_seconds() {
    assert!(RELOAD_INTERVAL >= Duration::from_secs(1) && RELOAD_INTERVAL <= Duration::from_secs(5));
}

#[test]
fn revoke_keeps_earlier_serials_and_load_refuses_revoked() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let crl = revoke(dir.path(), "sender")?;
    assert_eq!(crl, dir.path().join("crl.pem"));
    let s2 = issue(dir.path(), Role::Sender, "s2", &[], 30)?;
    revoke(dir.path(), "s2")?;
    // Revoking twice is harmless.
    revoke(dir.path(), "s2")?;

    for (name, role) in [("sender", Role::Sender), ("s2", Role::Sender)] {
        let err = Mtls::load(&TlsFiles::named(dir.path(), name), role)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(&format!(
                "{} has been revoked (it is listed in {})",
                dir.path().join(format!("{name}.pem")).display(),
                crl.display()
            )),
            "{name}: {err}"
        );
    }
    assert_eq!(s2, dir.path().join("s2.pem"));
    load(dir.path(), Role::Receiver)?;
    load(dir.path(), Role::Coordinator)?;

    let missing = revoke(dir.path(), "nobody").err().map(|e| e.to_string());
    assert!(
        missing
            .as_deref()
            .unwrap_or_default()
            .contains("does not exist"),
        "{missing:?}"
    );
    assert!(revoke(dir.path(), "../ca").is_err());
    assert!(revoke(dir.path(), "ca").is_err());
    Ok(())
}

#[tokio::test]
async fn revoked_client_is_refused_by_running_server() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let sender = load(dir.path(), Role::Sender)?;
    let before = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(
        who_am_i(before.clone(), server.addr).await?,
        "sender/sender"
    );

    revoke(dir.path(), "sender")?;
    let err = eventually("sender refused after revoke", || async {
        Ok(connect_error(server.addr, &sender, Role::Coordinator).await)
    })
    .await?;
    assert!(
        err.contains("the coordinator refused our certificate (our certificate has been revoked)"),
        "{err}"
    );
    // A bare client with the same files is refused too, whatever its own state.
    let connector = raw_client(
        &dir.path().join("ca.pem"),
        Some((
            &dir.path().join("sender.pem"),
            &dir.path().join("sender.key"),
        )),
    )?;
    let reason = assert_refused(connector, server.addr).await?;
    assert!(reason.contains("CertificateRevoked"), "{reason}");

    // Others are unaffected, and the connection made before keeps its session.
    let operator = load(dir.path(), Role::Operator)?;
    let channel = connect(&server.addr.to_string(), &operator, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "operator/operator");
    assert_eq!(who_am_i(before, server.addr).await?, "sender/sender");
    server.stop().await
}

#[tokio::test]
async fn revoked_server_is_refused_by_client() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let sender = load(dir.path(), Role::Sender)?;
    assert_eq!(
        connect_error(server.addr, &sender, Role::Coordinator).await,
        None
    );

    revoke(dir.path(), "coordinator")?;
    let err = eventually("revoked coordinator refused by sender", || async {
        Ok(connect_error(server.addr, &sender, Role::Coordinator).await)
    })
    .await?;
    assert!(
        err.starts_with(&format!(
            "cannot reach coordinator at {}: TLS handshake failed: the server's certificate has been revoked",
            server.addr
        )),
        "{err}"
    );
    // A client loaded after the revocation refuses it from the start.
    let operator = load(dir.path(), Role::Operator)?;
    let err = connect_error(server.addr, &operator, Role::Coordinator).await;
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .contains("has been revoked"),
        "{err:?}"
    );
    server.stop().await
}

#[tokio::test]
async fn rotated_server_certificate_is_served_without_restart() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let sender = load(dir.path(), Role::Sender)?;
    let old = first_cert(&dir.path().join("coordinator.pem"))?;
    assert_eq!(served_certificate(dir.path(), server.addr).await?, old);
    let before = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;

    // Issue the renewal elsewhere (as on the CA's machine), then move it in.
    let staging = tempfile::tempdir()?;
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(dir.path().join(file), staging.path().join(file))?;
    }
    issue(staging.path(), Role::Coordinator, "coordinator", &[], 30)?;
    let new = first_cert(&staging.path().join("coordinator.pem"))?;
    assert_ne!(new, old);
    for file in ["coordinator.pem", "coordinator.key"] {
        replace(
            &dir.path().join(file),
            &std::fs::read(staging.path().join(file))?,
        )?;
    }

    eventually("renewed certificate served", || async {
        let served = served_certificate(dir.path(), server.addr).await?;
        Ok((served == new).then_some(()))
    })
    .await?;
    let channel = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/sender");
    // The connection made before the renewal carries on.
    assert_eq!(who_am_i(before, server.addr).await?, "sender/sender");
    server.stop().await
}

#[tokio::test]
async fn corrupt_replacement_keeps_old_identity() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let sender = load(dir.path(), Role::Sender)?;
    let old = first_cert(&dir.path().join("coordinator.pem"))?;

    // A broken certificate and, alongside, a revocation: when the operator is
    // refused, we know the server has looked at the files again.
    replace(
        &dir.path().join("coordinator.pem"),
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    )?;
    revoke(dir.path(), "operator")?;
    // The operator trusts a copy of the CA with no crl.pem beside it, so only
    // the server's reload can refuse it.
    let elsewhere = tempfile::tempdir()?;
    let ca_copy = elsewhere.path().join("ca.pem");
    std::fs::copy(dir.path().join("ca.pem"), &ca_copy)?;
    let operator = Mtls::load(
        &TlsFiles {
            ca: ca_copy,
            ..TlsFiles::for_role(dir.path(), Role::Operator)
        },
        Role::Operator,
    )?;
    let err = eventually("server reloaded", || async {
        Ok(connect_error(server.addr, &operator, Role::Coordinator).await)
    })
    .await?;
    assert!(err.contains("our certificate has been revoked"), "{err}");

    assert_eq!(served_certificate(dir.path(), server.addr).await?, old);
    let channel = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/sender");

    // A key that does not match the certificate is refused the same way. The
    // first handshake after the interval re-reads the files, so one wait is
    // enough to know the check has run.
    replace(
        &dir.path().join("coordinator.key"),
        &std::fs::read(dir.path().join("receiver.key"))?,
    )?;
    tokio::time::sleep(RELOAD_INTERVAL + POLL).await;
    assert_eq!(served_certificate(dir.path(), server.addr).await?, old);
    let channel = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/sender");
    server.stop().await
}

#[tokio::test]
async fn expired_client_certificate_is_refused() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let (not_before, not_after) = expired_window();
    issue_with_validity(dir.path(), Role::Sender, "old", &[], not_before, not_after)?;
    let files = TlsFiles::named(dir.path(), "old");
    let err = Mtls::load(&files, Role::Sender)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(&format!("{} expired on ", files.cert.display())),
        "{err}"
    );

    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let connector = raw_client(&files.ca, Some((&files.cert, &files.key)))?;
    let reason = assert_refused(connector, server.addr).await?;
    assert!(reason.contains("CertificateExpired"), "{reason}");
    server.stop().await
}

#[tokio::test]
async fn expired_server_certificate_is_refused() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let (not_before, not_after) = expired_window();
    let hosts = ["127.0.0.1".to_owned()];
    issue_with_validity(
        dir.path(),
        Role::Coordinator,
        "oldco",
        &hosts,
        not_before,
        not_after,
    )?;
    let files = TlsFiles::named(dir.path(), "oldco");
    assert!(Mtls::load(&files, Role::Coordinator).is_err());

    // `serve` cannot be given an expired certificate, so a bare rustls server plays it.
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(
        CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<_, _>>()?,
        PrivateKeyDer::from_pem_file(&files.key)?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });

    let sender = load(dir.path(), Role::Sender)?;
    let err = connect_error(addr, &sender, Role::Coordinator).await;
    assert_eq!(
        err,
        Some(format!(
            "cannot reach coordinator at {addr}: TLS handshake failed: the server's certificate has expired"
        ))
    );
    task.abort();
    Ok(())
}
