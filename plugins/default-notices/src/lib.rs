//! The default notice handler: passes each notice the host raises to every participant of
//! the chat as a plain sentence. `transcript_saved = "off"` silences the per-save notice.
//! `webhook_url = "http://host:port/path"` also posts chat closes and moves (restores on
//! another instance) there as JSON; the deployment must grant "http" and list the host in
//! the slot's `http_hosts`.

wit_bindgen::generate!({ world: "notice-handler", path: "../../wit" });

use exports::parley::plugin::notices::{Audience, Delivery, Guest, Notice, NoticeKind, Settings};
use parley::plugin::http::post_json;
use parley::plugin::log::{log, Level};
use std::cell::{Cell, RefCell};

thread_local! {
    static SAVED_NOTICES: Cell<bool> = const { Cell::new(true) };
    static WEBHOOK: RefCell<Option<String>> = const { RefCell::new(None) };
}

struct PassThrough;

impl Guest for PassThrough {
    fn configure(settings: Settings) -> Result<(), String> {
        for (key, value) in settings {
            match (key.as_str(), value.as_str()) {
                ("transcript_saved", "on") => SAVED_NOTICES.set(true),
                ("transcript_saved", "off") => SAVED_NOTICES.set(false),
                ("transcript_saved", other) => return Err(format!("transcript_saved: expected \"on\" or \"off\", got {other:?}")),
                ("webhook_url", url) if url.starts_with("http://") => WEBHOOK.set(Some(url.to_string())),
                ("webhook_url", other) => return Err(format!("webhook_url: expected an http:// URL, got {other:?}")),
                (other, _) => return Err(format!("unknown setting {other:?}")),
            }
        }
        Ok(())
    }

    fn handle(notices: Vec<Notice>) -> Vec<Delivery> {
        let saved = SAVED_NOTICES.get();
        let webhook = WEBHOOK.with_borrow(|w| w.clone());
        let mut deliveries = Vec::with_capacity(notices.len());
        for n in notices {
            if let (Some(url), NoticeKind::ChatClosed | NoticeKind::ChatMoved) = (&webhook, n.kind) {
                post(url, &n);
            }
            let text = match n.kind {
                NoticeKind::TranscriptSaved if !saved => continue,
                NoticeKind::TranscriptSaved => "Transcript saved.".to_string(),
                NoticeKind::SaveFailed => format!("Saving the transcript failed: {}", n.detail),
                NoticeKind::ParticipantLeft => format!("{} left the chat.", n.detail),
                NoticeKind::ParticipantRejoined => format!("{} reconnected.", n.detail),
                NoticeKind::ChatClosed => format!("The chat was closed: {}", n.detail),
                // Participants learn of a move from the `moved` event on their stream.
                NoticeKind::ChatMoved => continue,
            };
            deliveries.push(Delivery { chat_id: n.chat_id, audience: Audience::Everyone, text });
        }
        deliveries
    }
}

/// Posts `{"chat_id", "kind", "detail"}`; a failure is logged, never fatal for the chat.
fn post(url: &str, n: &Notice) {
    let kind = if n.kind == NoticeKind::ChatMoved { "chat-moved" } else { "chat-closed" };
    let body = format!("{{\"chat_id\":{},\"kind\":\"{kind}\",\"detail\":{}}}", json_string(&n.chat_id), json_string(&n.detail));
    match post_json(url, &body) {
        Ok(status) if (200..300).contains(&status) => {}
        Ok(status) => log(Level::Warn, &format!("webhook {url} answered {status}")),
        Err(e) => log(Level::Warn, &format!("webhook {url}: {e}")),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

export!(PassThrough);
