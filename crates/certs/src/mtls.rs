//! Loading one agent's certificate, key and CA into ready-to-use rustls configs.
//!
//! Everything that can be wrong with certificate files is checked here, once,
//! at startup, and reported as one line naming the file and the fix. The
//! alternative — finding out from a TLS alert on the far side of a WAN link —
//! is the kind of error nobody can act on.
//!
//! The configs allow TLS 1.3 only (both ends are haul) and use the ring
//! provider explicitly rather than whatever process-wide default another crate
//! may have installed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::role::{Identity, Role};
use crate::verifier::{client_verifier, RoleVerifier};

/// ALPN protocol both ends insist on: gRPC is HTTP/2 only.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// Warn at startup when a certificate has fewer days than this left.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// Paths of one agent's identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate(s) to trust, PEM. Several may be listed during a CA rotation.
    pub ca: PathBuf,
    /// This agent's certificate, PEM, leaf first.
    pub cert: PathBuf,
    /// This agent's private key, PEM.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.pem`, `dir/<role>.pem`, `dir/<role>.key`: what `haul certs init` writes.
    pub fn for_role(dir: &Path, role: Role) -> Self {
        Self::named(dir, role.as_str())
    }

    /// `dir/ca.pem`, `dir/<name>.pem`, `dir/<name>.key`: what `haul certs issue` writes.
    pub fn named(dir: &Path, name: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// The directory the CA lives in, for "run `haul certs init --dir …`" hints.
    fn dir(&self) -> String {
        match self.ca.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.display().to_string(),
            _ => ".".to_owned(),
        }
    }
}

/// Loaded, validated mTLS material for one agent. Cheap to clone.
#[derive(Clone)]
pub struct Mtls {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    server: Arc<ServerConfig>,
    /// One client config per role we might dial, indexed by [`Role::index`],
    /// because the role check lives in the config's verifier.
    clients: [Arc<ClientConfig>; 4],
}

impl std::fmt::Debug for Mtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtls")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl Mtls {
    /// Loads `files`, checks the certificate is signed by the CA, currently
    /// valid, matches the key and names `expect` as its role, and builds the
    /// server and client configs.
    pub fn load(files: &TlsFiles, expect: Role) -> anyhow::Result<Mtls> {
        let dir = files.dir();
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let ca_certs = read_certs(&files.ca, &dir)?;
        let mut roots = RootCertStore::empty();
        for der in &ca_certs {
            roots.add(der.clone()).map_err(|e| {
                anyhow!(
                    "{} is not a usable CA certificate ({e}); run `haul certs init --dir {dir}`",
                    files.ca.display()
                )
            })?;
            check_ca_dates(der, files, &dir)?;
        }
        let roots = Arc::new(roots);

        let chain = read_certs(&files.cert, &dir)?;
        let key = read_key(&files.key, &dir)?;
        let Some(leaf) = chain.first() else {
            bail!("{} contains no certificate", files.cert.display());
        };
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
            anyhow!(
                "{} does not belong to {} ({e}); use the .key file written together with the certificate",
                files.key.display(),
                files.cert.display()
            )
        })?;

        let identity = Identity::from_cert_der(leaf)
            .map_err(|e| anyhow!("{}: {e:#}", files.cert.display()))?;
        if identity.role != expect {
            bail!(
                "{} is {} certificate; the {expect} needs one issued with role {expect} \
                 (`haul certs issue --dir {dir} --role {expect}`)",
                files.cert.display(),
                identity.role.with_article(),
            );
        }

        // Verify our own certificate exactly as peers will, so mistakes show up here.
        let verifier = client_verifier(roots.clone(), provider.clone(), Vec::new())?;
        if let Err(err) = verifier.verify_client_cert(leaf, &chain[1..], UnixTime::now()) {
            return Err(explain_verify_error(err, leaf, files, &identity, &dir));
        }
        warn_if_expiring(leaf, &files.cert);
        warn_if_key_readable(&files.key);

        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| anyhow!("configure TLS server: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| anyhow!("configure TLS server with {}: {e}", files.cert.display()))?;
        let mut server = server;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let client_for = |expect: Role| -> anyhow::Result<Arc<ClientConfig>> {
            let verifier = RoleVerifier::new(roots.clone(), provider.clone(), Vec::new(), expect)?;
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| anyhow!("configure TLS client: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| anyhow!("configure TLS client with {}: {e}", files.cert.display()))?;
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Ok(Arc::new(config))
        };
        let clients = [
            client_for(Role::ALL[0])?,
            client_for(Role::ALL[1])?,
            client_for(Role::ALL[2])?,
            client_for(Role::ALL[3])?,
        ];

        Ok(Mtls {
            inner: Arc::new(Inner {
                identity,
                server: Arc::new(server),
                clients,
            }),
        })
    }

    /// Who this agent is, according to its own certificate.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The rustls server config: client certificates required, ALPN h2.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server.clone()
    }

    /// The rustls client config for dialing an agent of role `expect`: presents
    /// our certificate, ALPN h2, and rejects servers of any other role.
    pub fn client_config(&self, expect: Role) -> Arc<ClientConfig> {
        self.inner.clients[expect.index()].clone()
    }
}

fn read_file(path: &Path, dir: &str) -> anyhow::Result<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; run `haul certs init --dir {dir}` (or `haul certs issue --dir {dir}` \
             for a named agent) and copy the files here",
            path.display()
        ),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

fn read_certs(path: &Path, dir: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = read_file(path, dir)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{} is not a valid PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} contains no PEM certificate; is it a key file?",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path, dir: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = read_file(path, dir)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        anyhow!(
            "{} contains no usable private key ({e}); expected the .key file from `haul certs`",
            path.display()
        )
    })
}

/// Dates of a certificate, if it parses.
fn validity(der: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = cert.validity();
    Some((
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    ))
}

/// webpki does not check trust anchor dates, so we do: an expired CA means
/// every peer will reject us anyway.
fn check_ca_dates(der: &[u8], files: &TlsFiles, dir: &str) -> anyhow::Result<()> {
    let Some((_, not_after)) = validity(der) else {
        bail!(
            "{} is not a parsable certificate; run `haul certs init --dir {dir}`",
            files.ca.display()
        );
    };
    if not_after <= OffsetDateTime::now_utc() {
        bail!(
            "the CA in {} expired on {}; make a new one with `haul certs init --dir {dir} --force` \
             and redistribute the certificates",
            files.ca.display(),
            not_after.date()
        );
    }
    Ok(())
}

fn explain_verify_error(
    err: rustls::Error,
    leaf: &CertificateDer<'_>,
    files: &TlsFiles,
    identity: &Identity,
    dir: &str,
) -> anyhow::Error {
    let cert = files.cert.display();
    let reissue = format!(
        "`haul certs issue --dir {dir} --role {} --name {}`",
        identity.role, identity.name
    );
    let dates = validity(leaf);
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => {
            let when = dates
                .map(|(_, not_after)| format!(" on {}", not_after.date()))
                .unwrap_or_default();
            anyhow!("{cert} expired{when}; issue a new one with {reissue}")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => {
            let when = dates
                .map(|(not_before, _)| format!(" until {not_before}"))
                .unwrap_or_default();
            anyhow!("{cert} is not valid{when}; check this machine's clock")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => anyhow!(
            "{cert} is not signed by the CA in {}; both must come from the same `haul certs init --dir {dir}`",
            files.ca.display()
        ),
        other => anyhow!(
            "{cert} failed verification against {}: {other}; issue a new one with {reissue}",
            files.ca.display()
        ),
    }
}

fn warn_if_expiring(leaf: &[u8], path: &Path) {
    if let Some((_, not_after)) = validity(leaf) {
        let left = not_after - OffsetDateTime::now_utc();
        if left.whole_days() < EXPIRY_WARNING_DAYS {
            tracing::warn!(
                "{} expires in {} days (on {}); issue a replacement soon",
                path.display(),
                left.whole_days(),
                not_after.date()
            );
        }
    }
}

fn warn_if_key_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{} is readable by other users (mode {mode:o}); run `chmod 600 {}`",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
