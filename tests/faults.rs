//! Fault injection on the embedded store: a slow store, the SQLite file locked by another
//! process, and a full disk. The save-error policy decides (here: resend, then continue), nothing unsaved is
//! acknowledged, and once the fault is gone the chat goes on with every acknowledged message
//! once.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// Both faults: a lease longer than the fault lasts (so what the policy decides is what
/// participants see), and a policy that resends twice, then refuses the message and keeps
/// the chat open.
const CLUSTER_AND_POLICY: &str = r#"
[cluster]
lease_ms = 6000
renew_ms = 1000

[plugins.save-error-policy]
file = "builtin:default-policy"
settings = { resend_attempts = "2", resend_delay_ms = "200", on_error = "continue" }
"#;

/// Once the fault is gone: the customer resends the refused message with the same
/// client_msg_id and it is stored once, the agent sends one more, and after kill -9 and a
/// restart on the same data every acknowledged message is there exactly once.
async fn after_the_fault(
    server: Server,
    data: &Path,
    config: &Path,
    (mut customer, mut agent): (Participant, Participant),
    acked: Vec<(parley::client::Reply, String)>,
    (refused_text, refused_id): (&str, &str),
    after_text: &str,
) {
    let resent = customer.send(refused_text, refused_id).await;
    assert_eq!(resent.status, 200, "{:?}", resent.body);
    let after = agent.send(after_text, "a1").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    let mut expected: Vec<(u64, String)> = acked.into_iter().map(|(r, text)| (r.body["seq"].as_u64().unwrap(), text)).collect();
    expected.push((resent.body["seq"].as_u64().unwrap(), refused_text.to_string()));
    expected.push((after.body["seq"].as_u64().unwrap(), after_text.to_string()));
    assert_eq!(messages(&customer.transcript().await), expected);
    server.kill9();
    let server = Server::start(data, Some(config));
    customer.moved_to(&server);
    assert_eq!(messages(&customer.transcript().await), expected, "every acknowledged message survived, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_process_then_released() {
    let data = Scratch::new("locked");
    let config = data.deployment(&format!(
        "[sqlite]\nbusy_timeout_ms = 200\n{CLUSTER_AND_POLICY}"
    ));
    let server = Server::start(data.path(), Some(&config));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    let first = customer.send("before the lock", "m1").await;
    assert_eq!(first.status, 200);

    // Another process takes the database's write lock and holds it.
    let db = data.path().join("parley.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline()",
            ])
            .arg(&db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with sqlite3");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(other.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        drop(other.stdin.take());
        other.wait().unwrap();
    });
    locked_rx.recv().unwrap();

    // The save fails (database locked), is resent twice, then the policy continues: the
    // message is refused so the sender can resend it, the chat stays open.
    let refused = customer.send("during the lock", "m2").await;
    assert_eq!(refused.status, 503, "not acknowledged while nothing could be saved: {:?}", refused.body);
    let notice = agent.events(0, 3000).await;
    assert!(
        notice["events"].as_array().unwrap().iter().all(|e| e["kind"] != "closed"),
        "on_error = continue keeps the chat open: {notice}"
    );

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    after_the_fault(server, data.path(), &config, (customer, agent), vec![(first, "before the lock".into())], ("during the lock", "m2"), "after the lock").await;
}

/// Unmounts the small filesystem the full-disk test runs on.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills a filesystem to the last byte; returns the filler file.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
        let bytes = vec![0u8; chunk];
        while f.write_all(&bytes).and_then(|()| f.flush()).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// A full disk (a 64 MiB tmpfs as the data directory, filled to the last byte by another
/// writer): once a save needs space, it fails, is resent, then the policy's `continue`
/// refuses the message; once space is freed the resend is stored, and everything
/// acknowledged is intact after kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_messages_until_space_is_freed() {
    let scratch = Scratch::new("full-disk");
    let data = scratch.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"]).arg(&data).output().unwrap();
    assert!(
        mounted.status.success(),
        "this test mounts a small tmpfs to fill it (root with CAP_SYS_ADMIN, as on CI): {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    let _mounted = Mounted(data.clone());
    let config = scratch.deployment(CLUSTER_AND_POLICY);
    let server = Server::start(&data, Some(&config));
    let (mut customer, agent) = open_chat(&server, "Ann").await;
    let first = customer.send("before the disk filled up", "m1").await;
    assert_eq!(first.status, 200);

    let filler = fill(&data);
    // A save that fits in space SQLite already holds (its WAL starts over after a checkpoint)
    // still succeeds, and is acknowledged; the first one that needs a new block is refused.
    let mut acked = vec![(first, "before the disk filled up".to_string())];
    let (refused_text, refused_id) = loop {
        let (text, id) = (format!("while the disk is full {} {}", acked.len(), "x".repeat(4000)), format!("m{}", acked.len() + 1));
        let r = customer.send(&text, &id).await;
        if r.status == 200 {
            acked.push((r, text));
            assert!(acked.len() < 50, "50 messages of 4 KB saved on a full disk");
            continue;
        }
        assert_eq!(r.status, 503, "not acknowledged while nothing could be saved: {:?}", r.body);
        assert_eq!(r.error_code(), Some("not_saved"), "{:?}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().contains("full"), "the cause is named: {:?}", r.body);
        break (text, id);
    };
    println!("{} messages saved on the full disk before the first refusal", acked.len() - 1);

    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    after_the_fault(server, &data, &config, (customer, agent), acked, (&refused_text, &refused_id), "after space was freed").await;
}

/// A slow store (each save that carries "!slow" takes 200 ms, well inside the slot's deadline):
/// acknowledgements wait for the save — the batches of other chats committed with it too — but
/// nothing fails, the policy is never asked, and every message is in its transcript once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_delays_acknowledgements_and_loses_nothing() {
    let data = Scratch::new("slow-store");
    let config = faulty_store(&data, "");
    let server = Server::start(data.path(), Some(&config));
    let (mut slow, _) = open_chat(&server, "Sol").await;
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(open_chat(&server, &format!("Oli {i}")).await.0);
    }
    let chatter: Vec<_> = others
        .into_iter()
        .enumerate()
        .map(|(i, mut p)| {
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for m in 0..30 {
                    let text = format!("other {i}.{m}");
                    let r = p.send(&text, &format!("o{i}-{m}")).await;
                    assert_eq!(r.status, 200, "{:?}", r.body);
                    acked.push((r.body["seq"].as_u64().unwrap(), text));
                }
                (p, acked)
            })
        })
        .collect();
    let mut slow_acked = Vec::new();
    for m in 0..5 {
        let started = std::time::Instant::now();
        let r = slow.send("!slow", &format!("s{m}")).await;
        assert_eq!(r.status, 200, "a slow save is still a save: {:?}", r.body);
        assert!(started.elapsed() >= Duration::from_millis(200), "acknowledged before the store had saved it ({:?})", started.elapsed());
        slow_acked.push((r.body["seq"].as_u64().unwrap(), "!slow".to_string()));
    }
    assert_eq!(messages(&slow.transcript().await), slow_acked);
    for task in chatter {
        let (mut p, acked) = task.await.unwrap();
        let transcript = p.transcript().await;
        scenarios::assert_dense(&transcript);
        assert_eq!(messages(&transcript), acked);
    }
    let kpi = server.kpi().await;
    assert_eq!(kpi["save_failures"], 0, "{kpi}");
    assert_eq!(kpi["sessions_current"], 6, "no chat was closed: {kpi}");
}

/// A create or join retried with its client_request_id while the first one is still being
/// saved (here a 200 ms save: the faulty store is slow for every save carrying this chat's
/// metadata) is answered only once that save is done: whoever got the answer to the retry and
/// saw the instance die right after still has a seat in the chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_creates_and_joins_are_answered_once_saved() {
    let data = Scratch::new("retried-open");
    let config = faulty_store(&data, "");
    let server = Server::start(data.path(), Some(&config));

    let create = json!({"nickname": "Ann", "subject": "!slow", "client_request_id": "retried-create-0123456789"});
    let (first, created) = sent_twice(&server, "/v1/chats", None, create).await;
    server.kill9();
    let server = Server::start(data.path(), Some(&config));
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let mut customer = Participant { client: server.client(), chat_id: chat_id.clone(), id: created["participant_id"].as_str().unwrap().into(), token: created["token"].as_str().unwrap().into() };
    let transcript = seat(&mut customer).await;
    assert_eq!(kinds(&transcript), ["joined"], "{transcript}");
    // The first create's answer (if it made it out before kill -9) is the same.
    if let Ok(Ok(first)) = first.await {
        assert_eq!(first.body, created, "the retry gets the first create's answer");
    }

    let join = json!({"nickname": "Bob", "client_request_id": "retried-join-0123456789"});
    let (first, joined) = sent_twice(&server, &format!("/v1/chats/{chat_id}/join"), Some(AGENT), join).await;
    server.kill9();
    let server = Server::start(data.path(), Some(&config));
    let mut agent = Participant { client: server.client(), chat_id, id: joined["participant_id"].as_str().unwrap().into(), token: joined["token"].as_str().unwrap().into() };
    let transcript = seat(&mut agent).await;
    let agent_joins = transcript["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "joined" && e["participant_id"] == agent.id.as_str()).count();
    assert_eq!(agent_joins, 1, "the agent's join survived kill -9: {transcript}");
    if let Ok(Ok(first)) = first.await {
        assert_eq!(first.body, joined, "the retry gets the first join's answer");
    }
    customer.moved_to(&server);
    assert_eq!(agent.send("still here", "a1").await.status, 200);
    let texts: Vec<String> = messages(&customer.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["still here"]);
}

/// Sends a request, and the same again 40 ms later while the first is still being saved;
/// returns the first (still running) and the retry's answer.
async fn sent_twice(server: &Server, path: &str, token: Option<&str>, body: Value) -> (tokio::task::JoinHandle<Result<parley::client::Reply, parley::client::ClientError>>, Value) {
    let (mut first_client, first_path, first_body, first_token) = (server.client(), path.to_string(), body.clone(), token.map(str::to_string));
    let first = tokio::spawn(async move { first_client.post(&first_path, first_token.as_deref(), first_body).await });
    tokio::time::sleep(Duration::from_millis(40)).await;
    let retried = server.client().post(path, token, body).await.unwrap().ok().unwrap();
    (first, retried)
}

/// An instance paused (SIGSTOP) in the middle of a save, for longer than its lease: when it
/// resumes, that save is not acknowledged, whichever of its threads runs first — another
/// instance may have restored the chat before the write arrived, and a store that does not
/// fence writes by epoch (Cassandra) would keep the new owner's rows instead. The client
/// resends with the same client_msg_id and gets one seq; the transcript holds the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_outlives_its_lease_is_not_acknowledged() {
    let data = Scratch::new("lapsed-save");
    let config = data.deployment(&format!(
        "[plugins.intermediate]\nfile = \"{}/faulty_store.wasm\"\ndeadline_ms = 5000\n[cluster]\nlease_ms = 600\nrenew_ms = 100\n",
        parley::plugins::builtin::PLUGIN_DIR
    ));
    let log = data.path().join("server.log");
    let server = Server::start_logged(data.path(), Some(&config), &log);
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    let first = customer.send("before the pause", "m1").await;
    assert_eq!(first.status, 200, "{:?}", first.body);

    // The "!slow" save spins for 200 ms in the store after logging that it started; the
    // process stops as soon as that line is in the log, for twice the lease.
    let (mut client, token, path) = (server.client(), customer.token.clone(), format!("/v1/chats/{}/messages", customer.chat_id));
    let during = tokio::spawn(async move { client.post(&path, Some(&token), json!({"text": "!slow", "client_msg_id": "m2"})).await.unwrap() });
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("slow save: spinning") {
        assert!(std::time::Instant::now() < until, "the slow save did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.freeze();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.resume();
    let during = tokio::time::timeout(Duration::from_secs(10), during).await.expect("answered after the pause").unwrap();
    assert_eq!((during.status, during.error_code()), (503, Some("chat_moved")), "acknowledged across a lapsed lease: {:?}", during.body);

    let resent = customer.send("!slow", "m2").await;
    assert_eq!(resent.status, 200, "{:?}", resent.body);
    let seq = resent.body["seq"].as_u64().unwrap();
    assert_eq!(customer.send("!slow", "m2").await.body["seq"].as_u64(), Some(seq), "one seq for the message");
    let transcript = customer.transcript().await;
    scenarios::assert_dense(&transcript);
    assert_eq!(messages(&transcript), [(first.body["seq"].as_u64().unwrap(), "before the pause".to_string()), (seq, "!slow".to_string())]);
    let kpi = server.kpi().await;
    assert!(kpi["writes_fenced"].as_u64().unwrap() >= 1, "{kpi}");
}

/// A deployment whose intermediate store is the faulty test store (faults by marker texts),
/// with a deadline well above its 200 ms "!slow".
/// A deployment with the faulty store as `intermediate`, and `more` (TOML) after it.
fn faulty_store(data: &Scratch, more: &str) -> std::path::PathBuf {
    data.deployment(&format!("[plugins.intermediate]\nfile = \"{}/faulty_store.wasm\"\ndeadline_ms = 1000\n{more}", parley::plugins::builtin::PLUGIN_DIR))
}

/// The transcript as this participant sees it; fails if its token lost its seat.
async fn seat(p: &mut Participant) -> Value {
    let path = format!("/v1/chats/{}/transcript", p.chat_id);
    let r = p.client.get(&path, Some(&p.token)).await.unwrap();
    assert_eq!(r.status, 200, "the token a retried request was answered with was lost with the instance: {:?}", r.body);
    r.body
}

/// Two instances of a cluster on one host share the SQLite file; one of them is kept busy all
/// the time (200 chats sending as fast as they are acknowledged: every group commit starts as
/// the last one ends), the other serves 20 chats sending a message every 50 ms. Lease renewals
/// write to the same file as the group commits: with SQLite's own busy-wait (sleep up to 100 ms,
/// retry) a renewal lost the race to back-to-back commits — of its own process or of the busy
/// neighbour — long enough for its instance to stop trusting its lease and drop its own chats.
/// Here with a short lease (an instance stops writing 450 ms after a renewal was sent), for
/// five seconds: on both instances no write fenced, no chat dropped, every answer 200, every
/// acknowledged message in its transcript once, and the WAL kept short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_instance_keeps_its_lease_and_does_not_starve_its_neighbour() {
    let data = Scratch::new("saturated");
    let config = data.deployment("[cluster]\nlease_ms = 600\nrenew_ms = 200\n\n[limits]\nmessages_per_second = 0\n");
    let busy = Server::start(data.path(), Some(&config));
    let neighbour = Server::start(data.path(), Some(&config));
    let mut senders = tokio::task::JoinSet::new();
    for (server, chats, pause) in [(&neighbour, 20, Duration::from_millis(50)), (&busy, 200, Duration::ZERO)] {
        for i in 0..chats {
            let (customer, _agent) = open_chat(server, &format!("c{i}")).await;
            senders.spawn(keep_sending(customer, Duration::from_secs(5), pause));
        }
    }
    let mut chats = Vec::new();
    while let Some(r) = senders.join_next().await {
        chats.push(r.unwrap());
    }
    for server in [&busy, &neighbour] {
        let kpi = server.kpi().await;
        println!("{}: {} messages saved, {} lease renewals", server.id, kpi["messages_saved"], kpi["lease_renewals"]);
        assert_eq!(kpi["writes_fenced"], 0, "{}: {kpi}", server.id);
        assert_eq!(kpi["chats_purged"], 0, "{}: {kpi}", server.id);
        assert_eq!(kpi["save_failures"], 0, "{}: {kpi}", server.id);
    }
    let mut total = 0;
    for (mut customer, acked) in chats {
        total += acked.len();
        assert_eq!(messages(&customer.transcript().await), acked, "chat {}", customer.chat_id);
    }
    let wal = std::fs::metadata(data.path().join("parley.db-wal")).map_or(0, |m| m.len());
    println!("{total} messages acknowledged; WAL {} MiB", wal >> 20);
    assert!(total > 2000, "the store was not kept busy: {total} messages");
    // Checkpoints keep up and the WAL starts over (it is cut back to 64 MiB when it does).
    assert!(wal <= 80 << 20, "the WAL grew to {} MiB", wal >> 20);
}

/// Sends messages for `how_long`, each as soon as the last is acknowledged and `pause` later;
/// every one must be acknowledged. Returns the (seq, text) acknowledged.
async fn keep_sending(mut customer: Participant, how_long: Duration, pause: Duration) -> (Participant, Vec<(u64, String)>) {
    let until = std::time::Instant::now() + how_long;
    let mut acked = Vec::new();
    while std::time::Instant::now() < until {
        let text = format!("m{}", acked.len());
        let r = customer.send(&text, &text).await;
        assert_eq!(r.status, 200, "chat {} {text}: {:?}", customer.chat_id, r.body);
        acked.push((r.body["seq"].as_u64().unwrap(), text));
        tokio::time::sleep(pause).await;
    }
    (customer, acked)
}

/// The SQLite store logs new events in saving order and folds each chat's rows into the chat's
/// own table later, remembering in the plugin's memory what it logged. That memory is gone when
/// the plugin traps (the host recreates the instance) and when the process dies: every
/// acknowledged message must still be in the transcript after both, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_outlive_a_recreated_store_plugin_and_kill_9() {
    let data = Scratch::new("store-log");
    let config = faulty_store(&data, "");
    let server = Server::start(data.path(), Some(&config));
    let (mut customer, _) = open_chat(&server, "Kim").await;
    let (mut victim, _) = open_chat(&server, "Vic").await;
    let mut acked = Vec::new();
    let send = async |customer: &mut Participant, acked: &mut Vec<(u64, String)>, round: &str, n: usize| {
        for m in 0..n {
            let text = format!("{round} {m}");
            let r = customer.send(&text, &format!("{round}-{m}")).await;
            assert_eq!(r.status, 200, "{text}: {:?}", r.body);
            acked.push((r.body["seq"].as_u64().unwrap(), text));
        }
    };
    // A chat's rows are folded 32 at a time: after 45, some are folded and some only logged.
    send(&mut customer, &mut acked, "before", 45).await;
    let r = victim.send("!trap", "v1").await;
    assert_eq!(r.status, 503, "the trapping save fails: {:?}", r.body);
    send(&mut customer, &mut acked, "after the trap", 45).await;
    server.kill9();

    let server = Server::start(data.path(), Some(&config));
    customer.moved_to(&server);
    let restored = customer.transcript().await;
    scenarios::assert_dense(&restored);
    assert_eq!(messages(&restored), acked, "every message logged before the trap, after it, and folded");
    send(&mut customer, &mut acked, "restarted", 20).await;
    server.kill9();

    let server = Server::start(data.path(), Some(&config));
    customer.moved_to(&server);
    assert_eq!(messages(&customer.transcript().await), acked, "and again after a second kill -9");
    // The restored instance folded what its previous runs logged (this store folds 16 rows per
    // transaction, so all of it takes many); it has logged no message since.
    let left = data.read_integer("SELECT count(*) FROM event_log WHERE kind = 'message'", []);
    assert_eq!(left, 0, "messages of the previous runs are still in the log");
}

/// The store cuts its log below the oldest row not yet folded into the chats' table, and folds
/// a chat once it has many rows: a quiet chat with one logged message would hold the cut back
/// for as long as it stays open, while the busy chats' rows pile up behind it. The log keeps at
/// most a span of rows from its oldest unfolded one (256 in the faulty store, which shares the
/// store's code), folding the quiet chat when the span is reached; nothing is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_chat_does_not_hold_the_log_back() {
    let data = Scratch::new("quiet-chat");
    let config = faulty_store(&data, "[limits]\nmessages_per_second = 0\n");
    let server = Server::start(data.path(), Some(&config));
    let (mut quiet, _) = open_chat(&server, "Quinn").await;
    let r = quiet.send("hello", "q1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let quiet_acked = vec![(r.body["seq"].as_u64().unwrap(), "hello".to_string())];
    let (mut busy, _) = open_chat(&server, "Bea").await;
    let mut busy_acked = Vec::new();
    let mut most = 0;
    for m in 0..600 {
        let text = format!("busy {m}");
        let r = busy.send(&text, &text).await;
        assert_eq!(r.status, 200, "{text}: {:?}", r.body);
        busy_acked.push((r.body["seq"].as_u64().unwrap(), text));
        most = most.max(data.read_integer("SELECT count(*) FROM event_log", []));
    }
    assert!(most <= 257, "the log held {most} rows: the quiet chat's one row kept the rows after it");
    server.kill9();

    let server = Server::start(data.path(), Some(&config));
    quiet.moved_to(&server);
    busy.moved_to(&server);
    assert_eq!(messages(&quiet.transcript().await), quiet_acked);
    assert_eq!(messages(&busy.transcript().await), busy_acked);
}

/// Stores before 2026-11-28 logged new events in a table `log`, keyed by the writer and its own
/// count, where this store logs into `event_log`. A database such a store left after a kill -9,
/// with messages still in that log, restores them; so does a chat an instance of the previous
/// version handed over during a rolling upgrade. The rows are written here as that store wrote
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_the_previous_stores_log_are_restored() {
    let data = Scratch::new("previous-log");
    let server = Server::start(data.path(), None);
    let (mut customer, _) = open_chat(&server, "Ola").await;
    let mut acked = Vec::new();
    for m in 0..3 {
        let text = format!("new {m}");
        let r = customer.send(&text, &text).await;
        assert_eq!(r.status, 200, "{text}: {:?}", r.body);
        acked.push((r.body["seq"].as_u64().unwrap(), text));
    }
    server.kill9();

    {
        let db = rusqlite::Connection::open(data.path().join("parley.db")).unwrap();
        let owner: String = db.query_row("SELECT owner FROM chats WHERE chat_id = ?1", [&customer.chat_id], |r| r.get(0)).unwrap();
        let mut seq = acked.last().unwrap().0;
        for (n, text) in [(1, "previous 1"), (2, "previous 2")] {
            seq += 1;
            db.execute(
                "INSERT INTO log (writer, n, chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
                 VALUES (?1, ?2, ?3, ?4, 'message', ?5, 'Ola', ?6, ?6, 1764288000000)",
                rusqlite::params![owner, n, customer.chat_id, seq as i64, customer.id, text],
            )
            .unwrap();
            acked.push((seq, text.to_string()));
        }
    }
    let server = Server::start(data.path(), None);
    customer.moved_to(&server);
    let restored = customer.transcript().await;
    scenarios::assert_dense(&restored);
    assert_eq!(messages(&restored), acked, "the messages of both logs, in order");
    let r = customer.send("after", "after").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    acked.push((r.body["seq"].as_u64().unwrap(), "after".to_string()));
    server.kill9();

    let server = Server::start(data.path(), None);
    customer.moved_to(&server);
    assert_eq!(messages(&customer.transcript().await), acked, "and again after a second kill -9");
    let left = data.read_integer("SELECT count(*) FROM log", []);
    assert_eq!(left, 0, "the previous log's rows were folded into the transcript table");
}

/// A rolling upgrade is a while of mixed versions: an instance of the version before
/// 2026-11-28, whose SQLite store reads `events` and the old `log` only, may restore the chats
/// of an upgraded instance that died (kill -9) or stopped (SIGTERM), whose last messages are
/// still in `event_log`. It must see every acknowledged message, and the chats must go on on an
/// upgraded instance afterwards. The previous version is played by its store's own SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_version_restoring_an_upgraded_instances_chats_loses_nothing() {
    let data = Scratch::new("previous-version");
    let config = data.deployment("[server]\ndrain_deadline_ms = 0\n");
    let mut chats = Vec::new();
    for (name, kill) in [("Ode", true), ("Pia", false)] {
        let server = Server::start(data.path(), Some(&config));
        let (mut customer, _) = open_chat(&server, name).await;
        let mut acked = Vec::new();
        for m in 0..5 {
            let text = format!("{name} {m}");
            let r = customer.send(&text, &text).await;
            assert_eq!(r.status, 200, "{text}: {:?}", r.body);
            acked.push((r.body["seq"].as_u64().unwrap(), text));
        }
        if kill {
            server.kill9();
        } else {
            server.terminate();
            assert_eq!(server.exited().await, 0);
        }
        let logged = data.read_integer("SELECT count(*) FROM event_log WHERE chat_id = ?1", [&customer.chat_id]);
        assert!(logged >= 5, "{name}: the messages are still in event_log ({logged} rows), as this test needs");
        let restored = previous_version_restores(&data.path().join("parley.db"), &customer.chat_id);
        assert_eq!(restored, acked, "{name}: what the previous version restores (stopped by kill -9: {kill})");
        chats.push((customer, acked));
    }

    let server = Server::start(data.path(), Some(&config));
    for (customer, acked) in &mut chats {
        customer.moved_to(&server);
        assert_eq!(&messages(&customer.transcript().await), acked, "back on an upgraded instance");
        let r = customer.send("later", "later").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

/// What the SQLite store before 2026-11-28 (`574d9f5`) ran to restore a chat whose owner's
/// lease ran out: its claim, the same `CLAIM` as now, as instance `previous`, at a time after
/// every lease here ran out; then its load, which reads `events` and `log` (the later row of a
/// seq wins). Its acknowledged messages, by seq.
fn previous_version_restores(db: &Path, chat_id: &str) -> Vec<(u64, String)> {
    let db = rusqlite::Connection::open(db).unwrap();
    let epoch: i64 = db.query_row("SELECT epoch FROM chats WHERE chat_id = ?1", [chat_id], |r| r.get(0)).unwrap();
    let later_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 + 60_000;
    let claimed = db
        .execute(
            "UPDATE chats SET epoch = epoch + 1, owner = ?2
             WHERE chat_id = ?1 AND epoch = ?3 AND (owner = ?2 OR NOT EXISTS
                 (SELECT 1 FROM members WHERE instance_id = chats.owner AND lease_expires_ms > ?4))",
            rusqlite::params![chat_id, "previous", epoch, later_ms],
        )
        .unwrap();
    assert_eq!(claimed, 1, "the previous version's claim");
    let mut load = db
        .prepare(
            "SELECT seq, kind, text, 0 FROM events WHERE chat_id = ?1
             UNION ALL SELECT seq, kind, text, n FROM log WHERE chat_id = ?1",
        )
        .unwrap();
    let mut latest = std::collections::BTreeMap::new();
    let rows = load.query_map([chat_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?)));
    for (seq, kind, text, age) in rows.unwrap().map(Result::unwrap) {
        let e = latest.entry(seq).or_insert((i64::MIN, String::new(), String::new()));
        if age >= e.0 {
            *e = (age, kind, text);
        }
    }
    latest.into_iter().filter(|(_, (_, kind, _))| kind == "message").map(|(seq, (_, _, text))| (seq, text)).collect()
}

/// Chats opened together fill up together: they reach the SQLite store's fold threshold in the
/// same commits, and the store folds them a few per commit, oldest first, paced by the rows it
/// logs, so for a while many chats hold more logged rows than the threshold. A kill -9 while
/// they wait, and another one later: every chat's transcript is exactly its acknowledged
/// messages, once and in order, and the store plugin never faulted (a trap is survived by
/// recreating the instance, which would hide a broken fold from the participants, not from the
/// operator's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_filling_up_together_are_intact_after_kill_9() {
    let data = Scratch::new("fill-together");
    let config = data.deployment("[limits]\nmessages_per_second = 0\n");
    let log = |n: usize| data.path().join(format!("serve{n}.log"));
    let no_fault = |n: usize| {
        let text = std::fs::read_to_string(log(n)).unwrap();
        assert!(!text.contains("plugin.fault"), "instance {n} logged a plugin fault:\n{text}");
    };
    let server = Server::start_logged(data.path(), Some(&config), &log(1));
    let mut chats = Vec::new();
    for i in 0..150 {
        chats.push((open_chat(&server, &format!("c{i}")).await.0, Vec::new()));
    }
    // Round by round every chat sends its next message at once: commits of ~150 events, each
    // folding a quarter more rows than it logs while 150 chats are due.
    let rounds = async |chats: Vec<(Participant, Vec<(u64, String)>)>, rounds: std::ops::Range<usize>| {
        let mut chats = chats;
        for m in rounds {
            let sends = chats.into_iter().map(|(mut customer, mut acked)| async move {
                let text = format!("m{m}");
                let r = customer.send(&text, &text).await;
                assert_eq!(r.status, 200, "chat {} {text}: {:?}", customer.chat_id, r.body);
                acked.push((r.body["seq"].as_u64().unwrap(), text));
                (customer, acked)
            });
            chats = futures_util::future::join_all(sends).await;
        }
        chats
    };
    let check = async |server: &Server, chats: &mut Vec<(Participant, Vec<(u64, String)>)>| {
        for (customer, acked) in chats.iter_mut() {
            customer.moved_to(server);
            let restored = customer.transcript().await;
            scenarios::assert_dense(&restored);
            assert_eq!(&messages(&restored), acked, "chat {}", customer.chat_id);
        }
    };
    // The chats' logged rows pass 32 at about the 30th message.
    let mut chats = rounds(chats, 0..36).await;
    server.kill9();
    no_fault(1);

    let server = Server::start_logged(data.path(), Some(&config), &log(2));
    check(&server, &mut chats).await;
    let mut chats = rounds(chats, 36..70).await;
    server.kill9();
    no_fault(2);

    let server = Server::start_logged(data.path(), Some(&config), &log(3));
    check(&server, &mut chats).await;
    no_fault(3);
}
