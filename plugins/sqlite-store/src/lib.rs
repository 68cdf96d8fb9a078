//! The default transcript store: chats and their events in the host's embedded SQLite
//! database, reached through the granted `sql` import. One `save` call is one transaction.

wit_bindgen::generate!({ world: "transcript-store", path: "../../wit" });

mod names;
mod tables;

/// A block of 2^40 positions lasts one writer years. Busy chats fold at 32 rows long before the
/// span; it bounds the log behind a quiet chat, which a claim folds after a failover.
const LOG_SIZES: tables::LogSizes = tables::LogSizes { block_rows: 1 << 40, span: 65_536, fold_chunk: 16_384 };

use exports::parley::plugin::store::{ChatDelta, ClaimOutcome, ClaimRequest, Guest, Location, Member, Settings, StoreError, Transcript};

struct SqliteStore;

impl Guest for SqliteStore {
    fn init(settings: Settings) -> Result<(), StoreError> {
        tables::init(&settings)
    }
    fn save(deltas: Vec<ChatDelta>) -> Vec<Result<(), StoreError>> {
        tables::save(deltas)
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

export!(SqliteStore);
