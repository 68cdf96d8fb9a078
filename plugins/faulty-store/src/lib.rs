//! A test-only transcript store: the real SQLite store code, plus faults injected by marker
//! texts in a saved message, so tests can prove the sandbox contains a misbehaving plugin.
//!   "!trap"  panics (a trap)         "!loop"  spins forever (cut off by the epoch deadline)
//!   "!oom"   allocates without bound "!fail"  returns `unavailable` for that chat only
//!   "!ack-lost"  saves that chat, then reports `unavailable` for it anyway: a write that
//!            landed though its answer was lost (as a database timeout can leave it)
//!   "!ack-lost-then-down"  the same, and every claim fails for the next second (the database
//!            went away after that write)
//!   "!slow"  takes 200 ms before saving, logging that it started (a slow disk or database:
//!            the whole batch waits); so does every save carrying the metadata of a chat whose
//!            subject is "!slow"

wit_bindgen::generate!({ world: "transcript-store", path: "../../wit" });

#[path = "../../sqlite-store/src/names.rs"]
mod names;
#[path = "../../sqlite-store/src/tables.rs"]
mod tables;

/// Small, so that the tests on this store go through many blocks of the log, fold a quiet
/// chat for the span of the log soon, and fold a writer's log in several transactions.
const LOG_SIZES: tables::LogSizes = tables::LogSizes { block_rows: 64, span: 256, fold_chunk: 16 };

use exports::parley::plugin::store::{ChatDelta, ClaimOutcome, ClaimRequest, Guest, Location, Member, Settings, StoreError, Transcript};

struct FaultyStore;

thread_local! {
    /// Claims fail until this monotonic time (ns).
    static CLAIMS_DOWN_UNTIL: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn marker(delta: &ChatDelta, m: &str) -> bool {
    delta.events.iter().any(|e| e.text == m)
}

impl Guest for FaultyStore {
    fn init(settings: Settings) -> Result<(), StoreError> {
        tables::init(&settings)
    }
    fn save(deltas: Vec<ChatDelta>) -> Vec<Result<(), StoreError>> {
        if deltas.iter().any(|d| marker(d, "!trap")) {
            panic!("injected trap");
        }
        if deltas.iter().any(|d| marker(d, "!loop")) {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if deltas.iter().any(|d| marker(d, "!oom")) {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if deltas.iter().any(|d| marker(d, "!slow") || d.meta.as_deref().is_some_and(|m| m.contains(r#""subject":"!slow""#))) {
            // Tests wait for this line to know a save is under way.
            parley::plugin::log::log(parley::plugin::log::Level::Info, "slow save: spinning 200 ms before saving");
            let until = parley::plugin::clock::monotonic_now_ns() + 200_000_000;
            while parley::plugin::clock::monotonic_now_ns() < until {
                std::hint::spin_loop();
            }
        }
        let (failing, healthy): (Vec<_>, Vec<_>) = deltas.iter().enumerate().partition(|(_, d)| marker(d, "!fail"));
        let healthy_deltas: Vec<ChatDelta> = healthy.iter().map(|(_, d)| (*d).clone()).collect();
        let mut saved = tables::save(healthy_deltas).into_iter();
        let mut results = Vec::with_capacity(deltas.len());
        for (i, delta) in deltas.iter().enumerate() {
            if failing.iter().any(|(j, _)| *j == i) {
                results.push(Err(StoreError::Unavailable("injected failure".to_string())));
            } else {
                let result = saved.next().unwrap_or(Ok(()));
                if result.is_ok() && marker(delta, "!ack-lost-then-down") {
                    CLAIMS_DOWN_UNTIL.set(parley::plugin::clock::monotonic_now_ns() + 1_000_000_000);
                }
                let lost = result.is_ok() && (marker(delta, "!ack-lost") || marker(delta, "!ack-lost-then-down"));
                results.push(if lost { Err(StoreError::Unavailable("injected timeout after the write".to_string())) } else { result });
            }
        }
        results
    }
    fn renew_lease(instance_id: String, incarnation: String, address: String, now_ms: u64, ttl_ms: u64) -> Result<Vec<Member>, StoreError> {
        tables::renew_lease(&instance_id, &incarnation, &address, now_ms, ttl_ms)
    }
    fn release_lease(instance_id: String, incarnation: String) -> Result<(), StoreError> {
        tables::release_lease(&instance_id, &incarnation)
    }
    fn locate(chat_ids: Vec<String>) -> Vec<Result<Option<Location>, StoreError>> {
        chat_ids.iter().map(|id| tables::locate(id)).collect()
    }
    fn claim(owner: String, requests: Vec<ClaimRequest>, now_ms: u64) -> Vec<Result<ClaimOutcome, StoreError>> {
        if parley::plugin::clock::monotonic_now_ns() < CLAIMS_DOWN_UNTIL.get() {
            return requests.iter().map(|_| Err(StoreError::Unavailable("injected outage".to_string()))).collect();
        }
        tables::claim(&owner, &requests, now_ms)
    }
    fn load(chat_ids: Vec<String>) -> Vec<Result<Option<Transcript>, StoreError>> {
        tables::load(&chat_ids)
    }
    fn save_final(transcript: Transcript) -> Result<(), StoreError> {
        tables::save_final(&transcript)
    }
    fn purge(chat_id: String) -> Result<(), StoreError> {
        tables::purge(&chat_id)
    }
}

export!(FaultyStore);
