//! The HTTP side of an instance: accepts connections (hyper, HTTP/1.1 with upgrades for
//! WebSocket) and hands each request to the API router.

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
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
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
                return serve(app, stream, peer, header_timeout).await;
            };
            // The handshake counts against the header timeout: a silent client holds nothing long.
            match tokio::time::timeout(header_timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve(app, stream, peer, header_timeout).await,
                Ok(Err(e)) => debug!(%peer, cause = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Serves HTTP/1.1 (with WebSocket upgrades) on one accepted connection, plain or TLS.
async fn serve<S>(app: Arc<App>, stream: S, peer: std::net::SocketAddr, header_timeout: std::time::Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(api::route(app, req).await) }
    });
    let conn = http1::Builder::new()
        .max_buf_size(64 * 1024)
        .header_read_timeout(header_timeout)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, cause = %e, "connection ended with an error");
    }
}
