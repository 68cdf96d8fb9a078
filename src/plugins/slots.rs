//! One worker thread per plugin slot. Each owns its plugin instance and takes jobs from a
//! channel, draining everything queued into one plugin call: the store slot's group commit
//! (one `save` call, one SQLite transaction, for every chat with unsaved events), and one
//! `decide` / `handle` call for all pending policy and notice work.

use super::bindings::notices::{Audience, Notice};
use super::bindings::policy::{Decision, ErrorKind, SaveFailure};
use super::bindings::store::{ClaimOutcome, ClaimRequest, Location, Member};
use super::bindings::types::{ChatDelta, StoreError, Transcript};
use super::bindings::{NoticeHandler, SaveErrorPolicy, TranscriptStore};
use super::{Instance, PluginFault};
use crate::cluster::Lease;
use crate::kpi::Kpi;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Why a storage operation failed, as the policy sees it.
#[derive(Debug, Clone)]
pub struct StorageError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::StaleEpoch(_) => ErrorKind::StaleEpoch,
            StoreError::Invalid(_) => ErrorKind::Invalid,
            StoreError::Internal(_) => ErrorKind::Internal,
        };
        StorageError { kind, message: store_error_message(&e) }
    }
}

impl From<PluginFault> for StorageError {
    fn from(f: PluginFault) -> Self {
        StorageError { kind: ErrorKind::PluginFault, message: f.to_string() }
    }
}

pub fn store_error_message(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(m) => format!("storage unavailable: {m}"),
        StoreError::StaleEpoch(m) => format!("stale epoch: {m}"),
        StoreError::Invalid(m) => format!("invalid: {m}"),
        StoreError::Internal(m) => format!("storage error: {m}"),
    }
}

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

enum StoreJob {
    Save(ChatDelta, Reply<()>),
    Claim { owner: String, request: ClaimRequest, reply: Reply<ClaimOutcome> },
    Load(String, Reply<Option<Transcript>>),
    Locate(String, Reply<Option<Location>>),
    RenewLease { instance_id: String, incarnation: String, address: String, now_ms: u64, ttl_ms: u64, reply: Reply<Vec<Member>> },
    ReleaseLease { instance_id: String, incarnation: String, reply: Reply<()> },
    SaveFinal(Transcript, Reply<()>),
    Purge(String, Reply<()>),
    /// A reloaded plugin: used for every call after the ones already taken.
    Replace(Box<Instance<TranscriptStore>>),
}

/// A handle on a store slot (`intermediate` or `final`).
#[derive(Clone)]
pub struct StoreSlot {
    jobs: mpsc::UnboundedSender<StoreJob>,
}

impl StoreSlot {
    /// `fence`: saves are refused while this instance's lease is not known to be live, so a
    /// stalled or cut-off instance stops writing before another one may take its chats.
    pub fn spawn(instance: Instance<TranscriptStore>, max_batch: usize, kpi: Arc<Kpi>, fence: Option<Arc<Lease>>) -> Self {
        let name = format!("parley-{}", instance.plugin.slot.name());
        Self::spawn_named(name, instance, max_batch, kpi, fence)
    }

    /// A worker of its own for lease renewals, so they never queue behind a wave of saves,
    /// claims and loads: a renewal that waits too long would fence the whole instance.
    pub fn spawn_for_leases(instance: Instance<TranscriptStore>, kpi: Arc<Kpi>) -> Self {
        Self::spawn_named("parley-lease".into(), instance, 1, kpi, None)
    }

    fn spawn_named(name: String, instance: Instance<TranscriptStore>, max_batch: usize, kpi: Arc<Kpi>, fence: Option<Arc<Lease>>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_worker(name, move || {
            ask_for_short_slices();
            run_store(instance, rx, max_batch, kpi, fence)
        });
        Self { jobs: tx }
    }

    async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> StoreJob) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(job(tx)).map_err(|_| StorageError::from(PluginFault::Gone))?;
        rx.await.unwrap_or_else(|_| Err(PluginFault::Gone.into()))
    }

    /// Queues one chat's delta for the next group commit; the receiver resolves when the
    /// commit that carried it finished. Each chat has at most one save in flight, so the
    /// queue is bounded by the number of chats.
    pub fn submit_save(&self, delta: ChatDelta) -> oneshot::Receiver<Result<(), StorageError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(StoreJob::Save(_, tx))) = self.jobs.send(StoreJob::Save(delta, tx)) {
            let _ = tx.send(Err(PluginFault::Gone.into()));
        }
        rx
    }
    /// Claims a chat for `owner` (this instance); the worker batches the claims queued together
    /// into one call, judged against the wall clock at that call.
    pub async fn claim(&self, chat_id: &str, owner: &str, expected_epoch: u64) -> Result<ClaimOutcome, StorageError> {
        let request = ClaimRequest { chat_id: chat_id.into(), expected_epoch };
        self.ask(|reply| StoreJob::Claim { owner: owner.into(), request, reply }).await
    }
    pub async fn load(&self, chat_id: &str) -> Result<Option<Transcript>, StorageError> {
        self.ask(|r| StoreJob::Load(chat_id.into(), r)).await
    }
    pub async fn locate(&self, chat_id: &str) -> Result<Option<Location>, StorageError> {
        self.ask(|r| StoreJob::Locate(chat_id.into(), r)).await
    }
    pub async fn renew_lease(&self, instance_id: &str, incarnation: &str, address: &str, now_ms: u64, ttl_ms: u64) -> Result<Vec<Member>, StorageError> {
        self.ask(|reply| StoreJob::RenewLease {
            instance_id: instance_id.into(),
            incarnation: incarnation.into(),
            address: address.into(),
            now_ms,
            ttl_ms,
            reply,
        })
        .await
    }
    pub async fn release_lease(&self, instance_id: &str, incarnation: &str) -> Result<(), StorageError> {
        self.ask(|reply| StoreJob::ReleaseLease { instance_id: instance_id.into(), incarnation: incarnation.into(), reply }).await
    }
    pub async fn save_final(&self, transcript: Transcript) -> Result<(), StorageError> {
        self.ask(|r| StoreJob::SaveFinal(transcript, r)).await
    }
    pub async fn purge(&self, chat_id: &str) -> Result<(), StorageError> {
        self.ask(|r| StoreJob::Purge(chat_id.into(), r)).await
    }
    pub fn replace(&self, instance: Instance<TranscriptStore>) {
        let _ = self.jobs.send(StoreJob::Replace(Box::new(instance)));
    }
}

async fn run_store(mut instance: Instance<TranscriptStore>, mut rx: mpsc::UnboundedReceiver<StoreJob>, max_batch: usize, kpi: Arc<Kpi>, fence: Option<Arc<Lease>>) {
    // The intermediate store's answers (and its lease renewals) tell whether storage is up.
    let watches_storage = instance.plugin.slot == super::Slot::Intermediate;
    let mut jobs = Vec::with_capacity(max_batch);
    let mut deltas = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut jobs, max_batch).await > 0 {
        // Saves, and loads (a wave of restores), queued together go in one call each.
        let mut load_ids = Vec::new();
        let mut load_replies = Vec::new();
        let mut locate_ids = Vec::new();
        let mut locate_replies = Vec::new();
        let mut claims: HashMap<String, (Vec<ClaimRequest>, Vec<Reply<ClaimOutcome>>)> = HashMap::new();
        let mut others = Vec::new();
        for job in jobs.drain(..) {
            match job {
                StoreJob::Save(delta, reply) => {
                    deltas.push(delta);
                    replies.push(reply);
                }
                StoreJob::Load(id, reply) => {
                    load_ids.push(id);
                    load_replies.push(reply);
                }
                StoreJob::Locate(id, reply) => {
                    locate_ids.push(id);
                    locate_replies.push(reply);
                }
                StoreJob::Claim { owner, request, reply } => {
                    let (requests, replies) = claims.entry(owner).or_default();
                    requests.push(request);
                    replies.push(reply);
                }
                other => others.push(other),
            }
        }
        // Read before the fence check: a lapse and renewal between this and the check shows
        // after the save as a changed count, and the acks are withheld.
        let gaps = fence.as_ref().map(|lease| lease.gaps());
        if !deltas.is_empty() && fence.as_ref().is_some_and(|lease| !lease.is_live()) {
            // Self-fencing: past the point where this instance knows its lease to be live,
            // another instance may already be restoring these chats. Write nothing.
            kpi.writes_fenced.fetch_add(deltas.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let refused = StoreError::StaleEpoch("this instance's lease is not live; it does not write".into());
            answer("save", replies.drain(..), Ok(deltas.drain(..).map(|_| Err(refused.clone())).collect()));
        }
        if !deltas.is_empty() {
            let started = Instant::now();
            let mut result = instance.call(async |b, s| b.parley_plugin_store().call_save(s, &deltas).await).await;
            kpi.record_save_batch(deltas.iter().map(|d| d.events.len()).sum(), started.elapsed());
            if let (Some(lease), Ok(results)) = (&fence, &mut result)
                && !(lease.is_live() && Some(lease.gaps()) == gaps)
            {
                // The lease lapsed while the save ran (this process was paused, or the store
                // took longer than the quarter lease the fence leaves): a new owner may have
                // claimed these chats and loaded them before the write arrived — a store whose
                // writes are not fenced by epoch (Cassandra) would then keep the new owner's
                // rows, not these. Withhold the acks: the clients resend, and whoever owns the
                // chat recognises by client_msg_id what it loaded.
                let lapsed = StoreError::StaleEpoch("this instance's lease lapsed during the save; not acknowledged".into());
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(lapsed.clone());
                    kpi.writes_fenced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if let (true, Ok(results)) = (watches_storage, &result) {
                match results.iter().find_map(|r| match r {
                    Err(StoreError::Unavailable(m)) => Some(m),
                    _ => None,
                }) {
                    Some(cause) => kpi.storage_reached(false, cause),
                    None => kpi.storage_reached(true, ""),
                }
            }
            if result.is_err() && deltas.len() > 1 {
                // One chat's delta may have made the plugin trap, loop or blow its memory:
                // resend each alone so only that chat's save fails.
                for (delta, reply) in deltas.drain(..).zip(replies.drain(..)) {
                    let one = std::slice::from_ref(&delta);
                    let r = instance.call(async |b, s| b.parley_plugin_store().call_save(s, one).await).await;
                    answer("save", [reply], r);
                }
            } else {
                answer("save", replies.drain(..), result);
            }
            deltas.clear();
        }
        for (owner, (requests, replies)) in claims {
            let now = crate::chat::event::now_ms();
            let result = instance.call(async |b, s| b.parley_plugin_store().call_claim(s, &owner, &requests, now).await).await;
            answer("claim", replies, result);
        }
        // A wave of restores can ask for more transcripts than fit the plugin's memory (or its
        // deadline) at once: a call that faults is split in halves, down to one chat, so only
        // a transcript too big on its own fails.
        let mut parts = vec![(load_ids.as_slice(), load_replies)];
        while let Some((ids, replies)) = parts.pop() {
            if ids.is_empty() {
                continue;
            }
            match instance.call(async |b, s| b.parley_plugin_store().call_load(s, ids).await).await {
                Err(_) if ids.len() > 1 => {
                    let mut first = replies;
                    let second = first.split_off(ids.len() / 2);
                    let (a, b) = ids.split_at(ids.len() / 2);
                    parts.push((b, second));
                    parts.push((a, first));
                }
                result => answer("load", replies, result),
            }
        }
        if !locate_ids.is_empty() {
            let result = instance.call(async |b, s| b.parley_plugin_store().call_locate(s, &locate_ids).await).await;
            answer("locate", locate_replies, result);
        }
        for job in others {
            match job {
                StoreJob::Save(..) | StoreJob::Load(..) | StoreJob::Locate(..) | StoreJob::Claim { .. } => unreachable!("sorted into their batches above"),
                StoreJob::RenewLease { instance_id, incarnation, address, now_ms, ttl_ms, reply } => {
                    let r = instance
                        .call(async |b, s| b.parley_plugin_store().call_renew_lease(s, &instance_id, &incarnation, &address, now_ms, ttl_ms).await)
                        .await;
                    match &r {
                        Ok(Err(StoreError::Unavailable(cause))) => kpi.storage_reached(false, cause),
                        Ok(Ok(_)) => kpi.storage_reached(true, ""),
                        _ => {}
                    }
                    let _ = reply.send(flatten(r));
                }
                StoreJob::ReleaseLease { instance_id, incarnation, reply } => {
                    let r = instance.call(async |b, s| b.parley_plugin_store().call_release_lease(s, &instance_id, &incarnation).await).await;
                    let _ = reply.send(flatten(r));
                }
                StoreJob::SaveFinal(transcript, reply) => {
                    let r = instance.call(async |b, s| b.parley_plugin_store().call_save_final(s, &transcript).await).await;
                    let _ = reply.send(flatten(r));
                }
                StoreJob::Purge(chat_id, reply) => {
                    let r = instance.call(async |b, s| b.parley_plugin_store().call_purge(s, &chat_id).await).await;
                    let _ = reply.send(flatten(r));
                }
                StoreJob::Replace(new) => instance = *new,
            }
        }
    }
}

/// Sends each caller its result from one batch call: a plugin fault, or a plugin that
/// answers with the wrong number of results, fails every caller in the batch.
fn answer<T>(what: &str, replies: impl IntoIterator<Item = Reply<T>>, result: Result<Vec<Result<T, StoreError>>, PluginFault>) {
    let replies: Vec<Reply<T>> = replies.into_iter().collect();
    match result {
        Ok(results) if results.len() == replies.len() => {
            for (r, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(r.map_err(StorageError::from));
            }
        }
        Ok(results) => {
            let fault = PluginFault::Trap(format!("{what} returned {} results for {} chats", results.len(), replies.len()));
            for reply in replies {
                let _ = reply.send(Err(fault.clone().into()));
            }
        }
        Err(fault) => {
            for reply in replies {
                let _ = reply.send(Err(fault.clone().into()));
            }
        }
    }
}

fn flatten<T>(r: Result<Result<T, StoreError>, PluginFault>) -> Result<T, StorageError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(f) => Err(f.into()),
    }
}

enum PolicyJob {
    Decide(SaveFailure, oneshot::Sender<Decision>),
    Replace(Box<Instance<SaveErrorPolicy>>),
}

/// A handle on the save-error-policy slot.
#[derive(Clone)]
pub struct PolicySlot {
    jobs: mpsc::Sender<PolicyJob>,
}

impl PolicySlot {
    pub fn spawn(instance: Instance<SaveErrorPolicy>) -> Self {
        let (tx, rx) = mpsc::channel(16 * 1024);
        spawn_worker("parley-save-error-policy".into(), move || run_policy(instance, rx));
        Self { jobs: tx }
    }

    pub async fn decide(&self, failure: SaveFailure) -> Decision {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(PolicyJob::Decide(failure, tx)).await.is_err() {
            return Decision::Close("the save-error policy is not running".into());
        }
        rx.await.unwrap_or_else(|_| Decision::Close("the save-error policy is not running".into()))
    }

    pub async fn replace(&self, instance: Instance<SaveErrorPolicy>) {
        let _ = self.jobs.send(PolicyJob::Replace(Box::new(instance))).await;
    }
}

async fn run_policy(mut instance: Instance<SaveErrorPolicy>, mut rx: mpsc::Receiver<PolicyJob>) {
    let mut jobs = Vec::new();
    while rx.recv_many(&mut jobs, 1024).await > 0 {
        let mut failures = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        let mut replacement = None;
        for job in jobs.drain(..) {
            match job {
                PolicyJob::Decide(f, reply) => {
                    failures.push(f);
                    replies.push(reply);
                }
                PolicyJob::Replace(new) => replacement = Some(new),
            }
        }
        if !failures.is_empty() {
            let decisions = match instance.call(async |b, s| b.parley_plugin_policy().call_decide(s, &failures).await).await {
                Ok(d) if d.len() == failures.len() => d,
                Ok(_) => vec![Decision::Close("the save-error policy answered with the wrong number of decisions".into()); failures.len()],
                // A broken policy must not keep a chat open on unsaved messages: close.
                Err(fault) => vec![Decision::Close(format!("the save-error policy failed ({fault})")); failures.len()],
            };
            for (decision, reply) in decisions.into_iter().zip(replies) {
                let _ = reply.send(decision);
            }
        }
        if let Some(new) = replacement {
            instance = *new;
        }
    }
}

/// Where the deliveries for one chat go.
pub trait NoticeSink: Send + Sync {
    fn deliver(&self, audience: Audience, text: String);
}

enum NoticeJob {
    Raise(Notice, Arc<dyn NoticeSink>),
    Replace(Box<Instance<NoticeHandler>>),
}

/// A handle on the notice-handler slot. Raising a notice never waits for the plugin.
#[derive(Clone)]
pub struct NoticeSlot {
    jobs: mpsc::UnboundedSender<NoticeJob>,
}

impl NoticeSlot {
    pub fn spawn(instance: Instance<NoticeHandler>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_worker("parley-notice-handler".into(), move || run_notices(instance, rx));
        Self { jobs: tx }
    }

    pub fn raise(&self, notice: Notice, sink: Arc<dyn NoticeSink>) {
        let _ = self.jobs.send(NoticeJob::Raise(notice, sink));
    }

    pub fn replace(&self, instance: Instance<NoticeHandler>) {
        let _ = self.jobs.send(NoticeJob::Replace(Box::new(instance)));
    }
}

async fn run_notices(mut instance: Instance<NoticeHandler>, mut rx: mpsc::UnboundedReceiver<NoticeJob>) {
    let mut jobs = Vec::new();
    while rx.recv_many(&mut jobs, 1024).await > 0 {
        let mut sinks: HashMap<String, Arc<dyn NoticeSink>> = HashMap::with_capacity(jobs.len());
        let mut notices = Vec::with_capacity(jobs.len());
        let mut replacement = None;
        for job in jobs.drain(..) {
            match job {
                NoticeJob::Raise(n, sink) => {
                    sinks.insert(n.chat_id.clone(), sink);
                    notices.push(n);
                }
                NoticeJob::Replace(new) => replacement = Some(new),
            }
        }
        if !notices.is_empty() {
            // On a fault nothing is delivered (the instance logged it): notices are advisory.
            if let Ok(deliveries) = instance.call(async |b, s| b.parley_plugin_notices().call_handle(s, &notices).await).await {
                for d in deliveries {
                    if let Some(sink) = sinks.get(&d.chat_id) {
                        sink.deliver(d.audience, d.text);
                    }
                }
            }
        }
        if let Some(new) = replacement {
            instance = *new;
        }
    }
}

/// Asks the kernel's scheduler (EEVDF, Linux 6.12 and later) for 0.1 ms slices for the calling
/// thread, instead of the default 1.4 ms or more. Its share of the CPU stays the same (and so
/// does its nice value); a shorter slice gives it earlier deadlines, so when it wakes (a batch
/// has come, its fsync has returned) it runs at once instead of waiting out the slice of a busy
/// HTTP worker. Every acknowledgement waits for the store thread's commit. At 20,000 msg/s on
/// two cores it halved the commits slower than 5 ms on a fast stretch of the host; on slow ones
/// no difference showed (README, "What paid"). Best effort: older kernels ignore it.
fn ask_for_short_slices() {
    #[cfg(target_os = "linux")]
    {
        /// `struct sched_attr` (`SCHED_ATTR_SIZE_VER0`); `runtime` is the slice for SCHED_OTHER.
        #[repr(C)]
        struct SchedAttr {
            size: u32,
            policy: u32,
            flags: u64,
            nice: i32,
            priority: u32,
            runtime: u64,
            deadline: u64,
            period: u64,
        }
        // SAFETY: getpriority reads this thread's nice value; sched_setattr reads `attr`, a
        // complete VER0 struct that outlives the call.
        unsafe {
            let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
            let attr = SchedAttr { size: 48, policy: libc::SCHED_OTHER as u32, flags: 0, nice, priority: 0, runtime: 100_000, deadline: 0, period: 0 };
            if libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) != 0 {
                tracing::debug!("no short scheduler slices for this thread: {}", std::io::Error::last_os_error());
            }
        }
    }
}

/// Runs a slot's loop on its own thread and single-threaded runtime, so a plugin call (and a
/// blocking SQLite commit inside it) never stalls the threads serving HTTP.
fn spawn_worker<F: Future<Output = ()> + 'static>(name: String, make: impl FnOnce() -> F + Send + 'static) {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
            rt.block_on(make());
        })
        .expect("spawn plugin worker thread");
}
