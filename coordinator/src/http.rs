//! The coordinator's HTTP side (`haul coordinator --http ADDR`): the dashboard at `/` (one
//! page served from the binary, no CDN, refreshing itself from `/api/status` every 2 s) and
//! Prometheus metrics at `/metrics`, from the same state `haul status` reads.
//!
//! Who may look: on a loopback address the page is plain HTTP and only this host can reach
//! it. On any other address (or with `--http-tls`) it is HTTPS with the job's CA, and the
//! client must present a certificate of role operator: without one the handshake fails, and
//! with another role's certificate every request gets 403. There is no way to serve it
//! unauthenticated beyond this host.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use haul_certs::{Identity, Mtls, Role};
use haul_proto as pb;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::service::Inner;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One job as `/metrics` shows it.
pub(crate) struct JobMetrics {
    pub status: pb::JobStatusReply,
    pub leased: u64,
    pub retries: u64,
    pub lease_expiries: u64,
}

/// One agent as `/metrics` shows it.
pub(crate) struct AgentMetrics {
    pub id: String,
    pub role: &'static str,
    pub up: bool,
    pub last_seen_secs: f64,
}

/// Serve on `listener` until `shutdown`; `tls`: HTTPS for operators only, else plain HTTP
/// (the caller binds plain HTTP to loopback only).
pub async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    tls: Option<Mtls>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("--http: failed to accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let inner = inner.clone();
        let tls = tls.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                connection(inner, tcp, true, stop).await;
                return;
            };
            // The agents' config (taken per connection, so renewed certificates apply) offers
            // HTTP/2 for gRPC; this side speaks HTTP/1.1.
            let mut config = (*tls.server_config()).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "--http: rejected TLS connection: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "--http: TLS handshake not finished in time");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| Identity::from_cert_der(leaf).ok());
            let operator = identity.as_ref().is_some_and(|i| i.role == Role::Operator);
            if !operator {
                tracing::warn!(%peer, identity = ?identity, "--http: refused a client that is not an operator");
            }
            connection(inner, stream, operator, stop).await;
        });
    }
}

async fn connection<S>(inner: Arc<Inner>, io: S, allowed: bool, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(respond(&inner, &req, allowed).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        () = stop.cancelled() => {}
    }
}

async fn respond<B>(inner: &Inner, req: &Request<B>, allowed: bool) -> Response<Full<Bytes>> {
    if !allowed {
        return text(
            StatusCode::FORBIDDEN,
            "this page needs a client certificate of role operator (haul certs issue --role operator)\n",
        );
    }
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let (jobs, agents) = inner.state.lock().await.metrics_input();
            typed(
                text(StatusCode::OK, &metrics_text(&jobs, &agents)),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/" => typed(text(StatusCode::OK, DASHBOARD), "text/html; charset=utf-8"),
        "/api/status" => {
            let body = inner.state.lock().await.dashboard().to_string();
            typed(text(StatusCode::OK, &body), "application/json")
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try / or /metrics\n"),
    }
}

/// The dashboard page: HTML, CSS and script in one file, built into the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

fn typed(mut r: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// A label value with `\`, `"` and newlines escaped, as the text format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `jobs` and `agents`.
pub(crate) fn metrics_text(jobs: &[JobMetrics], agents: &[AgentMetrics]) -> String {
    let mut out = String::new();
    type Get = fn(&JobMetrics) -> f64;
    let per_job: [(&str, &str, &str, Get); 19] = [
        (
            "haul_job_paused",
            "gauge",
            "1 while the job is paused (haul pause)",
            |j| j.status.paused as u8 as f64,
        ),
        (
            "haul_job_elapsed_seconds",
            "gauge",
            "Time since the job started",
            |j| j.status.elapsed_secs,
        ),
        (
            "haul_raw_bytes_total",
            "counter",
            "COPY bytes of the chunks applied on the target",
            |j| j.status.raw_bytes_done as f64,
        ),
        (
            "haul_wire_bytes_total",
            "counter",
            "Bytes on the wire (compressed) of the chunks applied",
            |j| j.status.wire_bytes_done as f64,
        ),
        (
            "haul_rows_total",
            "counter",
            "Rows of the chunks applied",
            |j| j.status.rows_done as f64,
        ),
        (
            "haul_planned_bytes",
            "gauge",
            "Planned size of all chunks",
            |j| j.status.est_bytes_total as f64,
        ),
        (
            "haul_wire_rate_bytes_per_second",
            "gauge",
            "Wire bytes per second over the last few seconds, all senders",
            |j| j.status.wire_rate,
        ),
        (
            "haul_cap_bytes_per_second",
            "gauge",
            "The job's bandwidth cap in force (0: none)",
            |j| j.status.cap_bytes_per_sec as f64,
        ),
        (
            "haul_lease_expiries_total",
            "counter",
            "Chunk leases that ran out without a renewal",
            |j| j.lease_expiries as f64,
        ),
        (
            "haul_chunk_retries_total",
            "counter",
            "Failed chunk attempts, retried",
            |j| j.retries as f64,
        ),
        (
            "haul_resumed_bytes_total",
            "counter",
            "Bytes not sent again because a stream resumed at the receiver's offset",
            |j| j.status.resumed_bytes_done as f64,
        ),
        (
            "haul_resent_bytes_total",
            "counter",
            "Bytes that crossed the link more than once",
            |j| j.status.resent_bytes_done as f64,
        ),
        (
            "haul_chunks_checked_total",
            "counter",
            "Chunks read back from the target and compared",
            |j| j.status.chunks_checked as f64,
        ),
        (
            "haul_chunk_mismatches",
            "gauge",
            "Chunks whose rows differ between source and target",
            |j| j.status.chunk_mismatches.len() as f64,
        ),
        (
            "haul_follow_lag_seconds",
            "gauge",
            "A --follow job: how far behind the source the target is, in time (0 without following)",
            |j| j.status.follow.as_ref().map_or(0.0, |f| f.lag_seconds),
        ),
        (
            "haul_follow_lag_bytes",
            "gauge",
            "A --follow job: source WAL not yet applied on the target",
            |j| j.status.follow.as_ref().map_or(0.0, |f| f.lag_bytes as f64),
        ),
        (
            "haul_follow_transactions_total",
            "counter",
            "A --follow job: source transactions applied on the target",
            |j| j.status.follow.as_ref().map_or(0.0, |f| f.transactions as f64),
        ),
        (
            "haul_follow_apply_rate",
            "gauge",
            "A --follow job: transactions applied a second, over the last few seconds",
            |j| j.status.follow.as_ref().map_or(0.0, |f| f.apply_rate),
        ),
        (
            "haul_follow_retained_bytes",
            "gauge",
            "A --follow job: WAL its slot holds back on the source",
            |j| j.status.follow.as_ref().map_or(0.0, |f| f.retained_bytes as f64),
        ),
    ];
    for (name, kind, help, get) in per_job {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for j in jobs {
            let _ = writeln!(
                out,
                "{name}{{job=\"{}\"}} {}",
                label(&j.status.job_id),
                get(j)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP haul_job_phase 1 for the phase the job is in\n# TYPE haul_job_phase gauge"
    );
    for j in jobs {
        for phase in [
            "planning",
            "copying",
            "finalizing",
            "following",
            "done",
            "failed",
            "cancelling",
            "cancelled",
        ] {
            let _ = writeln!(
                out,
                "haul_job_phase{{job=\"{}\",phase=\"{phase}\"}} {}",
                label(&j.status.job_id),
                (j.status.phase == phase) as u8
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP haul_chunks Chunks by state\n# TYPE haul_chunks gauge"
    );
    for j in jobs {
        let s = &j.status;
        let pending = s.chunks.saturating_sub(s.chunks_done + j.leased);
        for (state, n) in [
            ("pending", pending),
            ("leased", j.leased),
            ("done", s.chunks_done),
        ] {
            let _ = writeln!(
                out,
                "haul_chunks{{job=\"{}\",state=\"{state}\"}} {n}",
                label(&s.job_id)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP haul_agent_up 1 if the agent was heard from in the last 30 seconds\n# TYPE haul_agent_up gauge"
    );
    for a in agents {
        let _ = writeln!(
            out,
            "haul_agent_up{{agent=\"{}\",role=\"{}\"}} {}",
            label(&a.id),
            a.role,
            a.up as u8
        );
    }
    let _ = writeln!(
        out,
        "# HELP haul_agent_last_seen_seconds Time since the agent was last heard from\n# TYPE haul_agent_last_seen_seconds gauge"
    );
    for a in agents {
        let _ = writeln!(
            out,
            "haul_agent_last_seen_seconds{{agent=\"{}\",role=\"{}\"}} {}",
            label(&a.id),
            a.role,
            a.last_seen_secs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_the_text_format() {
        let job = JobMetrics {
            status: pb::JobStatusReply {
                job_id: "j\"1".into(),
                phase: "copying".into(),
                chunks: 10,
                chunks_done: 4,
                raw_bytes_done: 1000,
                ..Default::default()
            },
            leased: 2,
            retries: 3,
            lease_expiries: 1,
        };
        let agent = AgentMetrics {
            id: "sender/a".into(),
            role: "sender",
            up: true,
            last_seen_secs: 0.5,
        };
        let text = metrics_text(&[job], &[agent]);
        assert!(
            text.contains("haul_raw_bytes_total{job=\"j\\\"1\"} 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("haul_chunks{job=\"j\\\"1\",state=\"pending\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("haul_job_phase{job=\"j\\\"1\",phase=\"copying\"} 1\n"));
        assert!(text.contains("haul_agent_up{agent=\"sender/a\",role=\"sender\"} 1\n"));
        assert!(text.contains("# TYPE haul_chunk_retries_total counter\n"));
        // Every sample line is NAME{LABELS} VALUE, and every name was typed before use.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let name = line.split('{').next().unwrap_or_default();
                assert!(typed.contains(name), "{name} used before its TYPE");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            }
        }
    }
}
