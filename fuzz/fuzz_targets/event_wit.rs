//! Transcript events crossing the WIT boundary (a store plugin hands them back on restore):
//! any event converts to the host's form and back unchanged, and the JSON clients receive is
//! valid and carries exactly its values, whatever the text holds.

#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use parley::chat::Event;
use parley::plugins::bindings::types::{self, EventKind};

#[derive(Arbitrary, Debug)]
struct Input {
    seq: u64,
    kind: u8,
    participant_id: String,
    nickname: String,
    text: String,
    client_msg_id: Option<String>,
    at_ms: u64,
}

const KINDS: [(EventKind, &str); 7] = [
    (EventKind::Message, "message"),
    (EventKind::Joined, "joined"),
    (EventKind::Left, "left"),
    (EventKind::Reconnected, "reconnected"),
    (EventKind::Notice, "notice"),
    (EventKind::Closed, "closed"),
    (EventKind::Moved, "moved"),
];

fuzz_target!(|i: Input| {
    let (kind, name) = KINDS[i.kind as usize % KINDS.len()];
    let wit = types::Event {
        seq: i.seq,
        kind,
        participant_id: i.participant_id.clone(),
        nickname: i.nickname.clone(),
        text: i.text.clone(),
        client_msg_id: i.client_msg_id.clone(),
        at_ms: i.at_ms,
    };
    let event = Event::from_wit(wit);
    let back = event.to_wit();
    assert!(back.seq == i.seq && back.kind == kind && back.at_ms == i.at_ms);
    assert!(back.participant_id == i.participant_id && back.nickname == i.nickname && back.text == i.text && back.client_msg_id == i.client_msg_id);

    let json: serde_json::Value = serde_json::from_str(&event.json).expect("events are valid JSON");
    assert_eq!(json["kind"], name);
    assert_eq!(json["text"].as_str(), Some(i.text.as_str()));
    assert_eq!(json["nickname"].as_str(), Some(i.nickname.as_str()));
    assert_eq!(json["participant_id"].as_str(), Some(i.participant_id.as_str()));
    assert_eq!(json["at"].as_u64(), Some(i.at_ms));
    assert_eq!(json.get("seq").and_then(|s| s.as_u64()), (i.seq > 0).then_some(i.seq));
    assert_eq!(json.get("client_msg_id").and_then(|s| s.as_str()), i.client_msg_id.as_deref().filter(|id| !id.is_empty()));
});
