//! Clients of Parley's API: `Client` talks to one instance over one keep-alive connection;
//! `FailoverClient` moves between instances when one fails. Used by `parley bench` and the
//! integration tests.

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

/// A response: status, JSON body (a string if not JSON, Null if empty) and the answering instance.
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
        // A body that is not JSON (the Prometheus text of /metrics) is kept as a string.
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| if bytes.is_empty() { Value::Null } else { Value::String(String::from_utf8_lossy(&bytes).into_owned()) });
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

/// A client for a cluster: a list of instance addresses (or one load-balancer address). A
/// request that fails in transport or with a 5xx is sent again, unchanged, to the next
/// instance — a message keeps its `client_msg_id`, so a resend after a lost ack returns the
/// original seq — after an exponential backoff with full jitter, until `give_up_after`.
pub struct FailoverClient {
    instances: Vec<String>,
    current: usize,
    client: Client,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub give_up_after: Duration,
    /// How many times a request moved to another instance (for tests and benches).
    pub failovers: u64,
}

impl FailoverClient {
    pub fn new(instances: &[String]) -> Self {
        assert!(!instances.is_empty(), "a cluster client needs at least one instance address");
        let mut client = Client::new(&instances[0]);
        client.timeout = Duration::from_secs(10);
        Self {
            instances: instances.to_vec(),
            current: 0,
            client,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
            failovers: 0,
        }
    }

    /// The instance requests currently go to.
    pub fn instance(&self) -> &str {
        &self.instances[self.current]
    }

    /// Moves to the first instance whose `/readyz` answers 200 (taking new chats), starting
    /// from the current one; stays put if none does.
    pub async fn pick_ready(&mut self) -> Option<&str> {
        for k in 0..self.instances.len() {
            let i = (self.current + k) % self.instances.len();
            let mut probe = Client::new(&self.instances[i]);
            probe.timeout = Duration::from_secs(2);
            if matches!(probe.get("/readyz", None).await, Ok(r) if r.status == 200) {
                if i != self.current {
                    self.current = i;
                    self.client = probe;
                }
                return Some(&self.instances[i]);
            }
        }
        None
    }

    /// One long poll for a chat's events after `*after`, on whichever instance answers; moves
    /// `*after` to the answer's `next`, so the following poll (on this or another instance)
    /// resumes exactly after the last event seen.
    pub async fn poll_events(&mut self, chat_id: &str, token: &str, after: &mut u64, wait_ms: u64) -> Result<Vec<Value>, ClientError> {
        let path = format!("/v1/chats/{chat_id}/events?after={after}&wait_ms={wait_ms}");
        let body = self.get(&path, Some(token)).await?.ok()?;
        if let Some(next) = body["next"].as_u64() {
            *after = next;
        }
        Ok(body["events"].as_array().cloned().unwrap_or_default())
    }

    pub async fn call(&mut self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Result<Reply, ClientError> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let started = std::time::Instant::now();
        let mut backoff = self.first_backoff;
        loop {
            let outcome = self.client.raw(method.clone(), path, token, bytes.clone()).await;
            let retry = match &outcome {
                Ok(reply) => reply.status >= 500,
                Err(ClientError::Status { .. }) => false,
                Err(_) => true,
            };
            if !retry || started.elapsed() >= self.give_up_after {
                return outcome;
            }
            self.current = (self.current + 1) % self.instances.len();
            self.client = Client::new(&self.instances[self.current]);
            self.client.timeout = Duration::from_secs(10);
            self.failovers += 1;
            // Full jitter: many clients failing over at once do not arrive in lockstep.
            let pause = backoff.mul_f64(rand::random::<f64>());
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    pub async fn get(&mut self, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
        self.call(Method::GET, path, token, None).await
    }

    /// A create (`POST /v1/chats`) or join (`POST /v1/chats/{id}/join`) gets a
    /// `client_request_id` unless the body has one, so a retry on another instance after a
    /// lost answer opens no second chat and adds no second agent.
    pub async fn post(&mut self, path: &str, token: Option<&str>, body: Value) -> Result<Reply, ClientError> {
        self.call(Method::POST, path, token, Some(with_request_id(path, body))).await
    }
}

fn with_request_id(path: &str, mut body: Value) -> Value {
    let opens = path == "/v1/chats" || (path.starts_with("/v1/chats/") && path.ends_with("/join"));
    if let Some(fields) = body.as_object_mut().filter(|_| opens) {
        fields.entry("client_request_id").or_insert_with(|| Value::String(hex::encode(rand::random::<[u8; 16]>())));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::with_request_id;
    use serde_json::json;

    #[test]
    fn creates_and_joins_get_a_request_id_unless_they_have_one() {
        let created = with_request_id("/v1/chats", json!({"nickname": "Ann"}));
        let id = created["client_request_id"].as_str().expect("an id on a create");
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let joined = with_request_id("/v1/chats/c1/join", json!({"nickname": "Bob"}));
        assert!(joined["client_request_id"].is_string());
        assert_ne!(joined["client_request_id"], created["client_request_id"]);
        let own = with_request_id("/v1/chats", json!({"nickname": "Ann", "client_request_id": "mine-0123456789ab"}));
        assert_eq!(own["client_request_id"], "mine-0123456789ab");
        let message = with_request_id("/v1/chats/c1/messages", json!({"text": "hi"}));
        assert!(message.get("client_request_id").is_none());
    }
}
