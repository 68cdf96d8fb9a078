//! KPI counters of one instance: what `GET /v1/kpi` and `GET /metrics` report, and what an
//! operator watches before stopping a drained instance (sessions_current reaching zero).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (microseconds) of the latency histogram buckets: from a cheap plugin call
/// (a few µs) to a slow group commit; 20 ms is a common ack-latency objective.
const BUCKETS_US: [u64; 16] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 1_000_000];

/// A Prometheus latency histogram, updated without locks.
#[derive(Default, Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.sum_us.fetch_add(us, Relaxed);
        let bucket = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        self.counts[bucket].fetch_add(1, Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += self.counts[BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// How a chat came to be open on this instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    Created,
    /// From storage, after its owner (another instance, or an earlier process) let it go.
    Restored,
    /// From storage, after this instance dropped it for a lapsed lease.
    TakenBack,
}

pub struct Kpi {
    pub session_created: AtomicU64,
    pub session_closed: AtomicU64,
    pub session_restored: AtomicU64,
    /// Chats this instance dropped when its lease lapsed and then restored itself.
    pub session_taken_back: AtomicU64,
    pub sessions_current: AtomicI64,
    pub messages_saved: AtomicU64,
    pub events_saved: AtomicU64,
    pub save_batches: AtomicU64,
    pub save_failures: AtomicU64,
    /// Chat saves refused because this instance's lease was not live (self-fencing).
    pub writes_fenced: AtomicU64,
    /// Chats this instance dropped because another instance restored them.
    pub chats_purged: AtomicU64,
    /// Requests passed on to the instance that owns the chat.
    pub requests_proxied: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub lease_renewal_failures: AtomicU64,
    save_latency: Histogram,
    /// From a message's arrival to its acknowledgement (after the save), on the owner.
    pub message_acks: Histogram,
    /// Latency of every plugin call, per slot (intermediate, final, save-error-policy, notice-handler).
    pub plugin_calls: [Histogram; 4],
    /// The COMMIT of each write transaction on the embedded SQLite file (its WAL frames
    /// written and, with synchronous = full, fsynced): the disk's share of a slow save.
    pub sqlite_commits: std::sync::Arc<Histogram>,
    /// Whether the intermediate store answered its last call (0 after an `unavailable`).
    storage_available: std::sync::atomic::AtomicBool,
}

impl Default for Kpi {
    fn default() -> Self {
        Self {
            session_created: Default::default(),
            session_closed: Default::default(),
            session_restored: Default::default(),
            session_taken_back: Default::default(),
            sessions_current: Default::default(),
            messages_saved: Default::default(),
            events_saved: Default::default(),
            save_batches: Default::default(),
            save_failures: Default::default(),
            writes_fenced: Default::default(),
            chats_purged: Default::default(),
            requests_proxied: Default::default(),
            lease_renewals: Default::default(),
            lease_renewal_failures: Default::default(),
            save_latency: Default::default(),
            message_acks: Default::default(),
            plugin_calls: Default::default(),
            sqlite_commits: Default::default(),
            storage_available: true.into(),
        }
    }
}

impl Kpi {
    pub fn record_save_batch(&self, events: usize, took: Duration) {
        self.save_batches.fetch_add(1, Relaxed);
        self.events_saved.fetch_add(events as u64, Relaxed);
        self.save_latency.record(took);
    }

    /// Records whether the intermediate store could be reached; logs each change with a
    /// stable event id (the reference's alarms 59520 / 59521).
    pub fn storage_reached(&self, reached: bool, cause: &str) {
        let was = self.storage_available.swap(reached, Relaxed);
        if was && !reached {
            tracing::error!(event_id = "storage.unavailable", cause, "the transcript store is unavailable");
        } else if !was && reached {
            tracing::info!(event_id = "storage.available", "the transcript store is available again");
        }
    }

    pub fn storage_available(&self) -> bool {
        self.storage_available.load(Relaxed)
    }

    /// A chat is open here. A restored one counts at once; a new one counts as created only
    /// once its creation is saved (`chat_created`): a creation the store refused (storage down,
    /// or the same keyed chat created on another instance first) created nothing.
    pub fn chat_opened(&self, how: Opened) {
        match how {
            Opened::Created => {}
            Opened::Restored => {
                self.session_restored.fetch_add(1, Relaxed);
            }
            Opened::TakenBack => {
                self.session_taken_back.fetch_add(1, Relaxed);
            }
        }
        self.sessions_current.fetch_add(1, Relaxed);
    }

    pub fn chat_created(&self) {
        self.session_created.fetch_add(1, Relaxed);
    }

    pub fn chat_ended(&self, closed: bool) {
        if closed {
            self.session_closed.fetch_add(1, Relaxed);
        }
        self.sessions_current.fetch_sub(1, Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "session_created": self.session_created.load(Relaxed),
            "session_closed": self.session_closed.load(Relaxed),
            "session_restored": self.session_restored.load(Relaxed),
            "session_taken_back": self.session_taken_back.load(Relaxed),
            "sessions_current": self.sessions_current.load(Relaxed),
            "messages_saved": self.messages_saved.load(Relaxed),
            "events_saved": self.events_saved.load(Relaxed),
            "save_batches": self.save_batches.load(Relaxed),
            "save_failures": self.save_failures.load(Relaxed),
            "writes_fenced": self.writes_fenced.load(Relaxed),
            "chats_purged": self.chats_purged.load(Relaxed),
            "requests_proxied": self.requests_proxied.load(Relaxed),
            "lease_renewals": self.lease_renewals.load(Relaxed),
            "lease_renewal_failures": self.lease_renewal_failures.load(Relaxed),
            "storage_available": self.storage_available(),
        })
    }

    /// `events_in_memory`: the chats' count, made when scraped (`Chats::events_in_memory`).
    pub fn to_prometheus(&self, instance: &str, events_in_memory: usize) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let counters = [
            ("parley_sessions_created_total", "Chats created on this instance.", self.session_created.load(Relaxed) as i64),
            ("parley_sessions_closed_total", "Chats closed on this instance.", self.session_closed.load(Relaxed) as i64),
            ("parley_sessions_restored_total", "Chats restored from storage on this instance.", self.session_restored.load(Relaxed) as i64),
            ("parley_sessions_taken_back_total", "Chats this instance dropped when its lease lapsed and then restored itself.", self.session_taken_back.load(Relaxed) as i64),
            ("parley_messages_saved_total", "Messages durably saved before their ack.", self.messages_saved.load(Relaxed) as i64),
            ("parley_events_saved_total", "Transcript events saved.", self.events_saved.load(Relaxed) as i64),
            ("parley_save_failures_total", "Chat saves that failed.", self.save_failures.load(Relaxed) as i64),
            ("parley_writes_fenced_total", "Chat saves refused because this instance's lease was not live.", self.writes_fenced.load(Relaxed) as i64),
            ("parley_chats_purged_total", "Chats dropped here because another instance restored them.", self.chats_purged.load(Relaxed) as i64),
            ("parley_requests_proxied_total", "Requests passed on to the owning instance.", self.requests_proxied.load(Relaxed) as i64),
            ("parley_lease_renewals_total", "Lease renewals that succeeded.", self.lease_renewals.load(Relaxed) as i64),
            ("parley_lease_renewal_failures_total", "Lease renewals that failed.", self.lease_renewal_failures.load(Relaxed) as i64),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{instance=\"{instance}\"}} {value}");
        }
        let gauges = [
            ("parley_sessions_current", "Open chats owned by this instance.", self.sessions_current.load(Relaxed)),
            ("parley_storage_available", "1 while the transcript store answers, 0 after it reported itself unavailable.", i64::from(self.storage_available())),
            ("parley_transcript_events_in_memory", "Saved transcript events the chats hold in memory for readers (limits.events_in_memory each).", events_in_memory as i64),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{instance=\"{instance}\"}} {value}");
        }
        let _ = writeln!(out, "# HELP parley_save_batch_seconds Latency of one group-commit store call.\n# TYPE parley_save_batch_seconds histogram");
        self.save_latency.write(&mut out, "parley_save_batch_seconds", &format!("instance=\"{instance}\""));
        let _ = writeln!(out, "# HELP parley_message_ack_seconds From a message's arrival at its chat's owner to its acknowledgement.\n# TYPE parley_message_ack_seconds histogram");
        self.message_acks.write(&mut out, "parley_message_ack_seconds", &format!("instance=\"{instance}\""));
        let _ = writeln!(
            out,
            "# HELP parley_sqlite_commit_seconds The COMMIT of a write transaction on the embedded SQLite file: its WAL frames written and, with synchronous = full, fsynced.\n# TYPE parley_sqlite_commit_seconds histogram"
        );
        self.sqlite_commits.write(&mut out, "parley_sqlite_commit_seconds", &format!("instance=\"{instance}\""));
        let _ = writeln!(out, "# HELP parley_plugin_call_seconds Latency of one call into a plugin, per slot.\n# TYPE parley_plugin_call_seconds histogram");
        for (slot, h) in crate::plugins::Slot::ALL.iter().zip(&self.plugin_calls) {
            h.write(&mut out, "parley_plugin_call_seconds", &format!("instance=\"{instance}\",slot=\"{}\"", slot.name()));
        }
        out
    }
}
