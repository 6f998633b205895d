//! The private certificate authority behind `haul certs init` and `haul certs issue`.
//!
//! haul does not use the public web PKI: every agent trusts exactly one CA made
//! for the deployment, and a certificate's URI SAN says which role it plays (see
//! [`crate::Identity`]). `init` makes that CA plus one certificate per role so a
//! first transfer needs no extra steps; `issue` adds named agents later (a second
//! sender, say) signed by the same CA.
//!
//! Keys are ECDSA P-256, written with mode 0600. Validity is deliberately short
//! (90 days for agents by default) and the CA outlives its leaves fourfold, so a
//! forgotten certificate fails loudly at `Mtls::load` rather than lingering.
//! Files are never overwritten silently: replacing `ca.key` would orphan every
//! certificate already handed out.
//!
//! `revoke` withdraws one certificate before it expires (a lost laptop, a
//! decommissioned agent): it appends the certificate's serial to `crl.pem`, a
//! revocation list signed by `ca.key`, and re-signs the whole list. Agents read
//! `crl.pem` from beside their `ca.pem` (see [`crate::Mtls`]), so distributing
//! it is the same job as distributing `ca.pem`.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use crate::role::{validate_name, Identity, Role};

/// Default validity of agent certificates, in days.
pub const DEFAULT_DAYS: u32 = 90;

/// Upper bound on agent validity; a decade-long certificate is a mistake, not a policy.
const MAX_DAYS: u32 = 3650;

/// The CA lives `CA_LIFETIME_FACTOR` times as long as its leaves, but at least a year.
const CA_LIFETIME_FACTOR: u32 = 4;
const MIN_CA_DAYS: u32 = 365;

/// Certificates start slightly in the past so clock skew between datacenters
/// does not make a fresh certificate "not yet valid" on the other side.
const BACKDATE: Duration = Duration::hours(1);

/// Subject common name of the haul CA.
const CA_COMMON_NAME: &str = "haul CA";

/// Options for [`init`], mirroring `haul certs init` flags.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// DNS names and IP addresses the agents are reachable at. Empty means
    /// "this machine": localhost, 127.0.0.1, ::1 and the host name.
    pub hosts: Vec<String>,
    /// Validity of the role certificates in days; the CA gets four times that.
    pub days: u32,
    /// Replace an existing CA and role certificates.
    pub force: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            hosts: Vec::new(),
            days: DEFAULT_DAYS,
            force: false,
        }
    }
}

/// Writes `dir/ca.pem`, `dir/ca.key` and, for every role, `dir/<role>.pem` and
/// `dir/<role>.key`.
///
/// Refuses to touch an existing `ca.key` (or any other target file) unless
/// `opts.force` is set.
pub fn init(dir: &Path, opts: &InitOptions) -> anyhow::Result<()> {
    check_days(opts.days)?;
    let hosts = host_sans(&opts.hosts)?;

    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let mut targets = vec![ca_cert.clone(), ca_key.clone()];
    for role in Role::ALL {
        targets.push(dir.join(format!("{role}.pem")));
        targets.push(dir.join(format!("{role}.key")));
    }
    if !opts.force {
        if ca_key.exists() {
            bail!(
                "{} already exists; refusing to replace the CA because every certificate it signed \
                 would stop working (pass --force to start over, or use `haul certs issue` to add an agent)",
                ca_key.display()
            );
        }
        if let Some(existing) = targets.iter().find(|path| path.exists()) {
            bail!(
                "{} already exists; pass --force to overwrite it",
                existing.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("create directory {}", dir.display()))?;

    let now = OffsetDateTime::now_utc();
    let ca_days = opts
        .days
        .saturating_mul(CA_LIFETIME_FACTOR)
        .max(MIN_CA_DAYS);
    let ca_key_pair = KeyPair::generate().context("generate CA key")?;
    let ca_params = ca_params(&ca_key_pair, now, now + Duration::days(i64::from(ca_days)));
    let ca = ca_params
        .self_signed(&ca_key_pair)
        .context("sign CA certificate")?;
    let issuer = Issuer::new(ca_params, ca_key_pair);

    // Everything is generated before anything is written, so a failure above
    // leaves the directory as it was.
    let mut files = vec![
        (ca_cert, ca.pem(), Mode::Public),
        (ca_key, issuer.key().serialize_pem(), Mode::Secret),
    ];
    let not_after = now + Duration::days(i64::from(opts.days));
    for role in Role::ALL {
        let identity = Identity::new(role, role.as_str())?;
        let (cert, key) = leaf(&identity, &hosts, now - BACKDATE, not_after, &issuer)?;
        files.push((dir.join(format!("{role}.pem")), cert, Mode::Public));
        files.push((dir.join(format!("{role}.key")), key, Mode::Secret));
    }
    for (path, contents, mode) in files {
        write_file(&path, contents.as_bytes(), mode, opts.force)?;
    }
    // A revocation list belongs to the CA just replaced; its serials mean
    // nothing to the new one.
    let crl = dir.join(CRL_FILE);
    match fs::remove_file(&crl) {
        Ok(()) => tracing::info!(
            "removed {}, which belonged to the replaced CA",
            crl.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove the old CA's {}: {e}", crl.display()),
    }
    Ok(())
}

/// Issues one more agent certificate signed by the CA in `dir`, writing
/// `dir/<name>.pem` and `dir/<name>.key`. Never overwrites. Returns the
/// certificate path.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    days: u32,
) -> anyhow::Result<PathBuf> {
    check_days(days)?;
    let target = Target::new(dir, role, name, hosts)?;
    let ca = Ca::open(dir)?;
    let now = OffsetDateTime::now_utc();
    if ca.not_after <= now {
        bail!(
            "the CA in {} expired on {}; make a new one with `haul certs init --dir {} --force` \
             and redistribute the certificates",
            ca.cert_path.display(),
            ca.not_after.date(),
            dir.display()
        );
    }
    let wanted = now + Duration::days(i64::from(days));
    // A leaf that outlives its CA would only fail later and more confusingly.
    let not_after = if wanted > ca.not_after {
        tracing::warn!(
            "the CA expires on {}; the certificate for {} will expire then too",
            ca.not_after.date(),
            target.identity
        );
        ca.not_after
    } else {
        wanted
    };
    target.write(&ca, now - BACKDATE, not_after)
}

/// Like [`issue`], but with an explicit validity window and no checks on it,
/// so tests can make certificates that are already expired or not valid yet.
/// Not for production use: `haul certs issue` is the supported way.
#[doc(hidden)]
pub fn issue_with_validity(
    dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> anyhow::Result<PathBuf> {
    let target = Target::new(dir, role, name, hosts)?;
    let ca = Ca::open(dir)?;
    target.write(&ca, not_before.into(), not_after.into())
}

/// Revokes the certificate in `dir/<name>.pem` (a role such as `sender`, or a
/// name given to `haul certs issue`) by adding its serial number to the CA's
/// revocation list `dir/crl.pem`, which is created if needed and re-signed with
/// `dir/ca.key`. Serials revoked earlier stay on the list. Returns the CRL path.
///
/// Agents that load their CA from `dir/ca.pem` read `dir/crl.pem` beside it and
/// pick up a new list within [`crate::RELOAD_INTERVAL`] for new connections;
/// copy `crl.pem` next to `ca.pem` on every other machine.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    validate_name(name)?;
    if name == "ca" {
        bail!(
            "the CA cannot revoke itself; make a new one with `haul certs init --dir {} --force`",
            dir.display()
        );
    }
    let cert_path = dir.join(format!("{name}.pem"));
    if !cert_path.exists() && dir.join("ca.pem").exists() {
        bail!(
            "{} does not exist; pass a role (sender, receiver, …) or a name given to \
             `haul certs issue --dir {}`",
            cert_path.display(),
            dir.display()
        );
    }
    let cert_pem = read_text(&cert_path, dir)?;
    let ca = Ca::open(dir)?;

    let cert_der = first_pem_cert(&cert_pem)
        .with_context(|| format!("read certificate {}", cert_path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| anyhow!("{} is not a parsable certificate: {e}", cert_path.display()))?;
    if cert.issuer().as_raw() != ca.subject_der.as_slice() {
        bail!(
            "{} was not issued by the CA in {}; revoke it with the CA that signed it",
            cert_path.display(),
            ca.cert_path.display()
        );
    }
    let serial = SerialNumber::from_slice(cert.raw_serial());

    let now = OffsetDateTime::now_utc();
    let crl_path = dir.join(CRL_FILE);
    let (mut revoked, crl_number) = read_crl(&crl_path, &ca)?;
    if revoked.iter().any(|r| r.serial_number == serial) {
        tracing::info!(
            "{} is already revoked; re-signing {}",
            cert_path.display(),
            crl_path.display()
        );
    } else {
        revoked.push(RevokedCertParams {
            serial_number: serial,
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_NEXT_UPDATE,
        crl_number,
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.issuer)
        .context("sign the revocation list")?;
    let pem = crl.pem().context("encode the revocation list")?;
    write_file(&crl_path, pem.as_bytes(), Mode::Public, true)?;
    Ok(crl_path)
}

/// The revocation list's file name, beside `ca.pem`.
pub(crate) const CRL_FILE: &str = "crl.pem";

/// How far ahead a new CRL's `nextUpdate` lies. haul does not refuse peers when
/// it passes (a forgotten refresh must not stop every move), but other tools
/// reading the CRL may, and `revoke` re-signs the list each time.
const CRL_NEXT_UPDATE: Duration = Duration::days(30);

/// The entries of the existing CRL at `path` and the number the next one gets.
/// A list signed by another CA (one replaced by `init --force`) is dropped:
/// its serials name that CA's certificates.
fn read_crl(path: &Path, ca: &Ca) -> anyhow::Result<(Vec<RevokedCertParams>, SerialNumber)> {
    let pem = match fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), SerialNumber::from(1u64)))
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let der = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow!("{} contains no PEM revocation list", path.display()))?
        .map_err(|e| anyhow!("{} is not a valid PEM file: {e}", path.display()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| anyhow!("{} is not a parsable revocation list: {e}", path.display()))?;
    if crl.issuer().as_raw() != ca.subject_der.as_slice() {
        tracing::warn!(
            "{} was signed by another CA; starting a new list for {}",
            path.display(),
            ca.cert_path.display()
        );
        return Ok((Vec::new(), SerialNumber::from(1u64)));
    }
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedCertParams {
            serial_number: SerialNumber::from_slice(r.raw_serial()),
            revocation_time: r.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let next = crl
        .crl_number()
        .map(|n| increment(&n.to_bytes_be()))
        .unwrap_or_else(|| vec![1]);
    Ok((revoked, SerialNumber::from(next)))
}

/// `bytes` (big-endian, unsigned) plus one.
fn increment(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for byte in out.iter_mut().rev() {
        let (sum, carry) = byte.overflowing_add(1);
        *byte = sum;
        if !carry {
            return out;
        }
    }
    out.insert(0, 1);
    out
}

/// Where a new agent certificate goes, checked before anything is signed.
struct Target {
    identity: Identity,
    hosts: Vec<SanType>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Target {
    fn new(dir: &Path, role: Role, name: &str, hosts: &[String]) -> anyhow::Result<Target> {
        let identity = Identity::new(role, name)?;
        if name == "ca" {
            bail!("agent name \"ca\" is reserved for the CA's own files");
        }
        let hosts = host_sans(hosts)?;
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                bail!(
                    "{} already exists; pick another --name or remove the old certificate first",
                    path.display()
                );
            }
        }
        Ok(Target {
            identity,
            hosts,
            cert_path,
            key_path,
        })
    }

    fn write(
        self,
        ca: &Ca,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<PathBuf> {
        let (cert, key) = leaf(
            &self.identity,
            &self.hosts,
            not_before,
            not_after,
            &ca.issuer,
        )?;
        write_file(&self.key_path, key.as_bytes(), Mode::Secret, false)?;
        write_file(&self.cert_path, cert.as_bytes(), Mode::Public, false)?;
        Ok(self.cert_path)
    }
}

/// The CA in a `haul certs` directory, ready to sign.
struct Ca {
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    /// The CA's subject name, DER, to recognise what it issued.
    subject_der: Vec<u8>,
}

impl Ca {
    fn open(dir: &Path) -> anyhow::Result<Ca> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let ca_pem = read_text(&cert_path, dir)?;
        let ca_key_pem = read_text(&key_path, dir)?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)
            .map_err(|e| anyhow!("{} is not a usable private key: {e}", key_path.display()))?;
        let der = first_pem_cert(&ca_pem)
            .with_context(|| format!("read CA certificate {}", cert_path.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("{} is not a parsable certificate: {e}", cert_path.display()))?;
        let not_after = cert.validity().not_after.to_datetime();
        let subject_der = cert.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
            anyhow!(
                "{} is not a usable CA certificate: {e}",
                cert_path.display()
            )
        })?;
        Ok(Ca {
            cert_path,
            issuer,
            not_after,
            subject_der,
        })
    }
}

fn check_days(days: u32) -> anyhow::Result<()> {
    if days == 0 || days > MAX_DAYS {
        bail!("certificate validity must be between 1 and {MAX_DAYS} days, got {days}");
    }
    Ok(())
}

fn ca_params(
    key: &KeyPair,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    // Each CA gets its own name ("haul CA 3f9a0c21", from its key). With one
    // shared name, a certificate from another deployment's CA would look like
    // a forgery of ours (bad signature) instead of an unknown issuer, which
    // makes for confusing errors when two `certs` directories get mixed up.
    let fingerprint: String = params
        .key_identifier(key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{CA_COMMON_NAME} {fingerprint}"),
    );
    params.distinguished_name = dn;
    // Path length 0: the CA signs agent certificates only, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before - BACKDATE;
    params.not_after = not_after;
    params
}

/// Generates a key and a CA-signed certificate for `identity`, as PEM strings.
fn leaf(
    identity: &Identity,
    hosts: &[SanType],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("haul {identity}"));
    params.distinguished_name = dn;
    let uri = identity
        .uri()
        .try_into()
        .map_err(|e| anyhow!("encode identity URI for {identity}: {e}"))?;
    params.subject_alt_names = std::iter::once(SanType::URI(uri))
        .chain(hosts.iter().cloned())
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every agent both serves and dials, so every certificate does both.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;

    let key = KeyPair::generate().with_context(|| format!("generate key for {identity}"))?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("sign certificate for {identity}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The DNS and IP SANs for `hosts`, or for this machine when `hosts` is empty.
fn host_sans(hosts: &[String]) -> anyhow::Result<Vec<SanType>> {
    let defaults;
    let hosts = if hosts.is_empty() {
        defaults = default_hosts();
        &defaults
    } else {
        hosts
    };
    let mut sans: Vec<SanType> = Vec::new();
    for host in hosts {
        let host = host.trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if rustls_pki_types::DnsName::try_from(host).is_err() {
                    bail!("{host:?} is neither an IP address nor a valid DNS name");
                }
                SanType::DnsName(
                    host.try_into()
                        .map_err(|e| anyhow!("{host:?} is not a valid DNS name: {e}"))?,
                )
            }
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// localhost, the loopback addresses and the machine's host name if it has a usable one.
fn default_hosts() -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let hostname = ["/etc/hostname", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| !name.is_empty());
    if let Some(name) = hostname {
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_ok() && !hosts.contains(&name) {
            hosts.push(name);
        } else {
            tracing::debug!("host name {name:?} is not a DNS name; leaving it out of certificates");
        }
    }
    hosts
}

/// The first certificate in a PEM text, DER.
fn first_pem_cert(pem: &str) -> anyhow::Result<rustls_pki_types::CertificateDer<'static>> {
    rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no PEM certificate found"))?
        .map(|der: rustls_pki_types::CertificateDer<'static>| der)
        .map_err(|e| anyhow!("cannot decode PEM: {e}"))
}

fn read_text(path: &Path, dir: &Path) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; run `haul certs init --dir {}` first",
            path.display(),
            dir.display()
        ),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Certificates: world-readable is fine.
    Public,
    /// Private keys: owner only.
    Secret,
}

/// Writes `contents` to `path`. Without `overwrite` the file must not exist
/// (checked atomically by `create_new`); with it, the new file is written
/// beside the old one and renamed over it so a crash never leaves half a key.
fn write_file(path: &Path, contents: &[u8], mode: Mode, overwrite: bool) -> anyhow::Result<()> {
    let target = if overwrite {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("cannot remove stale {}: {e}", tmp.display())),
        }
        tmp
    } else {
        path.to_path_buf()
    };

    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match mode {
            Mode::Public => 0o644,
            Mode::Secret => 0o600,
        });
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&target).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!(
                "{} already exists; refusing to overwrite it",
                target.display()
            )
        } else {
            anyhow!("cannot create {}: {e}", target.display())
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| anyhow!("cannot write {}: {e}", target.display()))?;
    drop(file);
    if overwrite {
        fs::rename(&target, path).map_err(|e| {
            anyhow!(
                "cannot move {} to {}: {e}",
                target.display(),
                path.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_become_dns_and_ip_sans() {
        let sans = host_sans(&["db.example".into(), "10.0.0.1".into(), "[::1]".into()]).ok();
        let ip4: IpAddr = [10, 0, 0, 1].into();
        let ip6: IpAddr = std::net::Ipv6Addr::LOCALHOST.into();
        assert_eq!(
            sans,
            Some(vec![
                SanType::DnsName("db.example".try_into().expect("valid literal")),
                SanType::IpAddress(ip4),
                SanType::IpAddress(ip6),
            ])
        );
        assert!(host_sans(&["not a host".into()]).is_err());
    }

    #[test]
    fn default_hosts_cover_loopback() {
        let hosts = default_hosts();
        for want in ["localhost", "127.0.0.1", "::1"] {
            assert!(hosts.iter().any(|h| h == want), "{want} missing");
        }
    }

    #[test]
    fn crl_numbers_count_up() {
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[1]),
            (&[1], &[2]),
            (&[0x01, 0xff], &[0x02, 0x00]),
            (&[0xff, 0xff], &[0x01, 0x00, 0x00]),
        ];
        for (from, want) in cases {
            assert_eq!(increment(from), want.to_vec(), "{from:?}");
        }
    }

    #[test]
    fn days_are_bounded() {
        assert!(check_days(0).is_err());
        assert!(check_days(MAX_DAYS + 1).is_err());
        assert!(check_days(1).is_ok());
    }
}
