//! Scenarios run against more than one storage setup (the embedded store, Cassandra): each
//! takes the servers it should run on.

use super::*;
use futures_util::StreamExt;
use parley::client::{Client, FailoverClient};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The seq numbers of a transcript are 1, 2, 3, ... with no gap and no repeat.
pub fn assert_dense(t: &Value) {
    let seqs: Vec<u64> = t["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{t}");
}

/// A customer and an agent exchange 100 messages each way; the server is killed with SIGKILL
/// and started again by `start` (on the same storage); nothing acknowledged is lost or doubled.
pub async fn conversation_survives_kill_9(start: impl Fn() -> Server) {
    let server = start();
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;

    // 100 messages each way, both sides sending at once.
    let send_all = |mut p: Participant, who: &'static str| async move {
        let mut acked = Vec::new();
        for i in 0..100 {
            let text = format!("{who} {i} — ünïcødé 你好 🎉");
            let r = p.send(&text, &format!("{who}-{i}")).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            acked.push((r.body["seq"].as_u64().unwrap(), text));
        }
        (p, acked)
    };
    let (c, a) = tokio::join!(send_all(customer, "customer"), send_all(agent, "agent"));
    (customer, agent) = (c.0, a.0);
    let mut acked: Vec<(u64, String)> = c.1.into_iter().chain(a.1).collect();
    acked.sort();

    // Each side sees every acknowledged message exactly once, in seq order, and the same transcript.
    let seen_by_customer = messages(&customer.transcript().await);
    let seen_by_agent = messages(&agent.transcript().await);
    assert_eq!(seen_by_customer, acked);
    assert_eq!(seen_by_agent, acked);
    let seqs: HashSet<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs.len(), 200, "every ack has its own seq");

    // kill -9, then start again on the same data.
    server.kill9();
    let server = start();
    customer.moved_to(&server);
    agent.moved_to(&server);
    let after_restart = customer.transcript().await;
    assert_eq!(messages(&after_restart), acked, "the transcript is intact after kill -9");

    // The chat continues: numbering goes on, both participants are back.
    let r = customer.send("still there?", "customer-after").await;
    assert_eq!(r.status, 200);
    let seq = r.body["seq"].as_u64().unwrap();
    assert!(seq > acked.last().unwrap().0);
    let r = agent.send("yes", "agent-after").await;
    assert_eq!(r.status, 200);
    let t = agent.transcript().await;
    let reconnected: Vec<&Value> = t["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "reconnected").collect();
    let who: HashSet<&str> = reconnected.iter().map(|e| e["participant_id"].as_str().unwrap()).collect();
    assert_eq!(who, HashSet::from([customer.id.as_str(), agent.id.as_str()]), "both participants reconnected once each");
    assert_eq!(reconnected.len(), 2);
    let all: Vec<u64> = t["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>(), "one dense order");
    // A resend from before the crash is still recognised.
    let r = customer.send("customer 7 — ünïcødé 你好 🎉", "customer-7").await;
    assert_eq!(r.body["seq"].as_u64().unwrap(), acked.iter().find(|(_, t)| t.starts_with("customer 7 ")).unwrap().0);
}

/// The reference guide's HA test, automated: three instances, a chat with a customer and an
/// agent talking through different instances, `kill -9` of the owner, both carry on.
pub async fn reference_guide_test(servers: Vec<Server>) {
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    let mut customer = FailoverClient::new(&[a.addr.clone(), b.addr.clone(), c.addr.clone()]);
    let mut agent = FailoverClient::new(&[b.addr.clone(), c.addr.clone(), a.addr.clone()]);

    let created = customer.post("/v1/chats", None, json!({"nickname": "Ann", "subject": "billing"})).await.unwrap();
    assert_eq!(created.instance.as_deref(), Some(a.id.as_str()));
    let created = created.ok().unwrap();
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let customer_token = created["token"].as_str().unwrap().to_string();

    // The agent works through B: B passes every request on to A, which owns the chat.
    let queue = agent.get("/v1/queue", Some(AGENT)).await.unwrap().ok().unwrap();
    assert!(queue["chats"].as_array().unwrap().iter().any(|q| q["chat_id"] == chat_id.as_str()), "B's queue lists A's waiting chat: {queue}");
    let joined = agent.post(&format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({"nickname": "Bob"})).await.unwrap();
    assert_eq!(joined.instance.as_deref(), Some(a.id.as_str()), "served by the owner, through B");
    let agent_token = joined.ok().unwrap()["token"].as_str().unwrap().to_string();
    let messages_path = format!("/v1/chats/{chat_id}/messages");

    // A WebSocket through C follows the chat live, passed on to A as well.
    // Its token as a subprotocol, which C passes on and whose selection comes back from A.
    let (mut ws, selected) = super::chat_socket(&c.addr, &chat_id, 0, &super::token_protocols(&customer_token)).await.unwrap();
    assert_eq!(selected.as_deref(), Some("parley"));

    let mut acked = Vec::new();
    for i in 0..10 {
        let (client, token, who) = if i % 2 == 0 { (&mut customer, &customer_token, "c") } else { (&mut agent, &agent_token, "a") };
        let r = client.post(&messages_path, Some(token), json!({"text": format!("{who}{i}"), "client_msg_id": format!("{who}{i}")})).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.instance.as_deref(), Some(a.id.as_str()));
        acked.push((r.body["seq"].as_u64().unwrap(), format!("{who}{i}")));
    }
    let mut over_ws = Vec::new();
    while over_ws.len() < 10 {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("ws event").unwrap().unwrap();
        let e: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if e["kind"] == "message" {
            over_ws.push((e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(over_ws, acked, "the WebSocket through C saw what A acknowledged");
    let kpi_b = b.kpi().await;
    assert_eq!(kpi_b["session_restored"], 0, "an owner that is alive is asked, not replaced");
    assert!(kpi_b["requests_proxied"].as_u64().unwrap() >= 6, "{kpi_b}");

    // kill -9 of the owner. Both participants carry on through the other instances.
    let a_id = a.id.clone();
    let mut servers = servers;
    servers.remove(0).kill9();
    let killed = Instant::now();
    let r = customer.post(&messages_path, Some(&customer_token), json!({"text": "still there?", "client_msg_id": "c-after"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let new_owner = r.instance.clone().unwrap();
    assert_ne!(new_owner, a_id);
    assert!(killed.elapsed() < Duration::from_secs(4), "restored within the lease time, took {:?}", killed.elapsed());
    acked.push((r.body["seq"].as_u64().unwrap(), "still there?".into()));
    // A resend of a message A acknowledged gets its original seq, nothing new is stored.
    let r = agent.post(&messages_path, Some(&agent_token), json!({"text": "a1", "client_msg_id": "a1"})).await.unwrap();
    assert_eq!(r.body["seq"].as_u64(), Some(acked[1].0));
    let r = agent.post(&messages_path, Some(&agent_token), json!({"text": "yes", "client_msg_id": "a-after"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.instance.as_deref(), Some(new_owner.as_str()));
    acked.push((r.body["seq"].as_u64().unwrap(), "yes".into()));

    // The agent's event stream, followed with the failover client from where it stood before
    // the kill, resumes after the last seq it saw: the move, the reconnects, the new messages.
    let mut follower = FailoverClient::new(&[servers[1].addr.clone(), servers[0].addr.clone()]);
    let mut after = acked[9].0;
    let mut followed = Vec::new();
    while followed.iter().filter(|e: &&Value| e["kind"] == "message").count() < 2 {
        followed.extend(follower.poll_events(&chat_id, &agent_token, &mut after, 2000).await.unwrap());
    }
    let followed_kinds: Vec<&str> = followed.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(followed_kinds.starts_with(&["moved"]), "{followed_kinds:?}");
    assert_eq!(followed.iter().filter(|e| e["kind"] == "message").map(|e| e["text"].as_str().unwrap()).collect::<Vec<_>>(), ["still there?", "yes"]);

    // Both see the same transcript, through different instances: every acknowledged message
    // once and in order, the move to the new owner, and each participant's reconnect once.
    let (b, c) = (&servers[0], &servers[1]);
    let mut seen = Vec::new();
    for (server, token) in [(b, &customer_token), (c, &agent_token)] {
        let t = server.client().get(&format!("/v1/chats/{chat_id}/transcript"), Some(token)).await.unwrap().ok().unwrap();
        assert_eq!(messages(&t), acked);
        assert_dense(&t);
        let kinds = kinds(&t);
        assert_eq!(kinds.iter().filter(|k| *k == "reconnected").count(), 2, "{t}");
        let moved: Vec<&Value> = t["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "moved").collect();
        assert_eq!(moved.len(), 1, "{t}");
        assert_eq!(moved[0]["text"], new_owner.as_str(), "the move names the new owner");
        seen.push(t["events"].clone());
    }
    assert_eq!(seen[0], seen[1], "one order for everyone");

    // The workflow stops the chat from whichever instance it asks.
    let stopper = if b.id == new_owner { c } else { b };
    let r = stopper.client().post(&format!("/v1/chats/{chat_id}/stop"), Some(ADMIN), json!({"reason": "end of shift"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.instance.as_deref(), Some(new_owner.as_str()));
    let t = stopper.client().get(&format!("/v1/chats/{chat_id}/transcript"), Some(&customer_token)).await.unwrap().ok().unwrap();
    assert_eq!(t["state"], "closed");
}

/// A customer who opens a chat through `order` (the failover client's instance list) and
/// sends a message every `pause` until `stop`; every request must succeed as the client sees
/// it. Returns the chat, its token, and each acknowledged (seq, text) with when it was acked.
pub type BusyChat = tokio::task::JoinHandle<(String, String, Vec<(u64, String)>, Vec<Instant>)>;

pub fn busy_chat(i: usize, order: Vec<String>, stop: Arc<AtomicBool>, pause: Duration) -> BusyChat {
    tokio::spawn(async move {
        let mut client = FailoverClient::new(&order);
        let created = client.post("/v1/chats", None, json!({"nickname": format!("C{i}")})).await.unwrap().ok().unwrap();
        let chat_id = created["chat_id"].as_str().unwrap().to_string();
        let token = created["token"].as_str().unwrap().to_string();
        let path = format!("/v1/chats/{chat_id}/messages");
        let (mut acked, mut when) = (Vec::new(), Vec::new());
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let text = format!("{i}-{n}");
            let r = client.post(&path, Some(&token), json!({"text": text, "client_msg_id": text})).await.unwrap();
            assert_eq!(r.status, 200, "chat {i} message {n} failed as the client sees it: {:?}", r.body);
            acked.push((r.body["seq"].as_u64().unwrap(), text));
            when.push(Instant::now());
            tokio::time::sleep(pause).await;
        }
        (chat_id, token, acked, when)
    })
}

/// Waits for each busy chat to stop and checks, through `reader`, that its transcript holds
/// exactly the acknowledged messages, once each, in order, with dense seqs. Returns each
/// chat's id, number of acknowledged messages and when they were acknowledged.
pub async fn verify_busy_chats(reader: &mut Client, chats: Vec<BusyChat>) -> Vec<(String, usize, Vec<Instant>)> {
    let mut verified = Vec::with_capacity(chats.len());
    for chat in chats {
        let (chat_id, token, acked, when) = chat.await.unwrap();
        let t = reader.get(&format!("/v1/chats/{chat_id}/transcript"), Some(&token)).await.unwrap().ok().unwrap();
        assert_eq!(messages(&t), acked, "chat {chat_id}: exactly the acknowledged messages, once each, in order");
        assert_dense(&t);
        verified.push((chat_id, acked.len(), when));
    }
    verified
}

/// 200 chats with messages in flight on three instances; one instance is killed with SIGKILL.
/// Every acknowledged message is stored exactly once, and every chat goes on.
pub async fn busy_chats_survive_kill_9(mut servers: Vec<Server>) {
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let chats: Vec<_> = (0..200)
        .map(|i| {
            // Each chat starts on one instance and knows the others in rotation.
            let order: Vec<String> = (0..3).map(|k| addrs[(i + k) % 3].clone()).collect();
            busy_chat(i, order, stop.clone(), Duration::from_millis(50))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.remove(0).kill9();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for (chat_id, acked, when) in verify_busy_chats(&mut Client::new(&servers[0].addr), chats).await {
        assert!(when.iter().any(|t| *t > killed), "chat {chat_id} went on after the kill");
        total += acked;
    }
    let (k1, k2) = (servers[0].kpi().await, servers[1].kpi().await);
    let restored = k1["session_restored"].as_u64().unwrap() + k2["session_restored"].as_u64().unwrap();
    assert_eq!(restored, 67, "each of the killed instance's chats (every third) was restored once: {k1} {k2}");
    assert!(total > 2000, "messages were in flight throughout: {total}");
}

/// A create or a join whose answer was lost is retried with the same client_request_id — on
/// the same instance, on another one, after the first one was killed with SIGKILL, or on two
/// instances at once: every try answers the same ids and token, and nothing is opened or added
/// twice. The id used for another request (another nickname, subject or user_data) is refused.
pub async fn retried_creates_and_joins_open_nothing_twice(mut servers: Vec<Server>) {
    let c = servers.pop().unwrap();
    let b = servers.pop().unwrap();
    let a = servers.pop().unwrap();
    let create = |id: &str| json!({"nickname": "Ann", "subject": "order 7", "client_request_id": id});
    // Like a client: the same request again while the answer is "try again" (503).
    let post = |server: &Server, path: String, token: Option<&'static str>, body: Value| {
        let mut client = server.client();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = client.post(&path, token, body.clone()).await.unwrap();
                if r.status != 503 || Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    let first = post(&a, "/v1/chats".into(), None, create("create-0001-aaaa-bbbb")).await;
    assert_eq!(first.status, 201, "{}", first.body);
    for (server, what) in [(&a, "the same instance"), (&b, "another instance")] {
        let again = post(server, "/v1/chats".into(), None, create("create-0001-aaaa-bbbb")).await;
        assert_eq!((again.status, &again.body), (201, &first.body), "a retry on {what} answers the same");
    }
    // The id in another request: another customer, or the same nickname with other fields
    // (a widget that reuses ids, and every customer is "Guest"). On the instance that holds the
    // chat and on one that reads it from the store.
    for (server, other) in [
        (&b, json!({"nickname": "Bob", "subject": "order 7"})),
        (&a, json!({"nickname": "Ann", "subject": "order 8"})),
        (&b, json!({"nickname": "Ann", "subject": "order 8"})),
        (&a, json!({"nickname": "Ann", "subject": "order 7", "user_data": {"email": "eve@example.com"}})),
        (&b, json!({"nickname": "Ann", "subject": "order 7", "user_data": {"email": "eve@example.com"}})),
    ] {
        let mut body = other.clone();
        body["client_request_id"] = json!("create-0001-aaaa-bbbb");
        let reused = post(server, "/v1/chats".into(), None, body).await;
        assert_eq!((reused.status, reused.error_code()), (409, Some("client_request_id_reused")), "{other}: {}", reused.body);
    }
    let malformed = post(&a, "/v1/chats".into(), None, json!({"nickname": "Ann", "client_request_id": "short"})).await;
    assert_eq!((malformed.status, malformed.error_code()), (400, Some("invalid_field")), "{}", malformed.body);

    let chat_id = first.body["chat_id"].as_str().unwrap().to_string();
    let join = json!({"nickname": "Agent Smith", "client_request_id": "join-0001-aaaa-bbbb"});
    let joined = post(&a, format!("/v1/chats/{chat_id}/join"), Some(AGENT), join.clone()).await;
    assert_eq!(joined.status, 200, "{}", joined.body);
    let again = post(&b, format!("/v1/chats/{chat_id}/join"), Some(AGENT), join).await;
    assert_eq!((again.status, &again.body), (200, &joined.body), "a retried join answers the same");
    let other = post(&b, format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({"nickname": "Agent Jones", "client_request_id": "join-0001-aaaa-bbbb"})).await;
    assert_eq!((other.status, other.error_code()), (409, Some("client_request_id_reused")), "{}", other.body);

    let participant = |server: &Server, answer: &Value| Participant {
        client: server.client(),
        chat_id: chat_id.clone(),
        id: answer["participant_id"].as_str().unwrap().into(),
        token: answer["token"].as_str().unwrap().into(),
    };
    let (mut customer, mut agent) = (participant(&a, &first.body), participant(&b, &joined.body));
    assert_eq!(customer.send("hello", "m1").await.status, 200);
    assert_eq!(agent.send("hi Ann", "m2").await.status, 200);
    assert_eq!(kinds(&customer.transcript().await), ["joined", "joined", "message", "message"], "one customer and one agent joined");

    // The owner dies; the retried create reaches the survivor: the same answer, the same chat.
    a.kill9();
    customer.moved_to(&b);
    let after = post(&b, "/v1/chats".into(), None, create("create-0001-aaaa-bbbb")).await;
    assert_eq!((after.status, &after.body), (201, &first.body), "a retry after kill -9 of the owner answers the same");
    send_until_saved(&mut customer, "still here", "m3").await;
    let t = customer.transcript().await;
    assert_eq!(messages(&t).iter().map(|(_, text)| text.as_str()).collect::<Vec<_>>(), ["hello", "hi Ann", "still here"]);
    assert_eq!(kinds(&t).iter().filter(|k| *k == "joined").count(), 2, "{t}");

    // The same new id on two instances at once: both answer the same, and there is one chat,
    // counted as created once and purged nowhere.
    let counters = async || {
        let (kb, kc) = (b.kpi().await, c.kpi().await);
        let sum = |k: &str| kb[k].as_u64().unwrap() + kc[k].as_u64().unwrap();
        (sum("session_created"), sum("chats_purged"))
    };
    let before = counters().await;
    let (on_b, on_c) = tokio::join!(
        post(&b, "/v1/chats".into(), None, create("create-0002-aaaa-bbbb")),
        post(&c, "/v1/chats".into(), None, create("create-0002-aaaa-bbbb"))
    );
    assert_eq!((on_b.status, on_c.status), (201, 201), "{} / {}", on_b.body, on_c.body);
    assert_eq!(on_b.body, on_c.body);
    let after = counters().await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0), "one chat created, none purged");
    let chat_id = on_b.body["chat_id"].as_str().unwrap().to_string();
    let (mut via_b, mut via_c) = (participant(&b, &on_b.body), participant(&c, &on_c.body));
    via_b.chat_id = chat_id.clone();
    via_c.chat_id = chat_id;
    send_until_saved(&mut via_b, "one", "x1").await;
    send_until_saved(&mut via_c, "two", "x2").await;
    let (tb, tc) = (via_b.transcript().await, via_c.transcript().await);
    assert_eq!(tb, tc, "both instances serve the one chat");
    assert_eq!(kinds(&tb), ["joined", "message", "message"], "{tb}");
}

/// Sends like a client does: again with the same client_msg_id while the chat moves (503).
pub async fn send_until_saved(p: &mut Participant, text: &str, client_msg_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p.send(text, client_msg_id).await;
        if r.status == 200 {
            return;
        }
        assert!(r.status == 503 && Instant::now() < deadline, "{text}: {} {}", r.status, r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
