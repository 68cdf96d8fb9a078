//! The N+1 cluster as one instance sees it: its lease in the shared store (renewed on a timer,
//! and the fence every save checks), the other members and the addresses they advertise, and
//! the secret instances present when they pass a request on to a chat's owner.
//!
//! Ownership rules (ARCHITECTURE.md, guarantee 4): a chat belongs to one instance at one
//! epoch. Another instance may claim it only once the owner's lease has run out, and the
//! claim moves the epoch on, so the store refuses any later write of the old owner. The
//! owner stops writing as soon as it no longer knows its lease to be live, which is earlier
//! than the lease can run out in the store.

use crate::chat::event::now_ms;
use crate::config::ClusterSection;
use crate::kpi::Kpi;
use crate::plugins::slots::StoreSlot;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// This instance's own view of its lease, on the monotonic clock.
pub struct Lease {
    origin: Instant,
    /// Nanoseconds after `origin` until which the lease is known to be live; 0 = not live.
    live_until_ns: AtomicU64,
    /// Renewals that found the lease lapsed: a write that saw the same count before and after,
    /// with the lease live after, was made under one unbroken lease.
    gaps: AtomicU64,
}

impl Default for Lease {
    fn default() -> Self {
        Self::new()
    }
}

impl Lease {
    pub fn new() -> Self {
        Self { origin: Instant::now(), live_until_ns: AtomicU64::new(0), gaps: AtomicU64::new(0) }
    }

    pub fn is_live(&self) -> bool {
        (self.origin.elapsed().as_nanos() as u64) < self.live_until_ns.load(Ordering::Acquire)
    }

    /// How many times the lease was renewed after a gap (see `gaps`). A write is covered by
    /// one unbroken lease if the count read before its fence check equals the count read after
    /// it, read after `is_live` (a renewal counts its gap before it makes the lease live again).
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Acquire)
    }

    /// A renewal that was sent at `sent` succeeded: the store's lease runs `ttl` from some
    /// moment after `sent`, so counting from `sent` errs on the safe side. `gap`: the lease
    /// was not live when the renewal was sent.
    fn renewed(&self, sent: Instant, live_for: Duration, gap: bool) {
        if gap {
            self.gaps.fetch_add(1, Ordering::AcqRel);
        }
        let until = (sent - self.origin + live_for).as_nanos() as u64;
        self.live_until_ns.store(until, Ordering::Release);
    }

    /// Stops writing at once (graceful stop).
    pub fn end(&self) {
        self.live_until_ns.store(0, Ordering::Release);
    }
}

/// Another instance, as its lease row last said.
#[derive(Debug, Clone)]
pub struct Peer {
    pub instance_id: String,
    pub address: String,
    pub lease_expires_ms: u64,
}

impl Peer {
    pub fn is_live(&self) -> bool {
        self.lease_expires_ms > now_ms()
    }
}

pub struct Cluster {
    pub instance_id: Arc<str>,
    incarnation: String,
    pub address: String,
    pub lease: Arc<Lease>,
    lease_ms: u64,
    renew_ms: u64,
    /// Whether this instance has held its lease without a gap since it last dropped its chats.
    held: std::sync::atomic::AtomicBool,
    /// The renewing task, stopped before the lease is given up (see `leave`).
    renewing: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    peers: RwLock<HashMap<String, Peer>>,
    secret: String,
    store: StoreSlot,
    kpi: Arc<Kpi>,
}

impl Cluster {
    /// Takes this instance's lease. If a previous process with the same instance id still
    /// holds it (a restart right after a crash), waits for it to run out, up to one lease time.
    pub async fn join(
        instance_id: Arc<str>,
        address: String,
        settings: &ClusterSection,
        secret: String,
        (store, lease): (StoreSlot, Arc<Lease>),
        kpi: Arc<Kpi>,
    ) -> Result<Arc<Self>, String> {
        let cluster = Arc::new(Self {
            instance_id,
            incarnation: crate::auth::new_id(),
            address,
            lease,
            lease_ms: settings.lease_ms,
            renew_ms: settings.renew_ms,
            held: std::sync::atomic::AtomicBool::new(false),
            renewing: std::sync::Mutex::new(None),
            peers: RwLock::new(HashMap::new()),
            secret,
            store,
            kpi,
        });
        let give_up = Instant::now() + Duration::from_millis(settings.lease_ms * 2 + 1000);
        loop {
            match cluster.renew(&|| {}).await {
                Ok(()) => break,
                Err(problem) if Instant::now() < give_up => {
                    warn!(event_id = "lease.waiting", cause = %problem, "waiting for this instance id's previous lease to run out");
                    tokio::time::sleep(Duration::from_millis(settings.renew_ms)).await;
                }
                Err(problem) => return Err(format!("cannot take this instance's lease: {problem}")),
            }
        }
        let peers = cluster.peers.read().unwrap().values().filter(|p| p.is_live()).count();
        info!(event_id = "cluster.joined", address = %cluster.address, live_members = peers, "joined the cluster");
        Ok(cluster)
    }

    /// Renews the lease every `renew_ms`. If the lease was not known to be live at some
    /// moment since the last renewal (the store was unreachable, or this process was
    /// stopped), every chat here may have been restored elsewhere: `on_lapse` drops them all
    /// before the renewed lease lets writing resume.
    pub fn keep_renewing(self: &Arc<Self>, on_lapse: impl Fn() + Send + Sync + 'static) {
        let cluster = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(cluster.renew_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(problem) = cluster.renew(&on_lapse).await {
                    warn!(event_id = "lease.renew_failed", cause = %problem, "renewing this instance's lease failed");
                }
            }
        });
        *self.renewing.lock().unwrap() = Some(task);
    }

    async fn renew(&self, on_lapse: &(dyn Fn() + Send + Sync)) -> Result<(), String> {
        let sent = Instant::now();
        // Known live when this renewal is sent: it extends the lease without a gap.
        let gap = !self.lease.is_live();
        let members = self.store.renew_lease(&self.instance_id, &self.incarnation, &self.address, now_ms(), self.lease_ms).await;
        let members = match members {
            Ok(m) => m,
            Err(e) => {
                self.kpi.lease_renewal_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e.message);
            }
        };
        if gap && self.held.swap(false, Ordering::AcqRel) {
            error!(event_id = "lease.lapsed", "this instance's lease lapsed: dropping its chats, which other instances may have restored");
            on_lapse();
        }
        // Stop writing a quarter lease before the store's lease could run out: room for a
        // save that started just in time, and for clock drift between hosts.
        self.lease.renewed(sent, Duration::from_millis(self.lease_ms - self.lease_ms / 4), gap);
        if self.lease.is_live() && !self.held.swap(true, Ordering::AcqRel) {
            info!(event_id = "lease.held", "this instance holds its lease");
        }
        let peers = members
            .into_iter()
            .map(|m| (m.instance_id.clone(), Peer { instance_id: m.instance_id, address: m.address, lease_expires_ms: m.lease_expires_ms }))
            .collect();
        *self.peers.write().unwrap() = peers;
        self.kpi.lease_renewals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Gives the lease up (graceful stop): the other instances may restore this one's chats
    /// at once instead of waiting for the lease to run out.
    pub async fn leave(&self) {
        self.lease.end();
        // A renewal sent after the release would take the lease again, by the same incarnation,
        // for a whole lease: the chats would wait for it to run out. Stop the renewing task and
        // wait until it has stopped, so any renewal it sent is in the store's queue before the
        // release (the store answers them in order).
        let renewing = self.renewing.lock().unwrap().take();
        if let Some(task) = renewing {
            task.abort();
            let _ = task.await;
        }
        if let Err(e) = self.store.release_lease(&self.instance_id, &self.incarnation).await {
            warn!(event_id = "lease.release_failed", cause = %e, "could not release the lease; it runs out by itself");
        }
    }

    pub fn peer(&self, instance_id: &str) -> Option<Peer> {
        self.peers.read().unwrap().get(instance_id).cloned()
    }

    /// Every member row, live or not, for `/v1/cluster`.
    pub fn members(&self) -> Vec<Peer> {
        let mut all: Vec<Peer> = self.peers.read().unwrap().values().cloned().collect();
        all.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        all
    }

    /// Records what a claim learnt: the owner's lease runs until `expires_ms`.
    pub fn saw_lease(&self, instance_id: &str, expires_ms: u64) {
        if let Some(p) = self.peers.write().unwrap().get_mut(instance_id) {
            p.lease_expires_ms = p.lease_expires_ms.max(expires_ms);
        }
    }

    /// Resolves once `instance_id`'s lease, as renewals and claims report it, has run out.
    pub async fn lease_ran_out(&self, instance_id: &str) {
        loop {
            let left = self.peer(instance_id).map_or(0, |p| p.lease_expires_ms.saturating_sub(now_ms()));
            if left == 0 {
                return;
            }
            // Wake at the expiry we know of, or at the next renewal that may have moved it.
            tokio::time::sleep(Duration::from_millis(left.min(self.renew_ms) + 5)).await;
        }
    }

    /// The longest a request waits for a dead owner's lease to run out before it is restored.
    pub fn failover_wait(&self) -> Duration {
        Duration::from_millis(self.lease_ms * 2 + 2000)
    }

    pub fn renew_period(&self) -> Duration {
        Duration::from_millis(self.renew_ms)
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether `presented` is the cluster secret (constant-time).
    pub fn is_member_secret(&self, presented: &str) -> bool {
        crate::auth::same(&crate::auth::hash(presented), &crate::auth::hash(&self.secret))
    }
}

/// The cluster secret of a data directory: read from `<data>/cluster.key`, created on the
/// first start (readable by its owner only). Instances on one host share it through the
/// directory; across hosts, set `cluster.secret` in the deployment.
pub fn secret_of(data: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data.join("cluster.key");
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut f) => {
            let secret = crate::auth::new_token().0;
            f.write_all(secret.as_bytes())?;
            f.sync_all()?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another instance may be writing it this very moment.
            for _ in 0..50 {
                let s = std::fs::read_to_string(&path)?;
                if !s.trim().is_empty() {
                    return Ok(s.trim().to_string());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::io::Error::other(format!("{} is empty", path.display())))
        }
        Err(e) => Err(e),
    }
}
