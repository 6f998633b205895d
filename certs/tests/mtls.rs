//! End-to-end checks of the certificate files and the mTLS transport: a real
//! server on 127.0.0.1:0 serving a tiny gRPC-shaped service that reports who
//! called it, dialed by real clients with good and bad credentials.

mod common;

use haul_certs::{connect, connect_lazy, init, issue, InitOptions, Mtls, Role, TlsFiles};
use tokio::net::TcpListener;

use common::{assert_refused, init_dir, load, raw_client, who_am_i, TestServer};

#[cfg(unix)]
#[test]
fn init_writes_all_files_with_private_keys() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = init_dir()?;
    let mode = |name: &str| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(dir.path().join(name))?
            .permissions()
            .mode()
            & 0o777)
    };
    assert_eq!(mode("ca.key")?, 0o600);
    assert_eq!(mode("ca.pem")?, 0o644);
    for role in Role::ALL {
        assert_eq!(mode(&format!("{role}.key"))?, 0o600, "{role}.key");
        assert_eq!(mode(&format!("{role}.pem"))?, 0o644, "{role}.pem");
        let tls = load(dir.path(), role)?;
        assert_eq!(tls.identity().role, role);
        assert_eq!(tls.identity().name, role.as_str());
    }

    let again = init(dir.path(), &InitOptions::default()).err();
    let msg = again.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("ca.key already exists"), "{msg}");

    let old_ca = std::fs::read(dir.path().join("ca.pem"))?;
    let force = InitOptions {
        force: true,
        ..InitOptions::default()
    };
    init(dir.path(), &force)?;
    assert_ne!(std::fs::read(dir.path().join("ca.pem"))?, old_ca);
    assert_eq!(mode("ca.key")?, 0o600);
    load(dir.path(), Role::Sender)?;
    Ok(())
}

#[tokio::test]
async fn right_ca_and_role_connects_and_server_sees_identity() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let sender = load(dir.path(), Role::Sender)?;

    let channel = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(
        who_am_i(channel.clone(), server.addr).await?,
        "sender/sender"
    );

    // Lazy channels connect on first use, by host name as well as by IP.
    let lazy = connect_lazy(
        &format!("localhost:{}", server.addr.port()),
        &load(dir.path(), Role::Operator)?,
        Role::Coordinator,
    )?;
    assert_eq!(who_am_i(lazy, server.addr).await?, "operator/operator");

    // Shutdown returns even though `channel` still holds its connection open.
    server.stop().await?;
    drop(channel);
    Ok(())
}

#[tokio::test]
async fn client_without_certificate_is_refused() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;

    let reason = assert_refused(raw_client(&dir.path().join("ca.pem"), None)?, server.addr).await?;
    assert!(reason.contains("CertificateRequired"), "{reason}");

    // The refused client did not disturb the server.
    let sender = load(dir.path(), Role::Sender)?;
    let channel = connect(&server.addr.to_string(), &sender, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/sender");
    server.stop().await
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let other = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;

    // Trusts the right CA but presents a certificate from another one.
    let connector = raw_client(
        &dir.path().join("ca.pem"),
        Some((
            &other.path().join("sender.pem"),
            &other.path().join("sender.key"),
        )),
    )?;
    let reason = assert_refused(connector, server.addr).await?;
    assert!(reason.contains("UnknownCA"), "{reason}");

    // Through `connect`, the server's refusal becomes a sentence.
    let mixed = Mtls::load(
        &TlsFiles {
            ca: other.path().join("ca.pem"),
            cert: other.path().join("sender.pem"),
            key: other.path().join("sender.key"),
        },
        Role::Sender,
    )?;
    let err = connect(&server.addr.to_string(), &mixed, Role::Coordinator)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(&format!("cannot reach coordinator at {}: ", server.addr))
            && err.contains("not signed by our CA"),
        "{err}"
    );
    server.stop().await
}

#[tokio::test]
async fn server_with_wrong_role_is_refused_by_connect() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Receiver)?).await?;
    let sender = load(dir.path(), Role::Sender)?;

    let err = connect(&server.addr.to_string(), &sender, Role::Coordinator)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains(
            "presented a receiver certificate (name receiver) but a coordinator was expected"
        ),
        "{err}"
    );

    // The same server is fine for someone expecting a receiver.
    let channel = connect(&server.addr.to_string(), &sender, Role::Receiver).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/sender");
    server.stop().await
}

#[tokio::test]
async fn issued_certificate_is_usable() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let path = issue(dir.path(), Role::Sender, "s2", &[], 30)?;
    assert_eq!(path, dir.path().join("s2.pem"));
    let s2 = Mtls::load(&TlsFiles::named(dir.path(), "s2"), Role::Sender)?;
    assert_eq!(s2.identity().name, "s2");

    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;
    let channel = connect(&server.addr.to_string(), &s2, Role::Coordinator).await?;
    assert_eq!(who_am_i(channel, server.addr).await?, "sender/s2");
    server.stop().await?;

    let again = issue(dir.path(), Role::Sender, "s2", &[], 30)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(again.contains("s2.pem already exists"), "{again}");
    let bad = issue(dir.path(), Role::Sender, "../evil", &[], 30);
    assert!(bad.is_err());
    Ok(())
}

#[test]
fn load_with_wrong_role_explains() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let files = TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("sender.pem"),
        key: dir.path().join("sender.key"),
    };
    // Put a receiver certificate where the sender's belongs.
    std::fs::copy(dir.path().join("receiver.pem"), &files.cert)?;
    std::fs::copy(dir.path().join("receiver.key"), &files.key)?;
    let err = Mtls::load(&files, Role::Sender)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let want = format!(
        "{} is a receiver certificate; the sender needs one issued with role sender",
        files.cert.display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(!err.contains('\n'), "{err}");
    Ok(())
}

#[test]
fn load_with_missing_file_names_it() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let key = dir.path().join("sender.key");
    std::fs::remove_file(&key)?;
    let err = load(dir.path(), Role::Sender)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(&format!("{} does not exist", key.display()))
            && err.contains(&format!("haul certs init --dir {}", dir.path().display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn load_with_mismatched_key_or_foreign_ca_explains() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let other = init_dir()?;
    let files = TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: other.path().join("sender.pem"),
        key: other.path().join("sender.key"),
    };
    let err = Mtls::load(&files, Role::Sender)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("is not signed by the CA in"), "{err}");

    let files = TlsFiles {
        key: dir.path().join("sender.key"),
        ..TlsFiles::for_role(other.path(), Role::Sender)
    };
    let err = Mtls::load(&files, Role::Sender)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("does not belong to"), "{err}");
    Ok(())
}

#[tokio::test]
async fn unreachable_server_fails_fast_with_reason() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let sender = load(dir.path(), Role::Sender)?;
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        listener.local_addr()?
    };
    let err = connect(&addr.to_string(), &sender, Role::Coordinator)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        format!("cannot reach coordinator at {addr}: connection refused")
    );
    Ok(())
}

#[tokio::test]
async fn server_refusing_our_certificate_fails_connect_with_reason() -> anyhow::Result<()> {
    let dir = init_dir()?;
    let other = init_dir()?;
    let server = TestServer::start(&load(dir.path(), Role::Coordinator)?).await?;

    // Mid CA rotation: we trust both CAs, but our certificate comes from the
    // new one, which the server does not trust yet.
    let bundle = other.path().join("bundle.pem");
    let mut pem = std::fs::read(other.path().join("ca.pem"))?;
    pem.extend(std::fs::read(dir.path().join("ca.pem"))?);
    std::fs::write(&bundle, pem)?;
    let sender = Mtls::load(
        &TlsFiles {
            ca: bundle,
            ..TlsFiles::for_role(other.path(), Role::Sender)
        },
        Role::Sender,
    )?;
    let err = connect(&server.addr.to_string(), &sender, Role::Coordinator)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "cannot reach coordinator at {}: the coordinator refused our certificate (our certificate is not signed by its CA)",
            server.addr
        )),
        "{err}"
    );

    // A lazy channel reports the same reason from its first call.
    let lazy = connect_lazy(&server.addr.to_string(), &sender, Role::Coordinator)?;
    let err = who_am_i(lazy, server.addr)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("refused our certificate"), "{err}");
    server.stop().await
}
