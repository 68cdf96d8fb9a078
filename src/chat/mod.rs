//! Chats: the registry of chats this instance owns, the read side each chat shares with
//! request handlers, and the commands its owning task takes. One task owns one chat's state
//! (see `session`); handlers only read what it publishes.

pub mod event;
mod sent;
mod session;

use crate::auth::{self, TokenHash};
use crate::cluster::{Cluster, Peer};
use crate::config::{Deployment, Initiator, RestoreMode};
use crate::kpi::{Kpi, Opened};
use crate::plugins::bindings::notices::Audience;
use crate::plugins::bindings::store::ClaimOutcome;
use crate::plugins::bindings::types::ChatState;
use crate::plugins::slots::{NoticeSink, NoticeSlot, PolicySlot, StorageError, StoreSlot};
pub use event::{Event, Kind};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::info;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Agent,
}

/// Why a chat operation was refused; the HTTP layer maps each to a status and code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    #[error("no chat {0}")]
    NotFound(String),
    #[error("the chat is closed")]
    Closed,
    #[error("the message was not saved: {0}")]
    NotSaved(String),
    #[error("the chat moved to another instance; send the request again")]
    Moved,
    #[error("the chat's instance is gone and session restoration is disabled (restore.mode = \"none\")")]
    RestoreDisabled,
    #[error("the chat's instance is gone and a {0} may not restore it (restore.allowed_initiators)")]
    RestoreNotAllowed(&'static str),
    #[error("this token does not belong to a participant of this chat")]
    Forbidden,
    #[error("storage is unavailable: {0}")]
    Storage(String),
    #[error("the chat already has {0} participants (limits.max_participants)")]
    Full(usize),
    #[error("{0}")]
    RequestReused(String),
    #[error("too many messages: at most {per_second} per second on average (limits.messages_per_second); retry in {retry_ms} ms")]
    RateLimited { per_second: f64, retry_ms: u64 },
}

/// A participant as stored in the chat's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Participant {
    pub id: Arc<str>,
    pub role: Role,
    pub nickname: Arc<str>,
    #[serde(with = "hex_hash")]
    pub token_sha256: TokenHash,
    pub present: bool,
}

/// Chat metadata, stored by the store plugin as an opaque JSON document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub subject: String,
    pub user_data: serde_json::Map<String, serde_json::Value>,
    pub created_ms: u64,
    pub participants: Vec<Participant>,
}

impl Meta {
    /// What the customer's create carried, as `opening` digests it.
    pub fn opening(&self) -> TokenHash {
        let customer = self.participants.iter().find(|p| p.role == Role::Customer).map_or("", |p| &*p.nickname);
        opening(customer, &self.subject, &self.user_data)
    }
}

/// A digest of a create's fields (nickname, subject, user_data): a retry with its
/// client_request_id carries the same fields, another request reusing the id does not.
pub fn opening(nickname: &str, subject: &str, user_data: &serde_json::Map<String, serde_json::Value>) -> TokenHash {
    auth::hash(&serde_json::json!([nickname, subject, user_data]).to_string())
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Who is in the chat, as handlers need it to authenticate and label requests.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: Arc<str>,
    pub role: Role,
    pub nickname: Arc<str>,
    token_sha256: TokenHash,
    pub present: bool,
    /// Set after a restore until this participant's first request appends `reconnected`.
    pub must_reconnect: bool,
}

#[derive(Debug, Clone)]
pub struct Roster {
    pub state: ChatState,
    pub subject: String,
    pub customer_nickname: Arc<str>,
    pub created_ms: u64,
    pub members: Vec<Member>,
}

/// What a chat's owning task publishes for everyone else to read.
pub struct ChatShared {
    pub id: Arc<str>,
    /// `Meta::opening`, fixed at the create: a keyed create that finds this chat must carry the same.
    opened_with: TokenHash,
    transcript: RwLock<Window>,
    /// Where the events older than the window are read back; None: nothing leaves the window.
    older: Option<OlderEvents>,
    roster: RwLock<Roster>,
    /// The last seq in `transcript`; readers wait on it.
    committed: watch::Sender<u64>,
    /// Events outside the transcript: typing and notices.
    live: broadcast::Sender<Arc<Event>>,
    /// Set when this instance dropped the chat because another one restored it; readers
    /// waiting here must ask again (their next request reaches the new owner).
    moved: watch::Sender<bool>,
}

/// The newest events of a chat's transcript: at most `limits.events_in_memory` of them once
/// they are saved, so a chat's memory does not grow with its length. seq is dense from 1, so
/// the event with seq n sits at index n - `first`.
struct Window {
    first: u64,
    events: VecDeque<Arc<Event>>,
    keep: usize,
}

impl Window {
    fn push(&mut self, events: impl IntoIterator<Item = Arc<Event>>) {
        self.events.extend(events);
        while self.events.len() > self.keep {
            self.events.pop_front();
            self.first += 1;
        }
    }

    fn last_seq(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }
}

/// How many saved events a chat keeps in memory, and the stores that hold the older ones: the
/// intermediate one while the chat lives, the final one once it is closed and its intermediate
/// transcript purged.
struct OlderEvents {
    keep: usize,
    intermediate: StoreSlot,
    final_store: StoreSlot,
}

impl OlderEvents {
    /// None where memory keeps every event (no intermediate saves, or no limit set).
    fn of(deps: &Deps) -> Option<Self> {
        let keep = deps.events_in_memory?;
        Some(Self { keep, intermediate: deps.intermediate.clone(), final_store: deps.final_store.clone() })
    }
}

impl ChatShared {
    fn new(id: Arc<str>, opened_with: TokenHash, roster: Roster, transcript: Vec<Arc<Event>>, older: Option<OlderEvents>) -> Arc<Self> {
        let last = transcript.last().map_or(0, |e| e.seq);
        let keep = older.as_ref().map_or(usize::MAX, |o| o.keep);
        let mut window = Window { first: transcript.first().map_or(1, |e| e.seq), events: VecDeque::new(), keep };
        window.push(transcript);
        Arc::new(Self {
            id,
            opened_with,
            transcript: RwLock::new(window),
            older,
            roster: RwLock::new(roster),
            committed: watch::Sender::new(last),
            live: broadcast::Sender::new(256),
            moved: watch::Sender::new(false),
        })
    }

    /// The member a bearer token belongs to, if any.
    pub fn authenticate(&self, token: &str) -> Option<Member> {
        let h = auth::hash(token);
        let roster = self.roster.read().unwrap();
        roster.members.iter().find(|m| auth::same(&m.token_sha256, &h)).cloned()
    }

    pub fn roster(&self) -> Roster {
        self.roster.read().unwrap().clone()
    }

    pub fn state(&self) -> ChatState {
        self.roster.read().unwrap().state
    }

    /// Up to `limit` transcript events after `after` that `role` may see (all of them: None),
    /// from memory, or from the store when they are older than the window.
    pub async fn events_after(&self, after: u64, limit: usize, role: Option<Role>) -> Result<Vec<Arc<Event>>, ChatError> {
        let visible = |e: &Arc<Event>| role.is_none_or(|r| e.visible_to(r));
        let (first, recent) = {
            let window = self.transcript.read().unwrap();
            // `first` is at least 1; `after` comes from the client and may be any u64.
            if after >= window.first - 1 {
                let start = (after - (window.first - 1)).min(window.events.len() as u64) as usize;
                return Ok(window.events.range(start..).filter(|e| visible(e)).take(limit).cloned().collect());
            }
            (window.first, window.events.iter().take(limit).cloned().collect::<Vec<_>>())
        };
        let older = self.older.as_ref().expect("events leave the window only when a store holds them");
        let stored = match older.intermediate.load(&self.id).await.map_err(storage)? {
            Some(t) => t,
            // Closed, and its intermediate transcript purged: the final one has every event.
            None => older.final_store.load(&self.id).await.map_err(storage)?.ok_or_else(|| ChatError::Storage(format!("the stored transcript of chat {} is gone", self.id)))?,
        };
        let stored = stored.events.into_iter().filter(|e| e.seq > after && e.seq < first).map(Event::from_wit);
        Ok(stored.chain(recent).filter(|e| visible(e)).take(limit).collect())
    }

    /// Whether the transcript event with this seq passes `test`; None when it is older than
    /// the window.
    fn event_is(&self, seq: u64, test: impl Fn(&Event) -> bool) -> Option<bool> {
        let window = self.transcript.read().unwrap();
        let i = seq.checked_sub(window.first)?;
        window.events.get(i as usize).map(|e| test(e))
    }

    /// The seq of the first event in the window that passes `test`.
    fn find_event(&self, test: impl Fn(&Event) -> bool) -> Option<u64> {
        self.transcript.read().unwrap().events.iter().find(|e| test(e)).map(|e| e.seq)
    }

    /// The newest event of this kind in the window.
    fn last_of(&self, kind: Kind) -> Option<Arc<Event>> {
        self.transcript.read().unwrap().events.iter().rev().find(|e| e.kind == kind).cloned()
    }

    pub fn last_seq(&self) -> u64 {
        *self.committed.borrow()
    }

    pub fn watch_committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    pub fn subscribe_live(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    pub fn watch_moved(&self) -> watch::Receiver<bool> {
        self.moved.subscribe()
    }

    pub fn has_moved(&self) -> bool {
        *self.moved.borrow()
    }

    /// Broadcasts a typing indicator; it is not part of the transcript.
    pub fn typing(&self, member: &Member, typing: bool) {
        let _ = self.live.send(Event::typing(member.id.clone(), member.nickname.clone(), typing));
    }

    fn publish(&self, events: impl IntoIterator<Item = Arc<Event>>) {
        let mut window = self.transcript.write().unwrap();
        window.push(events);
        let last = window.last_seq();
        drop(window);
        self.committed.send_replace(last);
    }

    fn set_roster(&self, roster: Roster) {
        *self.roster.write().unwrap() = roster;
    }
}

impl NoticeSink for ChatShared {
    fn deliver(&self, audience: Audience, text: String) {
        let _ = self.live.send(Event::notice(text, audience));
    }
}

/// What a chat's task is asked to do.
enum Command {
    Post { member: Arc<str>, text: String, client_msg_id: Option<String>, reply: oneshot::Sender<Result<u64, ChatError>> },
    Join { nickname: Arc<str>, client_request_id: Option<String>, reply: oneshot::Sender<Result<Joined, ChatError>> },
    Reconnect { member: Arc<str> },
    Leave { member: Arc<str>, reply: oneshot::Sender<Result<u64, ChatError>> },
    Close { reason: String, reply: oneshot::Sender<Result<u64, ChatError>> },
    /// Answers once the chat's opening (the customer's `joined`) is saved.
    Opened { reply: oneshot::Sender<Result<(), ChatError>> },
    /// This instance lost its lease: drop the chat without writing anything more.
    Abandon,
}

#[derive(Debug, Clone, Serialize)]
pub struct Joined {
    pub participant_id: Arc<str>,
    pub token: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub chat_id: Arc<str>,
    pub participant_id: Arc<str>,
    pub token: String,
}

/// A way to reach a chat's task and read what it published.
#[derive(Clone)]
pub struct ChatHandle {
    pub shared: Arc<ChatShared>,
    commands: mpsc::Sender<Command>,
}

impl ChatHandle {
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T, ChatError>>) -> Command) -> Result<T, ChatError> {
        let (tx, rx) = oneshot::channel();
        // A task that ended without answering closed the chat, or dropped it as moved.
        let ended = || if self.shared.has_moved() { ChatError::Moved } else { ChatError::Closed };
        self.commands.send(command(tx)).await.map_err(|_| ended())?;
        rx.await.unwrap_or_else(|_| Err(ended()))
    }

    /// Appends `reconnected` for a participant's first request after a restore.
    pub async fn touch(&self, member: &Member) {
        if member.must_reconnect {
            let _ = self.commands.send(Command::Reconnect { member: member.id.clone() }).await;
        }
    }

    /// Posts a message; resolves with its seq once it is saved.
    pub async fn post(&self, member: &Member, text: String, client_msg_id: Option<String>) -> Result<u64, ChatError> {
        self.ask(|reply| Command::Post { member: member.id.clone(), text, client_msg_id, reply }).await
    }

    /// Adds an agent. With a `client_request_id` the agent's id and token derive from it: a
    /// retried join answers the same and adds no one.
    pub async fn join(&self, nickname: &str, client_request_id: Option<String>) -> Result<Joined, ChatError> {
        self.ask(|reply| Command::Join { nickname: nickname.into(), client_request_id, reply }).await
    }

    /// Resolves once the chat's opening is saved: a retried create is answered no sooner
    /// than the create it repeats.
    pub async fn opened(&self) -> Result<(), ChatError> {
        self.ask(|reply| Command::Opened { reply }).await
    }

    pub async fn leave(&self, member: &Member) -> Result<u64, ChatError> {
        self.ask(|reply| Command::Leave { member: member.id.clone(), reply }).await
    }

    pub async fn close(&self, reason: String) -> Result<u64, ChatError> {
        self.ask(|reply| Command::Close { reason, reply }).await
    }
}

/// A keyed create that finds its chat here: the same request only if it carries the same fields.
fn same_request(chat: &ChatHandle, fields: &TokenHash) -> Result<(), ChatError> {
    if chat.shared.opened_with == *fields { Ok(()) } else { Err(reused()) }
}

fn reused() -> ChatError {
    ChatError::RequestReused("client_request_id was used to open another chat".into())
}

/// What every chat task needs from its instance.
pub struct Deps {
    pub instance_id: Arc<str>,
    pub cluster: Arc<Cluster>,
    pub intermediate: StoreSlot,
    pub final_store: StoreSlot,
    pub policy: PolicySlot,
    pub notices: NoticeSlot,
    pub kpi: Arc<Kpi>,
    pub auto_save: u8,
    pub restore_mode: RestoreMode,
    pub allowed_initiators: Vec<Initiator>,
    pub purge_old_owner: bool,
    /// Whether closing a chat drops its intermediate transcript. Not when the intermediate
    /// store is shared (Cassandra) and the final one is each instance's own embedded store:
    /// the shared copy, closed, is how the other instances still find and serve the chat
    /// (until the rows' TTL).
    pub purge_on_close: bool,
    pub linger: Duration,
    pub max_participants: usize,
    /// Per participant: (messages per second, burst); None: no limit.
    pub message_rate: Option<(f64, f64)>,
    /// Saved events a chat keeps in memory; None: all (no store to read older ones back from).
    pub events_in_memory: Option<usize>,
}

impl Deps {
    pub fn new(deployment: &Deployment, cluster: Arc<Cluster>, slots: (StoreSlot, StoreSlot, PolicySlot, NoticeSlot), kpi: Arc<Kpi>) -> Self {
        let (intermediate, final_store, policy, notices) = slots;
        Deps {
            instance_id: cluster.instance_id.clone(),
            cluster,
            intermediate,
            final_store,
            policy,
            notices,
            kpi,
            auto_save: deployment.transcript.auto_save,
            restore_mode: deployment.restore.mode,
            allowed_initiators: deployment.restore.allowed_initiators.clone(),
            purge_old_owner: deployment.restore.purge_old_owner,
            purge_on_close: deployment.cassandra.is_none() || deployment.plugins.final_.is_some(),
            max_participants: deployment.limits.max_participants,
            message_rate: (deployment.limits.messages_per_second > 0.0).then_some((deployment.limits.messages_per_second, deployment.limits.message_burst as f64)),
            linger: Duration::from_millis(deployment.limits.closed_chat_linger_ms),
            events_in_memory: (deployment.transcript.auto_save > 0 && deployment.limits.events_in_memory > 0).then_some(deployment.limits.events_in_memory),
        }
    }
}

type ChatMap = Arc<RwLock<HashMap<Arc<str>, ChatHandle>>>;

/// The chats one `abandon_all` dropped.
pub struct Dropped {
    lapse: u64,
    pub chat_ids: Vec<String>,
}

/// The chats this instance owns.
pub struct Chats {
    deps: Arc<Deps>,
    map: ChatMap,
    restoring: std::sync::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    /// Set once this instance handed its chats over: it takes none back.
    handed_over: std::sync::atomic::AtomicBool,
    /// The chats `abandon_all` dropped for a lapsed lease (with the lapse's number), until they
    /// are restored here (a take-back) or that lapse's `take_back` has tried them all.
    dropped: std::sync::Mutex<(u64, HashMap<String, u64>)>,
}

#[derive(Debug, Serialize)]
pub struct Waiting {
    pub chat_id: Arc<str>,
    pub nickname: Arc<str>,
    pub subject: String,
    pub waiting_since: u64,
    /// The instance that owns the chat.
    pub instance: Arc<str>,
}

impl Chats {
    pub fn new(deps: Deps) -> Self {
        Self { deps: Arc::new(deps), map: Default::default(), restoring: Default::default(), handed_over: Default::default(), dropped: Default::default() }
    }

    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Opens a chat for a customer; resolves once the chat is saved. With a
    /// `client_request_id`, the chat's id, the customer's id and token derive from it (and the
    /// cluster secret), so a retry — here or on any instance, after the first answer was lost
    /// — answers the same and opens nothing new.
    pub async fn create(&self, nickname: &str, subject: String, user_data: serde_json::Map<String, serde_json::Value>, client_request_id: Option<&str>) -> Result<Created, ChatError> {
        let fields = opening(nickname, &subject, &user_data);
        let (created, token_sha256) = match client_request_id {
            None => {
                let (token, token_sha256) = auth::new_token();
                (Created { chat_id: auth::new_id().into(), participant_id: auth::new_id().into(), token }, token_sha256)
            }
            Some(request) => {
                let key = self.deps.cluster.secret().as_bytes();
                let chat_id = auth::derive(key, &["chat", request]);
                let participant_id = auth::derive(key, &["customer", &chat_id]);
                let token = auth::derive(key, &["customer-token", &chat_id, request]);
                let token_sha256 = auth::hash(&token);
                let created = Created { chat_id: chat_id.into(), participant_id: participant_id.into(), token };
                if self.created_before(&created, &fields).await? {
                    return Ok(created);
                }
                (created, token_sha256)
            }
        };
        let customer = Participant { id: created.participant_id.clone(), role: Role::Customer, nickname: nickname.into(), token_sha256, present: true };
        let saved = {
            let mut map = self.map.write().unwrap();
            match map.get(&created.chat_id) {
                // The same request, retried while the first is still being saved.
                Some(first) => Err(first.clone()),
                None => {
                    let meta = Meta { subject, user_data, created_ms: event::now_ms(), participants: vec![customer] };
                    let (handle, saved) = session::open(self.deps.clone(), self.map.clone(), created.chat_id.clone(), meta);
                    map.insert(created.chat_id.clone(), handle);
                    Ok(saved)
                }
            }
        };
        let saved = match saved {
            Ok(saved) => saved,
            Err(first) => {
                same_request(&first, &fields)?;
                return first.opened().await.map(|()| created);
            }
        };
        match saved.await.unwrap_or(Err(ChatError::Closed)) {
            Ok(()) => Ok(created),
            // Created on another instance first, from the same request retried there.
            Err(e) if client_request_id.is_some() => match self.created_before(&created, &fields).await {
                Ok(true) => Ok(created),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Whether the chat a create with a client_request_id derives exists already (open here or
    /// elsewhere, or closed). The same id used for another request is refused.
    async fn created_before(&self, created: &Created, fields: &TokenHash) -> Result<bool, ChatError> {
        if let Some(h) = self.local(&created.chat_id) {
            same_request(&h, fields)?;
            if h.opened().await.is_ok() {
                return Ok(true);
            }
            // Its task ended or the chat moved meanwhile: the store knows whether it was saved.
        }
        let deps = &self.deps;
        // Open (here or elsewhere), else closed, else never created.
        let stored = match deps.intermediate.load(&created.chat_id).await.map_err(storage)? {
            Some(t) => Some(t),
            None => deps.final_store.load(&created.chat_id).await.map_err(storage)?,
        };
        let Some(t) = stored else { return Ok(false) };
        let meta: Meta = serde_json::from_str(&t.meta).map_err(|e| ChatError::Storage(format!("stored chat metadata is unreadable: {e}")))?;
        let customer = meta.participants.iter().any(|p| p.id == created.participant_id);
        if customer && meta.opening() == *fields { Ok(true) } else { Err(reused()) }
    }

    /// Where the chat with this id is served: here (live, or restored from storage now), or
    /// by the instance that owns it and holds a live lease. `forwarded`: the request was
    /// passed on by another instance, so it is not passed on again.
    pub async fn locate(&self, chat_id: &str, requester: &Requester, forwarded: bool) -> Result<Whereabouts, ChatError> {
        if let Some(h) = self.local(chat_id) {
            return Ok(Whereabouts::Here(h));
        }
        Box::pin(self.restore(chat_id, requester, forwarded)).await
    }

    /// `locate` for a chat not in memory here.
    async fn restore(&self, chat_id: &str, requester: &Requester, forwarded: bool) -> Result<Whereabouts, ChatError> {
        // Requests racing for the same stored chat restore it once; other chats restore in parallel.
        let gate = self.restoring.lock().unwrap().entry(chat_id.into()).or_default().clone();
        let result = {
            let _restoring_this_chat = gate.lock().await;
            self.locate_or_restore(chat_id, requester, forwarded).await
        };
        // The last request through the gate removes it; earlier ones leave it for those still
        // waiting, so a third request cannot start a second restore of the same chat.
        let mut restoring = self.restoring.lock().unwrap();
        if Arc::strong_count(&gate) <= 2 {
            restoring.remove(chat_id);
        }
        result
    }

    fn local(&self, chat_id: &str) -> Option<ChatHandle> {
        self.map.read().unwrap().get(chat_id).cloned()
    }

    async fn locate_or_restore(&self, chat_id: &str, requester: &Requester, forwarded: bool) -> Result<Whereabouts, ChatError> {
        let deps = &self.deps;
        if self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ChatError::Moved);
        }
        // Each pass either ends or saw another instance's claim win the race: a few suffice.
        for _ in 0..4 {
            if let Some(h) = self.local(chat_id) {
                return Ok(Whereabouts::Here(h));
            }
            let Some(location) = deps.intermediate.locate(chat_id).await.map_err(storage)? else {
                // Not open: closed (its final transcript is served read-only) or never existed.
                let closed = deps.final_store.load(chat_id).await.map_err(storage)?;
                let t = closed.ok_or_else(|| ChatError::NotFound(chat_id.to_string()))?;
                self.may_read(&t.meta, requester)?;
                return Ok(Whereabouts::Here(self.keep(session::read_only(deps.clone(), self.map.clone(), t)?)));
            };
            let me = &*deps.instance_id;
            if location.owner != me
                && let Some(peer) = deps.cluster.peer(&location.owner).filter(Peer::is_live)
            {
                return if forwarded { Err(ChatError::Moved) } else { Ok(Whereabouts::Owner(peer)) };
            }
            // This instance owns it (a restart), or the owner's lease ran out: restore it here.
            let Some(stored) = deps.intermediate.load(chat_id).await.map_err(storage)? else { continue };
            if stored.state == ChatState::Closed {
                self.may_read(&stored.meta, requester)?;
                return Ok(Whereabouts::Here(self.keep(session::read_only(deps.clone(), self.map.clone(), stored)?)));
            }
            if deps.restore_mode == RestoreMode::None {
                return Err(ChatError::RestoreDisabled);
            }
            let initiator = self.may_read(&stored.meta, requester)?;
            if !deps.allowed_initiators.contains(&initiator) {
                return Err(ChatError::RestoreNotAllowed(initiator_name(initiator)));
            }
            match deps.intermediate.claim(chat_id, me, location.epoch).await.map_err(storage)? {
                ClaimOutcome::Claimed(epoch) => {
                    // Loaded again after the claim: from here on the old owner cannot add to it.
                    let t = deps.intermediate.load(chat_id).await.map_err(storage)?.ok_or_else(|| ChatError::NotFound(chat_id.to_string()))?;
                    let taken_back = *location.owner == *deps.instance_id && self.dropped.lock().unwrap().1.remove(chat_id).is_some();
                    let how = if taken_back { Opened::TakenBack } else { Opened::Restored };
                    let handle = session::restore(deps.clone(), self.map.clone(), t, epoch, &location.owner, how)?;
                    return Ok(Whereabouts::Here(self.keep(handle)));
                }
                ClaimOutcome::OwnerAlive(expires_ms) => {
                    deps.cluster.saw_lease(&location.owner, expires_ms);
                    match deps.cluster.peer(&location.owner) {
                        Some(peer) if !forwarded => return Ok(Whereabouts::Owner(peer)),
                        _ => return Err(ChatError::Moved),
                    }
                }
                ClaimOutcome::EpochMoved(_) => continue,
            }
        }
        Err(ChatError::Moved)
    }

    fn keep(&self, handle: ChatHandle) -> ChatHandle {
        self.map.write().unwrap().insert(handle.shared.id.clone(), handle.clone());
        handle
    }

    /// Who the requester is to a stored chat; a token of no participant of it is refused.
    fn may_read(&self, meta: &str, requester: &Requester) -> Result<Initiator, ChatError> {
        match requester {
            Requester::Agent => Ok(Initiator::Agent),
            Requester::Workflow => Ok(Initiator::Workflow),
            Requester::Participant(token) => {
                let meta: Meta = serde_json::from_str(meta).map_err(|e| ChatError::Storage(format!("stored chat metadata is unreadable: {e}")))?;
                let h = auth::hash(token);
                let p = meta.participants.iter().find(|p| auth::same(&p.token_sha256, &h)).ok_or(ChatError::Forbidden)?;
                Ok(if p.role == Role::Agent { Initiator::Agent } else { Initiator::Customer })
            }
        }
    }

    /// Graceful stop: this instance stops writing, drops its chats and gives its lease up, so
    /// the other instances restore them at once (no waiting for the lease to run out).
    /// Senders whose messages were not saved yet get `chat_moved` and resend elsewhere.
    pub async fn hand_over(&self) {
        self.handed_over.store(true, std::sync::atomic::Ordering::Release);
        let chats = self.map.read().unwrap().len();
        self.deps.cluster.lease.end();
        let _ = self.abandon_all();
        self.deps.cluster.leave().await;
        info!(event_id = "instance.handed_over", chats, "handed the remaining chats over to the other instances");
    }

    /// Drops every chat at once, writing nothing more: this instance lost its lease, so
    /// others may have restored them. Each comes back through a restore when asked for (and
    /// through `take_back`).
    pub fn abandon_all(&self) -> Dropped {
        let handles: Vec<ChatHandle> = self.map.write().unwrap().drain().map(|(_, h)| h).collect();
        let chat_ids: Vec<String> = handles.iter().map(|h| h.shared.id.to_string()).collect();
        let lapse = {
            let (lapses, dropped) = &mut *self.dropped.lock().unwrap();
            *lapses += 1;
            if !self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
                dropped.extend(chat_ids.iter().map(|id| (id.clone(), *lapses)));
            }
            *lapses
        };
        for h in handles {
            h.shared.moved.send_replace(true);
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(c)) = h.commands.try_send(Command::Abandon) {
                let commands = h.commands.clone();
                tokio::spawn(async move { commands.send(c).await });
            }
        }
        Dropped { lapse, chat_ids }
    }

    /// After a lapse (this instance was stalled past its lease and dropped its chats): once the
    /// lease is live again, restores here each dropped chat that no other instance restored
    /// meanwhile — the restore a request would start, as a workflow, so `restore.mode` and
    /// `restore.allowed_initiators` apply and the claim decides any race. Without it, a chat
    /// whose participants are not connected (a customer still waiting in the queue) would be
    /// missing from every agent's queue until its customer came back. Such a restore (or a
    /// request's, before it) counts as `session_taken_back`, not `session_restored`.
    pub async fn take_back(&self, dropped: Dropped) {
        for _ in 0..100 {
            if self.deps.cluster.lease.is_live() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let restores = dropped.chat_ids.iter().map(|id| self.locate(id, &Requester::Workflow, true));
        let here = futures_util::future::join_all(restores).await.into_iter().filter(|r| matches!(r, Ok(Whereabouts::Here(_)))).count();
        // The rest went to other instances; a later lapse's entries stay for its own take-back.
        self.dropped.lock().unwrap().1.retain(|_, lapse| *lapse != dropped.lapse);
        info!(event_id = "chats.taken_back", dropped = dropped.chat_ids.len(), restored_here = here, "restored the chats this instance dropped when its lease lapsed");
    }

    /// Transcript events the chats on this instance hold in memory (counted when asked: a
    /// shared counter would be one more contended write per message).
    pub fn events_in_memory(&self) -> usize {
        self.map.read().unwrap().values().map(|h| h.shared.transcript.read().unwrap().events.len()).sum()
    }

    /// Chats on this instance still waiting for an agent, oldest first.
    pub fn queue(&self) -> Vec<Waiting> {
        let map = self.map.read().unwrap();
        let mut waiting: Vec<Waiting> = map
            .values()
            .filter_map(|h| {
                let r = h.shared.roster.read().unwrap();
                (r.state == ChatState::Waiting).then(|| Waiting {
                    chat_id: h.shared.id.clone(),
                    nickname: r.customer_nickname.clone(),
                    subject: r.subject.clone(),
                    waiting_since: r.created_ms,
                    instance: self.deps.instance_id.clone(),
                })
            })
            .collect();
        waiting.sort_by_key(|w| w.waiting_since);
        waiting
    }
}

/// Who asks for a chat, as far as restores are concerned.
pub enum Requester {
    /// A participant's bearer token (customer or agent of that chat).
    Participant(String),
    /// An agent joining with a staff token.
    Agent,
    /// The workflow, with an admin token.
    Workflow,
}

/// Where a chat is served.
pub enum Whereabouts {
    Here(ChatHandle),
    /// By this instance, which owns it and holds a live lease.
    Owner(Peer),
}

fn initiator_name(i: Initiator) -> &'static str {
    match i {
        Initiator::Customer => "customer",
        Initiator::Agent => "agent",
        Initiator::Workflow => "workflow",
    }
}

fn storage(e: StorageError) -> ChatError {
    ChatError::Storage(e.message)
}
