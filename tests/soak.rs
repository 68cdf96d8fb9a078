//! A bounded soak: a three-instance cluster under steady load while two of the instances are
//! killed with SIGKILL and restarted at random intervals. At the end every acknowledged
//! message is present exactly once, and the instance that was never killed did not grow.
//! Three minutes by default (CI); `PARLEY_SOAK_SECONDS=1800 cargo test --release --test soak`
//! for longer.

mod common;

use common::scenarios::{busy_chat, verify_busy_chats};
use common::*;
use parley::client::Client;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_load_with_random_kill_9_loses_nothing() {
    let seconds: u64 = std::env::var("PARLEY_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    let data = Scratch::new("soak");
    let steady = Server::start(data.path(), None);
    let addrs: Vec<String> = (0..2).map(|_| spare_address()).collect();
    let mut others: Vec<Option<Server>> = addrs.iter().map(|a| Some(Server::start_at(data.path(), None, a))).collect();
    let all: Vec<String> = std::iter::once(steady.addr.clone()).chain(addrs.iter().cloned()).collect();

    // 30 customers, each starting on one instance (most on the two that get killed) and
    // knowing the others, sending every 100 ms through the failover client.
    let stop = Arc::new(AtomicBool::new(false));
    let chats: Vec<_> = (0..30)
        .map(|i| {
            let order: Vec<String> = (0..3).map(|k| all[(i + 1 + k) % 3].clone()).collect();
            busy_chat(i, order, stop.clone(), Duration::from_millis(100))
        })
        .collect();

    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut baseline = None;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2000..6000))).await;
        if baseline.is_none() && started.elapsed() > Duration::from_secs(seconds / 4) {
            baseline = Some(rss_kib(steady.pid()));
        }
        let victim = rng.random_range(0..others.len());
        others[victim].take().unwrap().kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        others[victim] = Some(Server::start_at(data.path(), None, &addrs[victim]));
    }
    stop.store(true, Ordering::Relaxed);

    let verified = verify_busy_chats(&mut Client::new(&steady.addr), chats).await;
    let total: usize = verified.iter().map(|(_, acked, _)| acked).sum();
    let end_rss = rss_kib(steady.pid());
    let baseline = baseline.unwrap_or(end_rss);
    println!("soak: {seconds} s, {kills} kills, {total} messages acknowledged and verified, steady instance RSS {baseline} KiB -> {end_rss} KiB");
    assert!(kills >= seconds / 8, "instances were killed throughout: {kills}");
    assert!(total as u64 > seconds * 30 * 5, "load held: {total} messages");
    assert!(end_rss < baseline + baseline / 2 + 16 * 1024, "memory of the instance never killed is stable: {baseline} KiB -> {end_rss} KiB");
}
