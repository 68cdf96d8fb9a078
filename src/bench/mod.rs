//! `parley bench`: N concurrent chats, each a customer and an agent taking turns to send
//! messages as fast as they are acknowledged, for a fixed time. Prints durable messages/s
//! and ack latency percentiles, then checks that every acknowledged message is in the
//! transcript exactly once. Without `--target` it starts its own instance on a fresh data
//! directory, so one command measures the whole path.

mod cassandra;
mod disk;
mod failover;
mod plugins;

use crate::client::Client;
use crate::local::LocalInstance;
use anyhow::{Context, bail};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Options {
    #[command(subcommand)]
    pub scenario: Option<Scenario>,
    /// Instance to drive (http://host:port); default: start one.
    #[arg(long)]
    pub target: Option<String>,
    /// Concurrent chats.
    #[arg(long, default_value_t = 100)]
    pub chats: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 40)]
    pub text_bytes: usize,
    /// Agent token for --target (PARLEY_AGENT_TOKEN by default).
    #[arg(long)]
    pub agent_token: Option<String>,
    /// Offered load in messages/s across all chats, each chat sending on a fixed schedule;
    /// latency counts from the scheduled time, so a stalled server cannot hide its queue.
    /// 0 (default): every chat sends its next message as soon as the last is acknowledged.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// SQLite synchronous mode of the instance the bench starts: full or normal.
    #[arg(long, default_value = "full")]
    pub synchronous: String,
    /// Send the messages over HTTP/2 (prior knowledge, as a load balancer in front of Parley
    /// would), the chats sharing this many connections; 0 (default): HTTP/1.1, a connection
    /// per chat.
    #[arg(long, default_value_t = 0)]
    pub http2: usize,
    /// Deployment file for the instance the bench starts (e.g. one with a [cassandra]
    /// section: its keyspace is created first). Overrides --synchronous.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also write the ack latency per 100 ms of sending time to this CSV file (window start
    /// ms, acks, p50, p99, max ms): a stall shows as a jump that drains, queueing as a drift.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// Failover time after kill -9 of one of three instances, and the time to restore a wave of chats.
    Failover(failover::Options),
    /// The cost of a call into a plugin (Rust, and any policy components given), of a batch,
    /// of instantiation, and of one store group commit.
    Plugins(plugins::Options),
    /// Messages/s and ack latency on the embedded store and on Cassandra in one run, and what
    /// cluster coordination (leases, claims) costs on each.
    Cassandra(cassandra::Options),
    /// How long the disk takes to make a group commit durable (writes + fsync, back to back),
    /// and the floor that puts under any ack latency objective.
    Disk(disk::Options),
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    match o.scenario {
        Some(Scenario::Failover(f)) => return failover::run(f).await,
        Some(Scenario::Plugins(p)) => return plugins::run(p).await,
        Some(Scenario::Cassandra(c)) => return cassandra::run(c).await,
        Some(Scenario::Disk(d)) => return tokio::task::spawn_blocking(move || disk::run(d)).await?,
        None => {}
    }
    let mut own_server = None;
    let (target, agent_token) = match &o.target {
        Some(t) => (t.clone(), o.agent_token.clone().or_else(|| std::env::var("PARLEY_AGENT_TOKEN").ok()).context("--agent-token or PARLEY_AGENT_TOKEN is required with --target")?),
        None => {
            let (child, addr, dir) = start_instance(&o.synchronous, o.config.as_deref()).await?;
            own_server = Some((child, dir));
            (addr, "bench-agent-token".to_string())
        }
    };
    let offered = if o.rate > 0 { format!("{} msg/s offered", o.rate) } else { "closed loop".to_string() };
    let transport = match o.http2 {
        0 => "HTTP/1.1, a connection per chat".to_string(),
        n => format!("HTTP/2 on {n} connection(s)"),
    };
    println!(
        "parley bench: {} chats, {offered}, {transport}, {} s against {target} (sqlite synchronous={})",
        o.chats,
        o.seconds,
        if o.target.is_some() || o.config.is_some() { "as configured" } else { &o.synchronous }
    );

    // Open the chats, an agent in each.
    let mut shared = Vec::new();
    for _ in 0..o.http2 {
        shared.push(Sender::connect_http2(Client::new(&target).authority()).await?);
    }
    // Room for each chat's samples, written through before the clock starts (see `touched`).
    let expected = match o.rate {
        0 => 4096,
        r => (r * o.seconds) as usize / o.chats.max(1) + 64,
    };
    let text = "x".repeat(o.text_bytes);
    let mut setup = tokio::task::JoinSet::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..o.chats {
        let (target, agent_token, gate, text) = (target.clone(), agent_token.clone(), gate.clone(), text.clone());
        let h2 = (!shared.is_empty()).then(|| shared[i % shared.len()].clone());
        setup.spawn(async move {
            let _permit = gate.acquire().await;
            let mut c = Client::new(&target);
            let created = c.post("/v1/chats", None, json!({"nickname": format!("customer{i}"), "subject": "bench"})).await?.ok()?;
            let chat_id = created["chat_id"].as_str().unwrap_or_default().to_string();
            let joined = c.post(&format!("/v1/chats/{chat_id}/join"), Some(&agent_token), json!({"nickname": format!("agent{i}")})).await?.ok()?;
            // Connected now, and one message sent (the customer's first, acknowledged before the
            // clock starts), so the measured window includes neither 1,000 simultaneous connects
            // nor the server setting up 1,000 connections at their first request.
            let mut sender = match h2 {
                Some(h2) => Sender::Http2(h2),
                None => Sender::connect(c.authority()).await?,
            };
            let (customer, agent) = (created["token"].as_str().unwrap_or_default().to_string(), joined["token"].as_str().unwrap_or_default().to_string());
            match sender.send_message(&mut String::new(), c.authority(), &chat_id, &customer, &text, 0).await? {
                200 => {}
                status => bail!("chat {chat_id}: the first message got {status}"),
            }
            Ok::<_, anyhow::Error>((c, sender, chat_id, customer, agent, touched(expected)))
        });
    }
    let mut chats = Vec::with_capacity(o.chats);
    while let Some(r) = setup.join_next().await {
        chats.push(r??);
    }

    let server_pid = own_server.as_ref().and_then(|(child, _)| child.id());
    let cpu_before = server_pid.map(CpuTime::of_threads);
    let written_before = server_pid.map(written_bytes);
    let memory_before = server_pid.and_then(Memory::of);
    let bench_before = CpuTime::of_threads(std::process::id());
    let kpi_before = kpi(&target).await;
    let acks_before = server_histogram(&target, "parley_message_ack_seconds").await;
    let saves_before = server_histogram(&target, "parley_save_batch_seconds").await;
    let commits_before = server_histogram(&target, "parley_sqlite_commit_seconds").await;
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let host = HostProbe::start(own_server.as_ref().map(|(_, dir): &(_, PathBuf)| dir.clone()));
    let started = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    let interval = (o.rate > 0).then(|| Duration::from_secs_f64(o.chats as f64 / o.rate as f64));
    for (i, (client, mut conn, chat_id, customer, agent, mut samples)) in chats.into_iter().enumerate() {
        let text = text.clone();
        // Spread the chats' schedules evenly over one interval.
        let mut next = tokio::time::Instant::now() + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / o.chats as f64));
        let authority = client.authority().to_string();
        load.spawn(async move {
            let mut errors = 0u64;
            // Message 0 was sent in the setup.
            let mut n = 1u64;
            let mut request = String::with_capacity(512);
            while Instant::now() < deadline {
                let token = if n.is_multiple_of(2) { &customer } else { &agent };
                let sent = match interval {
                    Some(iv) => {
                        tokio::time::sleep_until(next).await;
                        let scheduled = next.into_std();
                        next += iv;
                        scheduled
                    }
                    None => Instant::now(),
                };
                let late = sent.elapsed();
                match conn.send_message(&mut request, &authority, &chat_id, token, &text, n).await {
                    Ok(200) => samples.push(Sample {
                        sent_us: (sent - started).as_micros() as u32,
                        latency_us: sent.elapsed().as_micros() as u32,
                        late_us: late.as_micros() as u32,
                    }),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match conn.reconnect(&authority).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
                n += 1;
            }
            // The connection goes back too: closed here, each chat's last acks would share the
            // cores with a thousand connection teardowns, on both sides, inside the measured window.
            (client, conn, chat_id, customer, samples, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut finished = Vec::new();
    let mut connections = Vec::with_capacity(o.chats);
    while let Some(r) = load.join_next().await {
        let (client, conn, chat_id, customer, samples, e) = r?;
        errors += e;
        connections.push(conn);
        finished.push((client, chat_id, customer, samples.len() + 1, e));
        all.extend(samples);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let host = host.stop();
    let server_cpu = server_pid.zip(cpu_before).map(|(pid, before)| {
        let after = CpuTime::of_threads(pid);
        (after.since(&before), after.waited_since(&before))
    });
    let written = server_pid.zip(written_before).map(|(pid, before)| written_bytes(pid).saturating_sub(before));
    let memory = server_pid.and_then(Memory::of).zip(memory_before);
    let bench_after = CpuTime::of_threads(std::process::id());
    let (bench_cpu, bench_waited) = (bench_after.since(&bench_before), bench_after.waited_since(&bench_before));
    let kpi_after = kpi(&target).await;
    let acks_after = server_histogram(&target, "parley_message_ack_seconds").await;
    let saves_after = server_histogram(&target, "parley_save_batch_seconds").await;
    let commits_after = server_histogram(&target, "parley_sqlite_commit_seconds").await;
    drop(connections);
    if let Some(path) = &o.timeline {
        let worst = write_timeline(path, &mut all).with_context(|| format!("writing {}", path.display()))?;
        println!("timeline:              {}; worst 100 ms: p99 {:.2} ms from {} ms on", path.display(), worst.1, worst.0);
    }
    let late: Option<Vec<u32>> = (o.rate > 0).then(|| all.iter().map(|s| s.late_us).collect());
    let mut all: Vec<u32> = all.iter().map(|s| s.latency_us).collect();
    all.sort_unstable();
    let pct = |p: f64| percentile(&all, p);
    println!("acknowledged messages: {}  errors: {errors}", all.len());
    println!("durable messages/s:    {:.0}", all.len() as f64 / elapsed);
    println!("ack latency ms:        p50 {:.2}  p99 {:.2}  max {:.2}", pct(0.50), pct(0.99), pct(1.0));
    if let Some(mut late) = late {
        // Counted in the ack latency: a generator short of CPU sends late, whatever the server.
        late.sort_unstable();
        println!("  of which sent late:  p50 {:.2}  p99 {:.2}  max {:.2} (the generator behind its schedule)", percentile(&late, 0.5), percentile(&late, 0.99), percentile(&late, 1.0));
    }
    // The server's own share: arrival at the owner to the ack, without the generator's
    // scheduling and the loopback; bucket bounds, so "<=".
    let acks: Vec<(f64, u64)> = acks_after.iter().zip(&acks_before).map(|((le, after), (_, before))| (*le, after - before)).collect();
    if let Some(&(_, total)) = acks.last().filter(|(_, n)| *n > 0) {
        let bound = |p: f64| acks.iter().find(|(_, n)| *n as f64 >= p * total as f64).map_or(f64::INFINITY, |(le, _)| le * 1000.0);
        println!("  of which the server: p50 <= {} ms  p99 <= {} ms (histogram buckets)", bound(0.50), bound(0.99));
    }
    let delta = |k: &str| kpi_after[k].as_u64().unwrap_or(0).saturating_sub(kpi_before[k].as_u64().unwrap_or(0));
    let (batches, events) = (delta("save_batches"), delta("events_saved"));
    if batches > 0 {
        println!(
            "group commits:         {batches}, {:.1} events each; saves failed {}, writes fenced {}",
            events as f64 / batches as f64,
            delta("save_failures"),
            delta("writes_fenced")
        );
        // Every message waiting meanwhile waits for a slow commit: a few of them set the p99.
        // `parley bench disk` tells how many the disk alone causes.
        // How many of a histogram's observations during the run took over each bound.
        let over = |before: &[(f64, u64)], after: &[(f64, u64)]| -> Option<String> {
            if before.is_empty() || before.len() != after.len() {
                return None;
            }
            let counts: Vec<(f64, u64)> = after.iter().zip(before).map(|((le, a), (_, b))| (*le, a.saturating_sub(*b))).collect();
            let total = counts.last().map_or(0, |(_, n)| *n);
            let slow = |bound: f64| total - counts.iter().filter(|(le, _)| *le <= bound).map(|(_, n)| *n).max().unwrap_or(0);
            Some(format!("{} / {} / {} / {} / {}", slow(0.005), slow(0.01), slow(0.02), slow(0.05), slow(0.1)))
        };
        if let Some(slow) = over(&saves_before, &saves_after) {
            println!("  slower than 5 / 10 / 20 / 50 / 100 ms: {slow} (histogram buckets)");
        }
        // The disk's share: a COMMIT that took long waited for its WAL write and fsync.
        if let Some(slow) = over(&commits_before, &commits_after) {
            println!("  SQLite COMMITs over those: {slow} (the WAL written and fsynced; saves and leases)");
        }
    }
    // Where the CPU went, per acknowledged message: the two cores are shared by the server's
    // threads and the load generator, so this is what bounds throughput.
    let per_message = |seconds: f64| seconds * 1e6 / all.len().max(1) as f64;
    if let Some((cpu, _)) = &server_cpu {
        let threads: Vec<String> = cpu.iter().map(|(name, s)| format!("{name} {:.0}", per_message(*s))).collect();
        println!("server CPU µs/message: {:.0} ({})", per_message(cpu.iter().map(|(_, s)| s).sum()), threads.join(", "));
    }
    // Time runnable but not running: more threads wanting a core than there are cores. The
    // store thread commits for every chat, so its wait delays every ack in the next commit.
    if let Some((_, waited)) = server_cpu.as_ref().filter(|(_, waited)| !waited.is_empty()) {
        let threads: Vec<String> = waited.iter().take(3).map(|(name, s)| format!("{name} {:.0}", per_message(*s))).collect();
        println!("  waiting for a CPU:   {}", threads.join(", "));
    }
    let generator_waited = if bench_waited.is_empty() { String::new() } else { format!(" (waiting for a CPU {:.0})", per_message(bench_waited.iter().map(|(_, s)| s).sum())) };
    println!("load generator CPU:    {:.0} µs/message{generator_waited}", per_message(bench_cpu.iter().map(|(_, s)| s).sum()));
    if let Some(bytes) = written {
        println!("server disk writes:    {:.1} KB/message", bytes as f64 / 1000.0 / all.len().max(1) as f64);
    }
    // Memory the server took while measured: on a VM, a page touched for the first time can
    // cost the host's fault as well as the guest's.
    if let Some((after, before)) = memory {
        println!(
            "server memory:         {} MB resident, {:+} MB over the run; {:.0} page faults/s",
            after.resident >> 20,
            (after.resident as i64 - before.resident as i64) >> 20,
            after.faults.saturating_sub(before.faults) as f64 / elapsed
        );
    }
    // Not the load: the machine stopped as a whole. Every ack in flight then waits, and the
    // backlog takes the spare quarter of the cores a while to pay off.
    if let Some(host) = &host.machine {
        println!(
            "host:                  steal {:.2} s of CPU over the run; {} stalls over 20 ms (longest {:.0} ms), steal {:.2} s in them",
            host.steal,
            host.stalls,
            host.longest * 1000.0,
            host.steal_in_stalls
        );
    }
    if let Some(disk) = &host.disk {
        println!(
            "  disk probe:          {} fsyncs of 4 KiB beside the server's, {} over 20 ms, longest {:.1} ms",
            disk.fsyncs,
            disk.slow,
            disk.longest * 1000.0
        );
    }

    // Every acknowledged message must be in its transcript exactly once. A message that got
    // no ack (an error) may or may not be stored — its client would resend it with its
    // client_msg_id, which this generator does not.
    let mut checked = 0;
    for (mut client, chat_id, customer, acked, failed) in finished.into_iter().take(50) {
        let t = client.get(&format!("/v1/chats/{chat_id}/transcript"), Some(&customer)).await?.ok()?;
        let messages = t["events"].as_array().map_or(0, |e| e.iter().filter(|e| e["kind"] == "message").count());
        if messages < acked || messages as u64 > acked as u64 + failed {
            bail!("chat {chat_id}: {acked} messages acknowledged and {failed} not, but {messages} in the transcript");
        }
        checked += 1;
    }
    let besides = if errors > 0 { ", besides at most the unacknowledged ones" } else { "" };
    println!("verified: {checked} transcripts hold exactly the acknowledged messages{besides}");
    if let Some((mut child, dir)) = own_server {
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// CPU seconds used by a process's threads, by thread name (threads of one name summed), and
/// seconds they waited runnable for a CPU (`/proc/.../schedstat`, where the kernel keeps it).
struct CpuTime {
    used: std::collections::BTreeMap<String, f64>,
    waited: std::collections::BTreeMap<String, f64>,
}

impl CpuTime {
    fn of_threads(pid: u32) -> Self {
        let mut by_name = std::collections::BTreeMap::new();
        let mut waited = std::collections::BTreeMap::new();
        // Clock ticks are 1/100 s on Linux.
        let ticks = 100.0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let (Ok(name), Ok(stat)) = (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("stat"))) else { continue };
            // Fields after the parenthesised name: utime and stime are the 12th and 13th.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let used: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
            let name = name.trim().to_string();
            // Nanoseconds on a CPU, then waiting on a run queue.
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            if let Some(ns) = schedstat.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()) {
                *waited.entry(name.clone()).or_insert(0.0) += ns / 1e9;
            }
            *by_name.entry(name).or_insert(0.0) += used / ticks;
        }
        Self { used: by_name, waited }
    }

    /// What each thread name used since `before`, busiest first, idle ones left out.
    fn since(&self, before: &Self) -> Vec<(String, f64)> {
        Self::delta(&self.used, &before.used)
    }

    /// How long each thread name waited for a CPU since `before`, longest first.
    fn waited_since(&self, before: &Self) -> Vec<(String, f64)> {
        Self::delta(&self.waited, &before.waited)
    }

    fn delta(now: &std::collections::BTreeMap<String, f64>, before: &std::collections::BTreeMap<String, f64>) -> Vec<(String, f64)> {
        let mut used: Vec<(String, f64)> =
            now.iter().map(|(name, s)| (name.clone(), s - before.get(name).copied().unwrap_or(0.0))).filter(|(_, s)| *s > 0.0).collect();
        used.sort_by(|a, b| b.1.total_cmp(&a.1));
        used
    }
}

/// Watches the machine during a run, apart from the load. A thread that wakes every 5 ms
/// notes how long each sleep really took and the CPU time the hypervisor gave to other guests
/// meanwhile (`steal` of `/proc/stat`): a gap with steal in it is the VM standing still. With
/// the instance's data directory, another thread writes 4 KiB and fsyncs it there every 50 ms:
/// a long one is the disk stalling under the server's commits too.
struct HostProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    machine: std::thread::JoinHandle<Option<MachineReport>>,
    disk: Option<std::thread::JoinHandle<std::io::Result<DiskReport>>>,
}

struct HostReport {
    machine: Option<MachineReport>,
    disk: Option<DiskReport>,
}

struct MachineReport {
    /// Seconds of CPU time stolen over the run, all CPUs.
    steal: f64,
    /// Wakeups more than 20 ms late, the longest gap (s), and the steal in those gaps.
    stalls: u32,
    longest: f64,
    steal_in_stalls: f64,
}

struct DiskReport {
    fsyncs: u32,
    /// Over 20 ms, and the longest (s).
    slow: u32,
    longest: f64,
}

impl HostProbe {
    fn start(data: Option<PathBuf>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let machine = std::thread::Builder::new()
            .name("host-probe".into())
            .spawn(move || {
                let first = Self::steal()?;
                let mut report = MachineReport { steal: 0.0, stalls: 0, longest: 0.0, steal_in_stalls: 0.0 };
                let (mut then, mut stolen) = (Instant::now(), first);
                while !stopped.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    let (now, steal) = (Instant::now(), Self::steal()?);
                    let gap = (now - then).as_secs_f64();
                    report.longest = report.longest.max(gap);
                    if gap > 0.020 {
                        report.stalls += 1;
                        report.steal_in_stalls += steal - stolen;
                    }
                    (then, stolen) = (now, steal);
                }
                report.steal = stolen - first;
                Some(report)
            })
            .expect("spawn the host probe");
        let stopped = stop.clone();
        let disk = data.map(|dir| {
            std::thread::Builder::new()
                .name("disk-probe".into())
                .spawn(move || {
                    use std::os::unix::fs::FileExt;
                    let path = dir.join(format!("bench-disk-probe-{}", std::process::id()));
                    let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
                    let page = [0x5a_u8; 4096];
                    let mut report = DiskReport { fsyncs: 0, slow: 0, longest: 0.0 };
                    while !stopped.load(Relaxed) {
                        let at = Instant::now();
                        file.write_all_at(&page, 0)?;
                        file.sync_all()?;
                        let took = at.elapsed().as_secs_f64();
                        report.fsyncs += 1;
                        report.slow += u32::from(took > 0.020);
                        report.longest = report.longest.max(took);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = std::fs::remove_file(&path);
                    Ok(report)
                })
                .expect("spawn the disk probe")
        });
        Self { stop, machine, disk }
    }

    fn stop(self) -> HostReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        HostReport {
            machine: self.machine.join().ok().flatten(),
            disk: self.disk.and_then(|d| d.join().ok()).and_then(Result::ok),
        }
    }

    /// Seconds stolen so far, all CPUs (None where `/proc/stat` is not there to read): the
    /// eighth number of its `cpu` line, in clock ticks of 1/100 s.
    fn steal() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: f64 = stat.lines().next()?.split_whitespace().nth(8)?.parse().ok()?;
        Some(ticks / 100.0)
    }
}

/// One acknowledged message: when it was due (µs into the measured window) and how long its
/// ack took from then.
#[derive(Clone, Copy)]
struct Sample {
    sent_us: u32,
    latency_us: u32,
    /// How late the generator itself sent, against the schedule (paced runs).
    late_us: u32,
}

/// An empty buffer for `capacity` samples whose memory is written through now: the first touch
/// of a fresh page costs a page fault, and for 1,000 chats' buffers that took both cores for
/// ~100 ms at the start of the measured window, counted as ack latency.
fn touched(capacity: usize) -> Vec<Sample> {
    let mut buffer = vec![Sample { sent_us: u32::MAX, latency_us: u32::MAX, late_us: u32::MAX }; capacity];
    buffer.clear();
    buffer
}

/// The value below which a share `p` of the sorted latencies (µs) lie, in ms.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1000.0
}

/// Writes the latency per 100 ms window of sending time; the worst window's start (ms) and p99.
fn write_timeline(path: &std::path::Path, samples: &mut [Sample]) -> std::io::Result<(u32, f64)> {
    use std::io::Write;
    samples.sort_unstable_by_key(|s| s.sent_us);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "window_ms,acks,p50_ms,p99_ms,max_ms")?;
    let mut worst = (0, 0.0);
    for window in samples.chunk_by(|a, b| a.sent_us / 100_000 == b.sent_us / 100_000) {
        let start = window[0].sent_us / 100_000 * 100;
        let mut latencies: Vec<u32> = window.iter().map(|s| s.latency_us).collect();
        latencies.sort_unstable();
        let p99 = percentile(&latencies, 0.99);
        if p99 > worst.1 {
            worst = (start, p99);
        }
        writeln!(out, "{start},{},{:.2},{p99:.2},{:.2}", latencies.len(), percentile(&latencies, 0.5), percentile(&latencies, 1.0))?;
    }
    out.flush()?;
    Ok(worst)
}

/// A process's resident memory (bytes) and its page faults so far (minor and major).
struct Memory {
    resident: u64,
    faults: u64,
}

impl Memory {
    fn of(pid: u32) -> Option<Memory> {
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // After the command's closing parenthesis: state is field 3, minflt 10, majflt 12.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (minor, major): (u64, u64) = (fields.get(7)?.parse().ok()?, fields.get(9)?.parse().ok()?);
        Some(Memory { resident: resident * 4096, faults: minor + major })
    }
}

/// Bytes a process caused to be written to storage so far (`write_bytes` of `/proc/<pid>/io`:
/// the WAL, checkpoints into the database file); 0 where unreadable.
fn written_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| io.lines().find_map(|l| l.strip_prefix("write_bytes:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// The instance's KPI counters (empty if it does not answer).
async fn kpi(target: &str) -> serde_json::Value {
    let mut c = Client::new(target);
    match c.get("/v1/kpi", None).await {
        Ok(r) if r.status == 200 => r.body,
        _ => serde_json::Value::Null,
    }
}

/// One of the instance's cumulative latency histograms: (bucket bound in seconds, count), the
/// last bucket unbounded; empty if it does not answer.
async fn server_histogram(target: &str, name: &str) -> Vec<(f64, u64)> {
    let mut c = Client::new(target);
    let Ok(r) = c.get("/metrics", None).await else { return Vec::new() };
    let Some(text) = r.body.as_str() else { return Vec::new() };
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with("_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count))
        })
        .collect()
}

async fn start_instance(synchronous: &str, deployment: Option<&std::path::Path>) -> anyhow::Result<(tokio::process::Child, String, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("parley-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = match deployment {
        Some(d) => {
            if let Some(c) = crate::config::Deployment::from_file(d)?.cassandra {
                crate::storage::cassandra::init_schema(&c).await.map_err(anyhow::Error::msg)?;
            }
            d.to_path_buf()
        }
        None => {
            let config = dir.join("bench.toml");
            // A load test: no per-participant rate limit.
            std::fs::write(&config, format!("[sqlite]\nsynchronous = \"{synchronous}\"\n[limits]\nmessages_per_second = 0\n"))?;
            config
        }
    };
    let instance = LocalInstance::start(&dir.join("data"), Some(&config), "127.0.0.1:0", &[("PARLEY_AGENT_TOKEN", "bench-agent-token")]).await?;
    Ok((instance.child, instance.addr, dir))
}

/// Formats one message request; the same buffer is reused for every message of a chat.
fn message_request(out: &mut String, authority: &str, chat_id: &str, token: &str, text: &str, n: u64) {
    use std::fmt::Write;
    out.clear();
    let body_len = r#"{"text":"","client_msg_id":"m"}"#.len() + text.len() + n.to_string().len();
    let _ = write!(
        out,
        "POST /v1/chats/{chat_id}/messages HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n\r\n{{\"text\":\"{text}\",\"client_msg_id\":\"m{n}\"}}"
    );
}

/// The load generator's sending side. HTTP/1.1: one keep-alive connection per chat that writes
/// a prepared request and reads just the status and the body length of the answer (a full
/// client, `crate::client`, costs the generator about as much CPU as the server spends, on
/// the same two cores; like wrk, the generator should measure the server, not itself).
/// HTTP/2: a hyper client connection shared by many chats.
enum Sender {
    Http1 { stream: tokio::net::TcpStream, buf: Vec<u8> },
    Http2(Http2Sender),
}

type Http2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

impl Sender {
    async fn connect(authority: &str) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        Ok(Self::Http1 { stream, buf: Vec::with_capacity(1024) })
    }

    async fn connect_http2(authority: &str) -> anyhow::Result<Http2Sender> {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// A new connection after one failed (for HTTP/2, one of the chat's own).
    async fn reconnect(&self, authority: &str) -> anyhow::Result<Self> {
        match self {
            Sender::Http1 { .. } => Ok(Self::connect(authority).await?),
            Sender::Http2(_) => Ok(Sender::Http2(Self::connect_http2(authority).await?)),
        }
    }

    /// Sends message `n` of a chat; the answer's status. `request`: a buffer kept per chat.
    async fn send_message(&mut self, request: &mut String, authority: &str, chat_id: &str, token: &str, text: &str, n: u64) -> anyhow::Result<u16> {
        match self {
            Sender::Http1 { .. } => {
                message_request(request, authority, chat_id, token, text, n);
                Ok(self.exchange(request.as_bytes()).await?)
            }
            Sender::Http2(sender) => {
                use std::fmt::Write;
                request.clear();
                let _ = write!(request, "{{\"text\":\"{text}\",\"client_msg_id\":\"m{n}\"}}");
                let req = hyper::Request::post(format!("http://{authority}/v1/chats/{chat_id}/messages"))
                    .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(request.as_bytes())))?;
                sender.ready().await?;
                let response = sender.send_request(req).await?;
                let status = response.status().as_u16();
                http_body_util::BodyExt::collect(response.into_body()).await?;
                Ok(status)
            }
        }
    }

    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Sender::Http1 { stream, buf } = self else { unreachable!("HTTP/1.1 only") };
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        stream.write_all(request).await?;
        buf.clear();
        loop {
            if stream.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("response head is not UTF-8"))?;
            let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status"))?;
            let length: usize = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim()))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no content-length"))?;
            while buf.len() < end + 4 + length {
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            return Ok(status);
        }
    }
}
