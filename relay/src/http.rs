//! A tiny HTTP/1.1 responder for `GET /metrics` and `GET /health`: one
//! request per connection, `Connection: close`, bounded in size and time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::{CancellationToken, TransportHealth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::database::Db;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/health` waits for `SELECT 1`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// What the endpoints read.
pub(crate) struct HttpState {
    pub metrics: PrometheusHandle,
    pub db: Db,
    /// True while the relay runs (false once it stops).
    pub running: AtomicBool,
    /// Text of the secrets to scrub from `/health` error bodies.
    pub secrets: Vec<String>,
    /// Every transport, watched.
    pub transports: Vec<Arc<TransportHealth>>,
    /// How long a transport may fail before `/health` reports it.
    pub unhealthy_after: Duration,
}

/// Serves until `cancel` fires.
pub(crate) async fn serve(listener: TcpListener, state: Arc<HttpState>, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "too many HTTP connections; dropping one");
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state).await {
                        debug!(%peer, error = %e, "HTTP connection failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, state: &HttpState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(&mut stream, 400, "text/plain", b"bad request\n", false).await
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            405,
            "text/plain",
            b"method not allowed\n",
            false,
        )
        .await;
    }
    let (status, content_type, body): (u16, &str, Vec<u8>) = match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render().into_bytes(),
        ),
        "/health" | "/healthz" => {
            if !state.running.load(Ordering::SeqCst) {
                (503, "text/plain", b"stopping\n".to_vec())
            } else {
                let failing = state
                    .transports
                    .iter()
                    .find_map(|t| t.failing(state.unhealthy_after));
                match state.db.ping(PING_TIMEOUT).await {
                    Ok(()) => match failing {
                        None => (200, "text/plain", b"ok\n".to_vec()),
                        Some(why) => {
                            let why = crate::redact::scrub(&why, &state.secrets);
                            (503, "text/plain", format!("{why}\n").into_bytes())
                        }
                    },
                    Err(e) => {
                        let e = crate::redact::scrub(&e, &state.secrets);
                        (
                            503,
                            "text/plain",
                            format!("database unreachable: {e}\n").into_bytes(),
                        )
                    }
                }
            }
        }
        _ => (404, "text/plain", b"not found\n".to_vec()),
    };
    respond(&mut stream, status, content_type, &body, head_only).await
}

/// Reads up to the blank line ending the request head; `None` when it is
/// too large or not UTF-8.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
    Ok(String::from_utf8(buf).ok())
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(body).await?;
        }
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
