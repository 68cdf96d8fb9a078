//! `GET /v1/chats/{id}/ws`: the chat's events as WebSocket text frames, in order, starting
//! after `?after=`. Browsers cannot set headers on a WebSocket, so the participant token may
//! also come as a subprotocol, `parley.token.<token>` offered beside `parley` (the one the
//! answer selects), or as `?token=` — which keeps working, but puts the token in the URL that
//! proxies and load balancers log. When another instance takes the chat over, the socket
//! closes with code 1012 (service restart): the client reconnects after its last seq.

use super::api::{ApiError, Body, Req, query_u64};
use crate::chat::{ChatHandle, Member};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

/// The subprotocol a client offers for Parley's event frames; the answer selects it.
const SUBPROTOCOL: &str = "parley";
/// The prefix of the subprotocol that carries the participant token.
const TOKEN_SUBPROTOCOL: &str = "parley.token.";

/// The participant token offered as a subprotocol, if any.
pub fn subprotocol_token(req: &Req) -> Option<&str> {
    offered(req).find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL)).filter(|t| !t.is_empty())
}

fn offered(req: &Req) -> impl Iterator<Item = &str> {
    req.headers().get_all(SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

pub fn upgrade(chat: ChatHandle, member: Member, req: Req) -> Result<Response<Body>, ApiError> {
    let after = query_u64(&req, "after", 0)?;
    // A browser fails a socket whose answer selects none of the subprotocols it offered.
    let selected = match (offered(&req).any(|p| p == SUBPROTOCOL), subprotocol_token(&req)) {
        (true, _) => Some(HeaderValue::from_static(SUBPROTOCOL)),
        (false, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "subprotocol_missing",
                format!("offer the subprotocol \"{SUBPROTOCOL}\" beside \"{TOKEN_SUBPROTOCOL}<token>\": the answer selects it"),
            ));
        }
        (false, None) => None,
    };
    let key = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "not_websocket", "this endpoint needs a WebSocket upgrade request"))?;
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(64 << 10);
        config.max_frame_size = Some(64 << 10);
        let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, Some(config)).await;
        let (mut sink, mut incoming) = socket.split();
        let shared = chat.shared.clone();
        let mut live = shared.subscribe_live();
        let mut committed = shared.watch_committed();
        let mut moved = shared.watch_moved();
        let mut last = after;
        loop {
            committed.borrow_and_update();
            let Ok(events) = shared.events_after(last, 1000, Some(member.role)).await else {
                // The store holding the older events did not answer: the client reconnects after `last`.
                let frame = CloseFrame { code: CloseCode::Again, reason: "storage unavailable; reconnect".into() };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            };
            for e in events {
                last = e.seq;
                if sink.send(Message::text(&*e.json)).await.is_err() {
                    return;
                }
            }
            if shared.last_seq() > last {
                continue;
            }
            if *moved.borrow_and_update() {
                // Another instance took the chat over: "service restart", reconnect after `last`.
                let frame = CloseFrame { code: CloseCode::Restart, reason: "chat moved; reconnect".into() };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
            tokio::select! {
                changed = committed.changed() => if changed.is_err() { return },
                _ = moved.changed() => {}
                ev = live.recv() => match ev {
                    Ok(ev) if ev.visible_to(member.role) => {
                        if sink.send(Message::text(&*ev.json)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                frame = incoming.next() => match frame {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("accept key is ASCII"));
    if let Some(protocol) = selected {
        h.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response)
}
