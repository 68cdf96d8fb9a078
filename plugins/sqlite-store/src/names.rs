//! Event kinds and chat states as stored text, shared as source by every first-party store
//! so their rows read the same.

use crate::parley::plugin::types::{ChatState, EventKind};

pub fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Message => "message",
        EventKind::Joined => "joined",
        EventKind::Left => "left",
        EventKind::Reconnected => "reconnected",
        EventKind::Notice => "notice",
        EventKind::Closed => "closed",
        EventKind::Moved => "moved",
    }
}

pub fn parse_kind(s: &str) -> EventKind {
    match s {
        "joined" => EventKind::Joined,
        "left" => EventKind::Left,
        "reconnected" => EventKind::Reconnected,
        "notice" => EventKind::Notice,
        "closed" => EventKind::Closed,
        "moved" => EventKind::Moved,
        _ => EventKind::Message,
    }
}

pub fn state_name(s: ChatState) -> &'static str {
    match s {
        ChatState::Waiting => "waiting",
        ChatState::Active => "active",
        ChatState::Closed => "closed",
    }
}

pub fn parse_state(s: &str) -> ChatState {
    match s {
        "waiting" => ChatState::Waiting,
        "closed" => ChatState::Closed,
        _ => ChatState::Active,
    }
}
