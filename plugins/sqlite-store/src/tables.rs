//! The SQL behind the SQLite store: schema, fenced group-commit saves, claims, loads.
//! Shared as source with the faulty test store so both run exactly the same storage code.

use crate::exports::parley::plugin::store::{ChatDelta, ClaimOutcome, ClaimRequest, Location, Member, Settings, StoreError, Transcript};
use crate::parley::plugin::sql::{self, SqlError, Statement, Value};
use crate::names::{kind_name, parse_kind, parse_state, state_name};
use crate::parley::plugin::types::{ChatState, Event};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS chats (
        chat_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, owner TEXT NOT NULL,
        state TEXT NOT NULL, meta TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS events (
        chat_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
        participant_id TEXT NOT NULL, nickname TEXT NOT NULL, text TEXT NOT NULL,
        client_msg_id TEXT, at_ms INTEGER NOT NULL,
        PRIMARY KEY (chat_id, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS final_chats (
        chat_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, meta TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS final_events (
        chat_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
        participant_id TEXT NOT NULL, nickname TEXT NOT NULL, text TEXT NOT NULL,
        client_msg_id TEXT, at_ms INTEGER NOT NULL,
        PRIMARY KEY (chat_id, seq)) WITHOUT ROWID",
    // Cluster membership: one lease row per instance id.
    "CREATE TABLE IF NOT EXISTS members (
        instance_id TEXT PRIMARY KEY, incarnation TEXT NOT NULL, address TEXT NOT NULL,
        lease_expires_ms INTEGER NOT NULL) WITHOUT ROWID",
];

/// A lease is renewed by the incarnation holding it, or taken over once it ran out.
const RENEW_LEASE: &str = "INSERT INTO members (instance_id, incarnation, address, lease_expires_ms)
    VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (instance_id) DO UPDATE SET incarnation = excluded.incarnation,
        address = excluded.address, lease_expires_ms = excluded.lease_expires_ms
    WHERE members.incarnation = excluded.incarnation OR members.lease_expires_ms <= ?5";

/// The compare-and-set of a restore: the epoch must be the expected one, and the owner must
/// be the claimer itself or hold no live lease.
const CLAIM: &str = "UPDATE chats SET epoch = epoch + 1, owner = ?2
    WHERE chat_id = ?1 AND epoch = ?3 AND (owner = ?2 OR NOT EXISTS
        (SELECT 1 FROM members WHERE instance_id = chats.owner AND lease_expires_ms > ?4))";

/// Upserts a chat row only while the writer holds the chat's epoch: 0 rows changed means
/// another owner has claimed the chat since, or created it first (the same chat id created on
/// two instances at once: a create retried with its client_request_id) — the write is fenced off.
const UPSERT_CHAT: &str = "INSERT INTO chats (chat_id, epoch, owner, state, meta)
    VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (chat_id) DO UPDATE SET state = excluded.state, meta = excluded.meta
    WHERE chats.epoch = excluded.epoch AND chats.owner = excluded.owner";

const INSERT_EVENT: &str = "INSERT OR REPLACE INTO events
    (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
    WHERE EXISTS (SELECT 1 FROM chats WHERE chat_id = ?1 AND epoch = ?9 AND owner = ?10)";

const EVENT_COLUMNS: &str = "seq, kind, participant_id, nickname, text, client_msg_id, at_ms";

pub fn init(_settings: &Settings) -> Result<(), StoreError> {
    let statements = SCHEMA
        .iter()
        .map(|sql| Statement { sql: sql.to_string(), rows: vec![vec![]] })
        .collect::<Vec<_>>();
    sql::transaction(&statements).map(drop).map_err(store_error)
}

/// One transaction for all deltas. The chat row is written only when the chat's metadata
/// changed (the host sends `meta` then): rewriting it on every message would dirty a second
/// page per chat per commit. Event rows carry their own epoch fence.
pub fn save(deltas: &[ChatDelta]) -> Vec<Result<(), StoreError>> {
    let mut chats = Vec::new();
    let mut events = Vec::new();
    // Per delta: which row of which statement tells whether its epoch was current.
    let mut fence = Vec::with_capacity(deltas.len());
    for delta in deltas {
        if let Some(meta) = &delta.meta {
            fence.push(Some((0, chats.len())));
            chats.push(vec![
                Value::Text(delta.chat_id.clone()),
                Value::Integer(delta.epoch as i64),
                Value::Text(delta.owner.clone()),
                Value::Text(state_name(delta.state).to_string()),
                Value::Text(meta.clone()),
            ]);
        } else if delta.events.is_empty() {
            fence.push(None);
        } else {
            fence.push(Some((1, events.len())));
        }
        for event in &delta.events {
            let mut row = event_row(&delta.chat_id, event);
            row.push(Value::Integer(delta.epoch as i64));
            row.push(Value::Text(delta.owner.clone()));
            events.push(row);
        }
    }
    let statements = [
        Statement { sql: UPSERT_CHAT.to_string(), rows: chats },
        Statement { sql: INSERT_EVENT.to_string(), rows: events },
    ];
    match sql::transaction(&statements) {
        Ok(changed) => fence
            .iter()
            .zip(deltas)
            .map(|(fence, delta)| match fence {
                Some((statement, row)) if changed[*statement][*row] != 1 => Err(StoreError::StaleEpoch(format!(
                    "chat {} has moved past epoch {}",
                    delta.chat_id, delta.epoch
                ))),
                _ => Ok(()),
            })
            .collect(),
        Err(e) => {
            let e = store_error(e);
            deltas.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

pub fn renew_lease(instance_id: &str, incarnation: &str, address: &str, now_ms: u64, ttl_ms: u64) -> Result<Vec<Member>, StoreError> {
    let row = vec![
        Value::Text(instance_id.to_string()),
        Value::Text(incarnation.to_string()),
        Value::Text(address.to_string()),
        Value::Integer((now_ms + ttl_ms) as i64),
        Value::Integer(now_ms as i64),
    ];
    let changed = sql::transaction(&[Statement { sql: RENEW_LEASE.to_string(), rows: vec![row] }]).map_err(store_error)?;
    if changed[0][0] != 1 {
        return Err(StoreError::Invalid(format!(
            "instance id {instance_id} is already running: another process holds its lease"
        )));
    }
    let rows = sql::query("SELECT instance_id, address, lease_expires_ms FROM members", &[]).map_err(store_error)?;
    Ok(rows
        .iter()
        .map(|r| Member { instance_id: text(&r[0]), address: text(&r[1]), lease_expires_ms: int(&r[2]) })
        .collect())
}

pub fn release_lease(instance_id: &str, incarnation: &str) -> Result<(), StoreError> {
    let statement = Statement {
        sql: "UPDATE members SET lease_expires_ms = 0 WHERE instance_id = ?1 AND incarnation = ?2".to_string(),
        rows: vec![vec![Value::Text(instance_id.to_string()), Value::Text(incarnation.to_string())]],
    };
    sql::transaction(&[statement]).map(drop).map_err(store_error)
}

pub fn locate(chat_id: &str) -> Result<Option<Location>, StoreError> {
    let rows = sql::query("SELECT owner, epoch, state FROM chats WHERE chat_id = ?1", &[Value::Text(chat_id.to_string())])
        .map_err(store_error)?;
    Ok(rows.first().map(|r| Location {
        chat_id: chat_id.to_string(),
        owner: text(&r[0]),
        epoch: int(&r[1]),
        state: parse_state(&text(&r[2])),
    }))
}

pub fn claim(owner: &str, requests: &[ClaimRequest], now_ms: u64) -> Vec<Result<ClaimOutcome, StoreError>> {
    let rows = requests
        .iter()
        .map(|r| {
            vec![
                Value::Text(r.chat_id.clone()),
                Value::Text(owner.to_string()),
                Value::Integer(r.expected_epoch as i64),
                Value::Integer(now_ms as i64),
            ]
        })
        .collect();
    let changed = match sql::transaction(&[Statement { sql: CLAIM.to_string(), rows }]) {
        Ok(c) => c,
        Err(e) => {
            let e = store_error(e);
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
    };
    requests
        .iter()
        .zip(&changed[0])
        .map(|(r, &n)| if n == 1 { Ok(ClaimOutcome::Claimed(r.expected_epoch + 1)) } else { refusal(r) })
        .collect()
}

/// Why a claim changed nothing: the epoch moved on, or the owner's lease is live.
fn refusal(r: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
    let rows = sql::query(
        "SELECT c.epoch, m.lease_expires_ms FROM chats c LEFT JOIN members m ON m.instance_id = c.owner
         WHERE c.chat_id = ?1",
        &[Value::Text(r.chat_id.clone())],
    )
    .map_err(store_error)?;
    match rows.first() {
        None => Err(StoreError::Invalid(format!("no open chat {}", r.chat_id))),
        Some(row) if int(&row[0]) != r.expected_epoch => Ok(ClaimOutcome::EpochMoved(int(&row[0]))),
        Some(row) => Ok(ClaimOutcome::OwnerAlive(int(&row[1]))),
    }
}

pub fn load(chat_id: &str) -> Result<Option<Transcript>, StoreError> {
    let id = [Value::Text(chat_id.to_string())];
    let finals = sql::query("SELECT epoch, meta FROM final_chats WHERE chat_id = ?1", &id).map_err(store_error)?;
    let (table, epoch, state, meta) = if let Some(row) = finals.into_iter().next() {
        ("final_events", int(&row[0]), ChatState::Closed, text(&row[1]))
    } else {
        let live = sql::query("SELECT epoch, state, meta FROM chats WHERE chat_id = ?1", &id).map_err(store_error)?;
        let Some(row) = live.into_iter().next() else { return Ok(None) };
        ("events", int(&row[0]), parse_state(&text(&row[1])), text(&row[2]))
    };
    let rows = sql::query(
        &format!("SELECT {EVENT_COLUMNS} FROM {table} WHERE chat_id = ?1 ORDER BY seq"),
        &id,
    )
    .map_err(store_error)?;
    let events = rows.iter().map(|r| event_from_row(r)).collect();
    Ok(Some(Transcript { chat_id: chat_id.to_string(), epoch, state, meta, events }))
}

pub fn save_final(t: &Transcript) -> Result<(), StoreError> {
    let statements = [
        Statement {
            sql: "INSERT OR REPLACE INTO final_chats (chat_id, epoch, meta) VALUES (?1, ?2, ?3)".to_string(),
            rows: vec![vec![
                Value::Text(t.chat_id.clone()),
                Value::Integer(t.epoch as i64),
                Value::Text(t.meta.clone()),
            ]],
        },
        Statement {
            sql: "INSERT OR REPLACE INTO final_events
                (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                .to_string(),
            rows: t.events.iter().map(|e| event_row(&t.chat_id, e)).collect(),
        },
    ];
    sql::transaction(&statements).map(drop).map_err(store_error)
}

pub fn purge(chat_id: &str) -> Result<(), StoreError> {
    let id = vec![vec![Value::Text(chat_id.to_string())]];
    let statements = [
        Statement { sql: "DELETE FROM events WHERE chat_id = ?1".to_string(), rows: id.clone() },
        Statement { sql: "DELETE FROM chats WHERE chat_id = ?1".to_string(), rows: id },
    ];
    sql::transaction(&statements).map(drop).map_err(store_error)
}

fn event_row(chat_id: &str, e: &Event) -> Vec<Value> {
    vec![
        Value::Text(chat_id.to_string()),
        Value::Integer(e.seq as i64),
        Value::Text(kind_name(e.kind).to_string()),
        Value::Text(e.participant_id.clone()),
        Value::Text(e.nickname.clone()),
        Value::Text(e.text.clone()),
        e.client_msg_id.clone().map_or(Value::Null, Value::Text),
        Value::Integer(e.at_ms as i64),
    ]
}

fn event_from_row(r: &[Value]) -> Event {
    Event {
        seq: int(&r[0]),
        kind: parse_kind(&text(&r[1])),
        participant_id: text(&r[2]),
        nickname: text(&r[3]),
        text: text(&r[4]),
        client_msg_id: match &r[5] {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        },
        at_ms: int(&r[6]),
    }
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Integer(i) => *i as u64,
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        _ => String::new(),
    }
}

fn store_error(e: SqlError) -> StoreError {
    match e {
        SqlError::Busy(m) | SqlError::Io(m) => StoreError::Unavailable(m),
        SqlError::Constraint(m) | SqlError::Invalid(m) => StoreError::Internal(m),
    }
}
