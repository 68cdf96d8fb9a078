//! The embedded SQLite database (WAL) behind the `sql` capability. Each store plugin instance
//! gets its own connection to the one file under `--data` for its reads; statements are
//! prepared once and cached, and a `transaction` call is one SQLite transaction, so one group
//! commit is one fsync.
//!
//! Four things the host does for every connection to the file, because SQLite alone would not:
//! - All write transactions of the process go through one shared writer connection. In WAL
//!   mode a connection drops its whole page cache whenever another connection has committed
//!   since its last transaction: with the lease renewals on a connection of their own, the
//!   group commit re-read its 1,000 chats' pages from disk after every renewal.
//! - Write transactions take turns in arrival order (`WriteGate`). SQLite's own busy handler
//!   sleeps and retries, so a writer that commits back to back (the group commit under load)
//!   can starve another one for seconds — and the starved one is the lease renewal, whose
//!   lateness fences the whole instance.
//! - WAL checkpoints run on a thread of their own (`Checkpoints`), not inside whichever
//!   commit crosses the autocheckpoint size: a passive checkpoint runs beside the writer.
//! - SQLite's page cache is wrapped (`page_cache`) so that a commit after a page split does
//!   not walk every cached page.

use crate::config::Synchronous;
use crate::kpi::Histogram;
use crate::plugins::bindings::sql::{SqlError, Statement, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, ToSql};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct Database {
    /// For reads.
    conn: Connection,
    gate: Arc<WriteGate>,
    path: PathBuf,
    synchronous: Synchronous,
    busy_timeout: Duration,
    checkpointed: bool,
    /// Time spent in `transaction` so far, for `parley bench plugins`: what of a store call
    /// is SQLite and what is the plugin around it.
    pub spent: SqlTime,
    /// Where each COMMIT's duration goes (the instance's `parley_sqlite_commit_seconds`).
    commits: Option<Arc<Histogram>>,
}

/// Cumulative time in write transactions: running their statements, and committing (with
/// synchronous = full, the WAL fsync).
#[derive(Clone, Copy, Debug, Default)]
pub struct SqlTime {
    pub statements: Duration,
    pub commit: Duration,
}

/// The embedded database file of an instance, and what its connections share.
#[derive(Clone, Debug)]
pub struct DatabaseFile {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    gate: Arc<WriteGate>,
    /// Whether a checkpoint thread runs for this file.
    checkpointed: bool,
    /// Where connections opened from now on record how long each COMMIT took.
    commits: Option<Arc<Histogram>>,
}

impl DatabaseFile {
    pub fn new(path: PathBuf, synchronous: Synchronous, busy_timeout: Duration) -> Self {
        let gate = Arc::new(WriteGate::for_file(&path, busy_timeout));
        Self { path, synchronous, busy_timeout, gate, checkpointed: false, commits: None }
    }

    pub fn open(&self) -> Result<Database, rusqlite::Error> {
        Database::connect(&self.path, self.synchronous, self.busy_timeout, self.checkpointed, self.gate.clone(), self.commits.clone())
    }

    /// Connections opened by `open` from now on record each COMMIT's duration in `into`.
    pub fn record_commits(&mut self, into: Arc<Histogram>) {
        self.commits = Some(into);
    }

    /// Leaves WAL checkpoints to a thread of their own: connections opened by `open` from now
    /// on do not checkpoint in their commits. The thread runs once `Checkpoints::start` is
    /// called — when the instance has started, so that an instance refusing to start (a
    /// broken deployment) says so in one line, without a checkpoint thread racing the store's
    /// first connection to a new file.
    pub fn checkpoint_apart(&mut self) -> Checkpoints {
        self.checkpointed = true;
        Checkpoints(self.clone())
    }
}

/// The checkpoint thread of a database file, not yet running (see `checkpoint_apart`).
pub struct Checkpoints(DatabaseFile);

impl Checkpoints {
    /// Checkpoints the WAL into the database file every `period` on a thread of its own
    /// connection, for as long as the process runs. A passive checkpoint copies pages beside
    /// the writers; but the WAL only starts over once a checkpoint caught up with the last
    /// commit, which under steady load a passive one never does — so past
    /// `RESTART_AFTER_FRAMES` it catches up in passes beside the writers, and copies the last
    /// few frames in a writer's turn.
    pub fn start(self, period: Duration) -> std::io::Result<()> {
        let file = self.0;
        std::thread::Builder::new().name("parley-checkpoint".into()).spawn(move || {
            let mut db = None;
            // Logged when checkpoints start failing and when they work again, not every time.
            let mut failing = false;
            loop {
                std::thread::sleep(period);
                if db.is_none() {
                    // It holds this process's writers' turn while it waits for another
                    // process's writer: briefly, then it tries again next time.
                    db = connection(&file.path, file.synchronous, Duration::from_millis(100), true).ok();
                }
                match db.as_ref().map(|conn| checkpoint(conn, &file.gate, &file.path)) {
                    Some(Ok(())) if failing => {
                        failing = false;
                        tracing::info!(event_id = "sqlite.checkpoint_resumed", "WAL checkpoints work again");
                    }
                    Some(Ok(())) => {}
                    failed => {
                        if !failing {
                            failing = true;
                            let cause = match failed {
                                Some(Err(e)) => e.to_string(),
                                _ => "cannot open the database".to_string(),
                            };
                            tracing::warn!(event_id = "sqlite.checkpoint_failed", cause, "WAL checkpoints fail; retrying every {} ms", period.as_millis());
                        }
                        db = None;
                    }
                }
            }
        })?;
        Ok(())
    }
}

/// A WAL longer than this (16 MiB of 4 KiB pages) starts over after the next checkpoint.
const RESTART_AFTER_FRAMES: i64 = 4096;

/// A checkpoint in a writer's turn copies at most about this many frames (the rest having
/// been copied beside the writers), so commits wait for it only briefly.
const CATCH_UP_IN_TURN: i64 = 256;

/// Write transactions on one database file, first come first served: within this process a
/// ticket lock; between processes sharing the file (instances of a cluster on one host) a pair
/// of lock files next to it (see `Turn`). The kernel drops a dead process's file locks, so a
/// `kill -9` mid-transaction blocks nobody.
#[derive(Debug, Default)]
struct WriteGate {
    /// (next ticket to hand out, ticket now writing)
    tickets: Mutex<(u64, u64)>,
    turn: Condvar,
    /// The lock files, opened at the first write (none for a private connection).
    files: std::sync::OnceLock<Option<LockFiles>>,
    database: Option<PathBuf>,
    busy_timeout: Duration,
    /// The process's one connection for writes, opened at the first write; used only within
    /// a `Turn`.
    writer: Mutex<Option<Connection>>,
}

/// Takes a file lock, polling: `true` once taken, `false` past `until` or on an error.
fn take(try_lock: impl Fn() -> Result<(), std::fs::TryLockError>, until: std::time::Instant) -> bool {
    loop {
        match try_lock() {
            Ok(()) => return true,
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => std::thread::sleep(Duration::from_micros(100)),
            Err(_) => return false,
        }
    }
}

#[derive(Debug)]
struct LockFiles {
    /// Held exclusively by the process writing.
    writing: std::fs::File,
    /// Held shared by the processes waiting to write.
    waiting: std::fs::File,
}

/// One writer's turn.
///
/// Between processes: a writer waits for the waiting room to be empty (an exclusive lock on
/// `-waiting` is granted only when nobody holds it shared), enters it (shared), takes the
/// `-writing` lock (polling every 0.1 ms), and leaves the room. A process that writes back to
/// back therefore cannot take the `-writing` lock again while another one is waiting for it:
/// they alternate. SQLite's own busy handler (sleep 1 ... 100 ms, retry) let such a process
/// starve the others for seconds.
struct Turn<'a>(&'a WriteGate);

impl WriteGate {
    fn for_file(database: &Path, busy_timeout: Duration) -> Self {
        Self { database: Some(database.to_path_buf()), busy_timeout, ..Default::default() }
    }

    fn enter(&self) -> Turn<'_> {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.0;
        t.0 += 1;
        while t.1 != mine {
            t = self.turn.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        drop(t);
        if let Some(files) = self.lock_files() {
            // Each step waits at most the busy timeout (a process stopped with SIGSTOP keeps its
            // locks); then SQLite's busy handler decides, as without these files.
            let until = std::time::Instant::now() + self.busy_timeout;
            let _ = take(|| files.waiting.try_lock(), until)
                && take(|| files.waiting.try_lock_shared(), until)
                && take(|| files.writing.try_lock(), until);
            let _ = files.waiting.unlock();
        }
        Turn(self)
    }

    fn lock_files(&self) -> Option<&LockFiles> {
        self.files
            .get_or_init(|| {
                let database = self.database.as_ref()?;
                let open = |suffix: &str| {
                    let mut name = database.as_os_str().to_owned();
                    name.push(suffix);
                    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(name)
                };
                match (open("-writing"), open("-waiting")) {
                    (Ok(writing), Ok(waiting)) => Some(LockFiles { writing, waiting }),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(event_id = "sqlite.lock_files_failed", cause = %e, "cannot open the write lock files; writes of different processes are ordered by SQLite alone");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(Some(files)) = self.0.files.get() {
            let _ = files.writing.unlock();
        }
        self.0.tickets.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
        self.0.turn.notify_all();
    }
}

impl Database {
    /// A connection of its own (its writes take no turns with others of this process).
    pub fn open(path: &Path, synchronous: Synchronous, busy_timeout: Duration) -> Result<Self, rusqlite::Error> {
        Self::connect(path, synchronous, busy_timeout, false, Default::default(), None)
    }

    fn connect(
        path: &Path,
        synchronous: Synchronous,
        busy_timeout: Duration,
        checkpointed: bool,
        gate: Arc<WriteGate>,
        commits: Option<Arc<Histogram>>,
    ) -> Result<Self, rusqlite::Error> {
        let conn = plugin_connection(path, synchronous, busy_timeout, checkpointed)?;
        Ok(Self { conn, gate, path: path.to_path_buf(), synchronous, busy_timeout, checkpointed, spent: SqlTime::default(), commits })
    }

    pub fn transaction(&mut self, statements: &[Statement]) -> Result<Vec<Vec<u64>>, SqlError> {
        let _turn = self.gate.enter();
        let mut writer = self.gate.writer.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match &mut *writer {
            Some(conn) => conn,
            none => none.insert(plugin_connection(&self.path, self.synchronous, self.busy_timeout, self.checkpointed).map_err(sql_error)?),
        };
        let started = Instant::now();
        let tx = conn.transaction().map_err(sql_error)?;
        let mut changed = Vec::with_capacity(statements.len());
        for statement in statements {
            let mut counts = Vec::with_capacity(statement.rows.len());
            if !statement.rows.is_empty() {
                let mut prepared = tx.prepare_cached(&statement.sql).map_err(sql_error)?;
                for row in &statement.rows {
                    let n = prepared.execute(rusqlite::params_from_iter(row.iter().map(Param))).map_err(sql_error)?;
                    counts.push(n as u64);
                }
            }
            changed.push(counts);
        }
        let committing = Instant::now();
        self.spent.statements += committing - started;
        tx.commit().map_err(sql_error)?;
        let committed = committing.elapsed();
        self.spent.commit += committed;
        if let Some(commits) = &self.commits {
            commits.record(committed);
        }
        Ok(changed)
    }

    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, SqlError> {
        let mut prepared = self.conn.prepare_cached(sql).map_err(sql_error)?;
        // Writes take their turn through `transaction`; a query that wrote would bypass it.
        if !prepared.readonly() {
            return Err(SqlError::Invalid("query runs read-only statements; write through transaction".into()));
        }
        let columns = prepared.column_count();
        let mut rows = prepared.query(rusqlite::params_from_iter(params.iter().map(Param))).map_err(sql_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(sql_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Integer(i),
                    ValueRef::Real(f) => Value::Real(f),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(values);
        }
        drop(rows);
        drop(prepared);
        // A BEGIN counts as read-only, but a transaction left open would pin the WAL.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(SqlError::Invalid("query cannot open a transaction".into()));
        }
        Ok(out)
    }
}

/// One round of the checkpoint thread (see `Checkpoints::start`).
fn checkpoint(conn: &Connection, gate: &WriteGate, path: &Path) -> Result<(), rusqlite::Error> {
    // Answers (frames in the WAL, frames checkpointed).
    let checkpoint = || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
    let (frames, mut done) = checkpoint()?;
    if frames <= RESTART_AFTER_FRAMES {
        return Ok(());
    }
    // Catch up beside the writers: each pass copies what was committed during the last.
    for _ in 0..4 {
        let before = done;
        (_, done) = checkpoint()?;
        if done - before <= CATCH_UP_IN_TURN {
            break;
        }
    }
    // Write the copied pages to disk beside the writers too, so the checkpoint's own fsync
    // in the turn finds little left to do.
    let _ = std::fs::File::open(path).and_then(|f| f.sync_data());
    // The rest in a writer's turn: with nothing left to copy, the next commit starts the
    // WAL over. (A RESTART checkpoint here held the turn for 3-20 ms at 10,000 msg/s, and
    // every message arriving meanwhile waited.)
    let _turn = gate.enter();
    checkpoint().map(drop)
}

/// A connection with the pragmas every connection to the file uses; `checkpointed`: a
/// checkpoint thread runs for the file, so commits leave the WAL to it.
fn connection(path: &Path, synchronous: Synchronous, busy_timeout: Duration, checkpointed: bool) -> Result<Connection, rusqlite::Error> {
    super::page_cache::install();
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // Keep the working set in memory (the store's log tail, the chats it fences against, the
    // pages its folds land on), and checkpoint the WAL less often than every 4 MB so
    // checkpoints do not stall commits (where no checkpoint thread does it; see
    // `Checkpoints`).
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "wal_autocheckpoint", if checkpointed { 0 } else { 16384 })?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // A WAL that grew in a burst is cut back to this size when it starts over.
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A connection for plugins' SQL: the granted database and nothing more. ATTACH (also used by
/// VACUUM INTO) would reach any file the host can; a PRAGMA could switch off durability for
/// every plugin writing through the shared writer connection.
fn plugin_connection(path: &Path, synchronous: Synchronous, busy_timeout: Duration, checkpointed: bool) -> Result<Connection, rusqlite::Error> {
    use rusqlite::hooks::{AuthAction, Authorization};
    let conn = connection(path, synchronous, busy_timeout, checkpointed)?;
    conn.authorizer(Some(|context: rusqlite::hooks::AuthContext<'_>| match context.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } | AuthAction::Pragma { .. } => Authorization::Deny,
        _ => Authorization::Allow,
    }));
    Ok(conn)
}

struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            // SQLite keeps NaN as NULL: refuse it rather than hand back something else.
            Value::Real(f) if f.is_nan() => return Err(rusqlite::Error::ToSqlConversionFailure("NaN cannot be stored (SQLite would keep NULL)".into())),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Classifies SQLite errors for plugins without leaking paths.
fn sql_error(e: rusqlite::Error) -> SqlError {
    let message = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SqlError::Busy(message),
        Some(ErrorCode::ConstraintViolation) => SqlError::Constraint(message),
        Some(
            ErrorCode::DiskFull | ErrorCode::SystemIoFailure | ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::DatabaseCorrupt,
        ) => SqlError::Io(message),
        _ => SqlError::Invalid(message),
    }
}
