//! Transcript events as clients see them. Each event is serialized to JSON once, when it is
//! made, so fanning it out to long polls and WebSockets copies a reference, not the text.

use crate::plugins::bindings::notices::Audience;
use crate::plugins::bindings::types::{self, EventKind};
use serde::Serialize;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub struct Event {
    /// 0 for events outside the transcript (typing, notices).
    pub seq: u64,
    pub kind: Kind,
    pub participant_id: Arc<str>,
    pub nickname: Arc<str>,
    pub text: String,
    pub client_msg_id: Option<String>,
    pub at_ms: u64,
    /// Who may see it: notices can be for customers or agents only.
    pub audience: Audience,
    pub json: Box<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Message,
    Joined,
    Left,
    Reconnected,
    Typing,
    Notice,
    Closed,
    /// The chat was restored on another instance; `text` names it.
    Moved,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    kind: Kind,
    participant_id: &'a str,
    nickname: &'a str,
    text: &'a str,
    at: u64,
    /// On messages: the sender's id for it, so a client can match its own unacknowledged
    /// message when it arrives as an event.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    typing: Option<bool>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Event {
    pub fn new(seq: u64, kind: Kind, participant_id: Arc<str>, nickname: Arc<str>, text: String, client_msg_id: Option<String>, at_ms: u64) -> Arc<Self> {
        Self::build(seq, kind, participant_id, nickname, text, client_msg_id, at_ms, Audience::Everyone, None)
    }

    pub fn typing(participant_id: Arc<str>, nickname: Arc<str>, typing: bool) -> Arc<Self> {
        Self::build(0, Kind::Typing, participant_id, nickname, String::new(), None, now_ms(), Audience::Everyone, Some(typing))
    }

    pub fn notice(text: String, audience: Audience) -> Arc<Self> {
        Self::build(0, Kind::Notice, "".into(), "".into(), text, None, now_ms(), audience, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        seq: u64,
        kind: Kind,
        participant_id: Arc<str>,
        nickname: Arc<str>,
        text: String,
        client_msg_id: Option<String>,
        at_ms: u64,
        audience: Audience,
        typing: Option<bool>,
    ) -> Arc<Self> {
        let json = serde_json::to_string(&Wire {
            seq: (seq > 0).then_some(seq),
            kind,
            participant_id: &participant_id,
            nickname: &nickname,
            text: &text,
            at: at_ms,
            client_msg_id: client_msg_id.as_deref().filter(|id| !id.is_empty()),
            typing,
        })
        .expect("event serializes")
        .into_boxed_str();
        Arc::new(Event { seq, kind, participant_id, nickname, text, client_msg_id, at_ms, audience, json })
    }

    pub fn to_wit(&self) -> types::Event {
        types::Event {
            seq: self.seq,
            kind: match self.kind {
                Kind::Message | Kind::Typing => EventKind::Message,
                Kind::Joined => EventKind::Joined,
                Kind::Left => EventKind::Left,
                Kind::Reconnected => EventKind::Reconnected,
                Kind::Notice => EventKind::Notice,
                Kind::Closed => EventKind::Closed,
                Kind::Moved => EventKind::Moved,
            },
            participant_id: self.participant_id.to_string(),
            nickname: self.nickname.to_string(),
            text: self.text.clone(),
            client_msg_id: self.client_msg_id.clone(),
            at_ms: self.at_ms,
        }
    }

    pub fn from_wit(e: types::Event) -> Arc<Self> {
        let kind = match e.kind {
            EventKind::Message => Kind::Message,
            EventKind::Joined => Kind::Joined,
            EventKind::Left => Kind::Left,
            EventKind::Reconnected => Kind::Reconnected,
            EventKind::Notice => Kind::Notice,
            EventKind::Closed => Kind::Closed,
            EventKind::Moved => Kind::Moved,
        };
        Self::new(e.seq, kind, e.participant_id.into(), e.nickname.into(), e.text, e.client_msg_id, e.at_ms)
    }

    /// Whether a participant with `role` may see this event.
    pub fn visible_to(&self, role: super::Role) -> bool {
        match self.audience {
            Audience::Everyone => true,
            Audience::Customers => role == super::Role::Customer,
            Audience::Agents => role == super::Role::Agent,
        }
    }
}
