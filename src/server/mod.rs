//! The HTTP side of an instance: accepts connections and hands each request to the API
//! router. HTTP/1.1 (with upgrades for WebSocket) and HTTP/2: over TLS as the client's ALPN
//! chooses, on plain connections by the HTTP/2 preface (prior knowledge, as load balancers
//! speak it). HTTP/2 carries many requests on one connection: a load balancer's for many
//! clients, or a browser's for all the chats on an agent's console.

mod api;
pub mod input;
mod proxy;
mod tls;
mod web;
mod ws;

pub use api::ApiError;
pub use proxy::Peers;
pub use tls::Tls;

use crate::auth::StaffTokens;
use crate::chat::Chats;
use crate::config::LimitsSection;
use crate::kpi::Kpi;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::net::TcpListener;
use tracing::debug;

/// Everything a request handler can reach.
pub struct App {
    pub instance_id: Arc<str>,
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Connections to the other instances, for requests passed on to a chat's owner.
    pub peers: Peers,
    pub chats: Chats,
    pub staff: StaffTokens,
    pub limits: LimitsSection,
    pub kpi: Arc<Kpi>,
    pub draining: AtomicBool,
    pub plugins: crate::instance::Plugins,
    /// TLS on the listener and towards the other instances, if the deployment set it up.
    pub tls: Option<Arc<Tls>>,
}

/// Serves `app` on an already bound listener until `shutdown` resolves.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let connections = Arc::new(tokio::sync::Semaphore::new(match app.limits.max_connections {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        n => n,
    }));
    let header_timeout = std::time::Duration::from_millis(app.limits.header_read_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(cause = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Full: say so and close, without reading the request.
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = stream;
                let body = r#"{"error":{"code":"too_many_connections","message":"this instance has its limit of open connections (limits.max_connections); try another instance"}}"#;
                let head = format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(tls) = app.tls.clone() else {
                // Telling the protocols apart counts against the header timeout too.
                return match tokio::time::timeout(header_timeout, protocol_of(&stream)).await {
                    Ok(Ok(protocol)) => serve(app, stream, peer, header_timeout, protocol).await,
                    Ok(Err(e)) => debug!(%peer, cause = %e, "connection closed before a request"),
                    Err(_) => debug!(%peer, "no request within the header timeout"),
                };
            };
            // The handshake counts against the header timeout: a silent client holds nothing long.
            match tokio::time::timeout(header_timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let protocol = if stream.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
                    serve(app, stream, peer, header_timeout, protocol).await
                }
                Ok(Err(e)) => debug!(%peer, cause = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Protocol {
    Http1,
    Http2,
}

/// What a client sends first on an HTTP/2 connection with prior knowledge (RFC 9113, 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 if the connection starts with its preface, else HTTP/1.1; looks without reading.
async fn protocol_of(stream: &tokio::net::TcpStream) -> std::io::Result<Protocol> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[..n] != HTTP2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == HTTP2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // A start of the preface, the rest on its way ("P" is also how POST begins): peek
        // returns at once while any byte waits, so look again a moment later.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Serves one accepted connection, plain or TLS: HTTP/1.1 with WebSocket upgrades, or HTTP/2.
async fn serve<S>(app: Arc<App>, stream: S, peer: std::net::SocketAddr, header_timeout: std::time::Duration, protocol: Protocol)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(api::route(app, req).await) }
    });
    let ended = match protocol {
        Protocol::Http1 => {
            http1::Builder::new()
                .max_buf_size(64 * 1024)
                .header_read_timeout(header_timeout)
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
        }
        // No header timeout in HTTP/2: a peer that stops answering pings is cut off instead.
        Protocol::Http2 => {
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(HTTP2_STREAMS)
                .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
                .keep_alive_timeout(std::time::Duration::from_secs(20))
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(e) = ended {
        debug!(%peer, ?protocol, cause = %e, "connection ended with an error");
    }
}

/// Requests one HTTP/2 connection may have open at once (each long poll holds one).
const HTTP2_STREAMS: u32 = 256;
