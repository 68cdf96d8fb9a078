//! Limits with clear errors: messages per participant (token bucket, 429 with Retry-After),
//! participants per chat (409), open chats per instance (503, the reference's
//! limit-for-sessions). Nothing acknowledged is lost on the way.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::Duration;

/// Sends one message on a fresh connection and returns (status, Retry-After header, body).
fn raw_message(addr: &str, chat_id: &str, token: &str, text: &str, id: &str) -> (u16, Option<String>, Value) {
    let body = json!({"text": text, "client_msg_id": id}).to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chats/{chat_id}/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let retry_after = head.lines().find_map(|l| l.strip_prefix("retry-after: ").map(str::to_string));
    (status, retry_after, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_over_the_message_rate_gets_429_and_nothing_is_lost() {
    let data = Scratch::new("rate");
    let config = data.deployment("[limits]\nmessages_per_second = 2.0\nmessage_burst = 3\n");
    let server = Server::start(data.path(), Some(&config));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let mut acked = Vec::new();
    for i in 0..3 {
        let r = customer.send(&format!("burst {i}"), &format!("b{i}")).await;
        assert_eq!(r.status, 200, "within the burst: {:?}", r.body);
        acked.push((r.body["seq"].as_u64().unwrap(), format!("burst {i}")));
    }
    let (status, retry_after, body) = raw_message(&server.addr, &customer.chat_id, &customer.token, "one too many", "b3");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"].as_str().unwrap().contains("messages_per_second"), "{body}");
    let wait_ms = body["error"]["retry_after_ms"].as_u64().unwrap();
    assert!(wait_ms > 0 && wait_ms <= 500, "one token at 2/s: {wait_ms} ms");
    assert_eq!(retry_after.as_deref(), Some("1"), "Retry-After in whole seconds, rounded up");

    // A resend of an acknowledged message is answered with its seq, not charged, not refused.
    let again = customer.send("burst 1", "b1").await;
    assert_eq!((again.status, again.body["seq"].as_u64()), (200, Some(acked[1].0)));
    // The agent has a bucket of its own.
    let r = agent.send("agent is not limited by the customer", "a0").await;
    assert_eq!(r.status, 200);
    acked.push((r.body["seq"].as_u64().unwrap(), "agent is not limited by the customer".into()));

    // After the wait the refused message goes through, once.
    tokio::time::sleep(Duration::from_millis(wait_ms + 20)).await;
    let r = customer.send("one too many", "b3").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    acked.push((r.body["seq"].as_u64().unwrap(), "one too many".into()));
    assert_eq!(messages(&agent.transcript().await), acked, "exactly the acknowledged messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_per_chat_and_chats_per_instance_are_limited() {
    let data = Scratch::new("caps");
    let config = data.deployment("[limits]\nmax_participants = 2\nmax_chats = 2\n");
    let server = Server::start(data.path(), Some(&config));
    let (first, first_agent) = open_chat(&server, "Ann").await;

    // A second agent would be the third participant.
    let mut c = server.client();
    let r = c.post(&format!("/v1/chats/{}/join", first.chat_id), Some(AGENT), json!({"nickname": "Second agent"})).await.unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.error_code(), Some("chat_full"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("max_participants"));

    // Two open chats is this instance's limit: the third is refused, clients go elsewhere.
    let _second = open_chat(&server, "Bea").await;
    let r = c.post("/v1/chats", None, json!({"nickname": "Cid"})).await.unwrap();
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.error_code(), Some("too_many_chats"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("limits.max_chats"));

    // Once a chat ends, a new one is taken.
    let r = c.post(&format!("/v1/chats/{}/close", first.chat_id), Some(&first_agent.token), json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c.post("/v1/chats", None, json!({"nickname": "Cid"})).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
}

/// Slow or stalled clients cannot hold the server: a body that does not arrive gets 408, a
/// request whose headers do not arrive and an idle connection are closed, and open connections
/// are bounded (the one over the limit gets 503 and is closed) — while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_connections_are_bounded() {
    use std::time::Instant;
    let data = Scratch::new("slow");
    let config = data.deployment("[limits]\nheader_read_timeout_ms = 500\nbody_read_timeout_ms = 500\nmax_connections = 8\n");
    let server = Server::start(data.path(), Some(&config));
    let read_all = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };

    // A body promised but never sent in full.
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(s, "POST /v1/chats HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"nickname\"").unwrap();
    let answer = read_all(s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "cut off after the body timeout: {:?}", started.elapsed());

    // Headers that never end, and a connection that never says anything: both closed.
    for partial in ["POST /v1/chats HTTP/1.1\r\nhost: x\r\n", ""] {
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(s, "{partial}").unwrap();
        let answer = read_all(s);
        assert!(started.elapsed() < Duration::from_secs(3), "{partial:?}: closed after the header timeout, took {:?}: {answer}", started.elapsed());
        assert!(!answer.contains("201"), "{answer}");
    }

    // Eight idle connections fill the instance: the ninth is told so and closed.
    let idle: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&server.addr).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = read_all(std::net::TcpStream::connect(&server.addr).unwrap());
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // The idle ones are cut off by the header timeout; then new clients are served again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(idle);
    let mut c = server.client();
    let r = c.post("/v1/chats", None, json!({"nickname": "Ann"})).await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
}
