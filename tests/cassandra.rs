//! Parley on a real Apache Cassandra 5.0 node (started by `cassandra/node.sh start` if it
//! is not running yet: Java 17 and Maven are needed): the foundation's conversation and the N+1 cluster's kill -9 tests with Cassandra
//! as the store, non-ASCII text and row TTLs, Cassandra stopped and started mid-chat, a
//! refused save that landed, and the keyspace's numbered layout.
//! Each test has a keyspace of its own, made by `parley storage init`.

mod common;

use common::*;
use parley::config::CassandraSection;
use parley::plugins::bindings::cql::Value as Cql;
use parley::storage::cassandra::Cassandra;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The outage test stops the node: it runs alone, the others share the node.
static NODE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const TTL_SECONDS: u64 = 3600;

fn cql_port() -> String {
    std::env::var("PARLEY_CASSANDRA_PORT").unwrap_or_else(|_| "9042".into())
}

fn node_script(what: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cassandra/node.sh");
    let ok = Command::new("bash").arg(script).arg(what).status().unwrap().success();
    assert!(ok, "cassandra/node.sh {what} failed");
}

fn node_answers() -> bool {
    std::net::TcpStream::connect(format!("127.0.0.1:{}", cql_port())).is_ok()
}

/// Starts the node with cassandra/node.sh unless it answers already (once per test run; the
/// node stays up for the next run: `cassandra/node.sh stop` stops it, `.ci/run` does).
fn ensure_node() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if !node_answers() {
            node_script("start");
        }
    });
    assert!(node_answers(), "no Cassandra on 127.0.0.1:{} after cassandra/node.sh start", cql_port());
}

/// A deployment on its own keyspace of the test node, created with `parley storage init`.
struct OnCassandra {
    scratch: Scratch,
    config: PathBuf,
    section: CassandraSection,
    starts: AtomicU32,
}

impl OnCassandra {
    fn new(name: &str, extra: &str) -> Self {
        Self::with(name, "", extra)
    }

    /// `cassandra_extra` goes into the [cassandra] section, `extra` after it.
    fn with(name: &str, cassandra_extra: &str, extra: &str) -> Self {
        ensure_node();
        let scratch = Scratch::new(name);
        let keyspace = format!("t_{name}_{}", std::process::id());
        let toml = format!(
            r#"
[cassandra]
contact_points = ["127.0.0.1:{port}"]
keyspace = "{keyspace}"
consistency = "one"
serial_consistency = "local_serial"
ttl_seconds = {TTL_SECONDS}
gc_grace_seconds = 600
{cassandra_extra}

[cluster]
# Instances with data directories of their own share the secret through the deployment.
secret = "cassandra-test-cluster-secret"
{extra}
"#,
            port = cql_port()
        );
        let config = scratch.deployment(&toml);
        let out = Command::new(env!("CARGO_BIN_EXE_parley")).args(["storage", "init", "--config"]).arg(&config).output().unwrap();
        assert!(out.status.success(), "parley storage init: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("keyspace {keyspace} ready")));
        let section = parley::config::Deployment::from_file(&config).unwrap().cassandra.unwrap();
        OnCassandra { scratch, config, section, starts: AtomicU32::new(0) }
    }

    /// An instance with a data directory of its own: everything it shares with the others
    /// (transcripts, leases, the chat directory) is in Cassandra.
    fn start(&self) -> Server {
        let n = self.starts.fetch_add(1, Ordering::Relaxed);
        let data = self.scratch.path().join(format!("instance-{n}"));
        Server::start(&data, Some(&self.config))
    }

    async fn session(&self) -> Cassandra {
        Cassandra::connect(&self.section).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_survives_kill_9_with_cassandra_as_the_store() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("conversation", "");
    // The restarted server has a fresh data directory: the transcript can only come from Cassandra.
    scenarios::conversation_survives_kill_9(|| on.start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_guide_test_with_cassandra_as_the_store() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("reference", "");
    scenarios::reference_guide_test((0..3).map(|_| on.start()).collect()).await;
}

/// The same chat id created on two instances at once: Cassandra's creating `IF NOT EXISTS`
/// lets one of them write it; retries after kill -9 answer the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_creates_and_joins_open_nothing_twice_with_cassandra_as_the_store() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("request_id", "");
    scenarios::retried_creates_and_joins_open_nothing_twice((0..3).map(|_| on.start()).collect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_chats_survive_kill_9_with_cassandra_as_the_store() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("busy", "");
    scenarios::busy_chats_survive_kill_9((0..3).map(|_| on.start()).collect()).await;
}

/// CJK, emoji (with modifiers and joiners), right-to-left scripts and combining marks come
/// back byte for byte; every row written carries the configured TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_round_trips_and_rows_carry_the_ttl() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("text", "");
    let server = on.start();
    let (mut customer, mut agent) = open_chat(&server, "王小明 👩🏽‍💻").await;
    let texts = [
        "你好，我的订单在哪里？",
        "こんにちは、注文について",
        "안녕하세요",
        "مرحبا، أين طلبي؟",
        "שלום, איפה ההזמנה שלי?",
        "👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 👍🏿",
        "e\u{301} n\u{303} Å — “quotes” ‘single’ …",
        "mixed: abc مرحبا 123 שלום 🎉",
    ];
    let mut acked = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let r = if i % 2 == 0 { customer.send(text, &format!("t{i}")).await } else { agent.send(text, &format!("t{i}")).await };
        assert_eq!(r.status, 200, "{:?}", r.body);
        acked.push((r.body["seq"].as_u64().unwrap(), text.to_string()));
    }
    server.kill9();
    // A new instance (fresh data directory) restores the chat from Cassandra.
    let server = on.start();
    customer.moved_to(&server);
    let t = customer.transcript().await;
    assert_eq!(messages(&t), acked, "exactly the bytes that were sent");
    let nick = t["events"].as_array().unwrap().iter().find(|e| e["kind"] == "joined").unwrap()["nickname"].clone();
    assert_eq!(nick, "王小明 👩🏽‍💻");

    // The rows themselves, read straight from Cassandra: the text as sent, and the TTL.
    let session = on.session().await;
    let ks = &on.section.keyspace;
    let chat = Cql::Text(customer.chat_id.clone());
    let rows = session.query(&format!("SELECT text, TTL(text) FROM {ks}.events WHERE chat_id = ?"), &[vec![chat.clone()]]).await;
    let rows = rows.into_iter().next().unwrap().unwrap();
    let stored: Vec<String> = rows.iter().filter_map(|r| match &r[0] { Cql::Text(s) if !s.is_empty() => Some(s.clone()), _ => None }).collect();
    for text in texts {
        assert!(stored.iter().any(|s| s == text), "{text:?} stored as is: {stored:?}");
    }
    for r in &rows {
        let Cql::Int(ttl) = r[1] else { panic!("no TTL on an event row: {r:?}") };
        assert!(ttl > 0 && ttl as u64 <= TTL_SECONDS && ttl as u64 > TTL_SECONDS - 120, "event row TTL {ttl}, configured {TTL_SECONDS}");
    }
    let rows = session.query(&format!("SELECT TTL(meta) FROM {ks}.chats WHERE chat_id = ?"), &[vec![chat]]).await;
    let rows = rows.into_iter().next().unwrap().unwrap();
    assert!(matches!(rows[0][0], Cql::Int(ttl) if ttl > 0 && ttl as u64 <= TTL_SECONDS), "chat row TTL: {rows:?}");
}

/// Cassandra stopped mid-chat: the save-error policy resends, then closes the chat (the
/// participants are told why); the unavailable event, the metric and /readyz 503 appear.
/// Cassandra started again: the available event appears and new chats work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_stopped_and_started_mid_chat() {
    let _node = NODE.write().await;
    let on = OnCassandra::new(
        "outage",
        r#"
# A lease longer than the policy's resends, so what the policy decides is what participants see.
lease_ms = 60000
renew_ms = 1000

[plugins.save-error-policy]
file = "builtin:default-policy"
settings = { resend_attempts = "2", resend_delay_ms = "300", on_error = "close" }
"#,
    );
    let log = on.scratch.path().join("parley.log");
    let server = Server::start_logged(&on.scratch.path().join("data"), Some(&on.config), &log);
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let before = customer.send("before the outage", "m1").await;
    assert_eq!(before.status, 200);
    let mut client = server.client();
    assert_eq!(client.get("/readyz", None).await.unwrap().status, 200);

    node_script("stop");
    let stopped = Instant::now();
    let r = customer.send("during the outage", "m2").await;
    assert_ne!(r.status, 200, "nothing is acknowledged that was not saved: {:?}", r.body);
    // The policy resent twice, then closed the chat: everyone is told, with the reason.
    let events = agent.events(0, 5000).await;
    let closed = events["events"].as_array().unwrap().iter().find(|e| e["kind"] == "closed").cloned();
    let closed = closed.unwrap_or_else(|| panic!("the chat was closed by the policy: {events}"));
    assert!(closed["text"].as_str().unwrap().contains("could not be saved"), "{closed}");
    assert!(stopped.elapsed() < Duration::from_secs(10), "the policy decided promptly: {:?}", stopped.elapsed());
    let t = agent.transcript().await;
    assert_eq!(messages(&t), [(before.body["seq"].as_u64().unwrap(), "before the outage".to_string())], "only the acknowledged message");

    // Operators see it: readyz 503, the gauge at 0, the event in the log.
    let ready = client.get("/readyz", None).await.unwrap();
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(server.kpi().await["storage_available"], false, "the storage gauge (parley_storage_available) is down");
    wait_for_event(&log, "storage.unavailable", Duration::from_secs(5)).await;
    let r = client.post("/v1/chats", None, json!({"nickname": "Bea"})).await.unwrap();
    assert_eq!(r.status, 503, "no new chat while storage is down: {:?}", r.body);

    node_script("start");
    wait_for_event(&log, "storage.available", Duration::from_secs(30)).await;
    ready_again(&server).await;
    let (mut customer, mut agent) = open_chat(&server, "Bea").await;
    let r = customer.send("after the outage", "n1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(messages(&agent.transcript().await), [(r.body["seq"].as_u64().unwrap(), "after the outage".to_string())]);
    // The chat closed by the policy (and dropped again when the lease lapsed) left the
    // open-chats gauge once: only the new chat counts.
    assert_eq!(server.kpi().await["sessions_current"], 1);
}

/// A save can land and still be reported failed (the answer lost in a timeout). With the
/// `continue` policy the host refuses the message and gives its seq to the next one: that one,
/// acknowledged, must be what the store keeps. Here the save fails because the node is stopped,
/// and the row it would have left is written as the store writes it (at the chat's epoch); the
/// chat is then handed over, so the transcript the participants see is loaded from Cassandra.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_save_that_landed_loses_to_the_acknowledged_message() {
    let _node = NODE.write().await;
    let on = OnCassandra::new(
        "landed",
        r#"
# Leases outlast the outage; the drain hands the chat over at once.
lease_ms = 60000
renew_ms = 1000

[server]
drain_deadline_ms = 800

[plugins.save-error-policy]
file = "builtin:default-policy"
settings = { resend_attempts = "0", on_error = "continue" }
"#,
    );
    let (a, b) = (on.start(), on.start());
    let (mut customer, mut agent) = open_chat(&a, "Ann").await;
    assert_eq!(customer.send("one", "c1").await.body["seq"], 3);

    node_script("stop");
    let r = customer.send("refused", "c2").await;
    assert_eq!((r.status, r.error_code()), (503, Some("not_saved")), "{:?}", r.body);
    node_script("start");
    // Both: b serves the transcript at the end, and each instance's driver reconnects on its
    // own back-off (up to 10 s after a long outage).
    ready_again(&a).await;
    ready_again(&b).await;
    // The refused message's row, as if its save had landed: seq 4, written at epoch 1. Its
    // text sorts after the next message's, so a tie of write timestamps would keep it.
    let session = on.session().await;
    let landed = format!(
        "INSERT INTO {}.events (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms, epoch)
         VALUES (?, 4, 'message', ?, 'Ann', 'refused', 'c2', 0, 1) USING TIMESTAMP 1",
        on.section.keyspace
    );
    let written = session.query(&landed, &[vec![Cql::Text(customer.chat_id.clone()), Cql::Text(customer.id.clone())]]).await;
    assert!(written.into_iter().all(|r| r.is_ok()), "the landed row is written");

    let r = customer.send("next", "c3").await;
    assert_eq!((r.status, r.body["seq"].as_u64()), (200, Some(4)), "{:?}", r.body);
    a.terminate();
    assert_eq!(a.exited().await, 0);
    agent.moved_to(&b);
    let t = agent.transcript().await;
    assert_eq!(messages(&t), [(3, "one".to_string()), (4, "next".to_string())], "{t}");
}

/// Waits until the instance's /readyz answers 200 again after an outage of the node.
async fn ready_again(server: &Server) {
    let mut probe = server.client();
    let until = Instant::now() + Duration::from_secs(30);
    while probe.get("/readyz", None).await.unwrap().status != 200 {
        assert!(Instant::now() < until, "ready again once Cassandra answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_event(log: &Path, id: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| l["fields"]["event_id"] == id) {
            return;
        }
        assert!(Instant::now() < until, "no {id} event in the log within {within:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TLS to the node (its CQL port takes TLS optionally; node.sh made its certificate): with
/// the node's CA the chat works end to end; with a CA that did not sign it, `parley serve`
/// refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_node_is_verified() {
    let _node = NODE.read().await;
    let home = std::env::var("PARLEY_CASSANDRA_HOME").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cassandra"));
    ensure_node();
    let ca = home.join("node/tls/node.pem");
    assert!(ca.exists(), "node.sh writes the node's certificate to {}", ca.display());
    let on = OnCassandra::with("tls", &format!("tls_ca_file = {:?}", ca.display().to_string()), "");
    let server = on.start();
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let r = customer.send("over TLS", "m1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(messages(&agent.transcript().await), [(r.body["seq"].as_u64().unwrap(), "over TLS".to_string())]);

    // Another CA: the node's certificate does not verify, and Parley will not start on it.
    let other = on.scratch.path().join("other-ca.pem");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=not-the-node"])
        .arg("-keyout")
        .arg(on.scratch.path().join("other-key.pem"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let text = std::fs::read_to_string(&on.config).unwrap().replace(&ca.display().to_string(), &other.display().to_string());
    let wrong = on.scratch.path().join("wrong-ca.toml");
    std::fs::write(&wrong, text).unwrap();
    let (code, stderr) = Server::refuse(&on.scratch.path().join("refused"), &wrong);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot reach Cassandra at 127.0.0.1:"), "{stderr}");
}

/// `parley storage init` records the keyspace's layout in `store_schema`, and no run of it
/// lowers a newer record. A store starts on a keyspace it can read, including one made before
/// the layouts were numbered, and refuses one that needs a newer store, with one line naming
/// slot, plugin and both layouts, leaving the record and the rows alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyspace_in_a_layout_this_store_cannot_read_is_refused() {
    let _node = NODE.read().await;
    let on = OnCassandra::new("layout", "");
    let session = on.session().await;
    let ks = on.section.keyspace.clone();
    let recorded = || async {
        let rows = session.query(&format!("SELECT version, readable_from FROM {ks}.store_schema WHERE one = 1"), &[vec![]]).await;
        match rows.into_iter().next().unwrap().unwrap().as_slice() {
            [row] => match row.as_slice() {
                [Cql::Int(v), Cql::Int(r)] => Some((*v, *r)),
                other => panic!("store_schema row {other:?}"),
            },
            [] => None,
            more => panic!("store_schema holds {} rows", more.len()),
        }
    };
    let record = |version: i32, readable_from: i32| {
        let cql = format!("UPDATE {ks}.store_schema SET version = {version}, readable_from = {readable_from} WHERE one = 1");
        let session = &session;
        async move { session.run(&cql).await.unwrap() }
    };
    assert_eq!(recorded().await, Some((1, 1)), "storage init records layout 1");

    let server = on.start();
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("before the upgrade", "c1").await.status, 200);
    server.kill9();

    // A newer layout that this store still reads: it starts and serves; storage init again
    // (as an older Parley's would) leaves the record as it is.
    record(2, 1).await;
    let init = Command::new(env!("CARGO_BIN_EXE_parley")).args(["storage", "init", "--config"]).arg(&on.config).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    assert_eq!(recorded().await, Some((2, 1)), "storage init never lowers the recorded layout");
    let server = on.start();
    customer.moved_to(&server);
    assert_eq!(customer.send("after a compatible upgrade", "c2").await.status, 200);
    server.kill9();

    // A layout only newer stores read: refused before anything is written.
    record(5, 4).await;
    let stored = || async {
        let rows = session.query(&format!("SELECT count(*) FROM {ks}.events WHERE chat_id = ?"), &[vec![Cql::Text(customer.chat_id.clone())]]).await;
        format!("{:?}", rows.into_iter().next().unwrap().unwrap())
    };
    let events = stored().await;
    let (code, stderr) = Server::refuse(&on.scratch.path().join("refused"), &on.config);
    assert_eq!(code, 2, "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    for part in ["slot intermediate", "cassandra-store", "could not start", "keyspace holds store schema 5", "schema 4 or newer", "this store is schema 1"] {
        assert!(lines[0].contains(part), "{:?} should mention {part:?}", lines[0]);
    }
    assert_eq!(recorded().await, Some((5, 4)), "the refusal left the record alone");
    assert_eq!(stored().await, events, "and every event");

    // A keyspace from before the numbering (no store_schema) is in layout 1: it starts.
    session.run(&format!("DROP TABLE {ks}.store_schema")).await.unwrap();
    let server = on.start();
    customer.moved_to(&server);
    assert_eq!(customer.send("on an unnumbered keyspace", "c3").await.status, 200);
    let texts: Vec<String> = messages(&customer.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["before the upgrade", "after a compatible upgrade", "on an unnumbered keyspace"]);
}

/// The example deployment parses and spells out exactly the defaults.
#[test]
fn the_example_deployment_is_the_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cassandra.toml");
    let d = parley::config::Deployment::from_file(&example).unwrap();
    assert_eq!(format!("{:?}", d.cassandra.unwrap()), format!("{:?}", CassandraSection::default()));
}

/// A stale owner's save that arrives late — after another instance claimed the chat and wrote
/// the same seq, or after the chat was purged — does not replace the new owner's event or
/// metadata and does not bring the chat's rows back: event rows carry their chat's epoch as
/// write time, and metadata is written only while the writer holds the epoch. (The host's lease
/// fence keeps a stale owner from sending; this is for a write already under way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_late_write_loses_to_the_new_owner() {
    use parley::plugins::bindings::TranscriptStore;
    use parley::plugins::bindings::store::{ClaimOutcome, ClaimRequest};
    use parley::plugins::bindings::types::{ChatDelta, ChatState, Event, EventKind, StoreError};
    use parley::plugins::{Instance, Runtime, Slot};
    let _node = NODE.read().await;
    let on = OnCassandra::new("late_write", "");
    let runtime = Runtime::new(on.scratch.path().join("plugin-cache"), Default::default()).unwrap();
    runtime.connect_cql(std::sync::Arc::new(on.session().await));
    let section = parley::config::PluginSection {
        file: "builtin:cassandra-store".into(),
        grants: None,
        memory_mb: 64,
        deadline_ms: 10_000,
        http_hosts: Vec::new(),
        settings: [("keyspace".to_string(), toml::Value::String(on.section.keyspace.clone()))].into_iter().collect(),
    };
    let plugin = std::sync::Arc::new(runtime.load(Slot::Intermediate, &section, Path::new(".")).unwrap());
    let mut store: Instance<TranscriptStore> = runtime.instance(plugin, None);

    let chat_id = "late-write-chat".to_string();
    let delta = |owner: &str, epoch: u64, seq: u64, text: &str| ChatDelta {
        chat_id: chat_id.clone(),
        epoch,
        owner: owner.into(),
        state: ChatState::Active,
        meta: (seq == 1).then(|| r#"{"roster":"Ann"}"#.to_string()),
        events: vec![Event {
            seq,
            kind: EventKind::Message,
            participant_id: "p1".into(),
            nickname: "Ann".into(),
            text: text.into(),
            client_msg_id: Some(format!("{owner}-{seq}")),
            at_ms: 0,
        }],
    };
    let save = async |store: &mut Instance<TranscriptStore>, d: ChatDelta| {
        let r = store.call(async |b, s| b.parley_plugin_store().call_save(s, &[d]).await).await.unwrap();
        r.into_iter().next().unwrap()
    };
    let load = async |store: &mut Instance<TranscriptStore>| {
        let ids = vec![chat_id.clone()];
        let r = store.call(async |b, s| b.parley_plugin_store().call_load(s, &ids).await).await.unwrap();
        r.into_iter().next().unwrap().unwrap().expect("the chat is there")
    };
    let texts = async |store: &mut Instance<TranscriptStore>| -> Vec<(u64, String)> { load(store).await.events.into_iter().map(|e| (e.seq, e.text)).collect() };

    // Instance A owns the chat at epoch 1; B claims it (A's lease ran out) and writes seq 2.
    save(&mut store, delta("late-a", 1, 1, "hello")).await.unwrap();
    let now = parley::chat::event::now_ms();
    let claimed = store
        .call(async |b, s| b.parley_plugin_store().call_claim(s, "late-b", &[ClaimRequest { chat_id: chat_id.clone(), expected_epoch: 1 }], now).await)
        .await
        .unwrap();
    assert!(matches!(claimed[0], Ok(ClaimOutcome::Claimed(2))), "{claimed:?}");
    save(&mut store, delta("late-b", 2, 2, "the new owner's seq 2")).await.unwrap();
    // A's save of its own seq 2, sent before the claim, arrives now.
    save(&mut store, delta("late-a", 1, 2, "the stale owner's seq 2")).await.unwrap();
    assert_eq!(texts(&mut store).await, [(1, "hello".to_string()), (2, "the new owner's seq 2".to_string())], "the later epoch's row stays");

    // Within the new epoch a resend (the same event again) and the next seq are written as before.
    save(&mut store, delta("late-b", 2, 2, "the new owner's seq 2")).await.unwrap();
    save(&mut store, delta("late-b", 2, 3, "seq 3")).await.unwrap();
    assert_eq!(texts(&mut store).await, [(1, "hello".to_string()), (2, "the new owner's seq 2".to_string()), (3, "seq 3".to_string())]);

    // Metadata: the new owner's change (an agent joined) stays; the stale owner's change, sent
    // before the claim, is refused when it arrives, and its event with it.
    let with_meta = |owner: &str, epoch: u64, seq: u64, meta: &str| ChatDelta { meta: Some(meta.to_string()), ..delta(owner, epoch, seq, "joined") };
    save(&mut store, with_meta("late-b", 2, 4, r#"{"roster":"Ann, Bo"}"#)).await.unwrap();
    let refused = save(&mut store, with_meta("late-a", 1, 4, r#"{"roster":"Ann, Cy"}"#)).await;
    assert!(matches!(refused, Err(StoreError::StaleEpoch(_))), "{refused:?}");
    let t = load(&mut store).await;
    assert_eq!((t.epoch, t.meta.as_str()), (2, r#"{"roster":"Ann, Bo"}"#), "the new owner's metadata stays");
    assert_eq!(t.events.last().map(|e| (e.seq, e.participant_id.as_str(), e.client_msg_id.as_deref())), Some((4, "p1", Some("late-b-4"))));

    // Purged (closed, final transcript saved): a late write leaves no row.
    store.call(async |b, s| b.parley_plugin_store().call_purge(s, &chat_id).await).await.unwrap().unwrap();
    save(&mut store, delta("late-a", 1, 4, "after the purge")).await.unwrap();
    let session = on.session().await;
    let rows = session.query(&format!("SELECT seq FROM {}.events WHERE chat_id = ?", on.section.keyspace), &[vec![Cql::Text(chat_id.clone())]]).await;
    let rows = rows.into_iter().next().unwrap().unwrap();
    assert!(rows.is_empty(), "a purged chat stays purged: {rows:?}");
}
