//! Roles and the identities certificates carry.
//!
//! Every haul certificate names exactly one agent with a SPIFFE-style URI SAN,
//! `spiffe://haul/<role>/<name>`. The role decides what an agent may do (a sender
//! may not call receiver RPCs); the name tells agents of the same role apart in
//! logs and in the coordinator's bookkeeping. Putting the role in the certificate,
//! rather than in a request field, means a peer cannot claim a role its CA did not
//! grant it.
//!
//! Names double as file names (`certs/<name>.pem`), so they are restricted to a
//! small, path-safe alphabet.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail};

/// URI prefix shared by every haul identity.
const SPIFFE_PREFIX: &str = "spiffe://haul/";

/// Longest agent name accepted, so names stay readable in logs and file names.
const MAX_NAME_LEN: usize = 64;

/// The four kinds of haul agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Plans transfers and hands out work; never touches payload bytes.
    Coordinator,
    /// Reads from the source PostgreSQL and streams chunks out.
    Sender,
    /// Accepts chunks and restores them into the target PostgreSQL.
    Receiver,
    /// A human or script driving the coordinator.
    Operator,
}

impl Role {
    /// Every role, in a stable order (the order `haul certs init` writes them).
    pub const ALL: [Role; 4] = [
        Role::Coordinator,
        Role::Sender,
        Role::Receiver,
        Role::Operator,
    ];

    /// The lowercase name used in URIs, file names and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Sender => "sender",
            Role::Receiver => "receiver",
            Role::Operator => "operator",
        }
    }

    /// "a sender", "an operator": for error messages that read as sentences.
    pub(crate) fn with_article(&self) -> String {
        match self {
            Role::Operator => format!("an {}", self.as_str()),
            _ => format!("a {}", self.as_str()),
        }
    }

    /// Position in [`Role::ALL`], used to index per-role tables.
    pub(crate) fn index(&self) -> usize {
        match self {
            Role::Coordinator => 0,
            Role::Sender => 1,
            Role::Receiver => 2,
            Role::Operator => 3,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let valid: Vec<&str> = Role::ALL.iter().map(Role::as_str).collect();
                anyhow!("unknown role {s:?}; expected one of: {}", valid.join(", "))
            })
    }
}

/// Who is on the other end of a verified connection (or who we are).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the agent may do.
    pub role: Role,
    /// Which agent of that role it is; defaults to the role's own name.
    pub name: String,
}

impl Identity {
    /// An identity after checking `name` is acceptable.
    pub fn new(role: Role, name: &str) -> anyhow::Result<Identity> {
        validate_name(name)?;
        Ok(Identity {
            role,
            name: name.to_owned(),
        })
    }

    /// The URI SAN that certificates for this identity carry.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }

    /// Parses `spiffe://haul/<role>/<name>`.
    pub fn from_uri(uri: &str) -> anyhow::Result<Identity> {
        let Some(rest) = uri.strip_prefix(SPIFFE_PREFIX) else {
            bail!("{uri:?} is not a haul identity (expected {SPIFFE_PREFIX}<role>/<name>)");
        };
        let Some((role, name)) = rest.split_once('/') else {
            bail!("{uri:?} has no agent name (expected {SPIFFE_PREFIX}<role>/<name>)");
        };
        let role: Role = role.parse()?;
        Identity::new(role, name).map_err(|e| anyhow!("{uri:?}: {e}"))
    }

    /// Finds the single haul identity among a certificate's URI SANs.
    pub fn from_cert_der(der: &[u8]) -> anyhow::Result<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("cannot parse certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| anyhow!("cannot parse subjectAltName: {e}"))?;
        let mut found = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri)
                    if uri.starts_with(SPIFFE_PREFIX) =>
                {
                    Some(*uri)
                }
                _ => None,
            });
        let Some(uri) = found.next() else {
            bail!("certificate has no {SPIFFE_PREFIX}<role>/<name> URI; it was not issued by `haul certs`");
        };
        if found.next().is_some() {
            bail!("certificate carries more than one haul identity");
        }
        Identity::from_uri(uri)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Agent names become file names and URI path segments: keep them boring.
pub(crate) fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("agent name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        bail!("agent name {name:?} is longer than {MAX_NAME_LEN} characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        bail!("agent name {name:?} must not start with '.' or '-'");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        bail!("agent name {name:?} contains {bad:?}; use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_through_its_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().ok(), Some(role));
            assert_eq!(Role::ALL[role.index()], role);
        }
        assert_eq!("Sender".parse::<Role>().ok(), Some(Role::Sender));
    }

    #[test]
    fn unknown_role_lists_valid_ones() {
        let err = "pilot".parse::<Role>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "unknown role \"pilot\"; expected one of: coordinator, sender, receiver, operator"
            )
        );
    }

    #[test]
    fn identity_uri_round_trips() {
        let id = Identity::new(Role::Receiver, "r1").ok();
        let uri = id.as_ref().map(Identity::uri);
        assert_eq!(uri.as_deref(), Some("spiffe://haul/receiver/r1"));
        assert_eq!(uri.and_then(|u| Identity::from_uri(&u).ok()), id);
    }

    #[test]
    fn bad_uris_and_names_are_rejected() {
        for uri in [
            "spiffe://other/sender/s",
            "spiffe://haul/sender",
            "spiffe://haul/pilot/p",
            "spiffe://haul/sender/",
            "spiffe://haul/sender/a/b",
            "spiffe://haul/sender/../x",
        ] {
            assert!(Identity::from_uri(uri).is_err(), "{uri} accepted");
        }
        for name in ["", ".hidden", "-flag", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
        for name in ["s1", "dc-2.sender_a", "X"] {
            assert!(validate_name(name).is_ok(), "{name:?} rejected");
        }
    }
}
