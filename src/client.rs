//! A small HTTP client for Parley's API over one keep-alive connection: used by `parley bench`
//! and the integration tests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("request timed out")]
    Timeout,
    #[error("{status}: {body}")]
    Status { status: u16, body: Value },
}

/// A response: status, JSON body (Null if not JSON) and the answering instance.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub instance: Option<String>,
}

impl Reply {
    /// The body, if the status is 2xx.
    pub fn ok(self) -> Result<Value, ClientError> {
        if (200..300).contains(&self.status) { Ok(self.body) } else { Err(ClientError::Status { status: self.status, body: self.body }) }
    }
    pub fn error_code(&self) -> Option<&str> {
        self.body.get("error")?.get("code")?.as_str()
    }
}

pub struct Client {
    authority: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    pub timeout: Duration,
}

impl Client {
    /// `base` is `http://host:port` or `host:port`.
    pub fn new(base: &str) -> Self {
        let authority = base.trim_start_matches("http://").trim_end_matches('/').to_string();
        Self { authority, sender: None, timeout: Duration::from_secs(30) }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ClientError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.authority).await.map_err(|e| ClientError::Connect(self.authority.clone(), e))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Sends raw bytes as the body, so tests can send what no well-behaved client would.
    pub async fn raw(&mut self, method: Method, path: &str, token: Option<&str>, body: Bytes) -> Result<Reply, ClientError> {
        let mut builder = Request::builder().method(method).uri(path).header("host", self.authority.clone());
        if let Some(t) = token {
            builder = builder.header("authorization", format!("Bearer {t}"));
        }
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Full::new(body)).expect("valid request");
        let timeout = self.timeout;
        let sender = self.sender().await?;
        sender.ready().await?;
        let response = match tokio::time::timeout(timeout, sender.send_request(request)).await {
            Ok(r) => r?,
            Err(_) => {
                self.sender = None;
                return Err(ClientError::Timeout);
            }
        };
        let status = response.status().as_u16();
        let instance = response.headers().get("parley-instance").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body, instance })
    }

    pub async fn call(&mut self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Result<Reply, ClientError> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        self.raw(method, path, token, bytes).await
    }

    pub async fn get(&mut self, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&mut self, path: &str, token: Option<&str>, body: Value) -> Result<Reply, ClientError> {
        self.call(Method::POST, path, token, Some(body)).await
    }
}
