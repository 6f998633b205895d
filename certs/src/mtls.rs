//! Loading one agent's certificate, key and CA into ready-to-use rustls configs.
//!
//! Everything that can be wrong with certificate files is checked here, once,
//! at startup, and reported as one line naming the file and the fix. The
//! alternative — finding out from a TLS alert on the far side of a WAN link —
//! is the kind of error nobody can act on.
//!
//! **Reload.** Certificates are short-lived and revocations must take effect
//! while a move runs, so an [`Mtls`] re-reads its files when they change rather
//! than only at startup. Every handshake takes the current configs from
//! [`Mtls::server_config`] or [`Mtls::client_config`]; when the last look is
//! older than [`RELOAD_INTERVAL`] (2 s), that call first `stat`s the files and
//! re-reads whichever pair changed: the trust pair (`ca.pem` and the optional
//! `crl.pem` beside it) or the identity pair (certificate and key). A part that
//! fails to parse, does not match, is expired or names another agent keeps the
//! old material and logs one warning; a running agent never stops over a bad
//! file. New trust is applied even when it revokes our own certificate, with a
//! warning. Established connections keep their session; new ones (and every
//! reconnect of a channel) see the new material. Replace files atomically
//! (write beside, rename over) and the certificate before the key's old copy
//! is gone: a half-written pair is refused and retried when it changes again.
//!
//! **Revocation.** `crl.pem`, written by `haul certs revoke`, is handed to
//! rustls' webpki verifiers on both ends, so a revoked client is refused by
//! servers and a revoked server by clients. Certificates of a CA the CRL does
//! not cover (the other CA during a CA rotation) are not refused for that, and
//! an out-of-date CRL (past its `nextUpdate`) is still used rather than
//! blocking every peer. Expired certificates are refused by webpki on both ends.
//!
//! The configs allow TLS 1.3 only (both ends are haul) and use the ring
//! provider explicitly rather than whatever process-wide default another crate
//! may have installed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::role::{Identity, Role};
use crate::verifier::{client_verifier, RoleVerifier};

/// ALPN protocol both ends insist on: gRPC is HTTP/2 only.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// How often, at most, the files are checked for changes. The check is a few
/// `stat`s made by the next handshake after the interval has passed, so an
/// idle agent does no work and a busy one does little.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

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

    /// The revocation list beside the CA: `ca.pem`'s sibling `crl.pem`, as
    /// written by `haul certs revoke`. Optional.
    pub fn crl(&self) -> PathBuf {
        self.ca.with_file_name(crate::authority::CRL_FILE)
    }

    /// The directory the CA lives in, for "run `haul certs init --dir …`" hints.
    fn dir(&self) -> String {
        match self.ca.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.display().to_string(),
            _ => ".".to_owned(),
        }
    }
}

/// Loaded, validated mTLS material for one agent. Cheap to clone; clones share
/// the reloaded material.
#[derive(Clone)]
pub struct Mtls {
    inner: Arc<Inner>,
}

struct Inner {
    /// Fixed for the life of the process: a reload may renew the certificate
    /// but not turn this agent into another one.
    identity: Identity,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    /// Locked briefly by every handshake to take the current configs, and
    /// while files are re-read (a few small files, at most every
    /// [`RELOAD_INTERVAL`]).
    state: Mutex<State>,
}

/// What is loaded now, and what the files looked like when it was.
struct State {
    checked: Instant,
    trust_stamp: Stamp,
    own_stamp: Stamp,
    trust: Trust,
    own: Own,
    configs: Arc<Configs>,
}

/// The CA certificates and revocation lists peers are checked against.
#[derive(Clone)]
struct Trust {
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

/// This agent's certificate chain and key.
struct Own {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

struct Configs {
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
    /// Loads `files` (and the CRL beside the CA, if there is one), checks the
    /// certificate is signed by the CA, not revoked, currently valid, matches
    /// the key and names `expect` as its role, and builds the server and
    /// client configs.
    pub fn load(files: &TlsFiles, expect: Role) -> anyhow::Result<Mtls> {
        let dir = files.dir();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust_stamp = Stamp::of(&[&files.ca, &files.crl()]);
        let own_stamp = Stamp::of(&[&files.cert, &files.key]);

        let trust = load_trust(files, &dir, &provider)?;
        let (identity, own) = load_own(files, &dir, &provider)?;
        if identity.role != expect {
            bail!(
                "{} is {} certificate; the {expect} needs one issued with role {expect} \
                 (`haul certs issue --dir {dir} --role {expect}`)",
                files.cert.display(),
                identity.role.with_article(),
            );
        }
        // Verify our own certificate exactly as peers will, so mistakes show up here.
        verify_own(&trust, &own, &provider)
            .map_err(|err| explain_verify_error(err, &own.chain[0], files, &identity, &dir))?;
        warn_if_expiring(&own.chain[0], &files.cert);
        warn_if_key_readable(&files.key);
        let configs = build_configs(&trust, &own, &provider, files)?;

        Ok(Mtls {
            inner: Arc::new(Inner {
                identity,
                files: files.clone(),
                provider,
                state: Mutex::new(State {
                    checked: Instant::now(),
                    trust_stamp,
                    own_stamp,
                    trust,
                    own,
                    configs: Arc::new(configs),
                }),
            }),
        })
    }

    /// Who this agent is, according to its own certificate.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The current rustls server config: client certificates required and
    /// checked against the CA and CRL, ALPN h2. Re-reads changed files first
    /// when the last check is [`RELOAD_INTERVAL`] old, so take a fresh one per
    /// connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The current rustls client config for dialing an agent of role `expect`:
    /// presents our certificate, ALPN h2, and rejects servers of any other role
    /// or with a revoked certificate. Reloads like [`Mtls::server_config`].
    pub fn client_config(&self, expect: Role) -> Arc<ClientConfig> {
        self.current().clients[expect.index()].clone()
    }

    fn current(&self) -> Arc<Configs> {
        // A panic elsewhere while holding the lock leaves the state as it was
        // before that reload; it is still usable.
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_INTERVAL {
            state.checked = Instant::now();
            self.inner.refresh(&mut state);
        }
        state.configs.clone()
    }
}

impl Inner {
    /// Re-reads whichever of the trust files (CA, CRL) and identity files
    /// (certificate, key) changed since the last look. A part that fails to
    /// load keeps its old material, with one warning per change of the files.
    fn refresh(&self, state: &mut State) {
        let files = &self.files;
        let dir = files.dir();
        let trust_stamp = Stamp::of(&[&files.ca, &files.crl()]);
        let own_stamp = Stamp::of(&[&files.cert, &files.key]);
        let mut trust = None;
        let mut own = None;

        if trust_stamp != state.trust_stamp {
            state.trust_stamp = trust_stamp;
            match load_trust(files, &dir, &self.provider) {
                Ok(new) => trust = Some(new),
                Err(e) => tracing::warn!(
                    "failed to reload the CA and revocation list, keeping the ones loaded before: {e:#}"
                ),
            }
        }
        if own_stamp != state.own_stamp {
            state.own_stamp = own_stamp;
            let current_trust = trust.as_ref().unwrap_or(&state.trust);
            match self.load_renewed(current_trust, &dir) {
                Ok(new) => own = Some(new),
                Err(e) => tracing::warn!(
                    "failed to reload {}, keeping the certificate loaded before: {e:#}",
                    files.cert.display()
                ),
            }
        }
        if trust.is_none() && own.is_none() {
            return;
        }

        let new_trust = trust.as_ref().unwrap_or(&state.trust);
        let new_own = own.as_ref().unwrap_or(&state.own);
        if own.is_none() {
            // New trust is applied even if it condemns our own certificate
            // (revoked, say): refusing the peers it names matters more, and
            // the warning tells the operator what to reissue.
            if let Err(err) = verify_own(new_trust, new_own, &self.provider) {
                let why = explain_verify_error(err, &new_own.chain[0], files, &self.identity, &dir);
                tracing::warn!(
                    "peers that load the new CA and revocation list will refuse us: {why:#}"
                );
            }
        }
        match build_configs(new_trust, new_own, &self.provider, files) {
            Ok(configs) => {
                let what = match (trust.is_some(), own.is_some()) {
                    (true, true) => "CA, revocation list and certificate",
                    (true, false) => "CA and revocation list",
                    _ => "certificate",
                };
                tracing::info!("reloaded the {what} for {}", self.identity);
                state.configs = Arc::new(configs);
                if let Some(trust) = trust {
                    state.trust = trust;
                }
                if let Some(own) = own {
                    state.own = own;
                }
            }
            Err(e) => tracing::warn!("failed to rebuild TLS configs, keeping the old ones: {e:#}"),
        }
    }

    /// A replacement certificate and key: must be the same agent and pass the
    /// same checks as at startup.
    fn load_renewed(&self, trust: &Trust, dir: &str) -> anyhow::Result<Own> {
        let files = &self.files;
        let (identity, own) = load_own(files, dir, &self.provider)?;
        if identity != self.identity {
            bail!(
                "{} now names {identity} but this agent is {}; restart the agent to change who it is",
                files.cert.display(),
                self.identity
            );
        }
        verify_own(trust, &own, &self.provider)
            .map_err(|err| explain_verify_error(err, &own.chain[0], files, &identity, dir))?;
        warn_if_expiring(&own.chain[0], &files.cert);
        Ok(own)
    }
}

/// Reads the CA certificates and, if present, the revocation list beside them.
fn load_trust(
    files: &TlsFiles,
    dir: &str,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Trust> {
    let ca_certs = read_certs(&files.ca, dir)?;
    let mut roots = RootCertStore::empty();
    for der in &ca_certs {
        roots.add(der.clone()).map_err(|e| {
            anyhow!(
                "{} is not a usable CA certificate ({e}); run `haul certs init --dir {dir}`",
                files.ca.display()
            )
        })?;
        check_ca_dates(der, files, dir)?;
    }
    let roots = Arc::new(roots);
    let crls = read_crls(&files.crl())?;
    // Building a verifier parses the CRLs, so a broken one is caught here.
    client_verifier(roots.clone(), provider.clone(), crls.clone())
        .map_err(|e| anyhow!("{}: {e:#}", files.crl().display()))?;
    Ok(Trust { roots, crls })
}

/// Reads this agent's certificate and key and checks they belong together.
fn load_own(
    files: &TlsFiles,
    dir: &str,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<(Identity, Own)> {
    let chain = read_certs(&files.cert, dir)?;
    let key = read_key(&files.key, dir)?;
    let Some(leaf) = chain.first() else {
        bail!("{} contains no certificate", files.cert.display());
    };
    CertifiedKey::from_der(chain.clone(), key.clone_key(), provider).map_err(|e| {
        anyhow!(
            "{} does not belong to {} ({e}); use the .key file written together with the certificate",
            files.key.display(),
            files.cert.display()
        )
    })?;
    let identity =
        Identity::from_cert_der(leaf).map_err(|e| anyhow!("{}: {e:#}", files.cert.display()))?;
    Ok((identity, Own { chain, key }))
}

/// Our certificate as a peer holding `trust` would judge it.
fn verify_own(
    trust: &Trust,
    own: &Own,
    provider: &Arc<CryptoProvider>,
) -> Result<(), rustls::Error> {
    let verifier = client_verifier(trust.roots.clone(), provider.clone(), trust.crls.clone())
        .map_err(|e| rustls::Error::General(format!("{e:#}")))?;
    verifier
        .verify_client_cert(&own.chain[0], &own.chain[1..], UnixTime::now())
        .map(|_| ())
}

fn build_configs(
    trust: &Trust,
    own: &Own,
    provider: &Arc<CryptoProvider>,
    files: &TlsFiles,
) -> anyhow::Result<Configs> {
    let verifier = client_verifier(trust.roots.clone(), provider.clone(), trust.crls.clone())?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| anyhow!("configure TLS server: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(own.chain.clone(), own.key.clone_key())
        .map_err(|e| anyhow!("configure TLS server with {}: {e}", files.cert.display()))?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];

    let client_for = |expect: Role| -> anyhow::Result<Arc<ClientConfig>> {
        let verifier = RoleVerifier::new(
            trust.roots.clone(),
            provider.clone(),
            trust.crls.clone(),
            expect,
        )?;
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| anyhow!("configure TLS client: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(own.chain.clone(), own.key.clone_key())
            .map_err(|e| anyhow!("configure TLS client with {}: {e}", files.cert.display()))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    };
    Ok(Configs {
        server: Arc::new(server),
        clients: [
            client_for(Role::ALL[0])?,
            client_for(Role::ALL[1])?,
            client_for(Role::ALL[2])?,
            client_for(Role::ALL[3])?,
        ],
    })
}

/// The revocation lists in `path`; none if the file does not exist.
fn read_crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{} is not a valid PEM file: {e}", path.display()))?;
    if crls.is_empty() {
        bail!(
            "{} contains no PEM revocation list; write it with `haul certs revoke`",
            path.display()
        );
    }
    Ok(crls)
}

/// What a set of files looked like: modification time, size and (on Unix)
/// inode and change time, or absence. Comparing stamps is a few `stat`s; an
/// atomic replace (write beside, rename over) always changes the inode, so
/// even two writes within one clock tick are seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<FileStamp>>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

impl Stamp {
    fn of(paths: &[&Path]) -> Stamp {
        Stamp(
            paths
                .iter()
                .map(|path| {
                    let meta = fs::metadata(path).ok()?;
                    #[cfg(unix)]
                    use std::os::unix::fs::MetadataExt;
                    Some(FileStamp {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                        #[cfg(unix)]
                        inode: (meta.dev(), meta.ino()),
                        #[cfg(unix)]
                        changed: (meta.ctime(), meta.ctime_nsec()),
                    })
                })
                .collect(),
        )
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
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => anyhow!(
            "{cert} has been revoked (it is listed in {}); issue a new one with {reissue}",
            files.crl().display()
        ),
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
