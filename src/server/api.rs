//! The public HTTP API v1 (see openapi.json at the top of the repository): routing, input
//! checks that turn bad input into a 4xx JSON error naming the problem, and the handlers.

use super::{App, ws};
use crate::chat::{ChatError, ChatHandle, Event, Member, Role};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub type Body = Full<Bytes>;

/// An error as clients see it: `{"error": {"code", "message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let (status, code) = match &e {
            ChatError::NotFound(_) => (StatusCode::NOT_FOUND, "chat_not_found"),
            ChatError::Closed => (StatusCode::CONFLICT, "chat_closed"),
            ChatError::NotSaved(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_saved"),
            ChatError::Moved => (StatusCode::CONFLICT, "chat_moved"),
            ChatError::RestoreDisabled => (StatusCode::SERVICE_UNAVAILABLE, "restore_disabled"),
            ChatError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

type Reply = Result<Response<Body>, ApiError>;

pub async fn route(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, ["readyz"]) => readyz(&app),
        (&Method::GET, ["openapi.json"]) => Ok(respond(StatusCode::OK, "application/json", OPENAPI)),
        (&Method::GET, ["v1", "kpi"]) => json(StatusCode::OK, app.kpi.to_json()),
        (&Method::GET, ["metrics"]) => Ok(respond(StatusCode::OK, "text/plain; version=0.0.4", app.kpi.to_prometheus(&app.instance_id))),
        (&Method::POST, ["admin", "drain"]) => set_draining(&app, &req, true),
        (&Method::POST, ["admin", "undrain"]) => set_draining(&app, &req, false),
        (&Method::POST, ["admin", "reload"]) => reload(&app, &req).await,
        (&Method::GET, ["v1", "queue"]) => queue(&app, &req),
        (&Method::POST, ["v1", "chats"]) => create_chat(&app, req).await,
        (_, ["v1", "chats", chat_id, action]) => {
            let chat_id = chat_id.to_string();
            match (&method, *action) {
                (&Method::POST, "messages") => post_message(&app, &chat_id, req).await,
                (&Method::POST, "typing") => typing(&app, &chat_id, req).await,
                (&Method::GET, "events") => events(&app, &chat_id, req).await,
                (&Method::GET, "ws") => ws::upgrade(&app, &chat_id, req).await,
                (&Method::GET, "transcript") => transcript(&app, &chat_id, req).await,
                (&Method::POST, "leave") => leave(&app, &chat_id, req).await,
                (&Method::POST, "join") => join(&app, &chat_id, req).await,
                (&Method::POST, "close") => close(&app, &chat_id, req).await,
                (&Method::POST, "stop") => stop(&app, &chat_id, req).await,
                (_, "messages" | "typing" | "events" | "ws" | "transcript" | "leave" | "join" | "close" | "stop") => Err(wrong_method(&method)),
                _ => Err(not_found(&path)),
            }
        }
        (_, ["healthz" | "readyz" | "openapi.json" | "metrics"] | ["v1", "kpi" | "queue" | "chats"] | ["admin", "drain" | "undrain" | "reload"]) => {
            Err(wrong_method(&method))
        }
        _ => Err(not_found(&path)),
    };
    let mut response = result.unwrap_or_else(|e| error_response(&e));
    if let Ok(v) = HeaderValue::from_str(&app.instance_id) {
        response.headers_mut().insert("parley-instance", v);
    }
    response
}

const OPENAPI: &str = include_str!("openapi.json");

fn not_found(path: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}"))
}

fn wrong_method(method: &Method) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed here"))
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": e.code, "message": e.message}});
    respond(e.status, "application/json", body.to_string())
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, value: impl serde::Serialize) -> Reply {
    Ok(respond(status, "application/json", serde_json::to_vec(&value).expect("serializable")))
}

/// Reads a JSON body: size-limited, UTF-8 checked, each problem named.
async fn read_json<T: DeserializeOwned>(app: &App, req: Request<Incoming>) -> Result<T, ApiError> {
    let limit = app.limits.max_body_bytes;
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the request body exceeds {limit} bytes")))?
        .to_bytes();
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_utf8", format!("the request body is not valid UTF-8 ({e})")))?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("{e}")),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the request body is not valid JSON: {e}")),
    })
}

pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers().get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

pub fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "an Authorization: Bearer token is required")
}

fn require_token(req: &Request<Incoming>) -> Result<&str, ApiError> {
    bearer(req).ok_or_else(unauthorized)
}

fn require_agent(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let token = require_token(req)?;
    if app.staff.is_agent(token) { Ok(()) } else { Err(forbidden("an agent token is required")) }
}

fn require_admin(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let token = require_token(req)?;
    if app.staff.is_admin(token) { Ok(()) } else { Err(forbidden("an admin token is required")) }
}

fn forbidden(message: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The chat and the participant the request's bearer token belongs to.
async fn caller(app: &App, chat_id: &str, req: &Request<Incoming>) -> Result<(ChatHandle, Member), ApiError> {
    let token = require_token(req)?.to_owned();
    participant(app, chat_id, &token).await
}

/// The chat and the participant `token` belongs to; anyone else gets 403.
pub async fn participant(app: &App, chat_id: &str, token: &str) -> Result<(ChatHandle, Member), ApiError> {
    check_id(chat_id)?;
    let chat = app.chats.find(chat_id).await?;
    let member = chat.shared.authenticate(token).ok_or_else(|| forbidden("this token does not belong to a participant of this chat"))?;
    chat.touch(&member).await;
    Ok((chat, member))
}

fn check_id(chat_id: &str) -> Result<(), ApiError> {
    if chat_id.is_empty() || chat_id.len() > 64 || !chat_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "chat_not_found", "no chat with this id"));
    }
    Ok(())
}

fn readyz(app: &App) -> Reply {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this instance is draining and takes no new chats"));
    }
    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
}

fn set_draining(app: &App, req: &Request<Incoming>, draining: bool) -> Reply {
    require_admin(app, req)?;
    app.draining.store(draining, Ordering::Relaxed);
    tracing::info!(event_id = if draining { "instance.drain" } else { "instance.undrain" }, "draining = {draining}");
    json(StatusCode::OK, serde_json::json!({"draining": draining, "sessions_current": app.kpi.sessions_current.load(Ordering::Relaxed)}))
}

async fn reload(app: &App, req: &Request<Incoming>) -> Reply {
    require_admin(app, req)?;
    match app.plugins.reload().await {
        Ok(()) => {
            tracing::info!(event_id = "plugins.reloaded", "plugins reloaded from the deployment file");
            json(StatusCode::OK, serde_json::json!({"reloaded": true}))
        }
        Err(problem) => {
            tracing::warn!(event_id = "plugins.reload_refused", cause = %problem, "plugin reload refused; the running plugins stay");
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "reload_refused", problem))
        }
    }
}

fn queue(app: &App, req: &Request<Incoming>) -> Reply {
    require_agent(app, req)?;
    json(StatusCode::OK, serde_json::json!({"chats": app.chats.queue()}))
}

#[derive(Deserialize)]
struct CreateChat {
    nickname: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    user_data: serde_json::Map<String, serde_json::Value>,
}

fn check_nickname(app: &App, nickname: &str) -> Result<(), ApiError> {
    let n = nickname.trim().chars().count();
    if n == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "nickname must not be empty"));
    }
    if n > app.limits.max_nickname_chars {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("nickname is longer than {} characters", app.limits.max_nickname_chars)));
    }
    Ok(())
}

async fn create_chat(app: &App, req: Request<Incoming>) -> Reply {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this instance is draining and takes no new chats"));
    }
    let body: CreateChat = read_json(app, req).await?;
    check_nickname(app, &body.nickname)?;
    if body.subject.chars().count() > app.limits.max_message_chars {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "subject is too long"));
    }
    let created = app.chats.create(body.nickname.trim(), body.subject, body.user_data).await?;
    json(StatusCode::CREATED, created)
}

#[derive(Deserialize)]
struct PostMessage {
    text: String,
    #[serde(default)]
    client_msg_id: Option<String>,
}

async fn post_message(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let (chat, member) = caller(app, chat_id, &req).await?;
    let body: PostMessage = read_json(app, req).await?;
    let chars = body.text.chars().count();
    if body.text.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "text must not be empty"));
    }
    if chars > app.limits.max_message_chars {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_long",
            format!("text has {chars} characters; the limit is {}", app.limits.max_message_chars),
        ));
    }
    if let Some(id) = &body.client_msg_id
        && (id.is_empty() || id.len() > 128)
    {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "client_msg_id must have 1 to 128 characters"));
    }
    let seq = chat.post(&member, body.text, body.client_msg_id).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq}))
}

#[derive(Deserialize)]
struct Typing {
    typing: bool,
}

async fn typing(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let (chat, member) = caller(app, chat_id, &req).await?;
    let body: Typing = read_json(app, req).await?;
    chat.shared.typing(&member, body.typing);
    json(StatusCode::OK, serde_json::json!({"typing": body.typing}))
}

/// Query parameters as (name, value) pairs.
pub fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

pub fn query_u64(req: &Request<Incoming>, name: &str, default: u64) -> Result<u64, ApiError> {
    match query_pairs(req).into_iter().find(|(k, _)| k == name) {
        None => Ok(default),
        Some((_, v)) => v.parse().map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("{name} must be a non-negative integer, not {v:?}"))),
    }
}

const MAX_EVENTS_PER_POLL: usize = 1000;
const MAX_WAIT_MS: u64 = 60_000;

async fn events(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let after = query_u64(&req, "after", 0)?;
    let wait_ms = query_u64(&req, "wait_ms", 0)?.min(MAX_WAIT_MS);
    let (chat, member) = caller(app, chat_id, &req).await?;
    let shared = &chat.shared;
    let mut live = shared.subscribe_live();
    let mut committed = shared.watch_committed();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let events: Vec<Arc<Event>> = loop {
        committed.borrow_and_update();
        let found = shared.events_after(after, MAX_EVENTS_PER_POLL, member.role);
        if !found.is_empty() || shared.state() == crate::plugins::bindings::types::ChatState::Closed {
            break found;
        }
        tokio::select! {
            _ = committed.changed() => continue,
            ev = live.recv() => match ev {
                Ok(ev) if ev.visible_to(member.role) => break vec![ev],
                _ => continue,
            },
            _ = tokio::time::sleep_until(deadline) => break Vec::new(),
        }
    };
    let next = events.iter().rev().find(|e| e.seq > 0).map_or(after, |e| e.seq);
    let mut body = String::with_capacity(32 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.json);
    }
    body.push_str("],\"next\":");
    body.push_str(&next.to_string());
    body.push('}');
    Ok(respond(StatusCode::OK, "application/json", body))
}

async fn transcript(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let (chat, member) = caller(app, chat_id, &req).await?;
    let state = chat.shared.state();
    let events = chat.shared.events_after(0, usize::MAX, member.role);
    let mut body = format!("{{\"chat_id\":\"{}\",\"state\":\"{}\",\"events\":[", chat.shared.id, state_name(state));
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.json);
    }
    body.push_str("]}");
    Ok(respond(StatusCode::OK, "application/json", body))
}

fn state_name(s: crate::plugins::bindings::types::ChatState) -> &'static str {
    use crate::plugins::bindings::types::ChatState;
    match s {
        ChatState::Waiting => "waiting",
        ChatState::Active => "active",
        ChatState::Closed => "closed",
    }
}

async fn leave(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let (chat, member) = caller(app, chat_id, &req).await?;
    let seq = chat.leave(&member).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq}))
}

#[derive(Deserialize)]
struct JoinBody {
    #[serde(default = "default_agent_name")]
    nickname: String,
}

fn default_agent_name() -> String {
    "Agent".to_string()
}

async fn join(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    require_agent(app, &req)?;
    check_id(chat_id)?;
    let body: JoinBody = read_json(app, req).await?;
    check_nickname(app, &body.nickname)?;
    let chat = app.chats.find(chat_id).await?;
    let joined = chat.join(body.nickname.trim()).await?;
    json(StatusCode::OK, joined)
}

#[derive(Deserialize)]
struct CloseBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn close(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    let (chat, member) = caller(app, chat_id, &req).await?;
    if member.role != Role::Agent {
        return Err(forbidden("only an agent of this chat can close it; customers leave"));
    }
    let body: CloseBody = read_json(app, req).await?;
    let reason = body.reason.unwrap_or_else(|| format!("closed by {}", member.nickname));
    let seq = chat.close(reason).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq, "state": "closed"}))
}

async fn stop(app: &App, chat_id: &str, req: Request<Incoming>) -> Reply {
    require_admin(app, &req)?;
    check_id(chat_id)?;
    let body: CloseBody = read_json(app, req).await?;
    let chat = app.chats.find(chat_id).await?;
    let seq = chat.close(body.reason.unwrap_or_else(|| "stopped by the workflow".into())).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq, "state": "closed"}))
}
