//! KPI counters of one instance: what `GET /v1/kpi` and `GET /metrics` report, and what an
//! operator watches before stopping a drained instance (sessions_current reaching zero).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (microseconds) of the save-latency histogram buckets.
const SAVE_BUCKETS_US: [u64; 10] = [250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000];

#[derive(Default)]
pub struct Kpi {
    pub session_created: AtomicU64,
    pub session_closed: AtomicU64,
    pub session_restored: AtomicU64,
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
    save_latency: [AtomicU64; SAVE_BUCKETS_US.len() + 1],
    save_latency_sum_us: AtomicU64,
}

impl Kpi {
    pub fn record_save_batch(&self, events: usize, took: Duration) {
        self.save_batches.fetch_add(1, Relaxed);
        self.events_saved.fetch_add(events as u64, Relaxed);
        let us = took.as_micros() as u64;
        self.save_latency_sum_us.fetch_add(us, Relaxed);
        let bucket = SAVE_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(SAVE_BUCKETS_US.len());
        self.save_latency[bucket].fetch_add(1, Relaxed);
    }

    pub fn chat_opened(&self, restored: bool) {
        if restored {
            self.session_restored.fetch_add(1, Relaxed);
        } else {
            self.session_created.fetch_add(1, Relaxed);
        }
        self.sessions_current.fetch_add(1, Relaxed);
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
        })
    }

    pub fn to_prometheus(&self, instance: &str) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let counters = [
            ("parley_sessions_created_total", "Chats created on this instance.", self.session_created.load(Relaxed) as i64),
            ("parley_sessions_closed_total", "Chats closed on this instance.", self.session_closed.load(Relaxed) as i64),
            ("parley_sessions_restored_total", "Chats restored from storage on this instance.", self.session_restored.load(Relaxed) as i64),
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
        let _ = writeln!(
            out,
            "# HELP parley_sessions_current Open chats owned by this instance.\n# TYPE parley_sessions_current gauge\nparley_sessions_current{{instance=\"{instance}\"}} {}",
            self.sessions_current.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP parley_save_batch_seconds Latency of one group-commit store call.\n# TYPE parley_save_batch_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in SAVE_BUCKETS_US.iter().enumerate() {
            cumulative += self.save_latency[i].load(Relaxed);
            let _ = writeln!(out, "parley_save_batch_seconds_bucket{{instance=\"{instance}\",le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += self.save_latency[SAVE_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "parley_save_batch_seconds_bucket{{instance=\"{instance}\",le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "parley_save_batch_seconds_sum{{instance=\"{instance}\"}} {}", self.save_latency_sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "parley_save_batch_seconds_count{{instance=\"{instance}\"}} {cumulative}");
        out
    }
}
