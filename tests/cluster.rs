//! The N+1 cluster with real processes sharing one data directory: requests reach a chat
//! through any instance, a chat continues after its owner is killed with SIGKILL, and a
//! frozen owner that comes back cannot fork the transcript.

mod common;

use common::scenarios::{assert_dense, busy_chat, verify_busy_chats};
use common::*;
use parley::client::{Client, FailoverClient};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The reference guide's HA test, automated: three instances, a chat with a customer and an
/// agent talking through different instances, `kill -9` of the owner, both carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_guide_test_three_instances_and_kill_9_of_the_owner() {
    let data = Scratch::new("reference");
    scenarios::reference_guide_test(cluster_of(3, &data, None)).await;
}

/// 200 chats with messages in flight on three instances; one instance is killed with SIGKILL.
/// Every acknowledged message is stored exactly once, and every chat goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_busy_chats_survive_kill_9_of_one_of_three_instances() {
    let data = Scratch::new("load");
    scenarios::busy_chats_survive_kill_9(cluster_of(3, &data, None)).await;
}

fn cluster_of(n: usize, data: &Scratch, config: Option<&std::path::Path>) -> Vec<Server> {
    (0..n).map(|_| Server::start(data.path(), config)).collect()
}

/// Split brain: the owner is frozen (SIGSTOP) until its lease runs out; another instance
/// restores the chat and takes messages; the old owner is thawed. It writes nothing more,
/// drops the chat, and every participant sees one transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_that_comes_back_cannot_fork_the_transcript() {
    let data = Scratch::new("split");
    let servers = cluster_of(2, &data, None);
    let (a, b) = (&servers[0], &servers[1]);
    let (mut customer, mut agent) = open_chat(a, "Ann").await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = customer.send(&format!("before {i}"), &format!("b{i}")).await;
        acked.push((r.body["seq"].as_u64().unwrap(), format!("before {i}")));
    }

    a.freeze();
    // A request that reaches the frozen owner directly waits in its socket.
    let mut late = Client::new(&a.addr);
    let late_path = format!("/v1/chats/{}/messages", customer.chat_id);
    let late_token = agent.token.clone();
    let late = tokio::spawn(async move { late.post(&late_path, Some(&late_token), json!({"text": "late", "client_msg_id": "late"})).await.unwrap() });

    // Through B the chat goes on once A's lease ran out.
    customer.client = b.client();
    let frozen = Instant::now();
    for i in 0..3 {
        let r = customer.send(&format!("during {i}"), &format!("d{i}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.instance.as_deref(), Some(b.id.as_str()));
        acked.push((r.body["seq"].as_u64().unwrap(), format!("during {i}")));
    }
    assert!(frozen.elapsed() >= Duration::from_millis(1000), "B waited for A's lease to run out");

    a.resume();
    let late = tokio::time::timeout(Duration::from_secs(10), late).await.expect("the late request is answered").unwrap();
    if late.status == 200 {
        // A no longer owned the chat and passed the request on to B, which stored it.
        assert_eq!(late.instance.as_deref(), Some(b.id.as_str()), "{late:?}");
        acked.push((late.body["seq"].as_u64().unwrap(), "late".into()));
    } else {
        assert_eq!(late.status, 503, "{late:?}");
        assert_eq!(late.error_code(), Some("chat_moved"));
    }
    acked.sort();
    let kpi_a = a.kpi().await;
    assert!(kpi_a["chats_purged"].as_u64().unwrap() >= 1, "A dropped the chat: {kpi_a}");
    assert_eq!(kpi_a["sessions_current"], 0, "{kpi_a}");

    // The same transcript through either instance; A answers by asking B. The agent's first
    // request since the restore appends its `reconnected` (saved just after that answer), so
    // compare once both returning participants' reconnects are in.
    agent.moved_to(a);
    let _ = agent.transcript().await;
    customer.moved_to(b);
    let mut via_b = customer.transcript().await;
    for _ in 0..100 {
        if kinds(&via_b).iter().filter(|k| *k == "reconnected").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        via_b = customer.transcript().await;
    }
    let via_a = agent.transcript().await;
    assert_eq!(kinds(&via_b).iter().filter(|k| *k == "reconnected").count(), 2, "{via_b}");
    assert_eq!(via_a["events"], via_b["events"]);
    assert_eq!(messages(&via_b), acked);
    assert_dense(&via_b);
    let r = agent.send("after the thaw", "a-thaw").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.instance.as_deref(), Some(b.id.as_str()), "A passes writes on to the new owner");
}

/// `restore.mode = "none"` and `restore.allowed_initiators` are honoured when an owner dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_settings_decide_who_may_bring_a_chat_back() {
    let data = Scratch::new("restore-settings");
    let config = data.deployment("[restore]\nmode = \"simple\"\nallowed_initiators = [\"agent\"]\n");
    let mut servers = cluster_of(2, &data, Some(&config));
    let (mut customer, mut agent) = open_chat(&servers[0], "Ann").await;
    servers.remove(0).kill9();
    customer.moved_to(&servers[0]);
    agent.moved_to(&servers[0]);
    let r = customer.send("hello?", "c1").await;
    assert_eq!((r.status, r.error_code()), (503, Some("restore_not_allowed")), "{:?}", r.body);
    let r = agent.send("I am here", "a1").await;
    assert_eq!(r.status, 200, "an agent may restore: {:?}", r.body);
    assert_eq!(customer.send("hello?", "c1").await.status, 200, "then the customer goes on");

    let data = Scratch::new("restore-none");
    let config = data.deployment("[restore]\nmode = \"none\"\n");
    let mut servers = cluster_of(2, &data, Some(&config));
    let (mut customer, _agent) = open_chat(&servers[0], "Ann").await;
    servers.remove(0).kill9();
    customer.moved_to(&servers[0]);
    let r = customer.send("hello?", "c1").await;
    assert_eq!((r.status, r.error_code()), (410, Some("restore_disabled")), "{:?}", r.body);
}

/// SIGTERM: the instance drains (no new chats, open ones still served), then hands its chats
/// over by giving its lease up; they continue on another instance within a second, although
/// the lease would have lasted ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_hands_the_chats_over_at_once() {
    let data = Scratch::new("handoff");
    let config = data.deployment("[server]\ndrain_deadline_ms = 800\n[cluster]\nlease_ms = 10000\nrenew_ms = 300\n");
    let mut servers = cluster_of(2, &data, Some(&config));
    let (mut customer, mut agent) = open_chat(&servers[0], "Ann").await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = customer.send(&format!("m{i}"), &format!("m{i}")).await;
        acked.push((r.body["seq"].as_u64().unwrap(), format!("m{i}")));
    }
    let a = servers.remove(0);
    a.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut probe = a.client();
    assert_eq!(probe.get("/readyz", None).await.unwrap().status, 503, "a draining instance is not ready");
    let mut newcomer = FailoverClient::new(&[a.addr.clone(), servers[0].addr.clone()]);
    assert_eq!(newcomer.pick_ready().await, Some(servers[0].addr.as_str()), "a new client picks a ready instance");
    let r = probe.post("/v1/chats", None, json!({"nickname": "Late"})).await.unwrap();
    assert_eq!((r.status, r.error_code()), (503, Some("draining")));
    let r = customer.send("while draining", "d").await;
    assert_eq!(r.status, 200, "open chats are still served while draining: {:?}", r.body);
    acked.push((r.body["seq"].as_u64().unwrap(), "while draining".into()));

    assert_eq!(a.exited().await, 0, "a clean exit after the handoff");
    let handed_over = Instant::now();
    let b = &servers[0];
    customer.moved_to(b);
    let r = customer.send("after", "x").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.instance.as_deref(), Some(b.id.as_str()));
    assert!(handed_over.elapsed() < Duration::from_secs(1), "continued within a second: {:?}", handed_over.elapsed());
    acked.push((r.body["seq"].as_u64().unwrap(), "after".into()));
    agent.moved_to(b);
    let t = agent.transcript().await;
    assert_eq!(messages(&t), acked);
    assert_dense(&t);
    assert!(kinds(&t).contains(&"moved".to_string()), "{t}");
}

/// `parley demo`: three instances that form one cluster, their addresses printed; SIGTERM
/// stops all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_three_instance_cluster() {
    use std::io::{BufRead, BufReader};
    let data = Scratch::new("demo");
    let port = (0..50)
        .map(|_| 20_000 + (rand::random::<u16>() % 40_000))
        .find(|p| (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
        .expect("three free ports in a row");
    struct Demo(std::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["demo", "--port", &port.to_string(), "--data"])
        .arg(data.path().join("demo"))
        .env("PARLEY_AGENT_TOKEN", AGENT)
        .env("PARLEY_ADMIN_TOKEN", ADMIN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut demo = Demo(demo);
    let mut addrs = Vec::new();
    let mut pages = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("widget") || line.contains("console") {
            pages.extend(line.split_whitespace().filter_map(|w| w.strip_prefix("http://")).map(str::to_string));
        }
        if line.trim_start().starts_with("instance")
            && let Some(a) = line.split("http://").nth(1)
        {
            addrs.push(a.split_whitespace().next().unwrap().to_string());
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    assert_eq!(addrs, (0..3).map(|i| format!("127.0.0.1:{}", port + i)).collect::<Vec<_>>());
    // The widget's demo page and the agent console, each listing the cluster's instances for
    // failover once the instance has seen the others (at its next lease renewal).
    assert_eq!(pages, [format!("{}/widget/", addrs[0]), format!("{}/agent/", addrs[1])], "the demo prints the two pages' URLs");
    for page in &pages {
        let (authority, path) = page.split_once('/').unwrap();
        let lists_all = |html: &str| addrs.iter().all(|a| html.contains(&format!("http://{a}")));
        let mut html = http_get(authority, &format!("/{path}"));
        for _ in 0..30 {
            if lists_all(&html) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            html = http_get(authority, &format!("/{path}"));
        }
        assert!(html.starts_with("HTTP/1.1 200") && html.contains("text/html"), "{page}: {html}");
        assert!(lists_all(&html), "{page} lists every instance for failover: {html}");
    }

    let mut first = Client::new(&addrs[0]);
    let created = first.post("/v1/chats", None, json!({"nickname": "Ann"})).await.unwrap().ok().unwrap();
    let (chat_id, token) = (created["chat_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let t = Client::new(&addrs[2]).get(&format!("/v1/chats/{chat_id}/transcript"), Some(token)).await.unwrap();
    assert_eq!(t.status, 200, "the third instance answers for the first one's chat: {:?}", t.body);
    // Each instance refreshes its view of the members at every renewal.
    let mut members = Value::Null;
    for _ in 0..20 {
        members = Client::new(&addrs[0]).get("/v1/cluster", Some(ADMIN)).await.unwrap().ok().unwrap();
        if members["members"].as_array().unwrap().iter().filter(|m| m["live"] == true).count() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(members["members"].as_array().unwrap().iter().filter(|m| m["live"] == true).count(), 3, "{members}");

    assert!(std::process::Command::new("kill").arg("-TERM").arg(demo.0.id().to_string()).status().unwrap().success());
    assert!(demo.0.wait().unwrap().success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for a in &addrs {
        assert!(std::net::TcpStream::connect(a).is_err(), "{a} stopped with the demo");
    }
}

/// A rolling upgrade of a three-instance cluster under steady load: each instance in turn is
/// stopped with SIGTERM (drain, then hand over) and started again on the same address.
/// The failover clients see no failed request, and no message is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_under_load_loses_nothing() {
    let data = Scratch::new("rolling");
    let config = data.deployment("[server]\ndrain_deadline_ms = 300\n");
    let addrs: Vec<String> = (0..3).map(|_| spare_address()).collect();
    let mut servers: Vec<Option<Server>> = addrs.iter().map(|a| Some(Server::start_at(data.path(), Some(&config), a))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let chats: Vec<_> = (0..30)
        .map(|i| busy_chat(i, (0..3).map(|k| addrs[(i + k) % 3].clone()).collect(), stop.clone(), Duration::from_millis(30)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in 0..3 {
        let old = servers[k].take().unwrap();
        let old_id = old.id.clone();
        old.terminate();
        assert_eq!(old.exited().await, 0);
        let new = Server::start_at(data.path(), Some(&config), &addrs[k]);
        assert_ne!(new.id, old_id);
        servers[k] = Some(new);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let verified = verify_busy_chats(&mut Client::new(&addrs[0]), chats).await;
    let total: usize = verified.iter().map(|(_, acked, _)| acked).sum();
    assert!(total > 300, "load ran throughout: {total}");
    // The counters add up: every chat is open on exactly one of the new instances, and the
    // new instances took them over by restores (none was created anew).
    let mut current = 0;
    for s in servers.iter().flatten() {
        let kpi = s.kpi().await;
        current += kpi["sessions_current"].as_i64().unwrap();
        assert_eq!(kpi["session_created"], 0, "{kpi}");
    }
    assert_eq!(current, 30);
}

/// `GET /metrics` in Prometheus text format: chats, messages, save and plugin call latency,
/// restores, lease renewals, proxied requests and storage availability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_what_operators_watch() {
    let data = Scratch::new("metrics");
    let servers = cluster_of(2, &data, None);
    let (mut customer, _agent) = open_chat(&servers[0], "Ann").await;
    customer.moved_to(&servers[1]);
    for i in 0..3 {
        assert_eq!(customer.send(&format!("m{i}"), &format!("m{i}")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (owner, other) = (scrape_metrics(&servers[0].addr), scrape_metrics(&servers[1].addr));
    let (a, b) = (&servers[0].id, &servers[1].id);
    for line in [
        format!("parley_messages_saved_total{{instance=\"{a}\"}} 3"),
        format!("parley_sessions_current{{instance=\"{a}\"}} 1"),
        format!("parley_storage_available{{instance=\"{a}\"}} 1"),
        format!("parley_sessions_restored_total{{instance=\"{a}\"}} 0"),
    ] {
        assert!(owner.contains(&line), "missing {line:?} in\n{owner}");
    }
    assert!(other.contains(&format!("parley_requests_proxied_total{{instance=\"{b}\"}} 3")), "{other}");
    let count = |text: &str, prefix: &str| -> u64 {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(count(&owner, &format!("parley_plugin_call_seconds_count{{instance=\"{a}\",slot=\"intermediate\"}}")) >= 3, "{owner}");
    assert!(count(&owner, &format!("parley_save_batch_seconds_count{{instance=\"{a}\"}}")) >= 3, "{owner}");
    assert!(count(&owner, &format!("parley_sqlite_commit_seconds_count{{instance=\"{a}\"}}")) >= 3, "{owner}");
    assert!(count(&owner, &format!("parley_lease_renewals_total{{instance=\"{a}\"}}")) >= 2, "{owner}");
}

/// `--log-json`: one JSON object per line, and the events operators alert on carry stable
/// event ids (chat created / deleted with the session count, restore, purge, lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_stable_event_ids() {
    use std::io::{BufRead, BufReader};
    let data = Scratch::new("logs");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-json", "--data"])
        .arg(data.path())
        .env("PARLEY_AGENT_TOKEN", AGENT)
        .env("PARLEY_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let addr = line.split("http://").nth(1).unwrap().trim().to_string();
    let mut c = Client::new(&addr);
    let created = c.post("/v1/chats", None, json!({"nickname": "Ann"})).await.unwrap().ok().unwrap();
    let chat_id = created["chat_id"].as_str().unwrap();
    let joined = c.post(&format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({})).await.unwrap().ok().unwrap();
    c.post(&format!("/v1/chats/{chat_id}/close"), joined["token"].as_str(), json!({})).await.unwrap().ok().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut events = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if let Some(id) = v["fields"]["event_id"].as_str() {
            events.push((id.to_string(), v["fields"].clone()));
        }
    }
    let find = |id: &str| events.iter().find(|(e, _)| e == id).map(|(_, f)| f.clone()).unwrap_or_else(|| panic!("no {id} event in {events:?}"));
    find("lease.held");
    find("cluster.joined");
    assert_eq!(find("chat.created")["sessions_current"], 1);
    assert_eq!(find("chat.deleted")["sessions_current"], 0);
    assert_eq!(find("chat.created")["chat_id"], chat_id);
}

/// The default notice plugin posts chat closes and moves to a webhook, through the `http`
/// capability limited to the hosts the deployment lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_and_moves_reach_the_webhook() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap().to_string();
    let received = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            if length == 0 || reader.read_exact(&mut body).is_err() {
                continue; // a sender that died mid-request
            }
            sink.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let data = Scratch::new("webhook");
    let config = data.deployment(&format!(
        "[plugins.notice-handler]\nfile = \"builtin:default-notices\"\ngrants = [\"log\", \"clock\", \"http\"]\nhttp_hosts = [\"{hook}\"]\nsettings = {{ webhook_url = \"http://{hook}/parley\" }}\n"
    ));
    let mut servers = cluster_of(2, &data, Some(&config));
    let (_c1, mut a1) = open_chat(&servers[0], "Ann").await;
    let (mut c2, _a2) = open_chat(&servers[0], "Bob").await;
    let r = a1.client.post(&format!("/v1/chats/{}/close", a1.chat_id), Some(&a1.token), json!({"reason": "solved"})).await.unwrap();
    assert_eq!(r.status, 200);
    let wait_for = |n: usize| {
        let received = received.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while received.lock().unwrap().len() < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The notice is posted after the close is answered: wait for it before the kill.
    wait_for(1).await;
    servers.remove(0).kill9();
    c2.moved_to(&servers[0]);
    assert_eq!(c2.send("hello again", "h1").await.status, 200);
    wait_for(2).await;
    let got = received.lock().unwrap().clone();
    assert!(got.contains(&json!({"chat_id": a1.chat_id, "kind": "chat-closed", "detail": "solved"})), "{got:?}");
    assert!(got.contains(&json!({"chat_id": c2.chat_id, "kind": "chat-moved", "detail": servers[0].id})), "{got:?}");
}

/// A plain HTTP/1.1 GET, the whole answer (head and body) as text.
fn http_get(authority: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// A create or a join whose answer was lost is retried with the same client_request_id (on
/// the same instance, another one, after kill -9, on two at once): nothing opened twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_creates_and_joins_open_nothing_twice() {
    let data = Scratch::new("request-id");
    scenarios::retried_creates_and_joins_open_nothing_twice(cluster_of(3, &data, None)).await;
}

/// An instance stalled past its lease (SIGSTOP here; a VM pause or a disk that stops answering
/// in real life) drops its chats when it comes back, since another instance may have restored
/// them. Those nobody restored, it takes back at once: a customer who is still waiting in the
/// queue, with no connection open, is in the agents' queue again within a second or two, not
/// only once they write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stalled_past_its_lease_takes_its_waiting_chats_back() {
    let data = Scratch::new("lapse");
    let server = Server::start(data.path(), None);
    let mut c = server.client();
    let created = c.post("/v1/chats", None, json!({"nickname": "Bo", "subject": "waiting"})).await.unwrap().ok().unwrap();
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let mut agent = server.client();
    let queued = async |agent: &mut Client| -> Vec<String> {
        let queue = agent.get("/v1/queue", Some(AGENT)).await.unwrap().ok().unwrap();
        queue["chats"].as_array().unwrap().iter().map(|c| c["chat_id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(queued(&mut agent).await, vec![chat_id.clone()]);

    server.freeze();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.resume();
    let resumed = Instant::now();
    // First the instance finds its lease lapsed and drops the chat.
    while server.kpi().await["chats_purged"].as_u64().unwrap() == 0 {
        assert!(resumed.elapsed() < Duration::from_secs(5), "the lease lapsed and the chat was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = Vec::new();
    while resumed.elapsed() < Duration::from_secs(5) {
        seen = queued(&mut agent).await;
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, vec![chat_id.clone()], "the waiting chat is back in the queue ({:?} after the stall)", resumed.elapsed());
    let kpi = server.kpi().await;
    assert_eq!((&kpi["session_taken_back"], &kpi["session_restored"], &kpi["sessions_current"]), (&json!(1), &json!(0), &json!(1)), "a take-back, not a restore: {kpi}");
    let r = agent.post(&format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({"nickname": "Dana"})).await.unwrap();
    assert_eq!(r.status, 200, "an agent joins it: {:?}", r.body);
}
