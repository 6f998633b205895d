//! Serving tonic routes over mutually authenticated TLS.
//!
//! tonic's own TLS support is not compiled in; we accept TCP ourselves, run the
//! rustls handshake, and hand tonic finished streams through
//! `serve_with_incoming_shutdown`. That lets us:
//!
//! - run each handshake in its own task with a deadline, so one slow or
//!   malicious client cannot stall the accept loop;
//! - log each refused handshake once, with the peer address and the reason;
//! - attach the peer's verified [`Identity`] to the connection ([`PeerInfo`]),
//!   which tonic copies into every request's extensions for [`peer`] and
//!   [`require`] to read;
//! - take the current server config for every handshake, so certificates and
//!   revocation lists reloaded by [`Mtls`] apply without a restart;
//! - bound shutdown: tonic drains connections gracefully but would wait forever
//!   for a stream that never ends, so after a grace period we cut the
//!   remaining connections at the IO level.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::anyhow;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::service::Routes;
use tonic::transport::server::Connected;

use crate::mtls::Mtls;
use crate::role::{Identity, Role};

/// HTTP/2 per-stream flow-control window: large enough that one chunk stream
/// over a long-RTT link is not throttled by window updates.
pub(crate) const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window: room for several streams at full window.
pub(crate) const CONNECTION_WINDOW: u32 = 32 << 20;
/// HTTP/2 ping interval and the time to wait for its answer; finds dead peers
/// behind NATs and firewalls that drop idle flows silently.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after shutdown before being cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After cutting connections, how long to wait for tonic to notice.
const CUT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Handshaken connections waiting for tonic to pick them up. Small: tonic
/// takes them as fast as it can spawn a task; the bound only stops a burst of
/// handshakes from piling up memory if it cannot.
const HANDSHAKEN_QUEUE: usize = 64;

/// What the server knows about the other end of a connection. Available in
/// every request's extensions; prefer [`peer`] and [`require`] for the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The identity in the client's verified certificate.
    pub identity: Identity,
    /// The client's address as seen by this server.
    pub remote_addr: SocketAddr,
}

/// Serves `routes` over mTLS on `listener` until `shutdown` is cancelled, then
/// drains connections for up to 5 s and cuts the rest.
///
/// Callers build routes with `tonic::service::Routes::new(svc_a).add_service(svc_b)`;
/// message size limits belong on the generated service (`max_decoding_message_size`),
/// HTTP/2 windows and keepalive are set here.
pub async fn serve(
    routes: Routes,
    listener: TcpListener,
    tls: &Mtls,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listener.local_addr().ok();
    // `stop` ends the accept loop and pending handshakes whether we leave
    // because of `shutdown` or because tonic failed; `cut` closes established
    // connections once the drain period is over.
    let stop = shutdown.child_token();
    let _stop_on_exit = stop.clone().drop_guard();
    let cut = CancellationToken::new();

    let (tx, rx) = mpsc::channel(HANDSHAKEN_QUEUE);
    tokio::spawn(accept_loop(
        listener,
        tls.clone(),
        tx,
        stop.clone(),
        cut.clone(),
    ));
    let incoming = ReceiverStream::new(rx).map(Ok::<_, Infallible>);

    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::pin!(server);

    let result = tokio::select! {
        result = &mut server => result,
        () = shutdown.cancelled() => {
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        "connections still open {}s after shutdown; closing them",
                        DRAIN_TIMEOUT.as_secs()
                    );
                    cut.cancel();
                    match tokio::time::timeout(CUT_TIMEOUT, &mut server).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    result.map_err(|e| {
        let at = local.map(|a| format!(" on {a}")).unwrap_or_default();
        anyhow!("gRPC server{at} failed: {}", error_chain(&e))
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Mtls,
    tx: mpsc::Sender<ServerIo>,
    stop: CancellationToken,
    cut: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("failed to accept a connection: {e}");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        // Taken per connection so renewed certificates and revocation lists
        // apply to new handshakes (see `Mtls::server_config`).
        let acceptor = TlsAcceptor::from(tls.server_config());
        let tx = tx.clone();
        let stop = stop.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake(acceptor, tcp, remote_addr, cut),
            );
            let io = tokio::select! {
                () = stop.cancelled() => return,
                io = handshake => io,
            };
            match io {
                Ok(Ok(io)) => {
                    tracing::debug!(peer = %remote_addr, identity = %io.info.identity, "accepted mTLS connection");
                    // Fails only when the server is shutting down; dropping closes the connection.
                    let _ = tx.send(io).await;
                }
                Ok(Err(reason)) => {
                    tracing::warn!(peer = %remote_addr, "rejected TLS connection: {reason}");
                }
                Err(_) => {
                    tracing::warn!(
                        peer = %remote_addr,
                        "rejected TLS connection: handshake not finished within {}s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    );
                }
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    cut: CancellationToken,
) -> Result<ServerIo, String> {
    // Nagle only delays small gRPC frames (acks, headers); bulk data fills segments anyway.
    let _ = tcp.set_nodelay(true);
    let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| "client presented no certificate".to_owned())?;
    let identity = Identity::from_cert_der(leaf).map_err(|e| format!("{e:#}"))?;
    Ok(ServerIo {
        tls,
        info: PeerInfo {
            identity,
            remote_addr,
        },
        cut: Box::pin(cut.cancelled_owned()),
    })
}

/// An accepted, verified connection as tonic sees it.
struct ServerIo {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Resolves when the drain period is over; from then on every read and
    /// write fails, which makes hyper drop the connection.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl ServerIo {
    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server shut down",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// The caller's verified identity, or `Unauthenticated` when the request did
/// not arrive through [`serve`].
#[allow(clippy::result_large_err)] // tonic::Status is what handlers return
pub fn peer<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    req.extensions()
        .get::<PeerInfo>()
        .map(|info| info.identity.clone())
        .ok_or_else(|| {
            tonic::Status::unauthenticated("no verified client certificate on this connection")
        })
}

/// The caller's identity if its role is in `allowed`, else `PermissionDenied`
/// saying who may call and who did.
#[allow(clippy::result_large_err)] // tonic::Status is what handlers return
pub fn require<T>(req: &tonic::Request<T>, allowed: &[Role]) -> Result<Identity, tonic::Status> {
    let identity = peer(req)?;
    if allowed.contains(&identity.role) {
        return Ok(identity);
    }
    Err(tonic::Status::permission_denied(format!(
        "this RPC is for {}; the caller presented {} certificate (name {})",
        plural_list(allowed),
        identity.role.with_article(),
        identity.name
    )))
}

/// "senders", "senders or receivers", "coordinators, senders or receivers".
fn plural_list(roles: &[Role]) -> String {
    let names: Vec<String> = roles.iter().map(|r| format!("{r}s")).collect();
    match names.split_last() {
        None => "nobody".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// `e` and its sources on one line; tonic's transport errors hide the cause in `source`.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_from(role: Role, name: &str) -> tonic::Request<()> {
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(PeerInfo {
            identity: Identity {
                role,
                name: name.to_owned(),
            },
            remote_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        });
        req
    }

    #[test]
    fn require_names_both_sides() {
        let req = request_from(Role::Receiver, "r1");
        let err = require(&req, &[Role::Sender]).err();
        assert_eq!(
            err.as_ref().map(|s| s.code()),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            err.as_ref().map(|s| s.message()),
            Some("this RPC is for senders; the caller presented a receiver certificate (name r1)")
        );
        let req = request_from(Role::Operator, "ops");
        let err = require(&req, &[Role::Coordinator, Role::Sender, Role::Receiver]).err();
        assert_eq!(
            err.as_ref().map(|s| s.message()),
            Some("this RPC is for coordinators, senders or receivers; the caller presented an operator certificate (name ops)")
        );
    }

    #[test]
    fn require_accepts_allowed_roles() {
        let req = request_from(Role::Sender, "s1");
        let id = require(&req, &[Role::Receiver, Role::Sender]).ok();
        assert_eq!(id.map(|i| i.name), Some("s1".to_owned()));
    }

    #[test]
    fn missing_peer_is_unauthenticated() {
        let req = tonic::Request::new(());
        assert_eq!(
            peer(&req).err().map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            require(&req, &Role::ALL).err().map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
    }
}
