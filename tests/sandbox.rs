//! A store plugin that traps, loops forever or allocates past its memory limit does not take
//! the host down: that chat's save fails, the save-error policy applies, other chats go on.
//! The faulty store is the real SQLite store code plus faults triggered by marker texts.

mod common;

use common::*;
use parley::plugins::builtin::PLUGIN_DIR;
use serde_json::json;

fn deployment(on_error: &str) -> String {
    format!(
        r#"
[plugins.intermediate]
file = "{PLUGIN_DIR}/faulty_store.wasm"
deadline_ms = 300
memory_mb = 32

[plugins.save-error-policy]
file = "builtin:default-policy"
settings = {{ resend_attempts = 1, resend_delay_ms = 50, on_error = "{on_error}" }}
"#
    )
}

async fn fault_is_contained(marker: &str) {
    let data = Scratch::new("sandbox");
    let server = Server::start(data.path(), Some(&data.deployment(&deployment("close"))));
    let (mut victim, mut victim_agent) = open_chat(&server, "Vic").await;
    let (mut bystander, _) = open_chat(&server, "Bea").await;
    assert_eq!(victim.send("before", "v0").await.status, 200);

    // The bystander keeps talking while the victim's save misbehaves.
    let chatter = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for i in 0..30 {
            statuses.push(bystander.send(&format!("b{i}"), &format!("b{i}")).await.status);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        (bystander, statuses)
    });
    let r = victim.send(marker, "v1").await;
    assert_eq!(r.status, 503, "{marker}: {:?}", r.body);
    assert_eq!(r.error_code(), Some("not_saved"));

    // The default policy closed the victim's chat after its resend; participants were told.
    let seen = victim_agent.events(3, 5000).await;
    assert_eq!(kinds(&seen), vec!["closed"], "{marker}: {seen}");
    assert!(seen["events"][0]["text"].as_str().unwrap().contains("could not be saved"), "{marker}: {seen}");
    assert_eq!(victim_agent.transcript().await["state"], "closed");
    assert_eq!(victim.send("after", "v2").await.status, 409, "{marker}: the chat is closed");

    let (mut bystander, statuses) = chatter.await.unwrap();
    assert!(statuses.iter().all(|&s| s == 200), "{marker}: bystander statuses {statuses:?}");
    let texts: Vec<String> = messages(&bystander.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, (0..30).map(|i| format!("b{i}")).collect::<Vec<_>>());

    // The host is fine and new chats work with a fresh plugin instance.
    let mut c = server.client();
    assert_eq!(c.get("/healthz", None).await.unwrap().status, 200);
    let (mut next, _) = open_chat(&server, "Ned").await;
    assert_eq!(next.send("works", "n1").await.status, 200);
    let kpi = c.get("/v1/kpi", None).await.unwrap().ok().unwrap();
    assert!(kpi["save_failures"].as_u64().unwrap() >= 2, "{kpi}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_is_contained() {
    fault_is_contained("!trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_cut_off_at_the_deadline() {
    fault_is_contained("!loop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_limit() {
    fault_is_contained("!oom").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_policy_refuses_the_message_and_keeps_the_chat() {
    let data = Scratch::new("continue");
    let server = Server::start(data.path(), Some(&data.deployment(&deployment("continue"))));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("one", "c1").await.body["seq"], 3);
    let r = customer.send("!fail", "c2").await;
    assert_eq!((r.status, r.error_code()), (503, Some("not_saved")));
    // The store said `unavailable`: readiness and the metric show it until a save succeeds.
    let mut probe = server.client();
    let ready = probe.get("/readyz", None).await.unwrap();
    assert_eq!((ready.status, ready.error_code()), (503, Some("storage_unavailable")));
    assert_eq!(server.kpi().await["storage_available"], false);
    // The chat goes on; the refused message never took a seq, and resending works.
    let r = customer.send("two", "c3").await;
    assert_eq!((r.status, r.body["seq"].as_u64()), (200, Some(4)));
    assert_eq!(probe.get("/readyz", None).await.unwrap().status, 200, "storage answers again");
    assert_eq!(server.kpi().await["storage_available"], true);
    let texts: Vec<String> = messages(&agent.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["one", "two"]);
    let r = agent.client.post(&format!("/v1/chats/{}/typing", agent.chat_id), Some(&agent.token), json!({"typing": false})).await.unwrap();
    assert_eq!(r.status, 200);
}

/// A save can land and still fail on its way back (a database timeout after the write). The
/// continue policy refuses that message, and its seq goes to the next message: the store must
/// keep the acknowledged message, not the refused one, after kill -9, whether the chat's rows
/// were still in the store's log (few messages after it) or folded into its table (many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_whose_save_landed_does_not_displace_the_next() {
    refused_but_landed_then(3).await;
    refused_but_landed_then(40).await;
}

async fn refused_but_landed_then(messages_after: usize) {
    // Saved twice (the policy resends once), refused both times.
    let RefusedChat { data, config, server, mut customer, mut agent } = RefusedChat::open("ack-lost", "!ack-lost").await;
    let mut acked = vec![(3, "one".to_string())];
    for i in 0..messages_after {
        let text = format!("m{i}");
        let r = customer.send(&text, &text).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        acked.push((r.body["seq"].as_u64().unwrap(), text));
    }
    assert_eq!(acked[1].0, 4, "the refused message's seq went to the next one");
    assert_eq!(messages(&agent.transcript().await), acked);
    // Saved at the chat's next epoch, so a store that orders a seq's writes by epoch
    // (Cassandra) keeps them too.
    assert_eq!(chat_epoch(&data, &customer.chat_id), 2);

    let t = after_kill_9(&data, &config, server, &mut agent).await;
    assert_eq!(messages(&t), acked, "after kill -9, as acknowledged ({messages_after} after)");
    scenarios::assert_dense(&t);
}

/// The same, and then the store stays away: the next message waits for the chat's next epoch,
/// whose claim fails, so the policy decides as for a failed save (resend once, then refuse)
/// and the message is refused promptly instead of waiting. Once the store answers, the chat
/// goes on at its next epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_epoch_the_store_cannot_grant_is_a_failed_save() {
    let RefusedChat { data, config, server, mut customer, mut agent } = RefusedChat::open("ack-lost-down", "!ack-lost-then-down").await;
    let sent = std::time::Instant::now();
    let r = customer.send("while down", "c3").await;
    assert_eq!((r.status, r.error_code()), (503, Some("not_saved")), "{:?}", r.body);
    assert!(sent.elapsed() < std::time::Duration::from_millis(900), "refused within the outage: {:?}", sent.elapsed());
    assert_eq!(chat_epoch(&data, &customer.chat_id), 1, "no claim got through");

    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let r = customer.send("after", "c4").await;
    assert_eq!((r.status, r.body["seq"].as_u64()), (200, Some(4)), "{:?}", r.body);
    assert_eq!(chat_epoch(&data, &customer.chat_id), 2);
    let acked = vec![(3, "one".to_string()), (4, "after".to_string())];
    assert_eq!(messages(&agent.transcript().await), acked);
    let t = after_kill_9(&data, &config, server, &mut agent).await;
    assert_eq!(messages(&t), acked, "after kill -9");
}

/// A chat on the continue policy: "one" acknowledged as seq 3, then `marker` refused.
struct RefusedChat {
    data: Scratch,
    config: std::path::PathBuf,
    server: Server,
    customer: Participant,
    agent: Participant,
}

impl RefusedChat {
    async fn open(name: &str, marker: &str) -> Self {
        let data = Scratch::new(name);
        let config = data.deployment(&deployment("continue"));
        let server = Server::start(data.path(), Some(&config));
        let (mut customer, agent) = open_chat(&server, "Ann").await;
        assert_eq!(customer.send("one", "c1").await.body["seq"], 3);
        let r = customer.send(marker, "c2").await;
        assert_eq!((r.status, r.error_code()), (503, Some("not_saved")), "{marker}");
        RefusedChat { data, config, server, customer, agent }
    }
}

/// `p`'s transcript after kill -9 of `server` and a restart on the same data.
async fn after_kill_9(data: &Scratch, config: &std::path::Path, server: Server, p: &mut Participant) -> serde_json::Value {
    server.kill9();
    let server = Server::start(data.path(), Some(config));
    p.moved_to(&server);
    p.transcript().await
}

/// The chat's epoch in the instance's database, read beside the running server.
fn chat_epoch(data: &Scratch, chat_id: &str) -> i64 {
    data.read_integer("SELECT epoch FROM chats WHERE chat_id = ?1", [chat_id])
}

/// The `sql` capability is the granted database and nothing more: no other file (ATTACH,
/// VACUUM INTO), no PRAGMA (durability is the deployment's, and every store writes through
/// one shared connection), no writes or open transactions through `query`. Run on a real
/// SQLite file, through the host side of the capability the plugins call.
#[test]
fn sql_capability_reaches_only_the_granted_database() {
    use parley::config::Synchronous;
    use parley::plugins::bindings::sql::{SqlError, Statement, Value};
    use parley::storage::sqlite::DatabaseFile;
    let data = Scratch::new("sql-capability");
    let file = DatabaseFile::new(data.path().join("parley.db"), Synchronous::Full, std::time::Duration::from_secs(1));
    let (mut store, mut other) = (file.open().unwrap(), file.open().unwrap());
    let statement = |sql: &str, rows: Vec<Vec<Value>>| Statement { sql: sql.to_string(), rows };
    store.transaction(&[statement("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)", vec![vec![]])]).unwrap();
    let changed = store.transaction(&[statement("INSERT INTO t VALUES (?1, ?2)", vec![vec![Value::Integer(1), Value::Text("one".into())]])]).unwrap();
    assert_eq!(changed, vec![vec![1]]);
    // What one store instance writes, another reads.
    let rows = |r: Result<Vec<Vec<Value>>, SqlError>| format!("{:?}", r.unwrap());
    assert_eq!(rows(other.query("SELECT v FROM t WHERE k = ?1", &[Value::Integer(1)])), r#"[[Value::Text("one")]]"#);

    let elsewhere = data.path().join("elsewhere.db");
    let refused = |r: Result<Vec<Vec<u64>>, SqlError>| match r {
        Err(SqlError::Invalid(m)) => m,
        other => panic!("expected an `invalid` refusal, got {other:?}"),
    };
    let attach = format!("ATTACH DATABASE '{}' AS x", elsewhere.display());
    for sql in [attach.as_str(), "PRAGMA synchronous = OFF", "PRAGMA journal_mode = DELETE"] {
        let message = refused(store.transaction(&[statement(sql, vec![vec![]])]));
        assert!(message.contains("not authorized"), "{sql}: {message}");
    }
    // VACUUM cannot run inside the capability's transaction; through a query it is refused.
    for sql in [attach, format!("VACUUM INTO '{}'", elsewhere.display())] {
        assert!(matches!(other.query(&sql, &[]), Err(SqlError::Invalid(_))), "{sql} through query must be refused");
    }
    assert!(!elsewhere.exists(), "no file outside the granted database was created");
    assert!(other.query("PRAGMA synchronous", &[]).is_err(), "a pragma is refused in a query too");

    // `query` is read-only and leaves no transaction open.
    match other.query("INSERT INTO t VALUES (2, 'two') RETURNING k", &[]) {
        Err(SqlError::Invalid(m)) => assert!(m.contains("read-only"), "{m}"),
        r => panic!("a write through query must be refused, got {r:?}"),
    }
    match other.query("BEGIN", &[]) {
        Err(SqlError::Invalid(m)) => assert!(m.contains("transaction"), "{m}"),
        r => panic!("BEGIN through query must be refused, got {r:?}"),
    }
    store.transaction(&[statement("INSERT INTO t VALUES (?1, ?2)", vec![vec![Value::Integer(3), Value::Text("three".into())]])]).unwrap();
    // Had BEGIN left a transaction open, this connection would still see the old snapshot.
    assert_eq!(rows(other.query("SELECT count(*) FROM t", &[])), "[[Value::Integer(2)]]");
}
