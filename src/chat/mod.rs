//! Chats: the registry of chats this instance owns, the read side each chat shares with
//! request handlers, and the commands its owning task takes. One task owns one chat's state
//! (see `session`); handlers only read what it publishes.

pub mod event;
mod session;

use crate::auth::{self, TokenHash};
use crate::config::{Deployment, RestoreMode};
use crate::kpi::Kpi;
use crate::plugins::bindings::notices::Audience;
use crate::plugins::bindings::types::ChatState;
use crate::plugins::slots::{NoticeSink, NoticeSlot, PolicySlot, StorageError, StoreSlot};
pub use event::{Event, Kind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
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
    #[error("the chat moved to another instance")]
    Moved,
    #[error("session restoration is disabled on this instance")]
    RestoreDisabled,
    #[error("storage is unavailable: {0}")]
    Storage(String),
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
    transcript: RwLock<Vec<Arc<Event>>>,
    roster: RwLock<Roster>,
    /// The last seq in `transcript`; readers wait on it.
    committed: watch::Sender<u64>,
    /// Events outside the transcript: typing and notices.
    live: broadcast::Sender<Arc<Event>>,
}

impl ChatShared {
    fn new(id: Arc<str>, roster: Roster, transcript: Vec<Arc<Event>>) -> Arc<Self> {
        let last = transcript.last().map_or(0, |e| e.seq);
        Arc::new(Self {
            id,
            transcript: RwLock::new(transcript),
            roster: RwLock::new(roster),
            committed: watch::Sender::new(last),
            live: broadcast::Sender::new(256),
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

    /// Up to `limit` transcript events after `after` that `role` may see.
    pub fn events_after(&self, after: u64, limit: usize, role: Role) -> Vec<Arc<Event>> {
        let transcript = self.transcript.read().unwrap();
        // seq is dense from 1, so the event with seq n sits at index n-1.
        let start = (after as usize).min(transcript.len());
        transcript[start..].iter().filter(|e| e.visible_to(role)).take(limit).cloned().collect()
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

    /// Broadcasts a typing indicator; it is not part of the transcript.
    pub fn typing(&self, member: &Member, typing: bool) {
        let _ = self.live.send(Event::typing(member.id.clone(), member.nickname.clone(), typing));
    }

    fn publish(&self, events: impl IntoIterator<Item = Arc<Event>>) {
        let mut transcript = self.transcript.write().unwrap();
        transcript.extend(events);
        let last = transcript.last().map_or(0, |e| e.seq);
        drop(transcript);
        self.committed.send_replace(last);
    }

    fn set_roster(&self, roster: Roster) {
        *self.roster.write().unwrap() = roster;
    }

    fn full_transcript(&self) -> Vec<Arc<Event>> {
        self.transcript.read().unwrap().clone()
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
    Join { nickname: Arc<str>, reply: oneshot::Sender<Result<Joined, ChatError>> },
    Reconnect { member: Arc<str> },
    Leave { member: Arc<str>, reply: oneshot::Sender<Result<u64, ChatError>> },
    Close { reason: String, reply: oneshot::Sender<Result<u64, ChatError>> },
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
        self.commands.send(command(tx)).await.map_err(|_| ChatError::Closed)?;
        rx.await.unwrap_or(Err(ChatError::Closed))
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

    pub async fn join(&self, nickname: &str) -> Result<Joined, ChatError> {
        self.ask(|reply| Command::Join { nickname: nickname.into(), reply }).await
    }

    pub async fn leave(&self, member: &Member) -> Result<u64, ChatError> {
        self.ask(|reply| Command::Leave { member: member.id.clone(), reply }).await
    }

    pub async fn close(&self, reason: String) -> Result<u64, ChatError> {
        self.ask(|reply| Command::Close { reason, reply }).await
    }
}

/// What every chat task needs from its instance.
pub struct Deps {
    pub instance_id: Arc<str>,
    pub intermediate: StoreSlot,
    pub final_store: StoreSlot,
    pub policy: PolicySlot,
    pub notices: NoticeSlot,
    pub kpi: Arc<Kpi>,
    pub auto_save: u8,
    pub restore_mode: RestoreMode,
    pub linger: Duration,
}

impl Deps {
    pub fn new(deployment: &Deployment, instance_id: Arc<str>, slots: (StoreSlot, StoreSlot, PolicySlot, NoticeSlot), kpi: Arc<Kpi>) -> Self {
        let (intermediate, final_store, policy, notices) = slots;
        Deps {
            instance_id,
            intermediate,
            final_store,
            policy,
            notices,
            kpi,
            auto_save: deployment.transcript.auto_save,
            restore_mode: deployment.restore.mode,
            linger: Duration::from_millis(deployment.limits.closed_chat_linger_ms),
        }
    }
}

type ChatMap = Arc<RwLock<HashMap<Arc<str>, ChatHandle>>>;

/// The chats this instance owns.
pub struct Chats {
    deps: Arc<Deps>,
    map: ChatMap,
    restoring: std::sync::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Serialize)]
pub struct Waiting {
    pub chat_id: Arc<str>,
    pub nickname: Arc<str>,
    pub subject: String,
    pub waiting_since: u64,
}

impl Chats {
    pub fn new(deps: Deps) -> Self {
        Self { deps: Arc::new(deps), map: Default::default(), restoring: Default::default() }
    }

    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Opens a chat for a customer; resolves once the chat is saved.
    pub async fn create(&self, nickname: &str, subject: String, user_data: serde_json::Map<String, serde_json::Value>) -> Result<Created, ChatError> {
        let chat_id: Arc<str> = auth::new_id().into();
        let (token, token_sha256) = auth::new_token();
        let customer = Participant { id: auth::new_id().into(), role: Role::Customer, nickname: nickname.into(), token_sha256, present: true };
        let created = Created { chat_id: chat_id.clone(), participant_id: customer.id.clone(), token };
        let meta = Meta { subject, user_data, created_ms: event::now_ms(), participants: vec![customer] };
        let (handle, saved) = session::open(self.deps.clone(), self.map.clone(), chat_id.clone(), meta);
        self.map.write().unwrap().insert(chat_id, handle);
        saved.await.unwrap_or(Err(ChatError::Closed))?;
        Ok(created)
    }

    /// The chat with this id: live here, or restored from storage.
    pub async fn find(&self, chat_id: &str) -> Result<ChatHandle, ChatError> {
        if let Some(h) = self.map.read().unwrap().get(chat_id) {
            return Ok(h.clone());
        }
        // Requests racing for the same stored chat restore it once; other chats restore in parallel.
        let gate = self.restoring.lock().unwrap().entry(chat_id.into()).or_default().clone();
        let _restoring_this_chat = gate.lock().await;
        let result = self.restore(chat_id).await;
        self.restoring.lock().unwrap().remove(chat_id);
        result
    }

    async fn restore(&self, chat_id: &str) -> Result<ChatHandle, ChatError> {
        if let Some(h) = self.map.read().unwrap().get(chat_id) {
            return Ok(h.clone());
        }
        let stored = self.deps.intermediate.load(chat_id).await.map_err(storage)?;
        let stored = match stored {
            Some(t) => Some(t),
            None => self.deps.final_store.load(chat_id).await.map_err(storage)?,
        };
        let Some(transcript) = stored else {
            return Err(ChatError::NotFound(chat_id.to_string()));
        };
        if transcript.state != ChatState::Closed && self.deps.restore_mode == RestoreMode::None {
            return Err(ChatError::RestoreDisabled);
        }
        let handle = session::restore(self.deps.clone(), self.map.clone(), transcript).await?;
        self.map.write().unwrap().insert(handle.shared.id.clone(), handle.clone());
        Ok(handle)
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
                })
            })
            .collect();
        waiting.sort_by_key(|w| w.waiting_since);
        waiting
    }
}

fn storage(e: StorageError) -> ChatError {
    ChatError::Storage(e.message)
}
