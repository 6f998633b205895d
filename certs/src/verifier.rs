//! Certificate verifiers for both ends of a connection.
//!
//! Servers use rustls' webpki client verifier unchanged: the client must present
//! a certificate chaining to the haul CA. Which role the client has is decided
//! per RPC (see [`crate::require`]), because one server answers several roles.
//!
//! Clients wrap the webpki server verifier with a role check: a sender dialing
//! the coordinator must not be satisfied by a receiver that happens to listen on
//! that address, even though the receiver's certificate is perfectly valid.
//!
//! Both ends take the CA's revocation lists (see [`crate::Mtls`] for where
//! they come from). A certificate from an issuer no list covers is accepted on
//! its chain alone: during a CA rotation only one CA may have a `crl.pem`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use crate::role::{Identity, Role};

/// The verifier servers use for client certificates: required, chained to `roots`.
pub(crate) fn client_verifier(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| anyhow::anyhow!("build client certificate verifier: {e}"))
}

/// Checks the server's certificate like any TLS client would (chain to the haul
/// CA, host name or IP in the SANs, validity), then insists its haul identity
/// has the role we meant to reach.
#[derive(Debug)]
pub(crate) struct RoleVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Role,
}

impl RoleVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        expect: Role,
    ) -> anyhow::Result<RoleVerifier> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| anyhow::anyhow!("build server certificate verifier: {e}"))?;
        Ok(RoleVerifier { inner, expect })
    }
}

/// Why a valid certificate was still not the server we wanted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityMismatch {
    #[error("the server presented {} certificate (name {}) but {} was expected", .found.role.with_article(), .found.name, .expect.with_article())]
    WrongRole { found: Identity, expect: Role },
    #[error("the server certificate carries no usable haul identity: {0:#}")]
    Unreadable(anyhow::Error),
}

fn other(err: IdentityMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let found = Identity::from_cert_der(end_entity)
            .map_err(|e| other(IdentityMismatch::Unreadable(e)))?;
        if found.role != self.expect {
            return Err(other(IdentityMismatch::WrongRole {
                found,
                expect: self.expect,
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
