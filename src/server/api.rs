//! The public HTTP API v1 (see openapi.json at the top of the repository): routing, input
//! checks that turn bad input into a 4xx JSON error naming the problem, and the handlers.

use super::{App, input, proxy, web, ws};
use crate::chat::{ChatError, ChatHandle, Event, Member, Requester, Role, Whereabouts};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::time::Instant;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub type Body = Full<Bytes>;
/// A request whose body was read (size-limited) before routing, so it can be passed on to
/// another instance and still be served here if that instance turns out to be gone.
pub type Req = Request<Bytes>;

/// An error as clients see it: `{"error": {"code", "message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Sent as Retry-After (whole seconds, rounded up) and in the body.
    retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after_ms: None }
    }
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn code(&self) -> &'static str {
        self.code
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let (status, code) = match &e {
            ChatError::NotFound(_) => (StatusCode::NOT_FOUND, "chat_not_found"),
            ChatError::Closed => (StatusCode::CONFLICT, "chat_closed"),
            ChatError::NotSaved(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_saved"),
            // Retrying reaches the chat where it lives now.
            ChatError::Moved => (StatusCode::SERVICE_UNAVAILABLE, "chat_moved"),
            // The chat will not come back: its instance is gone and restores are off.
            ChatError::RestoreDisabled => (StatusCode::GONE, "restore_disabled"),
            ChatError::RestoreNotAllowed(_) => (StatusCode::SERVICE_UNAVAILABLE, "restore_not_allowed"),
            ChatError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ChatError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            ChatError::Full(_) => (StatusCode::CONFLICT, "chat_full"),
            ChatError::RequestReused(_) => (StatusCode::CONFLICT, "client_request_id_reused"),
            ChatError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        };
        let retry_after_ms = match &e {
            ChatError::RateLimited { retry_ms, .. } => Some(*retry_ms),
            _ => None,
        };
        ApiError { retry_after_ms, ..ApiError::new(status, code, e.to_string()) }
    }
}

type Reply = Result<Response<Body>, ApiError>;

pub async fn route(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let mut response = if req.method() == Method::OPTIONS {
        web::preflight()
    } else if req.method() == Method::GET
        && let Some(page) = web::asset(&app, req.uri().path())
    {
        page
    } else {
        handle(&app, req).await.unwrap_or_else(|e| error_response(&e))
    };
    web::allow_cross_origin(&mut response);
    // A response passed on from a chat's owner keeps the owner's name: it served the chat.
    if !response.headers().contains_key("parley-instance")
        && let Ok(v) = HeaderValue::from_str(&app.instance_id)
    {
        response.headers_mut().insert("parley-instance", v);
    }
    response
}

/// Every request's future is as large as its largest branch, and it is moved whole into
/// hyper's slot and into each caller's state: the branches other than a message's (the hot
/// path) are boxed where they are awaited. 6,480 -> 3,944 bytes a request; the copies went
/// from 5.4% to 3.4-3.9% of the HTTP workers' time at 20,000 msg/s.
async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let limit = app.limits.max_body_bytes;
    let within = std::time::Duration::from_millis(app.limits.body_read_timeout_ms);
    let body = tokio::time::timeout(within, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", format!("the request body did not arrive within {} ms", within.as_millis())))?
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the request body exceeds {limit} bytes")))?
        .to_bytes();
    let req = Request::from_parts(parts, body);
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, ["readyz"]) => readyz(app),
        (&Method::GET, ["openapi.json"]) => Ok(respond(StatusCode::OK, "application/json", OPENAPI)),
        (&Method::GET, ["v1", "kpi"]) => json(StatusCode::OK, app.kpi.to_json()),
        (&Method::GET, ["v1", "cluster"]) => cluster(app, &req),
        (&Method::GET, ["metrics"]) => Ok(respond(StatusCode::OK, "text/plain; version=0.0.4", app.kpi.to_prometheus(&app.instance_id, app.chats.events_in_memory()))),
        (&Method::POST, ["admin", "drain"]) => set_draining(app, &req, true),
        (&Method::POST, ["admin", "undrain"]) => set_draining(app, &req, false),
        (&Method::POST, ["admin", "reload"]) => Box::pin(reload(app, &req)).await,
        (&Method::GET, ["v1", "queue"]) => Box::pin(queue(app, &req)).await,
        (&Method::POST, ["v1", "chats"]) => Box::pin(create_chat(app, &req)).await,
        (_, ["v1", "chats", chat_id, action]) => {
            let (chat_id, action) = (chat_id.to_string(), action.to_string());
            chat_request(app, &chat_id, &action, req).await
        }
        (_, ["healthz" | "readyz" | "openapi.json" | "metrics"] | ["v1", "kpi" | "queue" | "chats" | "cluster"] | ["admin", "drain" | "undrain" | "reload"]) => {
            Err(wrong_method(&method))
        }
        _ => Err(not_found(&path)),
    }
}

/// A request about one chat: served here if the chat lives here (or is restored here now),
/// otherwise passed on to its owner. If the owner cannot be reached, the request waits for
/// the owner's lease to run out and the chat is restored here (ARCHITECTURE.md guarantee 4).
async fn chat_request(app: &Arc<App>, chat_id: &str, action: &str, req: Req) -> Reply {
    match (req.method(), action) {
        (&Method::GET, "events" | "ws" | "transcript") | (&Method::POST, "messages" | "typing" | "leave" | "join" | "close" | "stop") => {}
        (_, "messages" | "typing" | "events" | "ws" | "transcript" | "leave" | "join" | "close" | "stop") => return Err(wrong_method(req.method())),
        _ => return Err(not_found(req.uri().path())),
    }
    input::chat_id(chat_id)?;
    let requester = match action {
        "join" => {
            require_agent(app, &req)?;
            Requester::Agent
        }
        "stop" => {
            require_admin(app, &req)?;
            Requester::Workflow
        }
        // Browsers cannot set headers on a WebSocket: the token may come as a subprotocol or ?token=.
        "ws" => Requester::Participant(
            bearer(&req)
                .or_else(|| ws::subprotocol_token(&req))
                .map(str::to_owned)
                .or_else(|| query_pairs(&req).into_iter().find(|(k, _)| k == "token").map(|(_, v)| v))
                .ok_or_else(unauthorized)?,
        ),
        _ => Requester::Participant(require_token(&req)?.to_owned()),
    };
    let forwarded = forwarded(app, &req);
    let deadline = Instant::now() + app.cluster.failover_wait();
    loop {
        let owner = match app.chats.locate(chat_id, &requester, forwarded).await? {
            Whereabouts::Here(chat) => return serve(app, chat, &requester, action, req).await,
            Whereabouts::Owner(owner) => owner,
        };
        if action == "ws" {
            return Box::pin(proxy::websocket(app, &owner, req)).await.map_err(|problem| owner_unreachable(&owner.instance_id, &problem));
        }
        let answer = tokio::select! {
            r = Box::pin(proxy::forward(app, &owner, &req)) => r,
            _ = app.cluster.lease_ran_out(&owner.instance_id) => Err("its lease ran out".to_string()),
        };
        let problem = match answer {
            Ok(response) => return Ok(response),
            Err(problem) => problem,
        };
        tracing::debug!(chat_id, owner = %owner.instance_id, %problem, "the chat's owner did not answer");
        if Instant::now() >= deadline {
            return Err(owner_unreachable(&owner.instance_id, &problem));
        }
        // Ask again once the owner's lease ran out (the chat is restored here then), or after
        // a renewal period (the owner may have answered a transient error).
        tokio::select! {
            _ = app.cluster.lease_ran_out(&owner.instance_id) => {}
            _ = tokio::time::sleep(app.cluster.renew_period()) => {}
        }
    }
}

/// Whether another instance of the cluster passed this request on (it is not passed on again).
fn forwarded(app: &App, req: &Req) -> bool {
    req.headers().contains_key(proxy::FORWARDED_BY)
        && req.headers().get(proxy::CLUSTER_KEY).and_then(|v| v.to_str().ok()).is_some_and(|k| app.cluster.is_member_secret(k))
}

fn owner_unreachable(owner: &str, problem: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "owner_unreachable", format!("the chat's instance {owner} did not answer ({problem}); try again"))
}

/// Runs a chat request on the chat's task here.
async fn serve(app: &Arc<App>, chat: ChatHandle, requester: &Requester, action: &str, req: Req) -> Reply {
    let token = match requester {
        Requester::Agent => return Box::pin(join(app, &chat, &req)).await,
        Requester::Workflow => return Box::pin(stop(app, &chat, &req)).await,
        Requester::Participant(token) => token,
    };
    let member = chat.shared.authenticate(token).ok_or_else(|| forbidden("this token does not belong to a participant of this chat"))?;
    chat.touch(&member).await;
    match action {
        "messages" => post_message(app, &chat, &member, req).await,
        "typing" => typing(&chat, &member, &req),
        "events" => Box::pin(events(&chat, &member, &req)).await,
        "ws" => ws::upgrade(chat, member, req),
        "transcript" => Box::pin(transcript(&chat, &member)).await,
        "leave" => Box::pin(leave(&chat, &member)).await,
        "close" => Box::pin(close(app, &chat, &member, &req)).await,
        _ => Err(not_found(req.uri().path())),
    }
}

const OPENAPI: &str = include_str!("openapi.json");

fn not_found(path: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}"))
}

fn wrong_method(method: &Method) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed here"))
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut body = serde_json::json!({"error": {"code": e.code, "message": e.message}});
    if let Some(ms) = e.retry_after_ms {
        body["error"]["retry_after_ms"] = ms.into();
    }
    let mut r = respond(e.status, "application/json", body.to_string());
    if let Some(ms) = e.retry_after_ms {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    r
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

pub fn bearer(req: &Req) -> Option<&str> {
    input::bearer(req.headers().get(AUTHORIZATION)?.to_str().ok()?)
}

pub fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "an Authorization: Bearer token is required")
}

fn require_token(req: &Req) -> Result<&str, ApiError> {
    bearer(req).ok_or_else(unauthorized)
}

fn require_agent(app: &App, req: &Req) -> Result<(), ApiError> {
    let token = require_token(req)?;
    if app.staff.is_agent(token) { Ok(()) } else { Err(forbidden("an agent token is required")) }
}

fn require_admin(app: &App, req: &Req) -> Result<(), ApiError> {
    let token = require_token(req)?;
    if app.staff.is_admin(token) { Ok(()) } else { Err(forbidden("an admin token is required")) }
}

fn forbidden(message: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

fn readyz(app: &App) -> Reply {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this instance is draining and takes no new chats"));
    }
    if !app.kpi.storage_available() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", "the transcript store is unavailable"));
    }
    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
}

fn set_draining(app: &App, req: &Req, draining: bool) -> Reply {
    require_admin(app, req)?;
    app.draining.store(draining, Ordering::Relaxed);
    tracing::info!(event_id = if draining { "instance.drain" } else { "instance.undrain" }, "draining = {draining}");
    json(StatusCode::OK, serde_json::json!({"draining": draining, "sessions_current": app.kpi.sessions_current.load(Ordering::Relaxed)}))
}

async fn reload(app: &App, req: &Req) -> Reply {
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

/// The chats waiting for an agent on the whole cluster, oldest first: this instance's own,
/// and those of every other live instance (asked in parallel; one that does not answer is
/// named in `unreachable`).
async fn queue(app: &App, req: &Req) -> Reply {
    require_agent(app, req)?;
    let mut chats: Vec<serde_json::Value> = app.chats.queue().into_iter().map(|w| serde_json::to_value(w).expect("serializable")).collect();
    let mut unreachable = Vec::new();
    if !forwarded(app, req) {
        let peers: Vec<_> = app.cluster.members().into_iter().filter(|p| p.is_live() && *p.instance_id != *app.instance_id).collect();
        let answers = futures_util::future::join_all(peers.iter().map(|p| proxy::forward(app, p, req))).await;
        for (peer, answer) in peers.iter().zip(answers) {
            let body = match answer {
                Ok(r) if r.status() == StatusCode::OK => r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default(),
                _ => {
                    unreachable.push(peer.instance_id.clone());
                    continue;
                }
            };
            let theirs: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(list) = theirs["chats"].as_array() {
                chats.extend(list.iter().cloned());
            }
        }
    }
    chats.sort_by_key(|c| c["waiting_since"].as_u64().unwrap_or(0));
    json(StatusCode::OK, serde_json::json!({"chats": chats, "unreachable": unreachable}))
}

async fn create_chat(app: &App, req: &Req) -> Reply {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this instance is draining and takes no new chats"));
    }
    let open = app.kpi.sessions_current.load(Ordering::Relaxed).max(0) as usize;
    if app.limits.max_chats > 0 && open >= app.limits.max_chats {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_chats",
            format!("this instance holds {open} open chats, its limit (limits.max_chats); try another instance"),
        ));
    }
    let body = input::new_chat(req.body(), &app.limits)?;
    let created = app.chats.create(&body.nickname, body.subject, body.user_data, body.client_request_id.as_deref()).await?;
    json(StatusCode::CREATED, created)
}

async fn post_message(app: &App, chat: &ChatHandle, member: &Member, req: Req) -> Reply {
    let received = std::time::Instant::now();
    let body = input::new_message(req.body(), &app.limits)?;
    // The request's head and body are slices of the connection's read buffer: released now,
    // hyper reads on into that buffer while the message waits for its commit, instead of
    // allocating a fresh one for every message.
    drop(req);
    let seq = chat.post(member, body.text, body.client_msg_id).await?;
    app.kpi.message_acks.record(received.elapsed());
    json(StatusCode::OK, serde_json::json!({"seq": seq}))
}

fn typing(chat: &ChatHandle, member: &Member, req: &Req) -> Reply {
    let typing = input::typing(req.body())?;
    chat.shared.typing(member, typing);
    json(StatusCode::OK, serde_json::json!({"typing": typing}))
}

/// Query parameters as (name, value) pairs.
pub fn query_pairs(req: &Req) -> Vec<(String, String)> {
    input::query_pairs(req.uri().query().unwrap_or(""))
}

pub fn query_u64(req: &Req, name: &str, default: u64) -> Result<u64, ApiError> {
    input::query_u64(req.uri().query().unwrap_or(""), name, default)
}

const MAX_EVENTS_PER_POLL: usize = 1000;
const MAX_WAIT_MS: u64 = 60_000;

async fn events(chat: &ChatHandle, member: &Member, req: &Req) -> Reply {
    let after = query_u64(req, "after", 0)?;
    let wait_ms = query_u64(req, "wait_ms", 0)?.min(MAX_WAIT_MS);
    let shared = &chat.shared;
    let mut live = shared.subscribe_live();
    let mut committed = shared.watch_committed();
    let mut moved = shared.watch_moved();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let events: Vec<Arc<Event>> = loop {
        committed.borrow_and_update();
        let found = shared.events_after(after, MAX_EVENTS_PER_POLL, Some(member.role)).await?;
        if !found.is_empty() || shared.state() == crate::plugins::bindings::types::ChatState::Closed {
            break found;
        }
        if *moved.borrow_and_update() {
            // Another instance took the chat over: asking again reaches it there.
            return Err(ChatError::Moved.into());
        }
        tokio::select! {
            _ = committed.changed() => continue,
            _ = moved.changed() => continue,
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

async fn transcript(chat: &ChatHandle, member: &Member) -> Reply {
    let state = chat.shared.state();
    let events = chat.shared.events_after(0, usize::MAX, Some(member.role)).await?;
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

async fn leave(chat: &ChatHandle, member: &Member) -> Reply {
    let seq = chat.leave(member).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq}))
}

async fn join(app: &App, chat: &ChatHandle, req: &Req) -> Reply {
    let join = input::join(req.body(), &app.limits)?;
    let joined = chat.join(&join.nickname, join.client_request_id).await?;
    json(StatusCode::OK, joined)
}

async fn close(app: &App, chat: &ChatHandle, member: &Member, req: &Req) -> Reply {
    if member.role != Role::Agent {
        return Err(forbidden("only an agent of this chat can close it; customers leave"));
    }
    let reason = input::close_reason(req.body(), &app.limits)?.unwrap_or_else(|| format!("closed by {}", member.nickname));
    let seq = chat.close(reason).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq, "state": "closed"}))
}

async fn stop(app: &App, chat: &ChatHandle, req: &Req) -> Reply {
    let reason = input::close_reason(req.body(), &app.limits)?;
    let seq = chat.close(reason.unwrap_or_else(|| "stopped by the workflow".into())).await?;
    json(StatusCode::OK, serde_json::json!({"seq": seq, "state": "closed"}))
}

/// `GET /v1/cluster` (admin): the members this instance knows of and whether their leases are live.
fn cluster(app: &App, req: &Req) -> Reply {
    require_admin(app, req)?;
    let members: Vec<serde_json::Value> = app
        .cluster
        .members()
        .into_iter()
        .map(|p| serde_json::json!({"instance_id": p.instance_id, "address": p.address, "lease_expires_ms": p.lease_expires_ms, "live": p.is_live()}))
        .collect();
    json(StatusCode::OK, serde_json::json!({"instance_id": &*app.instance_id, "members": members}))
}
