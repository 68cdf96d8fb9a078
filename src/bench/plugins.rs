//! `parley bench plugins`: what crossing into a plugin costs, measured on the same runtime the
//! server uses (pooling allocator, epoch deadline, memory limiter): one `decide` / `handle`
//! call of the built-in Rust plugins and of any policy components given (Python,
//! JavaScript...), a batch of 100 in one call, instantiation, and one store group commit.

use crate::config::{PluginSection, Synchronous};
use crate::plugins::bindings::notices::{Notice, NoticeKind};
use crate::plugins::bindings::policy::{ErrorKind, SaveFailure};
use crate::plugins::bindings::types::{ChatDelta, ChatState, Event, EventKind};
use crate::plugins::bindings::{NoticeHandler, SaveErrorPolicy, TranscriptStore};
use crate::plugins::{Instance, Runtime, Slot};
use crate::storage::sqlite::DatabaseFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Policy components to measure next to the built-in Rust one (e.g. the Python and
    /// JavaScript examples); each must accept the default policy's settings.
    #[arg(long)]
    pub policy: Vec<PathBuf>,
    /// Calls per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub calls: u32,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("parley-bench-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = Runtime::new(dir.join("cache"), Default::default())?;
    println!("parley bench plugins: {} calls per figure, release build", o.calls);

    let mut policies = vec![("rust (builtin:default-policy)".to_string(), "builtin:default-policy".to_string())];
    policies.extend(o.policy.iter().map(|p| (p.display().to_string(), p.display().to_string())));
    for (label, file) in policies {
        let plugin = Arc::new(runtime.load(Slot::SaveErrorPolicy, &section(&file), Path::new("."))?);
        let one = vec![failure(0)];
        let hundred: Vec<SaveFailure> = (0..100).map(failure).collect();
        let mut instance: Instance<SaveErrorPolicy> = runtime.instance(plugin.clone(), None);
        instance.warm_up().await.map_err(|f| anyhow::anyhow!("{label}: {f}"))?;
        let per_call = time(o.calls, async || {
            instance.call(async |b, s| b.parley_plugin_policy().call_decide(s, &one).await).await.expect("decide");
        })
        .await;
        let batch_calls = (o.calls / 20).max(10);
        let per_batch = time(batch_calls, async || {
            instance.call(async |b, s| b.parley_plugin_policy().call_decide(s, &hundred).await).await.expect("decide");
        })
        .await;
        let started = Instant::now();
        let fresh = 20;
        for _ in 0..fresh {
            let mut i: Instance<SaveErrorPolicy> = runtime.instance(plugin.clone(), None);
            i.warm_up().await.map_err(|f| anyhow::anyhow!("{label}: {f}"))?;
        }
        let instantiate = started.elapsed() / fresh;
        println!(
            "policy {label}: decide x1 {:.2} µs/call; x100 {:.2} µs/call ({:.3} µs/failure); instantiate + configure {:.2} ms",
            us(per_call),
            us(per_batch),
            us(per_batch) / 100.0,
            instantiate.as_secs_f64() * 1e3
        );
    }

    let plugin = Arc::new(runtime.load(Slot::NoticeHandler, &section("builtin:default-notices"), Path::new("."))?);
    let mut notices: Instance<NoticeHandler> = runtime.instance(plugin, None);
    let one = vec![Notice { chat_id: "c0".into(), kind: NoticeKind::TranscriptSaved, participant_id: None, detail: String::new() }];
    let per_call = time(o.calls, async || {
        notices.call(async |b, s| b.parley_plugin_notices().call_handle(s, &one).await).await.expect("handle");
    })
    .await;
    println!("notices rust (builtin:default-notices): handle x1 {:.2} µs/call", us(per_call));

    // 100 chats a commit, as in a closed loop at 1,000 chats; 10 chats a commit out of 1,000 in
    // turn, as at 20,000 msg/s offered, where a commit's fixed cost weighs ten times as much
    // (100 events a chat: each is folded three times).
    for (chats, per_save, commits) in [(100, 100, 200), (1000, 10, 10_000)] {
        for synchronous in [Synchronous::Full, Synchronous::Normal] {
            let database = DatabaseFile::new(dir.join(format!("store-{chats}-{synchronous:?}.db")), synchronous, Duration::from_secs(5));
            let plugin = Arc::new(runtime.load(Slot::Intermediate, &section("builtin:sqlite-store"), Path::new("."))?);
            let mut store: Instance<TranscriptStore> = runtime.instance(plugin, Some(database));
            let started = Instant::now();
            for commit in 0..commits {
                let first = commit * per_save;
                let deltas: Vec<ChatDelta> = (first..first + per_save).map(|i| delta(i % chats, (i / chats + 1) as u64)).collect();
                let results = store.call(async |b, s| b.parley_plugin_store().call_save(s, &deltas).await).await.expect("save");
                assert!(results.iter().all(Result::is_ok), "saves succeed");
            }
            let calls = commits as u32;
            let per_commit = started.elapsed() / calls;
            let sql = store.sql_time();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "store rust (builtin:sqlite-store, synchronous={synchronous:?}): save of {per_save} chats x 1 event ({chats} chats in turn) {:.3} ms/call: SQLite statements {:.3} ms, commit {:.3} ms, the plugin and the boundary {:.3} ms",
                ms(per_commit),
                ms(sql.statements / calls),
                ms(sql.commit / calls),
                ms(per_commit.saturating_sub((sql.statements + sql.commit) / calls))
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn section(file: &str) -> PluginSection {
    let settings = if file.contains("policy") || !file.starts_with("builtin:") {
        [("resend_attempts", 2), ("resend_delay_ms", 500)].into_iter().map(|(k, v)| (k.to_string(), toml::Value::Integer(v))).collect()
    } else {
        Default::default()
    };
    PluginSection { file: file.to_string(), grants: None, memory_mb: 64, deadline_ms: 2000, http_hosts: Vec::new(), settings }
}

fn failure(i: usize) -> SaveFailure {
    SaveFailure {
        chat_id: format!("chat-{i}"),
        attempt: 1 + (i % 4) as u32,
        error_kind: ErrorKind::Unavailable,
        message: "database is locked".into(),
        ms_since_last_save: 40,
        pending_messages: 1,
    }
}

pub(super) fn delta(chat: usize, seq: u64) -> ChatDelta {
    let event = Event {
        seq,
        kind: EventKind::Message,
        participant_id: "p1".into(),
        nickname: "Ann".into(),
        text: "x".repeat(40),
        client_msg_id: Some(format!("m{seq}")),
        at_ms: 0,
    };
    ChatDelta {
        chat_id: format!("chat-{chat}"),
        epoch: 1,
        owner: "bench".into(),
        state: ChatState::Active,
        meta: (seq == 1).then(|| "{}".to_string()),
        events: vec![event],
    }
}

pub(super) async fn time(n: u32, mut f: impl AsyncFnMut()) -> Duration {
    for _ in 0..(n / 10).max(1) {
        f().await;
    }
    let started = Instant::now();
    for _ in 0..n {
        f().await;
    }
    started.elapsed() / n
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
