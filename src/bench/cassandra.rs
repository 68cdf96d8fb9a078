//! `parley bench cassandra`: the embedded store and Cassandra side by side in one run. For each
//! chat count, the closed-loop message bench on an instance with each store; then what the
//! cluster's coordination costs on each (lease renewal, a wave of claims, a directory lookup)
//! next to one group commit, measured on the store plugins themselves.

use super::plugins::{delta, time};
use crate::config::{Deployment, PluginSection, Synchronous};
use crate::plugins::bindings::TranscriptStore;
use crate::plugins::bindings::store::ClaimRequest;
use crate::plugins::bindings::types::ChatDelta;
use crate::plugins::{Instance, Runtime, Slot};
use crate::storage::cassandra::{Cassandra, init_schema};
use crate::storage::sqlite::DatabaseFile;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Deployment file whose [cassandra] section names the cluster to measure (give it
    /// `[limits] messages_per_second = 0`, or the rate limit shapes the load). Default: the
    /// development node of cassandra/node.sh (127.0.0.1:9042), keyspace parley_bench, consistency one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Concurrent chats, one measurement per count and store.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub chats: Vec<usize>,
    /// Seconds of measured load per measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("parley-bench-cassandra-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = match &o.config {
        Some(c) => c.clone(),
        None => {
            let c = dir.join("cassandra.toml");
            std::fs::write(
                &c,
                "[cassandra]\ncontact_points = [\"127.0.0.1:9042\"]\nkeyspace = \"parley_bench\"\nconsistency = \"one\"\n[limits]\nmessages_per_second = 0\n",
            )?;
            c
        }
    };
    let section = Deployment::from_file(&config)?.cassandra.context("the deployment file has no [cassandra] section")?;
    init_schema(&section).await.map_err(anyhow::Error::msg)?;
    println!(
        "parley bench cassandra: {} at consistency {:?} (serial {:?}), against the embedded store (SQLite, synchronous=full)",
        section.contact_points.join(", "),
        section.consistency,
        section.serial_consistency
    );
    for &chats in &o.chats {
        for (label, deployment) in [("embedded SQLite", None), ("Cassandra", Some(config.clone()))] {
            println!("\n== {label}, {chats} chats");
            let bench = super::Options {
                scenario: None,
                target: None,
                chats,
                seconds: o.seconds,
                text_bytes: 40,
                agent_token: None,
                rate: 0,
                http2: 0,
                synchronous: "full".into(),
                config: deployment,
                timeline: None,
            };
            Box::pin(super::run(bench)).await?;
        }
    }

    println!("\n== coordination: one call of each store operation, measured on the store plugin");
    let runtime = Runtime::new(dir.join("cache"), Default::default())?;
    runtime.connect_cql(Arc::new(Cassandra::connect(&section).await.map_err(anyhow::Error::msg)?));
    let sqlite = DatabaseFile::new(dir.join("coordination.db"), Synchronous::Full, Duration::from_secs(5));
    let stores = [
        ("embedded SQLite", "builtin:sqlite-store", Some(sqlite), Vec::new()),
        ("Cassandra", "builtin:cassandra-store", None, vec![("keyspace".to_string(), toml::Value::String(section.keyspace.clone()))]),
    ];
    for (label, file, database, settings) in stores {
        let section = PluginSection { file: file.into(), grants: None, memory_mb: 64, deadline_ms: 10_000, http_hosts: Vec::new(), settings: settings.into_iter().collect() };
        let plugin = Arc::new(runtime.load(Slot::Intermediate, &section, Path::new("."))?);
        let mut store: Instance<TranscriptStore> = runtime.instance(plugin, database);
        coordination(label, &mut store).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn coordination(label: &str, store: &mut Instance<TranscriptStore>) -> anyhow::Result<()> {
    let run = format!("{:x}", rand::random::<u64>());
    let now = || crate::chat::event::now_ms();
    let renew = time(200, async || {
        let r = store.call(async |b, s| b.parley_plugin_store().call_renew_lease(s, "bench-a", &run, "127.0.0.1:1", now(), 1500).await).await;
        r.expect("renew").expect("renewed");
    })
    .await;

    // 100 chats created (first save with metadata), then saved one event each per commit.
    let mut seq = 1u64;
    let chat = |c: usize| format!("{run}-{c}");
    let commit = |seq: u64| -> Vec<ChatDelta> {
        (0..100)
            .map(|c| {
                let mut d = delta(c, seq);
                d.chat_id = chat(c);
                d.owner = "bench-a".into();
                d
            })
            .collect()
    };
    let create = commit(seq);
    let started = Instant::now();
    let r = store.call(async |b, s| b.parley_plugin_store().call_save(s, &create).await).await?;
    anyhow::ensure!(r.iter().all(Result::is_ok), "{label}: creating chats failed: {r:?}");
    let created = started.elapsed();
    let save = time(50, async || {
        seq += 1;
        let deltas = commit(seq);
        let r = store.call(async |b, s| b.parley_plugin_store().call_save(s, &deltas).await).await.expect("save");
        assert!(r.iter().all(Result::is_ok), "saves succeed: {r:?}");
    })
    .await;

    let ids: Vec<String> = (0..100).map(chat).collect();
    let locate = time(50, async || {
        let r = store.call(async |b, s| b.parley_plugin_store().call_locate(s, &ids).await).await.expect("locate");
        assert!(r.iter().all(|l| matches!(l, Ok(Some(_)))), "every chat located");
    })
    .await;
    // The wave after a failover: bench-a's lease is released, bench-b claims all 100 at once.
    let r = store.call(async |b, s| b.parley_plugin_store().call_release_lease(s, "bench-a", &run).await).await?;
    r.map_err(|e| anyhow::anyhow!("{label}: release: {e:?}"))?;
    let requests: Vec<ClaimRequest> = ids.iter().map(|id| ClaimRequest { chat_id: id.clone(), expected_epoch: 1 }).collect();
    let started = Instant::now();
    let r = store.call(async |b, s| b.parley_plugin_store().call_claim(s, "bench-b", &requests, now()).await).await?;
    let claim = started.elapsed();
    anyhow::ensure!(r.iter().all(|c| matches!(c, Ok(crate::plugins::bindings::store::ClaimOutcome::Claimed(2)))), "{label}: claims: {r:?}");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label:>16}: lease renewal {:.2} ms | create 100 chats {:.2} ms | save 100 chats x 1 event {:.2} ms | locate 100 chats {:.2} ms | claim 100 chats {:.2} ms",
        ms(renew),
        ms(created),
        ms(save),
        ms(locate),
        ms(claim)
    );
    Ok(())
}
