//! A customer and an agent chat through the real server; the server is killed with SIGKILL
//! and started again on the same data; nothing acknowledged is lost or doubled.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_survives_kill_9_and_restart() {
    let data = Scratch::new("conversation");
    scenarios::conversation_survives_kill_9(|| Server::start(data.path(), None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_is_idempotent_and_strangers_are_refused() {
    let data = Scratch::new("idempotent");
    let server = Server::start(data.path(), None);
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let first = customer.send("hello", "m-1").await;
    let again = customer.send("hello", "m-1").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["seq"], again.body["seq"]);
    assert_eq!(messages(&agent.transcript().await).len(), 1, "stored once");

    // The same client_msg_id from another participant is another message.
    let other = agent.send("hello", "m-1").await;
    assert_ne!(other.body["seq"], first.body["seq"]);

    // A participant of another chat, an agent token and no token at all.
    let (mut stranger, _) = open_chat(&server, "Eve").await;
    let mut c = server.client();
    for token in [Some(stranger.token.as_str()), Some(AGENT), Some("0123456789abcdef0123456789abcdef")] {
        for (method, path) in [("GET", "transcript"), ("GET", "events"), ("POST", "messages"), ("POST", "typing"), ("POST", "leave"), ("POST", "close")] {
            let path = format!("/v1/chats/{}/{path}", customer.chat_id);
            let r = c.call(method.parse().unwrap(), &path, token, Some(json!({"text": "x", "typing": true}))).await.unwrap();
            assert_eq!(r.status, 403, "{method} {path} with {token:?}: {:?}", r.body);
            assert_eq!(r.error_code(), Some("forbidden"));
        }
    }
    let r = c.get(&format!("/v1/chats/{}/transcript", customer.chat_id), None).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(messages(&stranger.transcript().await).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_problem() {
    let data = Scratch::new("badinput");
    let server = Server::start(data.path(), Some(&data.deployment("[limits]\nmax_message_chars = 100\nmax_body_bytes = 2000\n")));
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    let ok = customer.send("before", "before").await;
    assert_eq!(ok.status, 200);
    let path = format!("/v1/chats/{}/messages", customer.chat_id);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", b"{\"text\": ".to_vec(), 400, "invalid_json"),
        ("not JSON at all", b"hello".to_vec(), 400, "invalid_json"),
        ("invalid UTF-8", b"{\"text\": \"\xff\xfe\"}".to_vec(), 400, "invalid_utf8"),
        ("wrong type", br#"{"text": 42}"#.to_vec(), 400, "invalid_field"),
        ("missing text", br#"{"client_msg_id": "x"}"#.to_vec(), 400, "invalid_field"),
        ("empty text", br#"{"text": "   "}"#.to_vec(), 400, "invalid_field"),
        ("oversize text", format!(r#"{{"text": "{}"}}"#, "é".repeat(101)).into_bytes(), 413, "message_too_long"),
        ("oversize body", format!(r#"{{"text": "{}"}}"#, "a".repeat(3000)).into_bytes(), 413, "body_too_large"),
        ("oversize client_msg_id", format!(r#"{{"text": "a", "client_msg_id": "{}"}}"#, "a".repeat(200)).into_bytes(), 400, "invalid_field"),
    ];
    for (what, body, status, code) in cases {
        let r = customer.client.raw("POST".parse().unwrap(), &path, Some(&customer.token), body.into()).await.unwrap();
        assert_eq!(r.status, status, "{what}: {:?}", r.body);
        assert_eq!(r.error_code(), Some(code), "{what}");
        assert!(!r.body["error"]["message"].as_str().unwrap().is_empty(), "{what}: the message names the problem");
    }
    let mut c = server.client();
    let unknown = c.post("/v1/chats/0000000000000000000000000000dead/messages", Some(&customer.token), json!({"text": "hi"})).await.unwrap();
    assert_eq!((unknown.status, unknown.error_code()), (404, Some("chat_not_found")));
    let bad_id = c.get("/v1/chats/..%2F..%2Fetc/transcript", Some(&customer.token)).await.unwrap();
    assert_eq!(bad_id.status, 404);
    let bad_query = c.get(&format!("/v1/chats/{}/events?after=minus-one", customer.chat_id), Some(&customer.token)).await.unwrap();
    assert_eq!((bad_query.status, bad_query.error_code()), (400, Some("invalid_query")));
    let no_nickname = c.post("/v1/chats", None, json!({"subject": "x"})).await.unwrap();
    assert_eq!((no_nickname.status, no_nickname.error_code()), (400, Some("invalid_field")));
    let nowhere = c.get("/v1/nowhere", None).await.unwrap();
    assert_eq!((nowhere.status, nowhere.error_code()), (404, Some("not_found")));

    // The server is healthy and nothing was lost or added.
    assert_eq!(c.get("/healthz", None).await.unwrap().status, 200);
    let after = customer.send("after", "after").await;
    assert_eq!(after.status, 200);
    assert_eq!(messages(&customer.transcript().await).iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(), vec!["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_by_long_poll_and_websocket_in_order() {
    let data = Scratch::new("events");
    let server = Server::start(data.path(), None);
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;

    // A long poll waiting for the next event is woken by it.
    let waiting = poll_in_background(&server, &customer, 2);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(agent.send("first", "a1").await.status, 200);
    let woke = waiting.await.unwrap();
    assert_eq!(messages(&woke), vec![(3, "first".to_string())]);
    assert_eq!(woke["next"], 3);

    // Typing reaches the other side without entering the transcript.
    let typing_seen = poll_in_background(&server, &customer, 3);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = agent.client.post(&format!("/v1/chats/{}/typing", agent.chat_id), Some(&agent.token), json!({"typing": true})).await.unwrap();
    assert_eq!(r.status, 200);
    let t = typing_seen.await.unwrap();
    assert_eq!(kinds(&t), vec!["typing"]);
    assert!(t["events"][0].get("seq").is_none());
    assert_eq!(t["next"], 3, "typing does not move the cursor");

    // A WebSocket from the start replays the transcript, then follows it live. The token rides
    // as a subprotocol (out of the URL), and the answer selects `parley` as browsers require.
    let (mut ws, selected) = chat_socket(&server.addr, &customer.chat_id, 0, &token_protocols(&customer.token)).await.unwrap();
    assert_eq!(selected.as_deref(), Some("parley"));
    // The other ways in: the token in the URL still works (older clients); a stranger's token
    // as a subprotocol is refused like any other; a token subprotocol alone is refused, since a
    // browser would fail a socket whose answer selects none of what it offered.
    let url = format!("ws://{}/v1/chats/{}/ws?after=0&token={}", server.addr, customer.chat_id, customer.token);
    let (mut by_url, response) = tokio_tungstenite::client_async(url, tokio::net::TcpStream::connect(&server.addr).await.unwrap()).await.unwrap();
    assert!(response.headers().get("sec-websocket-protocol").is_none(), "nothing offered, nothing selected");
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), by_url.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(serde_json::from_str::<Value>(first.to_text().unwrap()).unwrap()["seq"], 1);
    let stranger = chat_socket(&server.addr, &customer.chat_id, 0, &token_protocols(&"0".repeat(32))).await.expect_err("a stranger is refused");
    assert_eq!(stranger.0, 403, "{}", stranger.1);
    let (status, body) = chat_socket(&server.addr, &customer.chat_id, 0, &format!("parley.token.{}", customer.token)).await.expect_err("refused");
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "subprotocol_missing", "{body}");
    for i in 0..20 {
        assert_eq!(customer.send(&format!("live {i}"), &format!("c{i}")).await.status, 200);
    }
    let mut seqs = Vec::new();
    while seqs.len() < 23 {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let e: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if let Some(seq) = e["seq"].as_u64() {
            seqs.push(seq);
        }
    }
    assert_eq!(seqs, (1..=23).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stores_the_final_transcript() {
    let data = Scratch::new("close");
    let server = Server::start(data.path(), None);
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let mut queue_client = server.client();
    let (waiting, _) = open_chat_without_agent(&server).await;
    let queue = queue_client.get("/v1/queue", Some(AGENT)).await.unwrap().ok().unwrap();
    let queued: Vec<&str> = queue["chats"].as_array().unwrap().iter().map(|c| c["chat_id"].as_str().unwrap()).collect();
    assert_eq!(queued, vec![waiting.as_str()], "only the chat without an agent waits");
    assert_eq!(queue_client.get("/v1/queue", Some(&customer.token)).await.unwrap().status, 403);

    customer.send("thanks, bye", "c1").await;
    let r = customer.client.post(&format!("/v1/chats/{}/close", customer.chat_id), Some(&customer.token), json!({})).await.unwrap();
    assert_eq!(r.status, 403, "customers leave; agents close");
    let r = agent.client.post(&format!("/v1/chats/{}/close", agent.chat_id), Some(&agent.token), json!({"reason": "resolved"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = customer.events(3, 1000).await;
    assert_eq!(kinds(&seen), vec!["closed"]);
    assert_eq!(customer.send("too late", "c2").await.status, 409);

    // After a restart the closed chat is read from the final store.
    server.kill9();
    let server = Server::start(data.path(), None);
    customer.moved_to(&server);
    let t = customer.transcript().await;
    assert_eq!(t["state"], "closed");
    assert_eq!(kinds(&t), vec!["joined", "joined", "message", "closed"]);
    assert_eq!(t["events"][3]["text"], "resolved");
}

/// A long chat keeps only its newest events in memory (`limits.events_in_memory`); readers
/// who ask for older ones get them from the store, in order and once each: long polls, the
/// WebSocket replay, the transcript, a resend's seq, and the final transcript at close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chat_reads_its_older_events_back_from_the_store() {
    let data = Scratch::new("window");
    let config = data.deployment("[limits]\nevents_in_memory = 5\nmessages_per_second = 0\n");
    let server = Server::start(data.path(), Some(&config));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let mut expected: Vec<(u64, String)> = Vec::new();
    for i in 0..30 {
        let (who, text) = if i % 3 == 2 { (&mut agent, format!("agent {i}")) } else { (&mut customer, format!("customer {i}")) };
        let r = who.send(&text, &format!("m{i}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        expected.push((r.body["seq"].as_u64().unwrap(), text));
    }
    assert_eq!(expected.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (3..33).collect::<Vec<_>>());
    assert_eq!(events_in_memory(&server.addr), 5, "the chat holds its 5 newest events");

    for p in [&mut customer, &mut agent] {
        let t = p.transcript().await;
        assert_eq!(kinds(&t)[..2], ["joined", "joined"]);
        assert_eq!(messages(&t), expected, "the whole transcript, once each, in order");
    }
    // Long polls from the start and from the middle: the older part comes from the store,
    // and the answer runs on into the events in memory.
    let from_start = customer.events(0, 0).await;
    assert_eq!(from_start["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), (1..33).collect::<Vec<_>>());
    assert_eq!(from_start["next"], 32);
    let from_middle = agent.events(10, 0).await;
    assert_eq!(messages(&from_middle), expected[8..].to_vec());
    let beyond = agent.events(u64::MAX, 0).await;
    assert_eq!(beyond["events"], json!([]), "nothing after the largest seq a client can name");
    // A WebSocket from seq 0 replays all of it, then follows live.
    let (mut ws, _) = chat_socket(&server.addr, &customer.chat_id, 0, &token_protocols(&customer.token)).await.unwrap();
    assert_eq!(customer.send("live", "live").await.status, 200);
    let mut seqs = Vec::new();
    while seqs.len() < 33 {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        if let Some(seq) = serde_json::from_str::<Value>(frame.to_text().unwrap()).unwrap()["seq"].as_u64() {
            seqs.push(seq);
        }
    }
    assert_eq!(seqs, (1..=33).collect::<Vec<_>>());
    expected.push((33, "live".into()));
    // A resend of a message long out of memory gets its seq, and nothing is stored twice.
    let again = customer.send("customer 0", "m0").await;
    assert_eq!(again.body["seq"], 3, "{:?}", again.body);
    assert_eq!(messages(&agent.transcript().await), expected);

    // After kill -9 the restored chat holds its newest events again, and the rest reads back.
    server.kill9();
    let server = Server::start(data.path(), Some(&config));
    customer.moved_to(&server);
    agent.moved_to(&server);
    assert_eq!(customer.send("customer 1", "m1").await.body["seq"], 4, "a resend after the restore");
    let next = agent.send("after the restart", "after").await;
    assert_eq!(next.status, 200);
    expected.push((next.body["seq"].as_u64().unwrap(), "after the restart".into()));
    assert_eq!(messages(&customer.transcript().await), expected);
    assert_eq!(events_in_memory(&server.addr), 5);

    // The final transcript holds every event: after a restart the closed chat reads from it.
    let r = agent.client.post(&format!("/v1/chats/{}/close", agent.chat_id), Some(&agent.token), json!({"reason": "done"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    server.kill9();
    let server = Server::start(data.path(), Some(&config));
    customer.moved_to(&server);
    let t = customer.transcript().await;
    assert_eq!(t["state"], "closed");
    assert_eq!(messages(&t), expected);
    let seqs: Vec<u64> = t["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(kinds(&t).last().unwrap(), "closed");
}

/// `parley_transcript_events_in_memory` from the instance's `/metrics`.
fn events_in_memory(addr: &str) -> u64 {
    let text = scrape_metrics(addr);
    let line = text.lines().find(|l| l.starts_with("parley_transcript_events_in_memory{")).expect("the gauge is served");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn open_chat_without_agent(server: &Server) -> (String, String) {
    let mut c = server.client();
    let created = c.post("/v1/chats", None, json!({"nickname": "Bo", "subject": "waiting"})).await.unwrap().ok().unwrap();
    (created["chat_id"].as_str().unwrap().into(), created["token"].as_str().unwrap().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_save_2_notifies_and_0_skips_intermediate_saves() {
    let data = Scratch::new("autosave2");
    let server = Server::start(data.path(), Some(&data.deployment("[transcript]\nauto_save = 2\n")));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let watcher = poll_in_background(&server, &customer, 3);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(agent.send("hello", "a1").await.status, 200);
    let mut seen = watcher.await.unwrap();
    if kinds(&seen) == vec!["message"] {
        seen = customer.events(3, 5000).await;
    }
    assert!(seen["events"].as_array().unwrap().iter().any(|e| e["kind"] == "notice" && e["text"] == "Transcript saved."), "{seen}");

    let data = Scratch::new("autosave0");
    let server = Server::start(data.path(), Some(&data.deployment("[transcript]\nauto_save = 0\n")));
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("not saved until close", "c1").await.status, 200);
    assert_eq!(messages(&customer.transcript().await).len(), 1);
    let db = data.read_integer("SELECT count(*) FROM events", []);
    assert_eq!(db, 0, "no intermediate rows with auto_save = 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_of_chats_restores_at_once_after_kill_9() {
    let data = Scratch::new("wave");
    let server = Server::start(data.path(), None);
    let mut chats = Vec::new();
    for i in 0..30 {
        let (mut customer, _agent) = open_chat(&server, &format!("C{i}")).await;
        assert_eq!(customer.send(&format!("hello from {i}"), "m1").await.status, 200);
        chats.push(customer);
    }
    server.kill9();
    let server = Server::start(data.path(), None);
    // Every chat's first request arrives at once, so their loads queue together in the store slot.
    let restores = chats.into_iter().enumerate().map(|(i, mut customer)| {
        customer.moved_to(&server);
        async move {
            let t = customer.transcript().await;
            assert_eq!(messages(&t), vec![(3, format!("hello from {i}"))]);
            // The new process has a new instance id: `moved` (4) names it, then `reconnected` (5).
            assert_eq!(customer.send("back", "m2").await.body["seq"], 6);
            let t = customer.transcript().await;
            assert_eq!(kinds(&t)[3..], ["moved", "reconnected", "message"]);
        }
    });
    futures_util::future::join_all(restores).await;
    let kpi = server.client().get("/v1/kpi", None).await.unwrap().ok().unwrap();
    assert_eq!(kpi["session_restored"], 30);
}

/// Thirty chats of long messages (~100 KB of text each) in a store plugin held to 4 MiB:
/// loading the whole wave in one call would need several times that, and the plugin would
/// blow its memory on every retry. The wave restores all the same, in parts that fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_of_long_transcripts_restores_in_parts_the_plugin_memory_holds() {
    let data = Scratch::new("wave-long");
    let config = data.deployment("[plugins.intermediate]\nfile = \"builtin:sqlite-store\"\nmemory_mb = 4\n");
    let server = Server::start(data.path(), Some(&config));
    let long = |i: usize, n: usize| format!("{i}/{n} {}", "x".repeat(4000));
    let mut chats = Vec::new();
    for i in 0..30 {
        let (mut customer, _agent) = open_chat(&server, &format!("C{i}")).await;
        for n in 0..25 {
            assert_eq!(customer.send(&long(i, n), &format!("m{n}")).await.status, 200);
        }
        chats.push(customer);
    }
    server.kill9();
    let server = Server::start(data.path(), Some(&config));
    let restores = chats.into_iter().enumerate().map(|(i, mut customer)| {
        customer.moved_to(&server);
        async move {
            let t = customer.transcript().await;
            let texts: Vec<String> = messages(&t).into_iter().map(|(_, text)| text).collect();
            assert_eq!(texts, (0..25).map(|n| long(i, n)).collect::<Vec<_>>(), "chat {i}");
            assert_eq!(customer.send("back", "m25").await.status, 200, "chat {i}");
        }
    });
    futures_util::future::join_all(restores).await;
    let kpi = server.client().get("/v1/kpi", None).await.unwrap().ok().unwrap();
    assert_eq!(kpi["session_restored"], 30);
}

/// One HTTP/2 request on a shared connection: (status, JSON body).
async fn h2(sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    use http_body_util::BodyExt;
    let mut req = hyper::Request::builder().method(method).uri(format!("http://parley{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map_or_else(bytes::Bytes::new, |b| bytes::Bytes::from(b.to_string()));
    let req = req.header("content-type", "application/json").body(http_body_util::Full::new(body)).unwrap();
    sender.ready().await.expect("the HTTP/2 connection is open");
    let response = sender.send_request(req).await.expect("an HTTP/2 answer");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_carries_a_whole_chat_with_long_polls_open() {
    let data = Scratch::new("http2");
    let server = Server::start(data.path(), None);
    // Prior knowledge (no upgrade), as a load balancer speaks HTTP/2 to its backends.
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let mut s = sender.clone();

    let (status, created) = h2(&mut s, "POST", "/v1/chats", None, Some(json!({"nickname": "Ann"}))).await;
    assert_eq!(status, 201, "{created}");
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let customer = created["token"].as_str().unwrap().to_string();
    let (status, joined) = h2(&mut s, "POST", &format!("/v1/chats/{chat_id}/join"), Some(AGENT), Some(json!({"nickname": "Bo"}))).await;
    assert_eq!(status, 200, "{joined}");
    let agent = joined["token"].as_str().unwrap().to_string();
    let after = h2(&mut s, "GET", &format!("/v1/chats/{chat_id}/transcript"), Some(&customer), None).await.1["events"].as_array().unwrap().len() as u64;

    // More long polls than a browser opens HTTP/1.1 connections to one origin (six), all on
    // this one connection, then messages both ways on it while they wait.
    let polls: Vec<_> = (0..8)
        .map(|i| {
            let (mut s, token, path) = (sender.clone(), if i % 2 == 0 { customer.clone() } else { agent.clone() }, format!("/v1/chats/{chat_id}/events?after={after}&wait_ms=10000"));
            tokio::spawn(async move { h2(&mut s, "GET", &path, Some(&token), None).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, acked) = h2(&mut s, "POST", &format!("/v1/chats/{chat_id}/messages"), Some(&customer), Some(json!({"text": "hello over h2", "client_msg_id": "h1"}))).await;
    assert_eq!(status, 200, "{acked}");
    let seq = acked["seq"].as_u64().unwrap();
    for poll in polls {
        let (status, events) = poll.await.unwrap();
        assert_eq!(status, 200, "{events}");
        assert_eq!(messages(&events), vec![(seq, "hello over h2".to_string())]);
    }
    let (status, answer) = h2(&mut s, "POST", &format!("/v1/chats/{chat_id}/messages"), Some(&agent), Some(json!({"text": "hi back", "client_msg_id": "a1"}))).await;
    assert_eq!(status, 200, "{answer}");
    // Bad input gets the same 4xx JSON errors as over HTTP/1.1.
    let (status, error) = h2(&mut s, "POST", &format!("/v1/chats/{chat_id}/messages"), Some(&customer), Some(json!({"text": 5}))).await;
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["code"].is_string(), "{error}");
    let (status, _) = h2(&mut s, "GET", &format!("/v1/chats/{chat_id}/transcript"), Some("not-a-token"), None).await;
    assert_eq!(status, 403);

    let (_, transcript) = h2(&mut s, "GET", &format!("/v1/chats/{chat_id}/transcript"), Some(&agent), None).await;
    assert_eq!(messages(&transcript), vec![(seq, "hello over h2".to_string()), (seq + 1, "hi back".to_string())]);
    // The same instance still speaks HTTP/1.1 to everyone else.
    let mut c = server.client();
    assert_eq!(c.get("/healthz", None).await.unwrap().status, 200);
}
