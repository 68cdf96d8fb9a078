//! What a group commit costs SQLite alone, per event, for the ways of laying out a transcript
//! that the SQLite store was measured with: rows clustered by chat (one dirtied page per chat a
//! commit carries), rows appended in saving order (a few pages per commit, but no chat's rows
//! together), and appended rows copied into the clustered table 32 of a chat's rows at a time
//! with the log's prefix cut (the store until 2026-11-28), and the same with the log keyed by an
//! integer position, SQLite's rowid, so that appends go to the table's end without rebalancing
//! the pages before it (`positioned`: what `plugins/sqlite-store` does, folding 128 at a time).
//! No plugin, no HTTP: rusqlite on a real file, WAL, the store's schema, `chats` chats each
//! getting one event per commit in random order.
//!
//!     cargo run --release --example sqlite_layouts -- clustered|appended|folded|positioned [events per commit] [total events] [full|normal] [fold at]
//!
//! It prints µs per event and the slowest commit. The file is `sqlite-layouts.db` in the
//! system's temp directory, replaced on every run.

use rand::seq::SliceRandom;
use rusqlite::{Connection, params};
use std::time::Instant;

const CHATS: usize = 1000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let layout = args.get(1).map_or("folded", String::as_str);
    let per_commit: usize = args.get(2).map_or(300, |s| s.parse().expect("events per commit"));
    let total: usize = args.get(3).map_or(300_000, |s| s.parse().expect("total events"));
    let synchronous = args.get(4).map_or("full", String::as_str);
    let fold_at: usize = args.get(5).map_or(32, |s| s.parse().expect("rows per fold"));
    assert!(["clustered", "appended", "folded", "positioned"].contains(&layout), "layout: clustered, appended, folded or positioned");
    assert!(per_commit <= CHATS, "at most one event per chat per commit ({CHATS} chats)");

    let path = std::env::temp_dir().join("sqlite-layouts.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(&format!("PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA cache_size = -65536;")).unwrap();
    conn.execute_batch(
        "CREATE TABLE chats (chat_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, owner TEXT NOT NULL,
            state TEXT NOT NULL, meta TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE events (chat_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
            participant_id TEXT NOT NULL, nickname TEXT NOT NULL, text TEXT NOT NULL,
            client_msg_id TEXT, at_ms INTEGER NOT NULL, PRIMARY KEY (chat_id, seq)) WITHOUT ROWID;
         CREATE TABLE log (writer TEXT NOT NULL, n INTEGER NOT NULL, chat_id TEXT NOT NULL,
            seq INTEGER NOT NULL, kind TEXT NOT NULL, participant_id TEXT NOT NULL,
            nickname TEXT NOT NULL, text TEXT NOT NULL, client_msg_id TEXT, at_ms INTEGER NOT NULL,
            PRIMARY KEY (writer, n)) WITHOUT ROWID;",
    )
    .unwrap();
    if layout == "positioned" {
        conn.execute_batch(
            "DROP TABLE log; CREATE TABLE log (n INTEGER PRIMARY KEY, writer TEXT NOT NULL, chat_id TEXT NOT NULL,
                seq INTEGER NOT NULL, kind TEXT NOT NULL, participant_id TEXT NOT NULL, nickname TEXT NOT NULL,
                text TEXT NOT NULL, client_msg_id TEXT, at_ms INTEGER NOT NULL);",
        )
        .unwrap();
    }
    let chats: Vec<String> = (0..CHATS).map(|i| format!("{:016x}{:016x}", i * 7919, i)).collect();
    for chat in &chats {
        conn.execute("INSERT INTO chats VALUES (?1, 1, 'a', 'active', '{}')", params![chat]).unwrap();
    }
    let insert = match layout {
        "clustered" => {
            "INSERT OR REPLACE INTO events (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
             SELECT ?1, ?2, 'message', ?3, 'Ann', ?4, ?5, 1700000000000
             WHERE EXISTS (SELECT 1 FROM chats WHERE chat_id = ?1 AND epoch = 1 AND owner = 'a')"
        }
        _ => {
            "INSERT INTO log (writer, n, chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
             SELECT 'a', ?6, ?1, ?2, 'message', ?3, 'Ann', ?4, ?5, 1700000000000
             WHERE EXISTS (SELECT 1 FROM chats WHERE chat_id = ?1 AND epoch = 1 AND owner = 'a')"
        }
    };
    let fold = "INSERT OR IGNORE INTO events (chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms)
        SELECT chat_id, seq, kind, participant_id, nickname, text, client_msg_id, at_ms FROM log WHERE writer = 'a' AND n = ?1";
    let text = "x".repeat(40);
    let mut seqs = vec![0i64; CHATS];
    // Per chat, where its unfolded rows are in the log.
    let mut logged: Vec<Vec<i64>> = vec![Vec::new(); CHATS];
    let mut order: Vec<usize> = (0..CHATS).collect();
    let (mut n, mut done, mut slowest) = (0i64, 0, 0f64);
    let started = Instant::now();
    while done < total {
        order.shuffle(&mut rand::rng());
        let commit = Instant::now();
        let tx = conn.unchecked_transaction().unwrap();
        let mut folded = false;
        for &c in &order[..per_commit] {
            seqs[c] += 1;
            n += 1;
            let msg_id = format!("{c}-{}", seqs[c]);
            let mut statement = tx.prepare_cached(insert).unwrap();
            let (chat, agent) = (&chats[c], &chats[(c + 1) % CHATS]);
            match layout {
                "clustered" => statement.execute(params![chat, seqs[c], agent, text, msg_id]),
                _ => statement.execute(params![chat, seqs[c], agent, text, msg_id, n]),
            }
            .unwrap();
            if layout == "folded" || layout == "positioned" {
                logged[c].push(n);
                if logged[c].len() >= fold_at {
                    let mut statement = tx.prepare_cached(fold).unwrap();
                    for at in logged[c].drain(..) {
                        statement.execute(params![at]).unwrap();
                    }
                    folded = true;
                }
            }
        }
        if folded {
            let oldest = logged.iter().filter_map(|l| l.first()).min().copied().unwrap_or(n + 1);
            tx.execute("DELETE FROM log WHERE writer = 'a' AND n < ?1", params![oldest]).unwrap();
        }
        tx.commit().unwrap();
        slowest = slowest.max(commit.elapsed().as_secs_f64());
        done += per_commit;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{layout}, {per_commit} events per commit, synchronous {synchronous}, fold at {fold_at}: {:.1} µs per event ({:.0} events/s), slowest commit {:.1} ms",
        elapsed * 1e6 / done as f64,
        done as f64 / elapsed,
        slowest * 1e3
    );
}
