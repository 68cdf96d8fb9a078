//! What a request carries — JSON bodies, query parameters, the bearer token, chat ids —
//! decoded into checked values; every problem is a 4xx `ApiError` naming it. Pure functions
//! without I/O, so the fuzz targets in `fuzz/` can drive them with arbitrary bytes.

use super::api::ApiError;
use crate::config::LimitsSection;
use hyper::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Parses a JSON body (already size-limited): UTF-8 checked, each problem named. An empty body
/// is `{}`.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if body.is_empty() { b"{}" } else { body };
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_utf8", format!("the request body is not valid UTF-8 ({e})")))?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("{e}")),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the request body is not valid JSON: {e}")),
    })
}

/// Query parameters as (name, value) pairs, in order.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The first `name=` parameter as a non-negative integer, or `default` when absent.
pub fn query_u64(query: &str, name: &str, default: u64) -> Result<u64, ApiError> {
    match query_pairs(query).into_iter().find(|(k, _)| k == name) {
        None => Ok(default),
        Some((_, v)) => v.parse().map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("{name} must be a non-negative integer, not {v:?}"))),
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: &str) -> Option<&str> {
    authorization.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty())
}

/// Chat ids are 1-64 ASCII letters, digits and dashes; anything else names no chat.
pub fn chat_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "chat_not_found", "no chat with this id"));
    }
    Ok(())
}

/// A nickname, trimmed: 1 to `max_nickname_chars` characters.
pub fn nickname(nickname: &str, limits: &LimitsSection) -> Result<String, ApiError> {
    let trimmed = nickname.trim();
    let n = trimmed.chars().count();
    if n == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "nickname must not be empty"));
    }
    if n > limits.max_nickname_chars {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("nickname is longer than {} characters", limits.max_nickname_chars)));
    }
    Ok(trimmed.to_string())
}

/// `POST /v1/chats`.
pub struct NewChat {
    pub nickname: String,
    pub subject: String,
    pub user_data: serde_json::Map<String, serde_json::Value>,
    pub client_request_id: Option<String>,
}

/// A client's id for a create or join it may retry: 16 to 128 letters, digits, `-` and `_`
/// (a random UUID fits). The same id makes a retry answer what the first request got.
pub fn client_request_id(id: Option<String>) -> Result<Option<String>, ApiError> {
    match id {
        Some(id) if !(16..=128).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "client_request_id must have 16 to 128 letters, digits, '-' or '_' (a random UUID fits)",
        )),
        id => Ok(id),
    }
}

pub fn new_chat(body: &[u8], limits: &LimitsSection) -> Result<NewChat, ApiError> {
    #[derive(Deserialize)]
    struct Wire {
        nickname: String,
        #[serde(default)]
        subject: String,
        #[serde(default)]
        user_data: serde_json::Map<String, serde_json::Value>,
        #[serde(default)]
        client_request_id: Option<String>,
    }
    let w: Wire = json(body)?;
    let nickname = nickname(&w.nickname, limits)?;
    if w.subject.chars().count() > limits.max_message_chars {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("subject is longer than {} characters", limits.max_message_chars)));
    }
    let client_request_id = client_request_id(w.client_request_id)?;
    Ok(NewChat { nickname, subject: w.subject, user_data: w.user_data, client_request_id })
}

/// `POST /v1/chats/{id}/messages`.
pub struct NewMessage {
    pub text: String,
    pub client_msg_id: Option<String>,
}

pub fn new_message(body: &[u8], limits: &LimitsSection) -> Result<NewMessage, ApiError> {
    #[derive(Deserialize)]
    struct Wire {
        text: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    }
    let w: Wire = json(body)?;
    if w.text.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "text must not be empty"));
    }
    let chars = w.text.chars().count();
    if chars > limits.max_message_chars {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "message_too_long", format!("text has {chars} characters; the limit is {}", limits.max_message_chars)));
    }
    if let Some(id) = &w.client_msg_id
        && (id.is_empty() || id.len() > 128)
    {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", "client_msg_id must have 1 to 128 characters"));
    }
    Ok(NewMessage { text: w.text, client_msg_id: w.client_msg_id })
}

/// `POST /v1/chats/{id}/typing`: whether the participant is typing.
pub fn typing(body: &[u8]) -> Result<bool, ApiError> {
    #[derive(Deserialize)]
    struct Wire {
        typing: bool,
    }
    Ok(json::<Wire>(body)?.typing)
}

/// `POST /v1/chats/{id}/join`: the agent's nickname ("Agent" when not given).
pub struct Join {
    pub nickname: String,
    pub client_request_id: Option<String>,
}

pub fn join(body: &[u8], limits: &LimitsSection) -> Result<Join, ApiError> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        nickname: Option<String>,
        #[serde(default)]
        client_request_id: Option<String>,
    }
    let w: Wire = json(body)?;
    let nickname = nickname(w.nickname.as_deref().unwrap_or("Agent"), limits)?;
    Ok(Join { nickname, client_request_id: client_request_id(w.client_request_id)? })
}

/// `POST /v1/chats/{id}/close` and `/stop`: the reason, if given (at most a message long).
pub fn close_reason(body: &[u8], limits: &LimitsSection) -> Result<Option<String>, ApiError> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        reason: Option<String>,
    }
    let w: Wire = json(body)?;
    if let Some(r) = &w.reason
        && r.chars().count() > limits.max_message_chars
    {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("reason is longer than {} characters", limits.max_message_chars)));
    }
    Ok(w.reason)
}
