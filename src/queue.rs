//! The asynchronous embedding queue: `kv_vectorize(table, text_col,
//! vec_col)` makes a table's vectors fill in the background.
//!
//! A row is pending while its vector is NULL and its text is not: rows that
//! arrive by INSERT, COPY or logical replication are pending without any
//! trigger, and the table's `kvembed_vectorize` trigger (BEFORE UPDATE OF
//! the text column, enabled ALWAYS so that replication fires it too) sets
//! the vector to NULL when the text changes, and only then. The trigger is
//! also the registration: its arguments hold the columns, the profile and
//! the batch size, so the setup follows the table through renames, dumps
//! and restores.
//!
//! One background worker per database (`kvembed queue`) drains the
//! vectorized tables of that database in batches: it locks pending rows
//! with `FOR UPDATE SKIP LOCKED`, embeds them in one `kv_embed_batch` call
//! and commits, as the table's owner with the restrictions PostgreSQL uses
//! for maintenance on a user's behalf. A failed batch rolls back and leaves
//! its rows pending, so an engine crash or a cluster restart loses nothing.
//!
//! Workers are started by `kv_vectorize` (at once, and when its transaction
//! commits) and, after a restart or an error, by the engine supervisor, from
//! `$PGDATA/kvembed/queues` (the databases that have vectorized tables). A
//! worker whose database has none left takes it off that list and exits.

use crate::worker::runtime_dir;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const WORKER_FUNCTION: &str = "kvembed_queue_main";
/// How long a worker waits between polls of an empty queue.
const NAPTIME: Duration = Duration::from_millis(500);
/// A worker whose database has no vectorized table for this long exits.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// The supervisor relaunches a database's worker at most this often.
const RELAUNCH_EVERY: Duration = Duration::from_secs(20);
/// Backoff after a failed batch: doubled per failure, up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The worker samples (transaction id, time) this often, so that the age of
/// the oldest pending row can be told from its xmin.
const CLOCK_EVERY: Duration = Duration::from_secs(10);

fn queues_file() -> PathBuf {
    runtime_dir().join("queues")
}

fn lock_path(db: pg_sys::Oid) -> PathBuf {
    runtime_dir().join(format!("queue.{}.lock", u32::from(db)))
}

fn read_queues() -> Vec<u32> {
    std::fs::read_to_string(queues_file())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Changes the list of databases with queues under an exclusive lock (the
/// supervisor, workers and committing sessions all write it).
fn update_queues(change: impl FnOnce(&mut Vec<u32>)) {
    let Ok(lock) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(runtime_dir().join("queues.lock"))
    else {
        return;
    };
    // SAFETY: flock on a file descriptor we own; released when it closes.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    let before = read_queues();
    let mut dbs = before.clone();
    change(&mut dbs);
    if dbs != before {
        let tmp = runtime_dir().join(format!("queues.{}.tmp", std::process::id()));
        let text: String = dbs.iter().map(|d| format!("{d}\n")).collect();
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, queues_file());
        }
    }
}

fn add_queue(db: pg_sys::Oid) {
    update_queues(|dbs| {
        if !dbs.contains(&u32::from(db)) {
            dbs.push(u32::from(db));
        }
    });
}

fn remove_queue(db: pg_sys::Oid) {
    update_queues(|dbs| dbs.retain(|d| *d != u32::from(db)));
}

/// Takes the database's queue lock without blocking (the file is opened
/// close-on-exec and the lock lives as long as it).
fn try_lock(db: pg_sys::Oid) -> Option<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path(db))
        .ok()?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 };
    locked.then_some(file)
}

fn worker_running(db: pg_sys::Oid) -> bool {
    try_lock(db).is_none()
}

fn builder(db: pg_sys::Oid) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!("kvembed queue (database {})", u32::from(db)))
        .set_type("kvembed queue")
        .set_library("kvembed")
        .set_function(WORKER_FUNCTION)
        .set_argument(Some(pg_sys::Datum::from(u32::from(db))))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Never restarted by PostgreSQL: the supervisor relaunches it, and
        // only for a database that still exists.
        .set_restart_time(None)
}

/// Starts the queue worker of database `db` unless one runs. False when no
/// background worker slot is free.
fn launch(db: pg_sys::Oid) -> bool {
    if worker_running(db) {
        return true;
    }
    builder(db).load_dynamic().is_ok()
}

/// Called by the supervisor every few seconds: starts the worker of each
/// database with vectorized tables that has none, and forgets the databases
/// that were dropped.
pub fn supervise(last: &mut HashMap<u32, Instant>) {
    let dbs = read_queues();
    if dbs.is_empty() {
        return;
    }
    // SAFETY: DataDir is set before any extension code runs.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    let base = PathBuf::from(data.to_string_lossy().into_owned()).join("base");
    let alive: Vec<u32> = dbs
        .iter()
        .copied()
        .filter(|d| base.join(d.to_string()).is_dir())
        .collect();
    if alive.len() != dbs.len() {
        update_queues(|dbs| dbs.retain(|d| base.join(d.to_string()).is_dir()));
    }
    for db in alive {
        let due = last.get(&db).is_none_or(|t| t.elapsed() >= RELAUNCH_EVERY);
        if due {
            last.insert(db, Instant::now());
            launch(pg_sys::Oid::from(db));
        }
    }
}

/// The `CREATE TRIGGER` arguments of a vectorized table, as the batch
/// query needs them (identifiers and literals quoted).
struct Setup {
    table: String,
    text_col: String,
    vec_col: String,
    batch_size: i32,
    /// `, 'profile'` or empty.
    profile_arg: String,
    owner: pg_sys::Oid,
    ext_schema: String,
}

fn spi_fail(e: impl std::fmt::Display) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("kvembed: queue: {e}"),
        "kvembed",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

fn read_setup(relid: pg_sys::Oid) -> Option<Setup> {
    let query = "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), \
                        pg_catalog.format('%I', v.text_col), pg_catalog.format('%I', v.vec_col), \
                        v.batch_size, \
                        CASE WHEN v.profile IS NULL THEN '' ELSE pg_catalog.format(', %L', v.profile) END, \
                        v.owner, \
                        (SELECT pg_catalog.format('%I', s.nspname) FROM pg_catalog.pg_extension AS e \
                           JOIN pg_catalog.pg_namespace AS s ON s.oid = e.extnamespace \
                          WHERE e.extname = 'kvembed') \
                   FROM kvembed.vectorize_tables() AS v \
                   JOIN pg_catalog.pg_class AS c ON c.oid = v.relid \
                   JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace \
                  WHERE v.relid = $1";
    let args: [DatumWithOid; 1] = [relid.into()];
    Spi::connect(|client| {
        let table = client.select(query, Some(1), &args)?;
        if table.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let row = table.first();
        Ok(Some(Setup {
            table: row.get::<String>(1)?.unwrap_or_default(),
            text_col: row.get::<String>(2)?.unwrap_or_default(),
            vec_col: row.get::<String>(3)?.unwrap_or_default(),
            batch_size: row.get::<i32>(4)?.unwrap_or(64),
            profile_arg: row.get::<String>(5)?.unwrap_or_default(),
            owner: row.get::<pg_sys::Oid>(6)?.unwrap_or(pg_sys::InvalidOid),
            ext_schema: row.get::<String>(7)?.unwrap_or_default(),
        }))
    })
    .unwrap_or_else(|e| spi_fail(e))
}

/// The rows a failed single-row batch left behind: skipped until their text
/// changes (a new row version) or they are embedded some other way.
struct Exclusions {
    rels: Vec<pg_sys::Oid>,
    tids: Vec<String>,
    hashes: Vec<String>,
}

fn read_exclusions(relid: pg_sys::Oid) -> Exclusions {
    let args: [DatumWithOid; 1] = [relid.into()];
    let mut ex = Exclusions {
        rels: Vec::new(),
        tids: Vec::new(),
        hashes: Vec::new(),
    };
    Spi::connect(|client| {
        let table = client.select(
            "SELECT rel, tid::text, text_hash FROM kvembed.vectorize_failures WHERE relid = $1",
            None,
            &args,
        )?;
        for row in table {
            ex.rels
                .push(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid));
            ex.tids.push(row.get::<String>(2)?.unwrap_or_default());
            ex.hashes.push(row.get::<String>(3)?.unwrap_or_default());
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| spi_fail(e));
    ex
}

/// The batch: lock up to `limit` pending rows (skipping rows others hold),
/// embed their texts in one call, write the vectors, count them. A row is
/// (tableoid, ctid): ctids repeat across partitions. `$1..$3`: rows to skip
/// (with the md5 of the text they failed with); `$4, $5`: one row only.
fn batch_query(s: &Setup, limit: i32, exclude: bool, only: bool) -> String {
    let (t, v) = (&s.text_col, &s.vec_col);
    let skip = if exclude {
        format!(
            " AND NOT EXISTS (SELECT 1 FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.oid[]), \
                 pg_catalog.unnest($2::pg_catalog.text[]::pg_catalog.tid[]), pg_catalog.unnest($3::pg_catalog.text[])) AS f(rel, tid, h) \
               WHERE f.rel OPERATOR(pg_catalog.=) x.tableoid AND f.tid OPERATOR(pg_catalog.=) x.ctid \
                 AND f.h OPERATOR(pg_catalog.=) pg_catalog.md5(x.{t}::pg_catalog.text))"
        )
    } else {
        String::new()
    };
    let only = if only {
        " AND x.tableoid OPERATOR(pg_catalog.=) $4 AND x.ctid OPERATOR(pg_catalog.=) $5::pg_catalog.tid"
    } else {
        ""
    };
    format!(
        "WITH batch AS (
           SELECT x.tableoid AS rel, x.ctid AS tid, x.{t}::pg_catalog.text AS t FROM {table} AS x
            WHERE x.{v} IS NULL AND x.{t} IS NOT NULL{skip}{only}
            LIMIT {limit} FOR UPDATE OF x SKIP LOCKED),
         packed AS (SELECT pg_catalog.array_agg(rel) AS rels, pg_catalog.array_agg(tid) AS tids,
                           pg_catalog.array_agg(t) AS ts FROM batch),
         embedded AS (
           SELECT e.rel, e.tid, e.v
             FROM packed, ROWS FROM (pg_catalog.unnest(packed.rels), pg_catalog.unnest(packed.tids),
                    pg_catalog.unnest({ext}.kv_embed_batch(packed.ts, 'document'{profile}))) AS e(rel, tid, v)
            WHERE packed.tids IS NOT NULL),
         written AS (
           UPDATE {table} AS x SET {v} = embedded.v FROM embedded
            WHERE x.tableoid OPERATOR(pg_catalog.=) embedded.rel
              AND x.ctid OPERATOR(pg_catalog.=) embedded.tid AND x.{v} IS NULL
           RETURNING 1)
         SELECT pg_catalog.count(*) FROM written",
        table = s.table,
        ext = s.ext_schema,
        profile = s.profile_arg,
    )
}

fn run_batch(s: &Setup, limit: i32, ex: &Exclusions, only: Option<(pg_sys::Oid, &str)>) -> i64 {
    let exclude = !ex.rels.is_empty();
    let query = batch_query(s, limit, exclude, only.is_some());
    let (only_rel, only_tid) = only.unwrap_or((pg_sys::InvalidOid, ""));
    // Every parameter goes, typed, whether the query names it or not.
    let args: Vec<DatumWithOid> = vec![
        ex.rels.clone().into(),
        ex.tids.clone().into(),
        ex.hashes.clone().into(),
        only_rel.into(),
        only_tid.into(),
    ];
    Spi::connect_mut(|client| {
        client
            .update(query.as_str(), Some(1), &args)?
            .first()
            .get_one::<i64>()
    })
    .unwrap_or_else(|e| spi_fail(e))
    .unwrap_or(0)
}

/// Runs `f` as `owner`, with the restrictions PostgreSQL applies when it
/// runs a user's code on that user's behalf (VACUUM, REFRESH MATERIALIZED
/// VIEW): no SET ROLE back to the worker's superuser, and setting changes
/// undone afterwards. An ERROR restores the identity through the
/// (sub)transaction's abort.
fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: PostgreSQL's own functions for switching the current user
    // inside a transaction, used as ExecRefreshMatView uses them.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        pg_sys::NewGUCNestLevel()
    };
    let out = f();
    // SAFETY: undoes the switch above in reverse order.
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    out
}

#[pg_schema]
mod kvembed {
    use super::*;

    /// One batch of `kv_backfill`: as the calling user, with its settings.
    #[pg_extern(volatile, parallel_unsafe)]
    fn embed_pending(tbl: pg_sys::Oid, text_col: &str, vec_col: &str, batch_size: i32) -> i64 {
        let setup = Spi::connect(|client| {
            let args: [DatumWithOid; 3] = [tbl.into(), text_col.into(), vec_col.into()];
            let row = client.select(
                "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), pg_catalog.format('%I', $2::text), \
                        pg_catalog.format('%I', $3::text), \
                        (SELECT pg_catalog.format('%I', s.nspname) FROM pg_catalog.pg_extension AS e \
                           JOIN pg_catalog.pg_namespace AS s ON s.oid = e.extnamespace WHERE e.extname = 'kvembed') \
                   FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace \
                  WHERE c.oid = $1",
                Some(1),
                &args,
            )?;
            let row = row.first();
            Ok::<_, pgrx::spi::Error>(Setup {
                table: row.get::<String>(1)?.unwrap_or_default(),
                text_col: row.get::<String>(2)?.unwrap_or_default(),
                vec_col: row.get::<String>(3)?.unwrap_or_default(),
                batch_size,
                profile_arg: String::new(),
                owner: pg_sys::InvalidOid,
                ext_schema: row.get::<String>(4)?.unwrap_or_default(),
            })
        })
        .unwrap_or_else(|e| spi_fail(e));
        let none = Exclusions {
            rels: Vec::new(),
            tids: Vec::new(),
            hashes: Vec::new(),
        };
        run_batch(&setup, batch_size, &none, None)
    }

    /// One batch of a vectorized table, as its owner (superusers only: the
    /// queue worker). `only_rel`/`only_tid`: that row alone.
    #[pg_extern(volatile, parallel_unsafe)]
    fn vectorize_batch(
        relid: pg_sys::Oid,
        only_rel: default!(Option<pg_sys::Oid>, "NULL"),
        only_tid: default!(Option<&str>, "NULL"),
    ) -> i64 {
        // SAFETY: reads the current user's flag from the syscache.
        if !unsafe { pg_sys::superuser() } {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "kvembed: vectorize_batch is for the queue worker",
                "kvembed",
            )
            .report(PgLogLevel::ERROR);
        }
        let Some(setup) = read_setup(relid) else {
            return 0;
        };
        let ex = read_exclusions(relid);
        let only = match (only_rel, only_tid) {
            (Some(r), Some(t)) => Some((r, t)),
            _ => None,
        };
        let limit = if only.is_some() { 1 } else { setup.batch_size };
        as_owner(setup.owner, || run_batch(&setup, limit, &ex, only))
    }

    /// Makes sure this database's queue worker runs (kv_vectorize calls
    /// it): now, and again when the calling transaction commits, since a
    /// worker started now does not see the uncommitted table.
    #[pg_extern(volatile, parallel_unsafe)]
    fn vectorize_wake() -> bool {
        // SAFETY: MyDatabaseId is set for the whole life of a backend.
        let db = unsafe { pg_sys::MyDatabaseId };
        add_queue(db);
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            add_queue(db);
            launch(db);
        });
        if !launch(db) {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "kvembed: could not start the queue worker: no background worker slot is free",
                "kvembed",
            )
            .set_hint(
                "Raise max_worker_processes. Pending rows stay pending and are embedded once a worker runs.",
            )
            .report(PgLogLevel::WARNING);
            return false;
        }
        true
    }
}

/// The vectorized tables of the worker's database; None when kvembed is
/// not installed there.
fn list_tables() -> Option<Vec<pg_sys::Oid>> {
    BackgroundWorker::transaction(|| {
        let installed = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'kvembed')",
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !installed {
            return None;
        }
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT relid FROM kvembed.vectorize_tables() ORDER BY relid",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for row in rows {
                if let Some(oid) = row.get::<pg_sys::Oid>(1)? {
                    out.push(oid);
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .ok()
    })
}

/// Entry point of a database's queue worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn kvembed_queue_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = pg_sys::Oid::from(arg.value() as u32);
    let Some(_lock) = try_lock(db) else {
        return; // another worker serves this database
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    let mut idle_since = Instant::now();
    let mut backoff: HashMap<u32, (Duration, Instant)> = HashMap::new();
    let mut last_clock: Option<Instant> = None;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let tables = list_tables();
        let tables = tables.unwrap_or_default();
        if tables.is_empty() {
            if idle_since.elapsed() >= IDLE_EXIT {
                // Forget this database, then look once more: a kv_vectorize
                // that committed meanwhile has added it back (and finds this
                // worker running, so it launches none).
                remove_queue(db);
                if list_tables().unwrap_or_default().is_empty() {
                    break;
                }
                add_queue(db);
                idle_since = Instant::now();
            }
        } else {
            idle_since = Instant::now();
        }
        if !tables.is_empty() && last_clock.is_none_or(|t| t.elapsed() >= CLOCK_EVERY) {
            last_clock = Some(Instant::now());
            BackgroundWorker::transaction(|| {
                let _ = Spi::run("SELECT kvembed.vectorize_clock_tick()");
            });
        }
        let mut worked = false;
        for relid in tables {
            let key = u32::from(relid);
            if backoff
                .get(&key)
                .is_some_and(|(_, until)| Instant::now() < *until)
            {
                continue;
            }
            let args: [DatumWithOid; 1] = [relid.into()];
            let n = BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<i64>("SELECT kvembed.vectorize_work($1)", &args)
                    .ok()
                    .flatten()
                    .unwrap_or(-1)
            });
            if n < 0 {
                let wait = backoff
                    .get(&key)
                    .map(|(d, _)| (*d * 2).min(MAX_BACKOFF))
                    .unwrap_or(MIN_BACKOFF);
                backoff.insert(key, (wait, Instant::now() + wait));
            } else {
                backoff.remove(&key);
                worked |= n > 0;
            }
            if BackgroundWorker::sigterm_received() {
                return;
            }
        }
        let nap = if worked { Duration::ZERO } else { NAPTIME };
        if !BackgroundWorker::wait_latch(Some(nap)) {
            break;
        }
    }
}
