//! The three roles as separate processes over mTLS: `haul certs init`, a coordinator, a
//! receiver and a sender, a move started and followed by `haul start --wait`, compared
//! independently. Then the running agents are probed with clients that must be refused: no
//! certificate, a certificate from another CA, and certificates of the wrong role.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::procs::{self, failure_line, free_addr, haul};
use common::{compare_databases, load_rich};
use haul_certs::{Mtls, Role, TlsFiles};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn three_processes_move_and_refuse_strangers() -> anyhow::Result<()> {
    let (source, target) = common::two_clusters()?;
    load_rich(&source, "rich")?;
    target.create_database("rich")?;

    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let out = haul(&["certs", "init", "--dir", &d("certs"), "--host", "127.0.0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let coord = free_addr();
    let recv = free_addr();
    let _coordinator = procs::spawn(
        dir.path(),
        "coordinator",
        &[
            "--listen",
            &coord,
            "--state",
            &d("cstate"),
            "--certs",
            &d("certs"),
        ],
    )?;
    let receiver = procs::spawn(
        dir.path(),
        "receiver",
        &[
            "--coordinator",
            &coord,
            "--listen",
            &recv,
            "--target",
            &target.url("rich"),
            "--state",
            &d("rstate"),
            "--spool",
            &d("spool"),
            "--certs",
            &d("certs"),
        ],
    )?;
    let sender = procs::spawn(
        dir.path(),
        "sender",
        &[
            "--coordinator",
            &coord,
            "--source",
            &source.url("rich"),
            "--state",
            &d("sstate"),
            "--certs",
            &d("certs"),
        ],
    )?;

    // The coordinator takes a moment to bind; `start` fails fast until it has.
    let mut started = None;
    for _ in 0..100 {
        let out = haul(&[
            "start",
            "--coordinator",
            &coord,
            "--certs",
            &d("certs"),
            "--chunk-size",
            "4MB",
            "--jobs",
            "3",
            "--wait",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if stderr.contains("cannot reach coordinator") {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        started = Some(out);
        break;
    }
    let out = started.expect("coordinator never came up");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "start --wait failed\n{stdout}\n{}\nreceiver log:\n{}\nsender log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        receiver.log_text(),
        sender.log_text()
    );
    assert!(stdout.contains("result     done"), "{stdout}");
    // Each agent started again at once with glibc's malloc held to two arenas (same process,
    // same pid): many blocking threads would otherwise each keep what they freed.
    for agent in [&receiver, &sender] {
        let environ = std::fs::read(format!("/proc/{}/environ", agent.pid()))?;
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|v| v == b"MALLOC_ARENA_MAX=2"),
            "agent {} runs without MALLOC_ARENA_MAX=2",
            agent.pid()
        );
    }

    let diffs = compare_databases(&source.url("rich"), &target.url("rich"))?;
    assert!(
        diffs.is_empty(),
        "source and target differ:\n{}",
        diffs.join("\n")
    );

    let out = haul(&[
        "status",
        "--coordinator",
        &coord,
        "--certs",
        &d("certs"),
        "--json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["phase"], "done");
    assert_eq!(json["verified"], true);

    // A certificate from another CA: refused, one clear line.
    let out = haul(&["certs", "init", "--dir", &d("other")]);
    assert!(out.status.success());
    let line = failure_line(&haul(&[
        "status",
        "--coordinator",
        &coord,
        "--certs",
        &d("other"),
    ]));
    assert!(
        line.contains("refused") || line.contains("certificate"),
        "{line}"
    );

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // No client certificate at all: the TLS handshake is refused, no HTTP/2 is spoken.
        for addr in [&coord, &recv] {
            assert_no_cert_refused(&d("certs"), addr).await?;
        }

        // The right CA but the wrong role: PermissionDenied from every RPC we try.
        let sender_tls = Mtls::load(
            &TlsFiles::for_role(&dir.path().join("certs"), Role::Sender),
            Role::Sender,
        )?;
        let ch = haul_certs::connect(&coord, &sender_tls, Role::Coordinator).await?;
        let mut c = haul_proto::coordinator_client::CoordinatorClient::new(ch);
        let err = c
            .start_job(haul_proto::StartJobRequest {
                options: Some(Default::default()),
            })
            .await
            .expect_err("a sender may not start jobs");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        let err = c
            .job_status(haul_proto::JobStatusRequest::default())
            .await
            .expect_err("a sender may not read operator status");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);

        let op_tls = Mtls::load(
            &TlsFiles::for_role(&dir.path().join("certs"), Role::Operator),
            Role::Operator,
        )?;
        let ch = haul_certs::connect(&recv, &op_tls, Role::Receiver).await?;
        let mut r = haul_proto::receiver_client::ReceiverClient::new(ch);
        let err = r
            .begin_chunk(haul_proto::BeginChunkRequest {
                job_id: "job-1".into(),
                chunk_id: 1,
                epoch: 1,
            })
            .await
            .expect_err("an operator may not talk to a receiver");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

        // A client expecting a receiver refuses a coordinator that answers in its place.
        let e = haul_certs::connect(&coord, &op_tls, Role::Receiver)
            .await
            .expect_err("role of server checked");
        assert!(format!("{e:#}").contains("coordinator"), "{e:#}");
        anyhow::Ok(())
    })?;
    Ok(())
}

async fn assert_no_cert_refused(certs: &str, addr: &str) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(format!("{certs}/ca.pem"))? {
        roots.add(c?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // TLS 1.3: the client may finish its side before the server checks (and refuses) it.
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return Ok(());
    };
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await?;
    match read {
        Ok(0) | Err(_) => Ok(()),
        Ok(n) => anyhow::bail!("{addr} answered a client without a certificate with {n} bytes"),
    }
}
