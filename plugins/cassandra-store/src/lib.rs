//! The Cassandra / ScyllaDB transcript store, reached through the granted `cql` import. The
//! tables are created by `parley storage init` from cassandra/schema.cql.
//!
//! Writes on the per-message path are plain (one concurrent round of upserts per group
//! commit). Lightweight transactions are used where correctness needs a compare-and-set: a
//! chat's first owner, claims (restores), lease renewals (one instance id never runs twice),
//! and the chat row's state and metadata, which change only on joins, leaves and closes. So
//! every write to `chats` but a purge is conditional on the epoch and owner, and a stale
//! owner's metadata is refused however late it arrives.
//!
//! A stale owner's events are kept out by the host's lease fence: it stops saving a quarter
//! lease before its lease can run out, and a claim needs the lease to have run out. A write
//! the fence let through can still arrive late (the process paused between the check and the
//! send, or the request sat in a queue): an event row is therefore written with its chat's
//! epoch as its write timestamp, so the new owner's row for the same seq wins whatever the
//! order of arrival, and a purged chat's tombstone (written at the current time) shadows any
//! late row of it.

wit_bindgen::generate!({ world: "transcript-store", path: "../../wit" });

#[path = "../../sqlite-store/src/names.rs"]
mod names;

use exports::parley::plugin::store::{ChatDelta, ClaimOutcome, ClaimRequest, Guest, Location, Member, Settings, StoreError, Transcript};
use names::{kind_name, parse_kind, parse_state, state_name};
use parley::plugin::cql::{self, CqlError, Statement, Value};
use parley::plugin::types::{ChatState, Event};
use std::collections::HashMap;
use std::sync::OnceLock;

const EVENT_COLUMNS: &str = "seq, kind, participant_id, nickname, text, client_msg_id, at_ms";

/// A chat's first owner, once: a later claim must never be overwritten by a retried creation.
const CREATE_CHAT: &str = "INSERT INTO parley.chats (chat_id, epoch, owner, state, meta) VALUES (?, 1, ?, ?, ?) IF NOT EXISTS";
/// Only while the writer holds the chat's epoch: a stale owner's late write is not applied.
const UPDATE_META: &str = "UPDATE parley.chats SET state = ?, meta = ? WHERE chat_id = ? IF epoch = ? AND owner = ?";
/// Written at timestamp = the chat's epoch (see the module doc): later epochs win; within one
/// epoch a row is only ever rewritten with the same event (a resend). A seq the host gives to
/// another event, after refusing a save that may have landed, is written at the next epoch:
/// the host claims it from itself first.
const INSERT_EVENT: &str = "INSERT INTO parley.events
    (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms, epoch)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?";
const CLAIM: &str = "UPDATE parley.chats SET owner = ?, epoch = ? WHERE chat_id = ? IF epoch = ? AND owner = ?";
const RENEW: &str = "UPDATE parley.members SET address = ?, lease_expires_ms = ? WHERE instance_id = ? IF incarnation = ?";
const FIRST_LEASE: &str = "INSERT INTO parley.members (instance_id, incarnation, address, lease_expires_ms) VALUES (?, ?, ?, ?) IF NOT EXISTS";
const TAKE_OVER_LEASE: &str = "UPDATE parley.members SET incarnation = ?, address = ?, lease_expires_ms = ?
    WHERE instance_id = ? IF incarnation = ? AND lease_expires_ms = ?";

struct CassandraStore;

/// The keyspace (setting `keyspace`, default "parley"): statements name their tables in full.
static KEYSPACE: OnceLock<String> = OnceLock::new();

/// `statement` with its `parley.` table prefixes pointed at the configured keyspace.
fn q(statement: &str) -> String {
    match KEYSPACE.get().map(String::as_str) {
        None | Some("parley") => statement.to_string(),
        Some(ks) => statement.replace("parley.", &format!("{ks}.")),
    }
}

impl Guest for CassandraStore {
    /// The schema is `parley storage init`'s job; here we only check it is there.
    fn init(settings: Settings) -> Result<(), StoreError> {
        let keyspace = settings.iter().find(|(k, _)| k == "keyspace").map_or("parley", |(_, v)| v.as_str());
        if keyspace.is_empty() || !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(StoreError::Invalid(format!("setting keyspace = {keyspace:?}: letters, digits and _ only")));
        }
        let _ = KEYSPACE.set(keyspace.to_string());
        match one(&q("SELECT instance_id FROM parley.members LIMIT 1"), vec![]) {
            Ok(_) => check_layout(),
            Err(CqlError::Invalid(m)) => Err(StoreError::Invalid(format!(
                "the keyspace lacks Parley's tables (run `parley storage init --config FILE` once): {m}"
            ))),
            Err(e) => Err(store_error(e)),
        }
    }

    fn save(deltas: Vec<ChatDelta>) -> Vec<Result<(), StoreError>> {
        let mut outcomes: Vec<Result<(), StoreError>> = deltas.iter().map(|_| Ok(())).collect();
        // First saves create the chat row with its metadata, once. A creation that finds the row
        // made by another owner (the same chat id created on two instances at once: a create
        // retried with its client_request_id) writes nothing: the chat is the other owner's.
        // The other metadata changes go to `updates`, and so does a creation that found the row
        // there: applied if it is ours (a resend), refused if it is another owner's.
        let (first_saves, mut updates): (Vec<usize>, Vec<usize>) = (0..deltas.len())
            .filter(|&i| deltas[i].meta.is_some())
            .partition(|&i| deltas[i].epoch == 1 && deltas[i].events.first().is_none_or(|e| e.seq == 1));
        if !first_saves.is_empty() {
            let rows = first_saves
                .iter()
                .map(|&i| vec![text(&deltas[i].chat_id), text(&deltas[i].owner), text(state_name(deltas[i].state)), text(deltas[i].meta.as_deref().unwrap_or_default())])
                .collect::<Vec<_>>();
            for (&i, result) in first_saves.iter().zip(cql::query(&q(CREATE_CHAT), &rows)) {
                match result {
                    Err(e) => outcomes[i] = Err(store_error(e)),
                    Ok(rows) if applied(&rows) => {}
                    // Not applied: ours already (a resend of this save), or another owner's.
                    Ok(_) => updates.push(i),
                }
            }
        }
        if !updates.is_empty() {
            let rows = updates
                .iter()
                .map(|&i| {
                    let d = &deltas[i];
                    vec![text(state_name(d.state)), text(d.meta.as_deref().unwrap_or_default()), text(&d.chat_id), Value::Bigint(d.epoch as i64), text(&d.owner)]
                })
                .collect::<Vec<_>>();
            for (&i, result) in updates.iter().zip(cql::query(&q(UPDATE_META), &rows)) {
                outcomes[i] = match result {
                    Err(e) => Err(store_error(e)),
                    Ok(rows) if applied(&rows) => Ok(()),
                    // Not applied: created by another instance (a keyed create raced), claimed
                    // by one since, or closed and purged.
                    Ok(_) => Err(StoreError::StaleEpoch(format!(
                        "chat {} is not at epoch {} of {}: another instance created or claimed it, or it was purged",
                        deltas[i].chat_id, deltas[i].epoch, deltas[i].owner
                    ))),
                };
            }
        }
        let mut events = Vec::new();
        for (d, outcome) in deltas.iter().zip(&outcomes) {
            if outcome.is_err() {
                continue;
            }
            for e in &d.events {
                let mut row = event_row(&d.chat_id, e);
                row.push(Value::Bigint(d.epoch as i64));
                row.push(Value::Bigint(d.epoch as i64));
                events.push(row);
            }
        }
        if events.is_empty() {
            return outcomes;
        }
        match cql::write(&[Statement { cql: q(INSERT_EVENT), rows: events }]) {
            Ok(()) => outcomes,
            Err(e) => {
                let e = store_error(e);
                outcomes.into_iter().map(|o| o.and(Err(e.clone()))).collect()
            }
        }
    }

    fn renew_lease(instance_id: String, incarnation: String, address: String, now_ms: u64, ttl_ms: u64) -> Result<Vec<Member>, StoreError> {
        let expires = Value::Bigint((now_ms + ttl_ms) as i64);
        let renewed = applied(&one(&q(RENEW), vec![text(&address), expires.clone(), text(&instance_id), text(&incarnation)]).map_err(store_error)?);
        if !renewed {
            let current = one(&q("SELECT incarnation, lease_expires_ms FROM parley.members WHERE instance_id = ?"), vec![text(&instance_id)]).map_err(store_error)?;
            let taken = match current.first() {
                None => applied(&one(&q(FIRST_LEASE), vec![text(&instance_id), text(&incarnation), text(&address), expires]).map_err(store_error)?),
                Some(row) if int(&row[1]) <= now_ms => applied(
                    &one(&q(TAKE_OVER_LEASE), vec![text(&incarnation), text(&address), expires, text(&instance_id), row[0].clone(), row[1].clone()])
                        .map_err(store_error)?,
                ),
                Some(_) => false,
            };
            if !taken {
                return Err(StoreError::Invalid(format!("instance id {instance_id} is already running: another process holds its lease")));
            }
        }
        let rows = one(&q("SELECT instance_id, address, lease_expires_ms FROM parley.members"), vec![]).map_err(store_error)?;
        Ok(rows.iter().map(|r| Member { instance_id: string(&r[0]), address: string(&r[1]), lease_expires_ms: int(&r[2]) }).collect())
    }

    fn release_lease(instance_id: String, incarnation: String) -> Result<(), StoreError> {
        one(&q("UPDATE parley.members SET lease_expires_ms = 0 WHERE instance_id = ? IF incarnation = ?"), vec![text(&instance_id), text(&incarnation)])
            .map(drop)
            .map_err(store_error)
    }

    fn locate(chat_ids: Vec<String>) -> Vec<Result<Option<Location>, StoreError>> {
        let params = chat_ids.iter().map(|id| vec![text(id)]).collect::<Vec<_>>();
        cql::query(&q("SELECT owner, epoch, state FROM parley.chats WHERE chat_id = ?"), &params)
            .into_iter()
            .zip(&chat_ids)
            .map(|(r, id)| {
                let rows = r.map_err(store_error)?;
                Ok(rows.first().filter(|row| !matches!(row[1], Value::Null)).map(|row| Location {
                    chat_id: id.clone(),
                    owner: string(&row[0]),
                    epoch: int(&row[1]),
                    state: parse_state(&string(&row[2])),
                }))
            })
            .collect()
    }

    /// Reads the chats and the leases, then one lightweight transaction per chat that may be
    /// taken (all concurrently): the epoch must still be the expected one and the owner the one
    /// whose lease was seen to have run out.
    fn claim(owner: String, requests: Vec<ClaimRequest>, now_ms: u64) -> Vec<Result<ClaimOutcome, StoreError>> {
        let params = requests.iter().map(|r| vec![text(&r.chat_id)]).collect::<Vec<_>>();
        let chats = cql::query(&q("SELECT epoch, owner FROM parley.chats WHERE chat_id = ?"), &params);
        let leases: HashMap<String, u64> = match one(&q("SELECT instance_id, lease_expires_ms FROM parley.members"), vec![]) {
            Ok(rows) => rows.iter().map(|r| (string(&r[0]), int(&r[1]))).collect(),
            Err(e) => {
                let e = store_error(e);
                return requests.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut outcomes: Vec<Result<ClaimOutcome, StoreError>> = Vec::with_capacity(requests.len());
        let mut attempts = Vec::new();
        for (r, found) in requests.iter().zip(chats) {
            let outcome = match found {
                Err(e) => Err(store_error(e)),
                Ok(rows) => match rows.first().filter(|row| !matches!(row[0], Value::Null)) {
                    None => Err(StoreError::Invalid(format!("no open chat {}", r.chat_id))),
                    Some(row) if int(&row[0]) != r.expected_epoch => Ok(ClaimOutcome::EpochMoved(int(&row[0]))),
                    Some(row) => {
                        let current = string(&row[1]);
                        match leases.get(&current) {
                            Some(&expires) if current != owner && expires > now_ms => Ok(ClaimOutcome::OwnerAlive(expires)),
                            _ => {
                                attempts.push((outcomes.len(), vec![
                                    text(&owner),
                                    Value::Bigint(r.expected_epoch as i64 + 1),
                                    text(&r.chat_id),
                                    Value::Bigint(r.expected_epoch as i64),
                                    text(&current),
                                ]));
                                Ok(ClaimOutcome::Claimed(r.expected_epoch + 1))
                            }
                        }
                    }
                },
            };
            outcomes.push(outcome);
        }
        let rows = attempts.iter().map(|(_, row)| row.clone()).collect::<Vec<_>>();
        for ((index, _), result) in attempts.iter().zip(cql::query(&q(CLAIM), &rows)) {
            outcomes[*index] = match result {
                Err(e) => Err(store_error(e)),
                Ok(rows) if applied(&rows) => continue,
                // Someone else's claim won: say where the chat is now.
                Ok(_) => match one(&q("SELECT epoch FROM parley.chats WHERE chat_id = ?"), vec![text(&requests[*index].chat_id)]) {
                    Ok(rows) => Ok(ClaimOutcome::EpochMoved(rows.first().map_or(0, |r| int(&r[0])))),
                    Err(e) => Err(store_error(e)),
                },
            };
        }
        outcomes
    }

    fn load(chat_ids: Vec<String>) -> Vec<Result<Option<Transcript>, StoreError>> {
        let params = chat_ids.iter().map(|id| vec![text(id)]).collect::<Vec<_>>();
        let finals = cql::query(&q("SELECT epoch, meta FROM parley.final_chats WHERE chat_id = ?"), &params);
        let lives = cql::query(&q("SELECT epoch, state, meta FROM parley.chats WHERE chat_id = ?"), &params);
        // Per chat: where its events are, and the transcript header.
        let mut heads: Vec<Result<Option<(bool, Transcript)>, StoreError>> = Vec::with_capacity(chat_ids.len());
        for ((id, f), l) in chat_ids.iter().zip(finals).zip(lives) {
            let head = match (f, l) {
                (Err(e), _) | (_, Err(e)) => Err(store_error(e)),
                (Ok(f), Ok(l)) => Ok(if let Some(row) = f.first() {
                    Some((true, transcript(id, int(&row[0]), ChatState::Closed, string(&row[1]))))
                } else {
                    l.first()
                        .filter(|row| !matches!(row[0], Value::Null))
                        .map(|row| (false, transcript(id, int(&row[0]), parse_state(&string(&row[1])), string(&row[2]))))
                }),
            };
            heads.push(head);
        }
        for table in ["final_events", "events"] {
            let wanted: Vec<usize> = (0..heads.len())
                .filter(|&i| matches!(&heads[i], Ok(Some((is_final, _))) if *is_final == (table == "final_events")))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let params = wanted.iter().map(|&i| vec![text(&chat_ids[i])]).collect::<Vec<_>>();
            let sql = q(&format!("SELECT {EVENT_COLUMNS} FROM parley.{table} WHERE chat_id = ?"));
            for (&i, rows) in wanted.iter().zip(cql::query(&sql, &params)) {
                match rows {
                    Ok(rows) => {
                        if let Ok(Some((_, t))) = &mut heads[i] {
                            t.events = rows.iter().map(|r| event_from_row(r)).collect();
                        }
                    }
                    Err(e) => heads[i] = Err(store_error(e)),
                }
            }
        }
        heads.into_iter().map(|h| h.map(|o| o.map(|(_, t)| t))).collect()
    }

    fn save_final(t: Transcript) -> Result<(), StoreError> {
        cql::write(&[
            Statement {
                cql: q("INSERT INTO parley.final_chats (chat_id, epoch, meta) VALUES (?, ?, ?)"),
                rows: vec![vec![text(&t.chat_id), Value::Bigint(t.epoch as i64), text(&t.meta)]],
            },
            Statement {
                cql: q("INSERT INTO parley.final_events (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                rows: t.events.iter().map(|e| event_row(&t.chat_id, e)).collect(),
            },
        ])
        .map_err(store_error)
    }

    fn purge(chat_id: String) -> Result<(), StoreError> {
        let id = vec![vec![text(&chat_id)]];
        cql::write(&[
            Statement { cql: q("DELETE FROM parley.events WHERE chat_id = ?"), rows: id.clone() },
            Statement { cql: q("DELETE FROM parley.chats WHERE chat_id = ?"), rows: id },
        ])
        .map_err(store_error)
    }
}

/// Runs one statement with one parameter row.
fn one(statement: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>, CqlError> {
    cql::query(statement, &[params]).pop().unwrap_or_else(|| Ok(Vec::new()))
}

/// The layout of the tables this store reads and writes, as `store_schema` records it
/// (cassandra/schema.cql): 1, the only one so far.
const LAYOUT: i32 = 1;

/// Refuses a keyspace in a layout this store cannot read. A keyspace made before the layouts
/// were numbered (no `store_schema`, or no row in it) is in layout 1.
fn check_layout() -> Result<(), StoreError> {
    let recorded = match one(&q("SELECT version, readable_from FROM parley.store_schema WHERE one = 1"), vec![]) {
        Ok(rows) => rows,
        Err(CqlError::Invalid(_)) => return Ok(()),
        Err(e) => return Err(store_error(e)),
    };
    match recorded.first().map(|r| (&r[0], &r[1])) {
        Some((Value::Int(version), Value::Int(readable_from))) if *readable_from > LAYOUT => Err(StoreError::Invalid(format!(
            "the keyspace holds store schema {version}, which only stores of schema {readable_from} or newer read; this store is schema {LAYOUT} (run the Parley that wrote it, or a newer one)"
        ))),
        _ => Ok(()),
    }
}

/// Whether a lightweight transaction took effect (its first column, `[applied]`).
fn applied(rows: &[Vec<Value>]) -> bool {
    matches!(rows.first().and_then(|r| r.first()), Some(Value::Boolean(true)))
}

fn transcript(chat_id: &str, epoch: u64, state: ChatState, meta: String) -> Transcript {
    Transcript { chat_id: chat_id.to_string(), epoch, state, meta, events: Vec::new() }
}

fn event_row(chat_id: &str, e: &Event) -> Vec<Value> {
    vec![
        text(chat_id),
        Value::Bigint(e.seq as i64),
        text(kind_name(e.kind)),
        text(&e.participant_id),
        text(&e.nickname),
        text(&e.text),
        e.client_msg_id.as_deref().map_or(Value::Null, text),
        Value::Bigint(e.at_ms as i64),
    ]
}

fn event_from_row(r: &[Value]) -> Event {
    Event {
        seq: int(&r[0]),
        kind: parse_kind(&string(&r[1])),
        participant_id: string(&r[2]),
        nickname: string(&r[3]),
        text: string(&r[4]),
        client_msg_id: match &r[5] {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        },
        at_ms: int(&r[6]),
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Bigint(i) => *i as u64,
        Value::Int(i) => *i as u64,
        _ => 0,
    }
}

fn string(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        _ => String::new(),
    }
}

fn store_error(e: CqlError) -> StoreError {
    match e {
        CqlError::Unavailable(m) => StoreError::Unavailable(m),
        CqlError::Invalid(m) => StoreError::Internal(m),
    }
}

export!(CassandraStore);
