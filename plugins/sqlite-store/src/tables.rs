//! The SQL behind the SQLite store: schema, fenced group-commit saves, claims, loads.
//! Shared as source with the faulty test store so both run exactly the same storage code.
//!
//! A group commit appends its events to `event_log`, in the order they are saved, so it writes a
//! few consecutive pages whatever the number of chats it carries (a row in `events`, which
//! keeps each chat's rows together for loads, dirties one page per chat). A row's key is its
//! position `n`, an integer: each writer appends in a block of positions of its own, and the
//! newest block is the table's end, where SQLite appends without rebalancing the pages before
//! it. The store keeps the
//! rows it logged in memory and copies ("folds") a chat's rows into `events` once it has
//! `CHAT_ROWS` of them, or once it holds the oldest row of a log grown past `LOG_BYTES` of
//! text or a span of rows: one page for many events. Folds are paced by the rows logged (a quarter more
//! rows folded than logged), so chats that reach `CHAT_ROWS` together (chats opened together, a
//! wave of restores) are folded over many commits, oldest first, instead of stalling some. Then it cuts the log's folded prefix. A load reads
//! `events` and the log rows of its chat, so a chat reads the same before and after a fold,
//! after a kill -9, and after a plugin instance was recreated.
//!
//! A log row is deleted only once it is in `events` (or its chat was purged). The plugin
//! instance that logged it knows when; rows whose writer's memory is gone are folded in one go:
//! by that writer's next plugin instance before it logs anything (after a restart, or a trap
//! that made the host recreate the instance), and by a claim once that writer's lease ran out.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

use crate::exports::parley::plugin::store::{ChatDelta, ClaimOutcome, ClaimRequest, Location, Member, Settings, StoreError, Transcript};
use crate::parley::plugin::sql::{self, SqlError, Statement, Value};
use crate::names::{kind_name, parse_kind, parse_state, state_name};
use crate::parley::plugin::types::{ChatState, Event};
use crate::LOG_SIZES;

/// The layout of the tables, numbered since 2026-11-28: 3 is `event_log` keyed by position; 2 was
/// `log` keyed by writer; 1, `events` alone. This store reads every layout up to its own.
const SCHEMA_VERSION: i64 = 3;
/// The oldest layout whose stores read what this one writes. A schema-2 store does not read
/// `event_log`: it gets those rows only through the claim trigger, when it takes a chat from
/// another owner, never for its own chats under the same instance id. So 3.
const READABLE_FROM: i64 = 3;

const SCHEMA: &[&str] = &[
    // Which layout wrote the file, and which stores can read it. A store refuses to start on a
    // file it cannot read: started on a newer layout, it would serve chats without the events
    // it does not know where to find, and answer as if they were never sent.
    "CREATE TABLE IF NOT EXISTS store_schema (
        one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL, readable_from INTEGER NOT NULL)",
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
    // New events of every writer (instance id), in saving order, until folded into `events`;
    // `n` in a block of `log_blocks` held by the writer.
    "CREATE TABLE IF NOT EXISTS event_log (
        n INTEGER PRIMARY KEY, writer TEXT NOT NULL, chat_id TEXT NOT NULL, seq INTEGER NOT NULL,
        kind TEXT NOT NULL, participant_id TEXT NOT NULL, nickname TEXT NOT NULL, text TEXT NOT NULL,
        client_msg_id TEXT, at_ms INTEGER NOT NULL)",
    // Block b holds the positions from b * LOG_SIZES.block_rows on. Taken max + 1, never given back.
    "CREATE TABLE IF NOT EXISTS log_blocks (block INTEGER PRIMARY KEY, writer TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS log_blocks_by_writer ON log_blocks (writer)",
    // The log as stores before 2026-11-28 wrote it (key: writer, then the writer's own count).
    // No longer written; read by loads and folded with its writer's rows, so a database from
    // before, and instances of the previous version during a rolling upgrade, lose nothing.
    "CREATE TABLE IF NOT EXISTS log (
        writer TEXT NOT NULL, n INTEGER NOT NULL, chat_id TEXT NOT NULL, seq INTEGER NOT NULL,
        kind TEXT NOT NULL, participant_id TEXT NOT NULL, nickname TEXT NOT NULL, text TEXT NOT NULL,
        client_msg_id TEXT, at_ms INTEGER NOT NULL,
        PRIMARY KEY (writer, n)) WITHOUT ROWID",
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

/// A claim from another owner folds the previous owner's rows of `event_log` (whose lease ran
/// out: `CLAIM` checks that) into `events`, inside the claim's own statement. This store folds
/// them before it claims (`fold_left_behind`, in chunks), so here it finds none; the trigger is
/// for the claimers that do not know `event_log`: instances of the version before 2026-11-28,
/// which read `events` and `log` only, during a rolling upgrade. Those run the same `CLAIM`, and
/// a trigger in the database runs whatever code issues it. `{block_rows}` is
/// `LogSizes::block_rows`, also in the name: each size of block has a trigger of its own.
const CLAIM_FOLDS_PREVIOUS_OWNER: &str = "CREATE TRIGGER IF NOT EXISTS claim_folds_previous_owner_{block_rows}
    AFTER UPDATE OF owner ON chats WHEN OLD.owner <> NEW.owner
    BEGIN
        INSERT OR REPLACE INTO events
            (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
            SELECT e.chat_id, e.seq, e.kind, e.participant_id, e.nickname, e.text, e.client_msg_id, e.at_ms
            FROM log_blocks b JOIN event_log e ON e.n >= b.block * {block_rows} AND e.n < (b.block + 1) * {block_rows}
            WHERE b.writer = OLD.owner AND EXISTS (SELECT 1 FROM chats WHERE chat_id = e.chat_id)
            ORDER BY e.chat_id, e.seq, e.n;
        DELETE FROM event_log WHERE n IN (SELECT e.n
            FROM log_blocks b JOIN event_log e ON e.n >= b.block * {block_rows} AND e.n < (b.block + 1) * {block_rows}
            WHERE b.writer = OLD.owner);
    END";

/// Upserts a chat row only while the writer holds the chat's epoch: 0 rows changed means
/// another owner has claimed the chat since, or created it first (the same chat id created on
/// two instances at once: a create retried with its client_request_id) — the write is fenced off.
const UPSERT_CHAT: &str = "INSERT INTO chats (chat_id, epoch, owner, state, meta)
    VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (chat_id) DO UPDATE SET state = excluded.state, meta = excluded.meta
    WHERE chats.epoch = excluded.epoch AND chats.owner = excluded.owner";

/// Logs one event while the writer (`{writer}`, a quoted literal) holds the chat's epoch: the
/// same fence as the chat row. The fence is the `writer` column: the chat row's owner while the
/// epoch holds, else NULL, which `OR IGNORE` skips (0 rows changed). A one-row `VALUES` insert
/// needs no statement journal; the `INSERT ... SELECT ... WHERE EXISTS` before it opened a
/// savepoint and copied the log's last page into it for every event (`parley bench plugins`,
/// synchronous=normal: SQLite statements 0.38 -> 0.32 ms per save of 100 events). `n` is never
/// taken twice (blocks are a writer's own), so `OR IGNORE` skips nothing else.
const LOG_EVENT: &str = "INSERT OR IGNORE INTO event_log
    (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms, writer, n)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,
        (SELECT owner FROM chats WHERE chat_id = ?1 AND epoch = ?9 AND owner = {writer}), ?10)";

/// Copies up to `FOLD_ROWS` logged rows of one chat (`?1`) into `events`, found by their
/// positions (`?2`...; unused ones are 0, a position no block holds): nothing crosses into the
/// plugin and back. They were accepted under the chat's epoch when logged. A later row of the
/// same seq replaces an earlier one: a resent event is the same event, and a seq logged again
/// with another event means the first save failed on its way back after it landed (a timeout),
/// the host refused that message and gave its seq to the next one, which is the one
/// acknowledged. Rows are folded in log order (the rowid `IN` list is walked in order, so
/// `ORDER BY n` costs no sort). A chat purged meanwhile (closed, its final transcript saved)
/// gets nothing back. One statement per chunk instead of one per row: `INSERT OR REPLACE ...
/// SELECT` runs in a statement journal, a savepoint and a copy of the chat's page in `events`
/// per execution (`parley bench plugins`, synchronous=normal: SQLite statements 0.32 -> 0.26 ms
/// per save of 100 events).
/// A ripe chat's rows fold in one statement.
const FOLD_ROWS: usize = CHAT_ROWS;
static FOLD_CHUNK: LazyLock<String> = LazyLock::new(|| {
    let positions = (2..FOLD_ROWS + 2).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    format!(
        "INSERT OR REPLACE INTO events
        (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
        SELECT chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms FROM event_log
        WHERE n IN ({positions}) AND chat_id = ?1 AND EXISTS (SELECT 1 FROM chats WHERE chat_id = ?1)
        ORDER BY n"
    )
});

/// Folds the rows a writer left in the log, then removes them: the rows of a previous process
/// or plugin instance of this writer, or of a writer whose lease ran out. First those of the
/// log of stores before 2026-11-28 (older than any of `event_log`), then `event_log`'s,
/// `LogSizes::fold_chunk` rows per transaction, so other writers are not held up for the whole log. In
/// key order for the B-tree, and the later of two rows of one seq last (see `FOLD_CHUNK`).
const FOLD_PREVIOUS_LOG: [&str; 2] = [
    "INSERT OR REPLACE INTO events
        (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
        SELECT chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms FROM log
        WHERE writer = ?1 AND EXISTS (SELECT 1 FROM chats WHERE chat_id = log.chat_id) ORDER BY chat_id, seq, n",
    "DELETE FROM log WHERE writer = ?1",
];
const FOLD_WRITER: [&str; 2] = [
    "INSERT OR REPLACE INTO events
        (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
        SELECT chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms FROM event_log
        WHERE n IN (SELECT n FROM event_log WHERE writer = ?1 ORDER BY n LIMIT ?2)
            AND EXISTS (SELECT 1 FROM chats WHERE chat_id = event_log.chat_id) ORDER BY chat_id, seq, n",
    "DELETE FROM event_log WHERE n IN (SELECT n FROM event_log WHERE writer = ?1 ORDER BY n LIMIT ?2)",
];

/// Cuts the rows this plugin instance logged, from its last cut (`?2`) to its oldest unfolded
/// row (`?3`).
const CUT_LOG: &str = "DELETE FROM event_log WHERE n >= ?2 AND n < ?3 AND writer = ?1";

/// Takes the block after the highest one taken; a writer that took the same block at the same
/// time changes nothing, and asks again.
const TAKE_BLOCK: &str = "INSERT OR IGNORE INTO log_blocks (block, writer) VALUES (?1, ?2)";

/// A chat is folded once it has this many logged rows...
const CHAT_ROWS: usize = 32;
/// ...or once its oldest row is more than `LogSizes::span` rows behind, folded or not (the log is
/// cut below its oldest unfolded row: one quiet chat would otherwise keep every row logged after
/// it). These are paced: each row logged earns a writer `FOLD_CREDIT_PER_ROW` quarter rows of
/// folding, saved up to one chat's worth while nothing is due, and a commit folds due chats while
/// it has credit (it may overdraw by the last chat's rows). So folds keep a quarter ahead of the
/// log, and a commit that carries a backlog folds about as many rows as it logs: budgets in
/// proportion to the commit, or of a chat per commit, made a slow commit's successor bigger and
/// slower again, most of all when a thousand chats opened together came due in the same second.
const FOLD_CREDIT_PER_ROW: i64 = 5;
const QUARTERS_PER_ROW: i64 = 4;
const FOLD_CREDIT_MAX: i64 = QUARTERS_PER_ROW * CHAT_ROWS as i64;
/// Or at once, holding the oldest row while the log holds more than this many bytes of unfolded
/// text. Together they bound what a load scans, what a claim folds, and what the plugin keeps in
/// memory.
const LOG_BYTES: usize = 8 << 20;

/// The sizes of the log that differ between the two stores built from this code: the faulty
/// test store's are small, so that its tests reach every bound.
pub struct LogSizes {
    /// Positions in one block of the log.
    pub block_rows: i64,
    /// The most rows the log keeps from a writer's oldest unfolded row on.
    pub span: u64,
    /// Rows folded per transaction when a writer's whole log is folded.
    pub fold_chunk: i64,
}

const EVENT_COLUMNS: &str = "seq, kind, participant_id, nickname, text, client_msg_id, at_ms";

/// Never lowers what a newer store recorded.
const RECORD_SCHEMA: &str = "INSERT INTO store_schema (one, version, readable_from) VALUES (1, ?1, ?2)
    ON CONFLICT (one) DO UPDATE SET version = max(version, excluded.version), readable_from = max(readable_from, excluded.readable_from)";

pub fn init(_settings: &Settings) -> Result<(), StoreError> {
    check_schema()?;
    let trigger = CLAIM_FOLDS_PREVIOUS_OWNER.replace("{block_rows}", &LOG_SIZES.block_rows.to_string());
    let mut statements = SCHEMA
        .iter()
        .map(|sql| sql.to_string())
        .chain([trigger])
        .map(|sql| Statement { sql, rows: vec![vec![]] })
        .collect::<Vec<_>>();
    let versions = vec![vec![Value::Integer(SCHEMA_VERSION), Value::Integer(READABLE_FROM)]];
    statements.push(Statement { sql: RECORD_SCHEMA.to_string(), rows: versions });
    sql::transaction(&statements).map(drop).map_err(store_error)
}

/// Refuses a file written by a layout this store cannot read, before creating anything in it.
/// A file from before the layouts were numbered has no `store_schema`: every such layout is
/// one this store reads.
fn check_schema() -> Result<(), StoreError> {
    let numbered = sql::query("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'store_schema'", &[]).map_err(store_error)?;
    if numbered.is_empty() {
        return Ok(());
    }
    let recorded = sql::query("SELECT version, readable_from FROM store_schema", &[]).map_err(store_error)?;
    match recorded.first() {
        Some(row) if int(&row[1]) as i64 > SCHEMA_VERSION => Err(StoreError::Invalid(format!(
            "the database holds store schema {}, which only stores of schema {} or newer read; this store is schema {SCHEMA_VERSION} (run the Parley that wrote it, or a newer one)",
            int(&row[0]),
            int(&row[1])
        ))),
        _ => Ok(()),
    }
}

/// What one plugin instance logged as one writer and has not folded yet.
struct Writer {
    /// `LOG_EVENT` for this writer.
    log_sql: String,
    next_n: i64,
    /// The end of its block of positions.
    block_end: i64,
    /// Its rows below this are cut already.
    cut_below: i64,
    chats: HashMap<String, Logged>,
    /// Each chat with logged rows, by its oldest row's `n`.
    oldest: BTreeMap<i64, String>,
    /// The oldest rows' `n` of the chats with `CHAT_ROWS` rows or more: due for a fold.
    ripe: BTreeSet<i64>,
    bytes: usize,
    /// Rows this instance logged so far.
    logged: u64,
    /// Quarter rows it may fold (see `FOLD_CREDIT_PER_ROW`); negative after an overdraft.
    fold_credit: i64,
}

struct Logged {
    first_n: i64,
    /// The writer's `logged` count at its first row.
    first_count: u64,
    /// Where its rows are in the log.
    rows: Vec<i64>,
    bytes: usize,
}

thread_local! {
    static WRITERS: RefCell<HashMap<String, Writer>> = RefCell::new(HashMap::new());
}

/// The writer state of `owner` in this plugin instance; the first time, whatever `owner`
/// left in the log before (another process, or this one before its plugin was recreated)
/// is folded first, and this instance logs in a block of positions of its own.
fn writer<'a>(writers: &'a mut HashMap<String, Writer>, owner: &str) -> Result<&'a mut Writer, StoreError> {
    if !writers.contains_key(owner) {
        fold_writer(owner)?;
        let first_n = take_block(owner)?;
        let literal = format!("'{}'", owner.replace('\'', "''"));
        let w = Writer {
            log_sql: LOG_EVENT.replace("{writer}", &literal),
            next_n: first_n,
            block_end: first_n + LOG_SIZES.block_rows,
            cut_below: first_n,
            chats: HashMap::new(),
            oldest: BTreeMap::new(),
            ripe: BTreeSet::new(),
            bytes: 0,
            logged: 0,
            fold_credit: 0,
        };
        writers.insert(owner.to_string(), w);
    }
    Ok(writers.get_mut(owner).unwrap())
}

fn fold_writer(writer: &str) -> Result<(), StoreError> {
    let run = |sql: [&str; 2], row: Vec<Value>| {
        let statements = sql.map(|sql| Statement { sql: sql.to_string(), rows: vec![row.clone()] });
        sql::transaction(&statements).map(|changed| changed[1][0]).map_err(store_error)
    };
    run(FOLD_PREVIOUS_LOG, vec![Value::Text(writer.to_string())])?;
    while run(FOLD_WRITER, vec![Value::Text(writer.to_string()), Value::Integer(LOG_SIZES.fold_chunk)])? > 0 {}
    Ok(())
}

/// A block of log positions of `writer`'s own; returns its first position.
fn take_block(writer: &str) -> Result<i64, StoreError> {
    for _ in 0..8 {
        let top = sql::query("SELECT coalesce(max(block), 0) FROM log_blocks", &[]).map_err(store_error)?;
        let block = top.first().map_or(0, |r| int(&r[0]) as i64) + 1;
        let row = vec![vec![Value::Integer(block), Value::Text(writer.to_string())]];
        let taken = sql::transaction(&[Statement { sql: TAKE_BLOCK.to_string(), rows: row }]).map_err(store_error)?;
        if taken[0][0] == 1 {
            return Ok(block * LOG_SIZES.block_rows);
        }
    }
    Err(StoreError::Unavailable("no block of log positions: other writers took each one first".to_string()))
}

/// One transaction for all deltas: their events appended to the log, the chats due folded
/// into `events`, the log's folded prefix cut. The chat row is written only when the chat's
/// metadata changed (the host sends `meta` then): rewriting it on every message would dirty a
/// second page per chat per commit. Event rows carry their own epoch fence. The events' strings
/// move into the statements' rows, not copied: the plugin's own code was ~11% of the store's
/// time at 20,000 msg/s, much of it copying them.
pub fn save(mut deltas: Vec<ChatDelta>) -> Vec<Result<(), StoreError>> {
    let Some(owner) = deltas.first().map(|d| d.owner.clone()) else { return Vec::new() };
    if let Some(other) = deltas.iter().find(|d| d.owner != owner) {
        let e = StoreError::Invalid(format!("one save carries two writers: {owner} and {}", other.owner));
        return deltas.iter().map(|_| Err(e.clone())).collect();
    }
    let events = deltas.iter_mut().map(|d| std::mem::take(&mut d.events)).collect();
    WRITERS.with_borrow_mut(|writers| match writer(writers, &owner) {
        Ok(w) => save_as(w, &owner, &deltas, events),
        Err(e) => deltas.iter().map(|_| Err(e.clone())).collect(),
    })
}

/// `deltas` without their events, which are `new_events`, one list per delta.
fn save_as(w: &mut Writer, owner: &str, deltas: &[ChatDelta], new_events: Vec<Vec<Event>>) -> Vec<Result<(), StoreError>> {
    let counts: Vec<usize> = new_events.iter().map(Vec::len).collect();
    let logging = counts.iter().sum::<usize>() as i64;
    if w.next_n + logging > w.block_end {
        if logging > LOG_SIZES.block_rows {
            let e = StoreError::Invalid(format!("one save of {logging} events: a block of the log holds {}", LOG_SIZES.block_rows));
            return deltas.iter().map(|_| Err(e.clone())).collect();
        }
        match take_block(owner) {
            Ok(first_n) => (w.next_n, w.block_end) = (first_n, first_n + LOG_SIZES.block_rows),
            Err(e) => return deltas.iter().map(|_| Err(e.clone())).collect(),
        }
    }
    let mut chats = Vec::new();
    let mut events = Vec::new();
    // Per delta: which row of which statement tells whether its epoch was current.
    let mut fence = Vec::with_capacity(deltas.len());
    let mut n = w.next_n;
    // Each event's place in the log and its text bytes, remembered once the commit succeeded.
    let mut placed = Vec::new();
    // Chats due for a fold, while the credit lasts; the rest wait for the next commits.
    let mut due: Vec<String> = Vec::new();
    let mut ripening: Vec<&str> = Vec::new();
    for ((delta, delta_events), &count) in deltas.iter().zip(new_events).zip(&counts) {
        if let Some(meta) = &delta.meta {
            fence.push(Some((0, chats.len())));
            chats.push(vec![
                Value::Text(delta.chat_id.clone()),
                Value::Integer(delta.epoch as i64),
                Value::Text(delta.owner.clone()),
                Value::Text(state_name(delta.state).to_string()),
                Value::Text(meta.clone()),
            ]);
        } else if count == 0 {
            fence.push(None);
        } else {
            fence.push(Some((1, events.len())));
        }
        for event in delta_events {
            let mut row = event_row(&delta.chat_id, event);
            placed.push((n, row_bytes(&row)));
            row.push(Value::Integer(delta.epoch as i64));
            row.push(Value::Integer(n));
            n += 1;
            events.push(row);
        }
        if let Some(logged) = w.chats.get(&delta.chat_id)
            && logged.rows.len() < CHAT_ROWS
            && logged.rows.len() + count >= CHAT_ROWS
            && !ripening.contains(&delta.chat_id.as_str())
        {
            ripening.push(&delta.chat_id);
        }
    }
    // Chats due for a fold, while the credit lasts: those whose oldest row is more than the
    // span behind (they hold the log's cut back), then ripe ones, oldest first, then those this
    // save's events make ripe.
    let mut credit = (w.fold_credit + FOLD_CREDIT_PER_ROW * placed.len() as i64).min(FOLD_CREDIT_MAX);
    let logged_after = w.logged + placed.len() as u64;
    let behind = w.oldest.values().map(String::as_str).take_while(|chat| logged_after - w.chats[*chat].first_count > LOG_SIZES.span);
    let ripe = w.ripe.iter().map(|n| w.oldest[n].as_str());
    for chat in behind.chain(ripe).chain(ripening.iter().copied()) {
        if credit <= 0 {
            break;
        }
        if !due.iter().any(|c| c == chat) {
            credit -= QUARTERS_PER_ROW * w.chats[chat].rows.len() as i64;
            due.push(chat.to_string());
        }
    }
    // Then the chats holding the oldest rows, while the log's text would outgrow the plugin's
    // memory.
    let mut bytes = w.bytes + placed.iter().map(|(_, b)| b).sum::<usize>();
    for chat in &due {
        bytes -= w.chats[chat].bytes;
    }
    for chat in w.oldest.values() {
        if bytes <= LOG_BYTES {
            break;
        }
        if !due.contains(chat) {
            bytes -= w.chats[chat].bytes;
            due.push(chat.clone());
        }
    }
    let folded: Vec<(String, Logged)> = due.iter().map(|c| w.chats.remove_entry(c).unwrap()).collect();
    for (_, logged) in &folded {
        w.oldest.remove(&logged.first_n);
        w.ripe.remove(&logged.first_n);
    }
    // Below the oldest row still unfolded, every row this instance logged is in `events`.
    let cut_below = w.oldest.keys().next().copied().unwrap_or(w.next_n);
    let mut statements = vec![
        Statement { sql: UPSERT_CHAT.to_string(), rows: chats },
        Statement { sql: w.log_sql.clone(), rows: events },
    ];
    if !folded.is_empty() {
        let rows = folded
            .iter()
            .flat_map(|(chat, l)| {
                l.rows.chunks(FOLD_ROWS).map(|chunk| {
                    let positions = chunk.iter().copied().chain(std::iter::repeat(0)).take(FOLD_ROWS).map(Value::Integer);
                    std::iter::once(Value::Text(chat.clone())).chain(positions).collect()
                })
            })
            .collect();
        statements.push(Statement { sql: FOLD_CHUNK.clone(), rows });
    }
    if cut_below > w.cut_below {
        let rows = vec![vec![Value::Text(owner.to_string()), Value::Integer(w.cut_below), Value::Integer(cut_below)]];
        statements.push(Statement { sql: CUT_LOG.to_string(), rows });
    }
    let result = sql::transaction(&statements);
    match result {
        Ok(changed) => {
            w.next_n = n;
            w.fold_credit = credit;
            w.cut_below = w.cut_below.max(cut_below);
            for (_, logged) in &folded {
                w.bytes -= logged.bytes;
            }
            let mut placed = placed.into_iter();
            fence
                .iter()
                .zip(deltas.iter().zip(&counts))
                .map(|(fence, (delta, &count))| {
                    let mut logged = placed.by_ref().take(count);
                    match fence {
                        Some((statement, row)) if changed[*statement][*row] != 1 => Err(StoreError::StaleEpoch(format!(
                            "chat {} has moved past epoch {}",
                            delta.chat_id, delta.epoch
                        ))),
                        _ => {
                            logged.by_ref().for_each(|(n, bytes)| w.remember(&delta.chat_id, n, bytes));
                            Ok(())
                        }
                    }
                })
                .collect()
        }
        Err(e) => {
            // Nothing was written: the folded chats are still only logged.
            for (chat, logged) in folded {
                w.oldest.insert(logged.first_n, chat.clone());
                if logged.rows.len() >= CHAT_ROWS {
                    w.ripe.insert(logged.first_n);
                }
                w.chats.insert(chat, logged);
            }
            let e = store_error(e);
            deltas.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

impl Writer {
    /// Keeps where a row was just logged, and its text bytes, for its chat's fold.
    fn remember(&mut self, chat_id: &str, n: i64, bytes: usize) {
        let logged = match self.chats.get_mut(chat_id) {
            Some(l) => l,
            None => {
                self.oldest.insert(n, chat_id.to_string());
                self.chats.entry(chat_id.to_string()).or_insert(Logged { first_n: n, first_count: self.logged, rows: Vec::new(), bytes: 0 })
            }
        };
        logged.rows.push(n);
        logged.bytes += bytes;
        if logged.rows.len() == CHAT_ROWS {
            self.ripe.insert(logged.first_n);
        }
        self.bytes += bytes;
        self.logged += 1;
    }

    /// Forgets a purged chat's logged rows: nothing will read them again.
    fn forget(&mut self, chat_id: &str) {
        if let Some(logged) = self.chats.remove(chat_id) {
            self.oldest.remove(&logged.first_n);
            self.ripe.remove(&logged.first_n);
            self.bytes -= logged.bytes;
        }
    }
}

fn row_bytes(row: &[Value]) -> usize {
    row.iter()
        .map(|v| match v {
            Value::Text(s) => s.len(),
            _ => 8,
        })
        .sum()
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
    if let Err(e) = fold_left_behind(owner, now_ms) {
        return requests.iter().map(|_| Err(e.clone())).collect();
    }
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

/// Before a claim: the claimer's own rows from before this plugin instance, and the rows of
/// every writer whose lease ran out, are folded, so loads after a failover scan a short log.
fn fold_left_behind(owner: &str, now_ms: u64) -> Result<(), StoreError> {
    let dead = sql::query(
        "SELECT instance_id FROM members WHERE lease_expires_ms <= ?1 AND instance_id != ?2
            AND (EXISTS (SELECT 1 FROM log WHERE writer = members.instance_id)
                OR EXISTS (SELECT 1 FROM log_blocks b JOIN event_log e ON e.n >= b.block * ?3 AND e.n < (b.block + 1) * ?3
                    WHERE b.writer = members.instance_id))",
        &[Value::Integer(now_ms as i64), Value::Text(owner.to_string()), Value::Integer(LOG_SIZES.block_rows)],
    )
    .map_err(store_error)?;
    WRITERS.with_borrow_mut(|writers| {
        writer(writers, owner)?;
        dead.iter().map(|r| text(&r[0])).filter(|w| !writers.contains_key(w)).try_for_each(|w| fold_writer(&w))
    })
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

/// Loads many chats with one query per table, so a wave of restores scans the log once.
pub fn load(chat_ids: &[String]) -> Vec<Result<Option<Transcript>, StoreError>> {
    let mut loaded = Vec::with_capacity(chat_ids.len());
    for chunk in chat_ids.chunks(500) {
        match load_chunk(chunk) {
            Ok(transcripts) => loaded.extend(transcripts.into_iter().map(Ok)),
            Err(e) => loaded.extend(chunk.iter().map(|_| Err(e.clone()))),
        }
    }
    loaded
}

fn load_chunk(chat_ids: &[String]) -> Result<Vec<Option<Transcript>>, StoreError> {
    let query = |sql: &str, ids: &[&String]| {
        let list = (1..=ids.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let params: Vec<Value> = ids.iter().map(|id| Value::Text(id.to_string())).collect();
        sql::query(&sql.replace("{ids}", &list), &params).map_err(store_error)
    };
    let all: Vec<&String> = chat_ids.iter().collect();
    // A closed chat's final transcript wins over what is left of its intermediate one.
    let mut chats: HashMap<String, Transcript> = HashMap::new();
    for r in query("SELECT chat_id, epoch, meta FROM final_chats WHERE chat_id IN ({ids})", &all)? {
        let t = Transcript { chat_id: text(&r[0]), epoch: int(&r[1]), state: ChatState::Closed, meta: text(&r[2]), events: Vec::new() };
        chats.insert(t.chat_id.clone(), t);
    }
    let finals: Vec<String> = chats.keys().cloned().collect();
    let mut live = Vec::new();
    for r in query("SELECT chat_id, epoch, state, meta FROM chats WHERE chat_id IN ({ids})", &all)? {
        let t = Transcript { chat_id: text(&r[0]), epoch: int(&r[1]), state: parse_state(&text(&r[2])), meta: text(&r[3]), events: Vec::new() };
        if !chats.contains_key(&t.chat_id) {
            live.push(t.chat_id.clone());
            chats.insert(t.chat_id.clone(), t);
        }
    }
    let mut rows = Vec::new();
    if !finals.is_empty() {
        rows = query(&format!("SELECT chat_id, {EVENT_COLUMNS} FROM final_events WHERE chat_id IN ({{ids}})"), &finals.iter().collect::<Vec<_>>())?;
    }
    if !live.is_empty() {
        // Folded and logged rows in one statement, so one snapshot: a fold moves rows from the
        // log to `events` in one transaction, and this sees them on one side or the other. The
        // log has no index by chat (that would dirty a page per chat again): it is scanned once
        // per call, which is why loads come in batches and only chats that exist get here.
        // Each row with its age: folded rows are older than any logged row of their seq.
        rows.extend(query(
            &format!(
                "SELECT chat_id, {EVENT_COLUMNS}, 0 FROM events WHERE chat_id IN ({{ids}})
                 UNION ALL SELECT chat_id, {EVENT_COLUMNS}, n FROM log WHERE chat_id IN ({{ids}})
                 UNION ALL SELECT chat_id, {EVENT_COLUMNS}, n FROM event_log WHERE chat_id IN ({{ids}})"
            ),
            &live.iter().collect::<Vec<_>>(),
        )?);
    }
    let mut aged: HashMap<String, Vec<(u64, i64, Event)>> = HashMap::new();
    for r in &rows {
        let age = r.get(8).map_or(0, |v| int(v) as i64);
        aged.entry(text(&r[0])).or_default().push((int(&r[1]), age, event_from_row(&r[1..])));
    }
    // A seq may have several rows: a resent event logged twice, or folded as well, and a seq
    // given to the next event after a save that landed was refused (see `FOLD_CHUNK`). The
    // latest row of a seq is the event.
    for (chat_id, mut events) in aged {
        if let Some(t) = chats.get_mut(&chat_id) {
            events.sort_by_key(|(seq, age, _)| (*seq, *age));
            for (seq, _, event) in events {
                match t.events.last_mut() {
                    Some(last) if last.seq == seq => *last = event,
                    _ => t.events.push(event),
                }
            }
        }
    }
    // The same chat may be asked for twice in one batch.
    Ok(chat_ids.iter().map(|id| chats.get(id).cloned()).collect())
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
            rows: t.events.iter().map(|e| event_row(&t.chat_id, e.clone())).collect(),
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
    sql::transaction(&statements).map_err(store_error)?;
    // Its logged rows are cut with the rest; nothing reads them again.
    WRITERS.with_borrow_mut(|writers| writers.values_mut().for_each(|w| w.forget(chat_id)));
    Ok(())
}

fn event_row(chat_id: &str, e: Event) -> Vec<Value> {
    // Room for the log's epoch and position, which `save_as` appends.
    let mut row = Vec::with_capacity(10);
    row.extend([
        Value::Text(chat_id.to_string()),
        Value::Integer(e.seq as i64),
        Value::Text(kind_name(e.kind).to_string()),
        Value::Text(e.participant_id),
        Value::Text(e.nickname),
        Value::Text(e.text),
        e.client_msg_id.map_or(Value::Null, Value::Text),
        Value::Integer(e.at_ms as i64),
    ]);
    row
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
