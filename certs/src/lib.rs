//! Certificates, identities and the mutually authenticated TLS transport that
//! every haul connection uses.
//!
//! haul agents talk gRPC across datacenters, usually over networks nobody on
//! the team controls, so every connection is mTLS against a private CA made by
//! `haul certs init`. A certificate names its agent's role in a URI SAN
//! (`spiffe://haul/<role>/<name>`): servers learn who called from the verified
//! certificate ([`peer`], [`require`]) and clients refuse servers of the wrong
//! role ([`connect`]), so a misrouted address fails at the handshake instead of
//! halfway through a transfer.
//!
//! - [`init`], [`issue`], [`revoke`]: making the CA and agent certificates,
//!   and withdrawing one through the CA's revocation list (`crl.pem`).
//! - [`Mtls`]: loading and checking one agent's files at startup, then
//!   re-reading them when they change (at most every [`RELOAD_INTERVAL`]), so
//!   renewed certificates and new revocations apply to new connections
//!   without restarting an agent mid-move.
//! - [`serve`]: the server side, tonic over our own TLS accept loop.
//! - [`connect`]: the client side, a tonic channel over our own TLS connector.
//!
//! **Invariant:** no other crate touches rustls or certificate files; they get
//! an [`Mtls`] and call [`serve`] or [`connect`].

mod authority;
mod client;
mod mtls;
mod role;
mod server;
mod verifier;

pub use authority::{init, issue, issue_with_validity, revoke, InitOptions, DEFAULT_DAYS};
pub use client::{connect, connect_lazy};
pub use mtls::{Mtls, TlsFiles, RELOAD_INTERVAL};
pub use role::{Identity, Role};
pub use server::{peer, require, serve, PeerInfo};
