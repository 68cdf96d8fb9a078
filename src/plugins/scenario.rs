//! `parley plugin test FILE.wasm --scenario FILE.toml`: runs a policy or notice plugin in the
//! same sandbox the server uses (grants, memory cap, deadline), without a server, through the
//! steps of a scenario; prints each step and a pass/fail summary. Plugin authors run it in
//! their own CI: the exit status is non-zero when a step fails.
//!
//! A scenario for a `save-error-policy` plugin:
//!
//! ```toml
//! settings = { resend_attempts = 2, resend_delay_ms = 500, on_error = "close" }
//! [[step]]
//! name = "a failed save is resent after the delay"
//! failures = [{ chat = "c1", attempt = 1, error = "unavailable", message = "db down" }]
//! expect = ["retry 500"]      # "retry N", "close", "close: TEXT", "continue", "continue: TEXT"
//! ```
//!
//! For a `notice-handler` plugin, steps carry `notices = [{ chat, kind, participant, detail }]`
//! and `expect = [{ chat, audience, text }]` (or `text_contains`).

use super::bindings::notices::{Audience, Delivery, Notice, NoticeKind};
use super::bindings::policy::{Decision, ErrorKind, SaveFailure};
use super::bindings::{NoticeHandler, SaveErrorPolicy};
use super::{Instance, Runtime, Slot};
use crate::config::PluginSection;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[serde(default)]
    grants: Option<Vec<String>>,
    #[serde(default)]
    settings: BTreeMap<String, toml::Value>,
    #[serde(default = "default_memory_mb")]
    memory_mb: u64,
    #[serde(default = "default_deadline_ms")]
    deadline_ms: u64,
    #[serde(rename = "step")]
    steps: Vec<Step>,
}

fn default_memory_mb() -> u64 {
    64
}
fn default_deadline_ms() -> u64 {
    2000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    name: String,
    #[serde(default)]
    failures: Vec<FailureIn>,
    #[serde(default)]
    notices: Vec<NoticeIn>,
    #[serde(default)]
    expect: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailureIn {
    chat: String,
    attempt: u32,
    error: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    ms_since_last_save: u64,
    #[serde(default = "one")]
    pending: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoticeIn {
    chat: String,
    kind: String,
    #[serde(default)]
    participant: Option<String>,
    #[serde(default)]
    detail: String,
}

/// Runs the scenario; returns the report and whether every step passed.
pub async fn run(runtime: &Arc<Runtime>, file: &Path, scenario_file: &Path) -> Result<(String, bool), String> {
    let text = std::fs::read_to_string(scenario_file).map_err(|e| format!("{}: {e}", scenario_file.display()))?;
    let scenario: Scenario = toml::from_str(&text).map_err(|e| format!("{}: {}", scenario_file.display(), e.message()))?;
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let report = super::inspect::report(&file.display().to_string(), &bytes)?;
    let slot = if report.contains("world:   save-error-policy") {
        Slot::SaveErrorPolicy
    } else if report.contains("world:   notice-handler") {
        Slot::NoticeHandler
    } else {
        return Err(format!("{}: plugin test runs save-error-policy and notice-handler plugins", file.display()));
    };
    let section = PluginSection {
        file: file.display().to_string(),
        grants: scenario.grants.clone(),
        memory_mb: scenario.memory_mb,
        deadline_ms: scenario.deadline_ms,
        http_hosts: Vec::new(),
        settings: scenario.settings.clone(),
    };
    let plugin = Arc::new(runtime.load(slot, &section, Path::new(".")).map_err(|e| e.to_string())?);
    let mut out = format!("plugin {} ({}), scenario {}\n", file.display(), slot.name(), scenario_file.display());
    let (mut passed, mut failed) = (0, 0);
    let mut verdict = |out: &mut String, n: usize, name: &str, (got, problem): (String, Option<String>)| match problem {
        None => {
            passed += 1;
            out.push_str(&format!("  ok    {n}. {name}\n          -> {got}\n"));
        }
        Some(p) => {
            failed += 1;
            out.push_str(&format!("  FAIL  {n}. {name}: {p}\n"));
        }
    };
    match slot {
        Slot::SaveErrorPolicy => {
            let mut instance: Instance<SaveErrorPolicy> = runtime.instance(plugin, None);
            instance.warm_up().await.map_err(|f| format!("the plugin does not start: {f}"))?;
            for (i, step) in scenario.steps.iter().enumerate() {
                let problem = policy_step(&mut instance, step).await;
                verdict(&mut out, i + 1, &step.name, problem);
            }
        }
        _ => {
            let mut instance: Instance<NoticeHandler> = runtime.instance(plugin, None);
            instance.warm_up().await.map_err(|f| format!("the plugin does not start: {f}"))?;
            for (i, step) in scenario.steps.iter().enumerate() {
                let problem = notice_step(&mut instance, step).await;
                verdict(&mut out, i + 1, &step.name, problem);
            }
        }
    }
    out.push_str(&format!("{passed} passed, {failed} failed\n"));
    Ok((out, failed == 0))
}

async fn policy_step(instance: &mut Instance<SaveErrorPolicy>, step: &Step) -> (String, Option<String>) {
    let mut shown = String::new();
    let problem = policy_check(instance, step, &mut shown).await;
    (shown, problem)
}

async fn policy_check(instance: &mut Instance<SaveErrorPolicy>, step: &Step, shown_all: &mut String) -> Option<String> {
    let mut failures = Vec::new();
    for f in &step.failures {
        let error_kind = match f.error.as_str() {
            "unavailable" => ErrorKind::Unavailable,
            "stale-epoch" => ErrorKind::StaleEpoch,
            "invalid" => ErrorKind::Invalid,
            "internal" => ErrorKind::Internal,
            "plugin-fault" => ErrorKind::PluginFault,
            other => return Some(format!("unknown error kind {other:?} (unavailable, stale-epoch, invalid, internal, plugin-fault)")),
        };
        failures.push(SaveFailure {
            chat_id: f.chat.clone(),
            attempt: f.attempt,
            error_kind,
            message: f.message.clone(),
            ms_since_last_save: f.ms_since_last_save,
            pending_messages: f.pending,
        });
    }
    let decisions = match instance.call(async |b, s| b.parley_plugin_policy().call_decide(s, &failures).await).await {
        Ok(d) => d,
        Err(fault) => return Some(fault.to_string()),
    };
    let got: Vec<String> = decisions.iter().map(show_decision).collect();
    *shown_all = got.join(" | ");
    if got.len() != step.expect.len() {
        return Some(format!("expected {} decisions, got {got:?}", step.expect.len()));
    }
    for (want, (decision, shown)) in step.expect.iter().zip(decisions.iter().zip(&got)) {
        let Some(want) = want.as_str() else { return Some(format!("expect entries of a policy scenario are strings, not {want}")) };
        if !decision_matches(want, decision) {
            return Some(format!("expected {want:?}, got {shown:?}"));
        }
    }
    None
}

fn show_decision(d: &Decision) -> String {
    match d {
        Decision::Retry(ms) => format!("retry {ms}"),
        Decision::Close(reason) => format!("close: {reason}"),
        Decision::Continue(reason) => format!("continue: {reason}"),
    }
}

fn decision_matches(want: &str, d: &Decision) -> bool {
    let (verb, text) = want.split_once(':').map_or((want.trim(), ""), |(v, t)| (v.trim(), t.trim()));
    match d {
        Decision::Retry(ms) => verb == format!("retry {ms}"),
        Decision::Close(reason) => verb == "close" && reason.contains(text),
        Decision::Continue(reason) => verb == "continue" && reason.contains(text),
    }
}

async fn notice_step(instance: &mut Instance<NoticeHandler>, step: &Step) -> (String, Option<String>) {
    let mut shown = String::new();
    let problem = notice_check(instance, step, &mut shown).await;
    (shown, problem)
}

async fn notice_check(instance: &mut Instance<NoticeHandler>, step: &Step, shown_all: &mut String) -> Option<String> {
    let mut notices = Vec::new();
    for n in &step.notices {
        let kind = match n.kind.as_str() {
            "transcript-saved" => NoticeKind::TranscriptSaved,
            "save-failed" => NoticeKind::SaveFailed,
            "participant-left" => NoticeKind::ParticipantLeft,
            "participant-rejoined" => NoticeKind::ParticipantRejoined,
            "chat-closed" => NoticeKind::ChatClosed,
            "chat-moved" => NoticeKind::ChatMoved,
            other => return Some(format!("unknown notice kind {other:?}")),
        };
        notices.push(Notice { chat_id: n.chat.clone(), kind, participant_id: n.participant.clone(), detail: n.detail.clone() });
    }
    let deliveries = match instance.call(async |b, s| b.parley_plugin_notices().call_handle(s, &notices).await).await {
        Ok(d) => d,
        Err(fault) => return Some(fault.to_string()),
    };
    let got: Vec<String> = deliveries.iter().map(show_delivery).collect();
    *shown_all = if got.is_empty() { "nothing delivered".into() } else { got.join(" | ") };
    if got.len() != step.expect.len() {
        return Some(format!("expected {} deliveries, got {got:?}", step.expect.len()));
    }
    for (want, (d, shown)) in step.expect.iter().zip(deliveries.iter().zip(&got)) {
        let field = |k: &str| want.get(k).and_then(|v| v.as_str());
        let audience = match d.audience {
            Audience::Everyone => "everyone",
            Audience::Customers => "customers",
            Audience::Agents => "agents",
        };
        let ok = field("chat").is_none_or(|c| c == d.chat_id)
            && field("audience").is_none_or(|a| a == audience)
            && field("text").is_none_or(|t| t == d.text)
            && field("text_contains").is_none_or(|t| d.text.contains(t));
        if !ok {
            return Some(format!("expected {want}, got {shown:?}"));
        }
    }
    None
}

fn show_delivery(d: &Delivery) -> String {
    format!("{} {:?}: {}", d.chat_id, d.audience, d.text)
}
