//! The default save-error policy, with the reference guide's semantics as settings:
//! resend a failed save `resend_attempts` times, `resend_delay_ms` apart, then `on_error`:
//! "close" (close the chat without a final save) or "continue" (keep it open; the unsaved
//! messages are refused so their senders resend them).

wit_bindgen::generate!({ world: "save-error-policy", path: "../../wit" });

use exports::parley::plugin::policy::{Decision, ErrorKind, Guest, SaveFailure, Settings};
use parley::plugin::log::{log, Level};
use std::cell::Cell;

thread_local! {
    static RULES: Cell<Rules> = const { Cell::new(Rules { resend_attempts: 2, resend_delay_ms: 500, close: true }) };
}

#[derive(Clone, Copy)]
struct Rules {
    resend_attempts: u32,
    resend_delay_ms: u32,
    close: bool,
}

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn configure(settings: Settings) -> Result<(), String> {
        let mut rules = RULES.get();
        for (key, value) in settings {
            match key.as_str() {
                "resend_attempts" => rules.resend_attempts = value.parse().map_err(|_| format!("resend_attempts: not a number: {value}"))?,
                "resend_delay_ms" => rules.resend_delay_ms = value.parse().map_err(|_| format!("resend_delay_ms: not a number: {value}"))?,
                "on_error" => {
                    rules.close = match value.as_str() {
                        "close" => true,
                        "continue" => false,
                        other => return Err(format!("on_error: expected \"close\" or \"continue\", got {other:?}")),
                    }
                }
                other => return Err(format!("unknown setting {other:?}")),
            }
        }
        RULES.set(rules);
        Ok(())
    }

    fn decide(failures: Vec<SaveFailure>) -> Vec<Decision> {
        let rules = RULES.get();
        failures
            .into_iter()
            .map(|f| {
                let retryable = !matches!(f.error_kind, ErrorKind::Invalid | ErrorKind::StaleEpoch);
                if retryable && f.attempt <= rules.resend_attempts {
                    Decision::Retry(rules.resend_delay_ms)
                } else if rules.close {
                    log(Level::Warn, &format!("closing chat {} after {} failed saves: {}", f.chat_id, f.attempt, f.message));
                    Decision::Close(format!("The transcript could not be saved ({}).", f.message))
                } else {
                    Decision::Continue(format!("The transcript could not be saved ({}); please resend.", f.message))
                }
            })
            .collect()
    }
}

export!(DefaultPolicy);
