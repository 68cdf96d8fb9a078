//! The floor under Parley's message path: a server that speaks the same HTTP/1.1 on the same
//! hyper and tokio setup as `parley serve` and answers just the requests `parley bench`
//! sends — create, join, message, transcript — from memory, with no chat task, no plugin and
//! no storage. `parley bench --target` against it shows what the HTTP exchange alone costs on
//! this machine (server and generator), so the figures of the real server can be read
//! against what no chat logic and no durability could go below.
//!
//!     cargo run --release --example http_floor -- 127.0.0.1:7499 &
//!     target/release/parley bench --target http://127.0.0.1:7499 --agent-token t --chats 1000 --rate 20000
//!
//! Its CPU per message: `/proc/<pid>/stat` (utime + stime) over a window of the run.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages answered per chat id.
#[derive(Default)]
struct Chats {
    messages: Mutex<HashMap<String, u64>>,
    created: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7499".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("http_floor listening on {listen}");
        let chats = Arc::new(Chats::default());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let chats = chats.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let chats = chats.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&chats, req).await) }
                });
                let _ = http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .header_read_timeout(std::time::Duration::from_secs(30))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn answer(chats: &Chats, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, "{}".into());
    };
    let path = parts.uri.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["v1", "chats"]) => {
            let n = chats.created.fetch_add(1, Ordering::Relaxed);
            let chat_id = format!("00000000-0000-4000-8000-{n:012}");
            chats.messages.lock().unwrap().insert(chat_id.clone(), 0);
            reply(StatusCode::CREATED, format!(r#"{{"chat_id":"{chat_id}","token":"c{n}"}}"#))
        }
        (&Method::POST, ["v1", "chats", _, "join"]) => reply(StatusCode::OK, r#"{"token":"a"}"#.into()),
        (&Method::POST, ["v1", "chats", chat_id, "messages"]) => {
            // Read the message as the real server does, so the floor includes parsing it.
            let Ok(message) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return reply(StatusCode::BAD_REQUEST, "{}".into());
            };
            let Some(seq) = chats.messages.lock().unwrap().get_mut(*chat_id).map(|n| {
                *n += 1;
                *n
            }) else {
                return reply(StatusCode::NOT_FOUND, "{}".into());
            };
            let id = message["client_msg_id"].as_str().unwrap_or_default();
            reply(StatusCode::OK, format!(r#"{{"seq":{seq},"client_msg_id":"{id}"}}"#))
        }
        (&Method::GET, ["v1", "chats", chat_id, "transcript"]) => {
            let n = chats.messages.lock().unwrap().get(*chat_id).copied().unwrap_or(0);
            let events = vec![r#"{"kind":"message"}"#; n as usize].join(",");
            reply(StatusCode::OK, format!(r#"{{"events":[{events}]}}"#))
        }
        _ => reply(StatusCode::NOT_FOUND, "{}".into()),
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}
