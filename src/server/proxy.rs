//! Passing a request on to the instance that owns its chat (API.md "Failover"), so a client
//! may talk to any instance. The request body was read before, so a request whose owner dies
//! on the way can still be served here, after a restore.

use super::{App, Tls};
use super::api::Body;
use crate::cluster::Peer;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

/// Names the instance that passed a request on; such a request is never passed on again.
pub const FORWARDED_BY: &str = "parley-forwarded-by";
/// The cluster secret, proving the request comes from an instance of the cluster.
pub const CLUSTER_KEY: &str = "parley-cluster-key";

/// An idle connection older than this is not reused: the peer may be about to close it (its
/// `limits.header_read_timeout_ms` cuts idle connections off), and a request sent on a
/// connection the peer is closing fails as if the owner were gone.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(3);

/// A keep-alive connection to another instance.
type Connection = SendRequest<Full<Bytes>>;

/// Idle keep-alive connections to the other instances, with when each became idle.
#[derive(Default)]
pub struct Peers {
    idle: Mutex<HashMap<String, Vec<(std::time::Instant, Connection)>>>,
}

impl Peers {
    async fn connection(&self, address: &str, tls: Option<&Tls>) -> Result<SendRequest<Full<Bytes>>, String> {
        loop {
            let reused = self.idle.lock().unwrap().get_mut(address).and_then(Vec::pop);
            match reused {
                Some((since, s)) if since.elapsed() < MAX_IDLE && !s.is_closed() && s.is_ready() => return Ok(s),
                Some(_) => continue,
                None => break,
            }
        }
        open(address, tls).await
    }

    fn give_back(&self, address: &str, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(address.to_string()).or_default();
        if list.len() < 64 {
            list.push((std::time::Instant::now(), sender));
        }
    }
}

/// The request as the owner gets it: same method, path, headers and body, plus who passed it
/// on and the cluster secret.
fn outgoing<B>(app: &App, owner: &Peer, req: &Request<B>, body: Bytes) -> Result<Request<Full<Bytes>>, String> {
    let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::builder().method(req.method()).uri(uri).body(Full::new(body)).map_err(|e| e.to_string())?;
    let headers = out.headers_mut();
    for (name, value) in req.headers() {
        if name != header::HOST && !name.as_str().starts_with("parley-") {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::HOST, HeaderValue::from_str(&owner.address).map_err(|e| e.to_string())?);
    headers.insert(HeaderName::from_static(FORWARDED_BY), HeaderValue::from_str(&app.instance_id).map_err(|e| e.to_string())?);
    headers.insert(HeaderName::from_static(CLUSTER_KEY), HeaderValue::from_str(app.cluster.secret()).map_err(|e| e.to_string())?);
    Ok(out)
}

/// A new HTTP/1.1 connection to another instance (TLS when the cluster uses it), able to
/// switch protocols for a WebSocket.
async fn open(address: &str, tls: Option<&Tls>) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| format!("cannot reach {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let sender = match tls {
        None => {
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{address}: {e}"))?;
            tokio::spawn(conn.with_upgrades());
            sender
        }
        Some(tls) => {
            let (sender, conn) = http1::handshake(TokioIo::new(tls.connect(address, stream).await?)).await.map_err(|e| format!("{address}: {e}"))?;
            tokio::spawn(conn.with_upgrades());
            sender
        }
    };
    Ok(sender)
}

/// Sends the request to the owner and returns its answer. An error means the owner could not
/// be reached or did not answer; the caller decides whether to wait for its lease to run out.
pub async fn forward(app: &App, owner: &Peer, req: &Request<Bytes>) -> Result<Response<Body>, String> {
    let request = outgoing(app, owner, req, req.body().clone())?;
    let mut sender = app.peers.connection(&owner.address, app.tls.as_deref()).await?;
    sender.ready().await.map_err(|e| format!("{}: {e}", owner.address))?;
    let response = sender.send_request(request).await.map_err(|e| format!("{}: {e}", owner.address))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("{}: {e}", owner.address))?.to_bytes();
    app.peers.give_back(&owner.address, sender);
    app.kpi.requests_proxied.fetch_add(1, Ordering::Relaxed);
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, HeaderName::from_static("parley-instance")] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    Ok(out)
}

/// Passes a WebSocket upgrade on to the owner and, once both sides switched protocols,
/// copies bytes both ways until either side closes.
pub async fn websocket(app: &App, owner: &Peer, req: Request<Bytes>) -> Result<Response<Body>, String> {
    let request = outgoing(app, owner, &req, Bytes::new())?;
    let mut sender = open(&owner.address, app.tls.as_deref()).await?;
    let mut response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    app.kpi.requests_proxied.fetch_add(1, Ordering::Relaxed);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let mut out = Response::new(Full::new(body));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        return Ok(out);
    }
    let mut out = Response::new(Full::default());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = response.headers().clone();
    let owner_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let (Ok(client), Ok(owner)) = (hyper::upgrade::on(req).await, owner_side.await) else { return };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(owner)).await;
    });
    Ok(out)
}
