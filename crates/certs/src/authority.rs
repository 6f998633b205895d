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

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::role::{Identity, Role};

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
        let (cert, key) = leaf(&identity, &hosts, now, not_after, &issuer)?;
        files.push((dir.join(format!("{role}.pem")), cert, Mode::Public));
        files.push((dir.join(format!("{role}.key")), key, Mode::Secret));
    }
    for (path, contents, mode) in files {
        write_file(&path, contents.as_bytes(), mode, opts.force)?;
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

    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_pem = read_text(&ca_cert_path, dir)?;
    let ca_key_pem = read_text(&ca_key_path, dir)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| anyhow!("{} is not a usable private key: {e}", ca_key_path.display()))?;
    let ca_not_after = ca_not_after(&ca_pem)
        .with_context(|| format!("read CA certificate {}", ca_cert_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        anyhow!(
            "{} is not a usable CA certificate: {e}",
            ca_cert_path.display()
        )
    })?;

    let now = OffsetDateTime::now_utc();
    if ca_not_after <= now {
        bail!(
            "the CA in {} expired on {}; make a new one with `haul certs init --dir {} --force` \
             and redistribute the certificates",
            ca_cert_path.display(),
            ca_not_after.date(),
            dir.display()
        );
    }
    let wanted = now + Duration::days(i64::from(days));
    // A leaf that outlives its CA would only fail later and more confusingly.
    let not_after = if wanted > ca_not_after {
        tracing::warn!(
            "the CA expires on {}; the certificate for {identity} will expire then too",
            ca_not_after.date()
        );
        ca_not_after
    } else {
        wanted
    };

    let (cert, key) = leaf(&identity, &hosts, now, not_after, &issuer)?;
    write_file(&key_path, key.as_bytes(), Mode::Secret, false)?;
    write_file(&cert_path, cert.as_bytes(), Mode::Public, false)?;
    Ok(cert_path)
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
    now: OffsetDateTime,
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
    params.not_before = now - BACKDATE;
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

/// The CA certificate's expiry, from its PEM.
fn ca_not_after(pem: &str) -> anyhow::Result<OffsetDateTime> {
    let der = rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no PEM certificate found"))?
        .map(|der: rustls_pki_types::CertificateDer<'static>| der)
        .map_err(|e| anyhow!("cannot decode PEM: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow!("cannot parse: {e}"))?;
    Ok(cert.validity().not_after.to_datetime())
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
    fn days_are_bounded() {
        assert!(check_days(0).is_err());
        assert!(check_days(MAX_DAYS + 1).is_err());
        assert!(check_days(1).is_ok());
    }
}
