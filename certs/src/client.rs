//! Dialing another agent over mutually authenticated TLS.
//!
//! tonic is given a connector (TCP connect, rustls handshake, ALPN h2) instead
//! of its built-in TLS, so the server's certificate is checked against the haul
//! CA, the dialed host *and* the role we meant to reach (see
//! [`crate::verifier`]). Every (re)connect takes the current client config
//! from [`Mtls`], so renewed certificates and revocation lists apply to new
//! connections of an existing channel.
//!
//! With TLS 1.3 the client finishes its handshake before the server has looked
//! at the client certificate; a server that rejects us says so only in an alert
//! that arrives afterwards. Left alone, that surfaces as an opaque failure of
//! the first RPC. So the connector waits for the server's first bytes (the
//! HTTP/2 SETTINGS frame every gRPC server sends immediately) and turns an alert
//! into a sentence; the bytes it read are replayed to hyper.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail};
use hyper_util::rt::TokioIo;
use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::mtls::Mtls;
use crate::role::Role;
use crate::server::{
    error_chain, CONNECTION_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, STREAM_WINDOW,
};

/// Budget for TCP connect, TLS handshake and the server's first frame.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one connection attempt failed, already phrased for a human.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DialError(String);

/// Dials `addr` ("host:port") and returns a connected channel, or an error
/// such as "cannot reach coordinator at 127.0.0.1:7000: connection refused".
pub async fn connect(addr: &str, tls: &Mtls, expect: Role) -> anyhow::Result<Channel> {
    let (endpoint, dialer) = prepare(addr, tls, expect)?;
    endpoint
        .connect_with_connector(dialer)
        .await
        .map_err(|e| anyhow!("cannot reach {expect} at {addr}: {}", explain(&e)))
}

/// Like [`connect`], but the channel connects on first use and reconnects by
/// itself after failures. Only a malformed `addr` is an error here.
pub fn connect_lazy(addr: &str, tls: &Mtls, expect: Role) -> anyhow::Result<Channel> {
    let (endpoint, dialer) = prepare(addr, tls, expect)?;
    Ok(endpoint.connect_with_connector_lazy(dialer))
}

fn prepare(addr: &str, tls: &Mtls, expect: Role) -> anyhow::Result<(Endpoint, Dialer)> {
    let (host, port) = split_host_port(addr)?;
    let server_name = ServerName::try_from(host.clone()).map_err(|_| {
        anyhow!("invalid address {addr:?}: {host:?} is not a host name or IP address")
    })?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| anyhow!("invalid address {addr:?}: {e}"))?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let dialer = Dialer(Arc::new(DialerInner {
        host,
        port,
        server_name,
        tls: tls.clone(),
        expect,
    }));
    Ok((endpoint, dialer))
}

/// "host:port", "1.2.3.4:port" or "[v6]:port" into its parts.
fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let usage = || anyhow!("invalid address {addr:?}: expected host:port, e.g. 10.0.0.5:7000");
    if addr.contains("://") {
        bail!("invalid address {addr:?}: give host:port without a scheme");
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(usage)?;
        (host, port)
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or_else(usage)?;
        if host.contains(':') {
            bail!("invalid address {addr:?}: write IPv6 addresses as [addr]:port");
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(usage());
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| anyhow!("invalid address {addr:?}: {port:?} is not a port number"))?;
    Ok((host.to_owned(), port))
}

/// Everything one connection attempt needs; shared by every reconnect.
struct DialerInner {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// Asked for its current client config on every (re)connect, so renewed
    /// certificates and revocation lists apply to new connections.
    tls: Mtls,
    expect: Role,
}

#[derive(Clone)]
struct Dialer(Arc<DialerInner>);

/// The tower service tonic calls for every (re)connect. The endpoint URI is
/// ignored: host and server name were fixed when the channel was made.
impl tower::Service<http::Uri> for Dialer {
    type Response = TokioIo<ClientIo>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, dialer.dial()).await {
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(DialError(format!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))),
            }
        })
    }
}

impl DialerInner {
    async fn dial(&self) -> Result<ClientIo, DialError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| DialError(describe_io(&e)))?;
        // Nagle only delays small gRPC frames (acks, headers); bulk data fills segments anyway.
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.tls.client_config(self.expect));
        let mut tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| DialError(format!("TLS handshake failed: {}", describe_tls(&e))))?;
        let mut first = vec![0u8; 16 * 1024];
        let n = tls.read(&mut first).await.map_err(|e| {
            DialError(match rustls_error(&e) {
                Some(rustls::Error::AlertReceived(alert)) => format!(
                    "the {} refused our certificate ({}); both sides need certificates from \
                     the same `haul certs init`",
                    self.expect,
                    describe_alert(alert)
                ),
                _ => format!(
                    "connection failed after the TLS handshake: {}",
                    describe_io(&e)
                ),
            })
        })?;
        if n == 0 {
            return Err(DialError(format!(
                "the {} closed the connection right after the TLS handshake",
                self.expect
            )));
        }
        first.truncate(n);
        Ok(ClientIo {
            replay: first,
            replayed: 0,
            tls,
        })
    }
}

/// The client side of a connection: bytes read while checking the server
/// accepted us are handed out first, then the TLS stream continues.
pub(crate) struct ClientIo {
    replay: Vec<u8>,
    replayed: usize,
    tls: TlsStream<TcpStream>,
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// The connector's message if it is in `e`'s source chain, else the whole chain.
fn explain(e: &tonic::transport::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(dial) = cause.downcast_ref::<DialError>() {
            return dial.0.clone();
        }
        source = cause.source();
    }
    error_chain(e)
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn describe_io(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | HostUnreachable
        | NetworkUnreachable | AddrNotAvailable
            if e.get_ref().is_none() =>
        {
            e.kind().to_string()
        }
        _ => e.to_string(),
    }
}

fn describe_tls(e: &io::Error) -> String {
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => "the server's certificate is not signed by our CA (are both sides using \
               certificates from the same `haul certs init`?)"
            .to_owned(),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "the server's certificate has expired".to_owned(),
        Some(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
            "the server's certificate has been revoked (it is listed in our crl.pem)".to_owned()
        }
        Some(rustls::Error::InvalidCertificate(
            err @ CertificateError::NotValidForNameContext { .. },
        )) => {
            format!("{err}; reissue it with --hosts covering the address we dialed")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            other.to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server refused us ({})", describe_alert(alert))
        }
        Some(other) => other.to_string(),
        None => describe_io(e),
    }
}

fn describe_alert(alert: &AlertDescription) -> String {
    match alert {
        AlertDescription::CertificateRequired => "it requires a client certificate".to_owned(),
        AlertDescription::UnknownCA
        | AlertDescription::BadCertificate
        | AlertDescription::DecryptError => "our certificate is not signed by its CA".to_owned(),
        AlertDescription::CertificateExpired => "our certificate has expired".to_owned(),
        AlertDescription::CertificateRevoked => "our certificate has been revoked".to_owned(),
        other => format!("TLS alert {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            ("127.0.0.1:7000", Some(("127.0.0.1", 7000))),
            ("db.example:443", Some(("db.example", 443))),
            ("[::1]:7000", Some(("::1", 7000))),
            ("::1:7000", None),
            ("host", None),
            (":7000", None),
            ("host:http", None),
            ("host:70000", None),
            ("https://host:7000", None),
        ];
        for (addr, want) in cases {
            let got = split_host_port(addr).ok();
            let want = want.map(|(h, p)| (h.to_owned(), p));
            assert_eq!(got, want, "{addr}");
        }
    }
}
