//! The default notice handler: passes each notice the host raises to every participant of
//! the chat as a plain sentence. `transcript_saved = "off"` silences the per-save notice.

wit_bindgen::generate!({ world: "notice-handler", path: "../../wit" });

use exports::parley::plugin::notices::{Audience, Delivery, Guest, Notice, NoticeKind, Settings};
use std::cell::Cell;

thread_local! {
    static SAVED_NOTICES: Cell<bool> = const { Cell::new(true) };
}

struct PassThrough;

impl Guest for PassThrough {
    fn configure(settings: Settings) -> Result<(), String> {
        for (key, value) in settings {
            match (key.as_str(), value.as_str()) {
                ("transcript_saved", "on") => SAVED_NOTICES.set(true),
                ("transcript_saved", "off") => SAVED_NOTICES.set(false),
                ("transcript_saved", other) => return Err(format!("transcript_saved: expected \"on\" or \"off\", got {other:?}")),
                (other, _) => return Err(format!("unknown setting {other:?}")),
            }
        }
        Ok(())
    }

    fn handle(notices: Vec<Notice>) -> Vec<Delivery> {
        let saved = SAVED_NOTICES.get();
        notices
            .into_iter()
            .filter(|n| saved || n.kind != NoticeKind::TranscriptSaved)
            .map(|n| {
                let text = match n.kind {
                    NoticeKind::TranscriptSaved => "Transcript saved.".to_string(),
                    NoticeKind::SaveFailed => format!("Saving the transcript failed: {}", n.detail),
                    NoticeKind::ParticipantLeft => format!("{} left the chat.", n.detail),
                    NoticeKind::ParticipantRejoined => format!("{} reconnected.", n.detail),
                    NoticeKind::ChatClosed => format!("The chat was closed: {}", n.detail),
                };
                Delivery { chat_id: n.chat_id, audience: Audience::Everyone, text }
            })
            .collect()
    }
}

export!(PassThrough);
