//! `parley bench failover`: three instances on one data directory. Each round opens chats on
//! one instance, kills it with SIGKILL, and has every chat send its next message at once
//! through the failover client (the dead instance first, as a client talking to it would).
//! Failover time is from the SIGKILL to that message's acknowledgement by the new owner.
//! Last, a wave of chats is restored at once after a kill, and its duration printed.

use crate::client::{Client, FailoverClient};
use crate::local::LocalInstance;
use anyhow::{Context, bail};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Chats on the killed instance in each round.
    #[arg(long, default_value_t = 100)]
    pub chats: usize,
    /// Rounds; each kills the next instance and starts it again afterwards.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Chats restored in the final wave (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub wave: usize,
    /// Deployment file for the three instances (for example other `[cluster]` lease settings).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("parley-bench-failover-{}", std::process::id()));
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let deployment = match &o.config {
        Some(path) => crate::config::Deployment::from_file(path)?,
        None => crate::config::Deployment::default(),
    };
    let config = o.config.as_deref();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Some(start(&data, config).await?));
    }
    println!(
        "parley bench failover: 3 instances on one SQLite file, lease_ms={} renew_ms={}, {} chats x {} rounds, wave of {}",
        deployment.cluster.lease_ms, deployment.cluster.renew_ms, o.chats, o.rounds, o.wave
    );

    let mut all = Vec::new();
    for round in 0..o.rounds {
        let victim = round % 3;
        let times = kill_and_reach(&mut instances, victim, o.chats, &data, config).await?;
        println!("round {}: killed instance {}  {}", round + 1, victim + 1, summary(&times));
        all.extend(times);
    }
    if !all.is_empty() {
        println!("failover time, SIGKILL -> first ack on the new owner, {} chats: {}", all.len(), summary(&all));
    }
    if o.wave > 0 {
        let victim = o.rounds % 3;
        let times = kill_and_reach(&mut instances, victim, o.wave, &data, config).await?;
        let first = times.iter().min().copied().unwrap_or_default();
        let last = times.iter().max().copied().unwrap_or_default();
        println!(
            "restore wave: {} chats acknowledged again {:.0} ms after the SIGKILL; the wave took {:.0} ms after the first restore ({:.0} chats/s)",
            times.len(),
            ms(last),
            ms(last - first),
            times.len() as f64 / (last - first).as_secs_f64().max(0.001)
        );
    }
    drop(instances);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn start(data: &Path, config: Option<&Path>) -> anyhow::Result<LocalInstance> {
    LocalInstance::start(data, config, "127.0.0.1:0", &[]).await
}

/// Opens `n` chats on `victim` (one message each), kills it, and returns for each chat the
/// time from the kill to its next message's acknowledgement. The victim is started again.
async fn kill_and_reach(instances: &mut [Option<LocalInstance>], victim: usize, n: usize, data: &Path, config: Option<&Path>) -> anyhow::Result<Vec<Duration>> {
    let victim_addr = instances[victim].as_ref().expect("running").addr.clone();
    let survivors: Vec<String> = (1..3).map(|k| instances[(victim + k) % 3].as_ref().expect("running").addr.clone()).collect();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut setup = tokio::task::JoinSet::new();
    for i in 0..n {
        // Each client talks to the victim; its fallbacks alternate so the restores spread.
        let order = vec![victim_addr.clone(), survivors[i % 2].clone(), survivors[(i + 1) % 2].clone()];
        let gate = gate.clone();
        setup.spawn(async move {
            let _permit = gate.acquire().await;
            let mut client = FailoverClient::new(&order);
            let created = client.post("/v1/chats", None, json!({"nickname": format!("c{i}")})).await?.ok()?;
            let chat_id = created["chat_id"].as_str().unwrap_or_default().to_string();
            let token = created["token"].as_str().unwrap_or_default().to_string();
            client.post(&format!("/v1/chats/{chat_id}/messages"), Some(&token), json!({"text": "before", "client_msg_id": "m1"})).await?.ok()?;
            Ok::<_, anyhow::Error>((client, chat_id, token))
        });
    }
    let mut chats = Vec::with_capacity(n);
    while let Some(r) = setup.join_next().await {
        chats.push(r??);
    }

    instances[victim].take().expect("running").kill9().await;
    let killed = Instant::now();
    let mut reach = tokio::task::JoinSet::new();
    for (mut client, chat_id, token) in chats {
        reach.spawn(async move {
            let r = client.post(&format!("/v1/chats/{chat_id}/messages"), Some(&token), json!({"text": "after", "client_msg_id": "m2"})).await?;
            let took = killed.elapsed();
            if r.status != 200 {
                bail!("chat {chat_id}: {} {}", r.status, r.body);
            }
            Ok::<_, anyhow::Error>((took, chat_id, token, client.instance().to_string()))
        });
    }
    let mut times = Vec::with_capacity(n);
    let mut check = Vec::new();
    while let Some(r) = reach.join_next().await {
        let (took, chat_id, token, at) = r??;
        times.push(took);
        if check.len() < 20 {
            check.push((chat_id, token, at));
        }
    }
    // Both messages, once each, in order.
    for (chat_id, token, at) in check {
        let t = Client::new(&at).get(&format!("/v1/chats/{chat_id}/transcript"), Some(&token)).await?.ok()?;
        let texts: Vec<&str> = t["events"].as_array().context("events")?.iter().filter(|e| e["kind"] == "message").filter_map(|e| e["text"].as_str()).collect();
        if texts != ["before", "after"] {
            bail!("chat {chat_id}: transcript messages {texts:?}");
        }
    }
    instances[victim] = Some(start(data, config).await?);
    Ok(times)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    let pct = |p: f64| sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default();
    format!("p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms", ms(pct(0.5)), ms(pct(0.99)), ms(pct(1.0)))
}
