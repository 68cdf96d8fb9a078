//! SQLite's own page cache, with one waste taken out of every commit.
//!
//! When a B-tree balance gets its new sibling pages out of order (pages reused from the
//! freelist, which the store's log feeds all the time), SQLite swaps their numbers through a
//! page number never used in a database: the "pending byte" page (262,145 with 4 KiB pages).
//! The default page cache remembers the largest page number it ever held, and at the end of
//! every write transaction it is asked to drop the pages past the database's end: when that
//! remembered number is further past the end than its hash table is long, it walks the whole
//! table. After a swap it always is, so a commit after a page split walked every page of the
//! writer's cache — 7,000 pages at 20,000 msg/s, 10% of the store thread's CPU in perf.
//!
//! This wraps the default cache and keeps its own largest page number, leaving out the
//! temporary one; a truncation is passed on only when a page past the limit can be cached.
//! Everything else is the default cache, unchanged.

use rusqlite::ffi;
use std::ffi::{c_int, c_uint};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// SQLite's default page cache methods.
struct DefaultMethods(ffi::sqlite3_pcache_methods2);
// SAFETY: the methods table is copied once at start and only read after; SQLite itself shares
// it between all connections of the process.
unsafe impl Sync for DefaultMethods {}
unsafe impl Send for DefaultMethods {}

static DEFAULT: OnceLock<DefaultMethods> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Truncations not passed on (for the test).
#[cfg(test)]
static SKIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the 1 GiB lock byte falls: SQLite never keeps a database page there.
const PENDING_BYTE: u64 = 0x4000_0000;

/// One connection's cache: SQLite calls it from one thread at a time.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// No page with a larger number can be in the cache (the pending page aside, which only
    /// ever holds a page in the middle of a swap).
    max_key: c_uint,
    pending: c_uint,
}

/// Installs the wrapper. It must run before SQLite is initialized (before the process opens
/// its first connection); later it changes nothing and the default cache stays.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config with the documented argument types; SQLite copies the table.
        unsafe {
            let mut methods: ffi::sqlite3_pcache_methods2 = std::mem::zeroed();
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &mut methods as *mut ffi::sqlite3_pcache_methods2) != ffi::SQLITE_OK {
                return;
            }
            if DEFAULT.set(DefaultMethods(methods)).is_err() {
                return;
            }
            let wrapped = ffi::sqlite3_pcache_methods2 {
                iVersion: 1,
                pArg: methods.pArg,
                xInit: methods.xInit,
                xShutdown: methods.xShutdown,
                xCreate: Some(create),
                xCachesize: Some(cache_size),
                xPagecount: Some(page_count),
                xFetch: Some(fetch),
                xUnpin: Some(unpin),
                xRekey: Some(rekey),
                xTruncate: Some(truncate),
                xDestroy: Some(destroy),
                xShrink: Some(shrink),
            };
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &wrapped as *const ffi::sqlite3_pcache_methods2) == ffi::SQLITE_OK {
                INSTALLED.store(true, Relaxed);
            } else {
                tracing::debug!("SQLite was initialized already: its default page cache stays");
            }
        }
    });
}

fn default() -> &'static ffi::sqlite3_pcache_methods2 {
    &DEFAULT.get().expect("the page cache wrapper is installed only after the default is kept").0
}

/// # Safety
/// `p` is a pointer `create` returned and `destroy` has not freed.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn create(page_size: c_int, extra: c_int, purgeable: c_int) -> *mut ffi::sqlite3_pcache {
    let inner = unsafe { (default().xCreate.expect("xCreate"))(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    let pending = (PENDING_BYTE / page_size.max(1) as u64 + 1) as c_uint;
    Box::into_raw(Box::new(Cache { inner, max_key: 0, pending })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn cache_size(p: *mut ffi::sqlite3_pcache, pages: c_int) {
    unsafe { (default().xCachesize.expect("xCachesize"))(cache(p).inner, pages) }
}

unsafe extern "C" fn page_count(p: *mut ffi::sqlite3_pcache) -> c_int {
    unsafe { (default().xPagecount.expect("xPagecount"))(cache(p).inner) }
}

unsafe extern "C" fn fetch(p: *mut ffi::sqlite3_pcache, key: c_uint, create: c_int) -> *mut ffi::sqlite3_pcache_page {
    let c = unsafe { cache(p) };
    let page = unsafe { (default().xFetch.expect("xFetch"))(c.inner, key, create) };
    if !page.is_null() && key > c.max_key {
        c.max_key = key;
    }
    page
}

unsafe extern "C" fn unpin(p: *mut ffi::sqlite3_pcache, page: *mut ffi::sqlite3_pcache_page, discard: c_int) {
    unsafe { (default().xUnpin.expect("xUnpin"))(cache(p).inner, page, discard) }
}

unsafe extern "C" fn rekey(p: *mut ffi::sqlite3_pcache, page: *mut ffi::sqlite3_pcache_page, old: c_uint, new: c_uint) {
    let c = unsafe { cache(p) };
    unsafe { (default().xRekey.expect("xRekey"))(c.inner, page, old, new) };
    if new != c.pending && new > c.max_key {
        c.max_key = new;
    }
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = unsafe { cache(p) };
    if limit <= c.max_key {
        unsafe { (default().xTruncate.expect("xTruncate"))(c.inner, limit) };
        c.max_key = limit.saturating_sub(1);
    } else {
        #[cfg(test)]
        SKIPPED.fetch_add(1, Relaxed);
    }
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    unsafe { (default().xDestroy.expect("xDestroy"))(c.inner) }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    unsafe { (default().xShrink.expect("xShrink"))(cache(p).inner) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::collections::BTreeMap;

    /// Page splits with pages reused from the freelist (the swaps), a transaction that grew the
    /// file rolled back (a truncation that must reach the cache), and a reader on another
    /// connection: the database stays intact and reads what was committed.
    #[test]
    fn a_database_reads_what_was_committed_through_splits_swaps_and_rollbacks() {
        install();
        assert!(INSTALLED.load(Relaxed), "SQLite was initialized before the wrapper: this test would not test it");
        let dir = std::env::temp_dir().join(format!("parley-page-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let open = || {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c.pragma_update(None, "cache_size", -65536).unwrap();
            c
        };
        let mut writer = open();
        let reader = open();
        writer.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID").unwrap();
        let mut model = BTreeMap::new();
        let mut seed: u64 = 7;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        let skipped_before = SKIPPED.load(Relaxed);
        for round in 0..60 {
            let tx = writer.transaction().unwrap();
            for _ in 0..200 {
                let k = format!("{:08}", next() % 1_000_000);
                let v = "x".repeat(20 + (next() % 300) as usize);
                tx.execute("INSERT OR REPLACE INTO t VALUES (?1, ?2)", (&k, &v)).unwrap();
                model.insert(k, v);
            }
            let gone: Vec<String> = model.keys().filter(|_| next() % 3 == 0).cloned().collect();
            for k in &gone {
                tx.execute("DELETE FROM t WHERE k = ?1", [k]).unwrap();
                model.remove(k);
            }
            tx.commit().unwrap();
            if round % 10 == 9 {
                // Grow the file by a few hundred pages, then fail: all of it rolls back.
                let tx = writer.transaction().unwrap();
                for i in 0..2000 {
                    tx.execute("INSERT INTO t VALUES (?1, ?2)", (format!("zz{round}-{i:05}"), "y".repeat(900))).unwrap();
                }
                assert!(tx.execute("INSERT INTO t VALUES ('zz-dup', 'a'), ('zz-dup', 'b')", []).is_err());
                drop(tx);
            }
        }
        assert!(SKIPPED.load(Relaxed) > skipped_before, "no truncation was left out: the workload did not reach the case");
        for conn in [&writer, &reader] {
            let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
            assert_eq!(ok, "ok");
            let mut stmt = conn.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
            let rows: BTreeMap<String, String> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
            assert_eq!(rows.len(), model.len());
            assert!(rows == model, "the database differs from what was committed");
        }
        drop((writer, reader));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
