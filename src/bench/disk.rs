//! `parley bench disk`: what the disk under `--data` does to durable acks, without Parley.
//! A message is acknowledged once the group commit holding it is on disk: with synchronous =
//! full, after the WAL's fsync. This writes commit-sized appends and fsyncs them back to back,
//! like the store thread under load, and reports how long each fsync took.
//!
//! From those it gives a floor under the ack latency of any server on this disk: a message
//! arriving while an fsync is under way joins the next commit, so when an fsync takes `d` ms,
//! the messages of its first `d - objective` ms wait longer than the objective, whatever the
//! server does. If those stretches add up to more than 1% of the time, a p99 under the
//! objective is out of reach at that moment.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Directory on the disk to measure (an instance's --data); default: the temp directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes written before each fsync: a group commit's WAL frames (about 12 frames of 4 KiB
    /// per commit at 20,000 msg/s).
    #[arg(long, default_value_t = 12 * 4120)]
    pub commit_bytes: usize,
    /// The ack latency objective the floor is computed for, in ms.
    #[arg(long, default_value_t = 20)]
    pub objective_ms: u64,
}

/// The file wraps around at this size, as the WAL starts over after a checkpoint.
const FILE_BYTES: u64 = 64 << 20;

pub fn run(o: Options) -> anyhow::Result<()> {
    let dir = o.data.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("parley-bench-disk-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let result = measure(&mut file, &o);
    let _ = std::fs::remove_file(&path);
    let (fsyncs, elapsed) = result?;
    report(&fsyncs, elapsed, &o, &path);
    Ok(())
}

/// Each fsync: when it started (since the first) and how long it took.
fn measure(file: &mut std::fs::File, o: &Options) -> std::io::Result<(Vec<(Duration, Duration)>, Duration)> {
    use std::io::Seek;
    let commit = vec![0x5a_u8; o.commit_bytes.max(1)];
    let mut fsyncs = Vec::with_capacity(100_000);
    let started = Instant::now();
    let until = started + Duration::from_secs(o.seconds);
    let mut offset = 0;
    while Instant::now() < until {
        if offset + commit.len() as u64 > FILE_BYTES {
            file.rewind()?;
            offset = 0;
        }
        let at = Instant::now();
        file.write_all(&commit)?;
        file.sync_all()?;
        fsyncs.push((at - started, at.elapsed()));
        offset += commit.len() as u64;
    }
    Ok((fsyncs, started.elapsed()))
}

fn report(fsyncs: &[(Duration, Duration)], elapsed: Duration, o: &Options, path: &std::path::Path) {
    let objective = Duration::from_millis(o.objective_ms);
    let mut took: Vec<u32> = fsyncs.iter().map(|(_, d)| d.as_micros().min(u32::MAX as u128) as u32).collect();
    took.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| super::percentile(&took, p);
    let slow: Vec<&(Duration, Duration)> = fsyncs.iter().filter(|(_, d)| *d > objective).collect();
    let blocked: Duration = slow.iter().map(|(_, d)| *d - objective).sum();
    let share = blocked.as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
    println!(
        "parley bench disk: {:.1} s of {} KiB writes + fsync, back to back, in {}",
        elapsed.as_secs_f64(),
        o.commit_bytes / 1024,
        path.parent().unwrap_or(path).display()
    );
    println!("fsyncs:                {} ({:.0}/s)", took.len(), took.len() as f64 / elapsed.as_secs_f64());
    println!("fsync ms:              p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}", pct(0.50), pct(0.99), pct(0.999), pct(1.0));
    let mut worst = slow.clone();
    worst.sort_unstable_by_key(|(_, d)| std::cmp::Reverse(*d));
    let worst: Vec<String> = worst.iter().take(5).map(|(at, d)| format!("{:.0} ms at {:.1} s", ms(*d), at.as_secs_f64())).collect();
    println!("over {} ms:            {} ({})", o.objective_ms, slow.len(), if worst.is_empty() { "none".to_string() } else { worst.join(", ") });
    println!(
        "ack floor:             for {:.1}% of the time a message arriving could not be on disk within {} ms ({:.0} ms of {:.1} s); a p99 under {} ms needs under 1%",
        share * 100.0,
        o.objective_ms,
        ms(blocked),
        elapsed.as_secs_f64(),
        o.objective_ms
    );
}
