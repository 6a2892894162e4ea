//! The engine supervisor: a background worker that starts `kvembed serve`,
//! watches it, and restarts it with backoff when it exits.
//!
//! The model never runs inside a postmaster child: if inference crashes or
//! is killed (out of memory, a driver fault), only the engine process dies,
//! the statements waiting on it get an ERROR, and this worker starts a new
//! one. The worker itself does nothing that could crash: it spawns, waits,
//! and writes a small state file.
//!
//! Runtime files, all in `$PGDATA/kvembed/` (mode 0700):
//! * `engine.sock`: the engine's socket (0600);
//! * `supervisor.lock`: flock'ed by the running supervisor, so at most one
//!   runs, and sessions can see whether one does;
//! * `supervisor.pending`: when a session last registered a worker (so a
//!   crowd of sessions does not register one each);
//! * `supervisor.json`: pids, restart count, last exit (read by `kv_status()`).
//!
//! The worker is registered by `_PG_init` when kvembed is in
//! `shared_preload_libraries`, else by the first session that finds no
//! engine (`ensure_supervisor`). Settings changes arrive by SIGHUP.

use crate::settings::EngineSettings;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WORKER_NAME: &str = "kvembed engine supervisor";
const WORKER_FUNCTION: &str = "kvembed_supervisor_main";
/// PostgreSQL restarts the worker this long after it exits with an error.
const WORKER_RESTART: Duration = Duration::from_secs(5);
/// Longest pause between engine restarts when it keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An engine that ran this long is healthy: its next crash restarts at once.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// `$PGDATA/kvembed`.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: DataDir is set by PostgreSQL before any extension code runs and
    // points to a NUL-terminated absolute path.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(data.to_string_lossy().into_owned()).join("kvembed")
}

/// The engine socket. A Unix socket path is limited to 107 bytes; when the
/// absolute path is longer, the path relative to the data directory is used:
/// every backend, and the engine (started there), has it as working directory.
pub fn socket_path() -> PathBuf {
    let absolute = runtime_dir().join("engine.sock");
    if absolute.as_os_str().len() < 100 {
        absolute
    } else {
        PathBuf::from("kvembed/engine.sock")
    }
}

fn ensure_runtime_dir() -> std::io::Result<PathBuf> {
    let dir = runtime_dir();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
    }
    Ok(dir)
}

fn open_lock(dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("supervisor.lock"))
}

/// Takes the supervisor lock without blocking. The lock lives as long as the
/// returned file (Rust opens files close-on-exec, so the engine never
/// inherits it).
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether a supervisor holds the lock now.
pub fn supervisor_running() -> bool {
    let Ok(dir) = ensure_runtime_dir() else {
        return false;
    };
    let Ok(file) = open_lock(&dir) else {
        return false;
    };
    // Closing the file releases the probe's lock at once.
    !try_lock(&file)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn builder() -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type("kvembed")
        .set_library("kvembed")
        .set_function(WORKER_FUNCTION)
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(WORKER_RESTART))
}

/// Static registration, from `_PG_init` under `shared_preload_libraries`.
pub fn register_at_startup() {
    builder().load();
}

thread_local! {
    static LAST_REGISTRATION: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called by a session that found no engine: registers the supervisor unless
/// one runs or was registered moments ago. A duplicate that slips through
/// (two sessions at the same instant) exits at once when it cannot take the
/// lock, so this only needs to keep duplicates rare, not impossible.
pub fn ensure_supervisor() {
    let recently = LAST_REGISTRATION
        .with(|l| l.get())
        .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
    if recently || supervisor_running() {
        return;
    }
    let Ok(dir) = ensure_runtime_dir() else {
        return;
    };
    let pending = dir.join("supervisor.pending");
    let fresh = std::fs::read_to_string(&pending)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|t| unix_now().saturating_sub(t) < 10);
    if fresh {
        return;
    }
    let _ = std::fs::write(&pending, unix_now().to_string());
    LAST_REGISTRATION.with(|l| l.set(Some(Instant::now())));
    if builder().load_dynamic().is_err() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "kvembed: could not start the engine supervisor background worker",
            "kvembed",
        )
        .set_hint(
            "All background worker slots are in use: raise max_worker_processes, \
             or add kvembed to shared_preload_libraries.",
        )
        .report(PgLogLevel::ERROR);
    }
}

/// What `kv_status()` shows about the supervisor (`supervisor.json`).
#[derive(serde::Serialize, serde::Deserialize, Default, Clone, Debug)]
pub struct SupervisorState {
    pub supervisor_pid: u32,
    pub engine_pid: Option<u32>,
    pub engine_started_at: Option<u64>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub next_start_in_ms: Option<u64>,
}

pub fn read_state() -> Option<SupervisorState> {
    let text = std::fs::read_to_string(runtime_dir().join("supervisor.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(dir: &Path, state: &SupervisorState) {
    let tmp = dir.join("supervisor.json.tmp");
    if let Ok(json) = serde_json::to_vec_pretty(state) {
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("supervisor.json"));
        }
    }
}

/// Entry point of the background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn kvembed_supervisor_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(
        SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM | SignalWakeFlags::SIGCHLD,
    );
    let dir = match ensure_runtime_dir() {
        Ok(d) => d,
        Err(e) => {
            log!("kvembed: cannot create {}: {e}", runtime_dir().display());
            return;
        }
    };
    let Ok(lock) = open_lock(&dir) else {
        log!(
            "kvembed: cannot open {}",
            dir.join("supervisor.lock").display()
        );
        return;
    };
    // A session's probe holds the lock for microseconds: retry briefly before
    // concluding that another supervisor runs.
    let mut locked = false;
    for _ in 0..20 {
        if try_lock(&lock) {
            locked = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !locked {
        debug1!("kvembed: another engine supervisor is running; this one exits");
        return; // exit code 0: PostgreSQL forgets this worker
    }
    let _ = std::fs::remove_file(dir.join("supervisor.pending"));
    Supervisor::new(dir).run();
    drop(lock);
}

struct Supervisor {
    dir: PathBuf,
    settings: EngineSettings,
    engine: Option<(Child, Instant)>,
    next_start: Instant,
    backoff: Duration,
    state: SupervisorState,
    /// When each database's queue worker was last (re)launched.
    queue_launches: std::collections::HashMap<u32, Instant>,
    queues_checked: Option<Instant>,
}

impl Supervisor {
    fn new(dir: PathBuf) -> Supervisor {
        Supervisor {
            dir,
            settings: EngineSettings::current(),
            engine: None,
            next_start: Instant::now(),
            backoff: Duration::ZERO,
            queue_launches: Default::default(),
            queues_checked: None,
            state: SupervisorState {
                supervisor_pid: std::process::id(),
                ..Default::default()
            },
        }
    }

    fn run(&mut self) {
        log!(
            "kvembed: engine supervisor started (engine {}, model '{}')",
            self.settings.engine_path,
            self.settings.model
        );
        self.tick();
        while BackgroundWorker::wait_latch(Some(Duration::from_millis(500))) {
            if BackgroundWorker::sighup_received() {
                self.reload();
            }
            self.tick();
        }
        self.stop_engine("the supervisor is shutting down");
        let _ = std::fs::remove_file(self.dir.join("supervisor.json"));
    }

    /// Reaps an exited engine and starts one when it is time.
    fn tick(&mut self) {
        if let Some((child, started)) = &mut self.engine {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    let ran = started.elapsed();
                    let clean = status.success();
                    let what = describe_exit(status);
                    self.engine = None;
                    self.state.engine_pid = None;
                    self.state.last_exit = Some(what.clone());
                    self.backoff = if clean || ran >= HEALTHY_RUN {
                        Duration::ZERO
                    } else {
                        (self.backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF)
                    };
                    self.next_start = Instant::now() + self.backoff;
                    if clean {
                        log!("kvembed: engine {what}; starting a new one");
                    } else {
                        warning!(
                            "kvembed: engine {what} after {:.1}s; restarting in {:.1}s",
                            ran.as_secs_f64(),
                            self.backoff.as_secs_f64()
                        );
                    }
                    self.save_state();
                }
                Err(e) => warning!("kvembed: cannot wait for the engine: {e}"),
            }
        }
        if self.engine.is_none() && Instant::now() >= self.next_start {
            self.start_engine();
        }
        // The queue workers of databases with vectorized tables (after a
        // restart, or when one exited with an error).
        if self
            .queues_checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.queues_checked = Some(Instant::now());
            crate::queue::supervise(&mut self.queue_launches);
        }
    }

    fn start_engine(&mut self) {
        let s = &self.settings;
        let socket = socket_path();
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(&s.engine_path);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--model")
            .arg(&s.model)
            .args(
                (!s.models.trim().is_empty())
                    .then(|| ["--models".to_string(), s.models.clone()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--device")
            .arg(&s.device)
            .arg("--threads")
            .arg(s.threads.to_string())
            .arg("--batch-tokens")
            .arg(s.batch_tokens.to_string())
            .arg("--max-tokens")
            .arg("0")
            .arg("--max-tokens-limit")
            .arg(s.max_tokens_limit.to_string())
            .arg("--max-calibration-texts")
            .arg(s.max_calibration_texts.to_string())
            .args(s.allow_faults.then_some("--allow-faults"))
            .current_dir(runtime_dir().parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::null());
        let memory_limit =
            (s.memory_limit_mb > 0).then(|| (s.memory_limit_mb as libc::rlim_t) << 20);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, signal, sigprocmask, setrlimit).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(bytes) = memory_limit {
                    let limit = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Die with the supervisor, whatever kills it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                // Ignored signals survive exec: give the engine default ones.
                for sig in [
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                    libc::SIGUSR1,
                    libc::SIGUSR2,
                    libc::SIGCHLD,
                ] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let limit = match s.memory_limit_mb {
                    0 => String::new(),
                    mb => format!(", memory limit {mb} MB"),
                };
                log!(
                    "kvembed: started engine pid {} (model '{}'{limit})",
                    child.id(),
                    s.model
                );
                self.state.engine_pid = Some(child.id());
                self.state.engine_started_at = Some(unix_now());
                if self.state.last_exit.is_some() {
                    self.state.restarts += 1;
                }
                self.engine = Some((child, Instant::now()));
            }
            Err(e) => {
                self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                self.next_start = Instant::now() + self.backoff;
                let what = format!("could not be started: {}: {e}", s.engine_path);
                warning!(
                    "kvembed: the engine {what} (check kvembed.engine_path); retrying in {:.0}s",
                    self.backoff.as_secs_f64()
                );
                self.state.last_exit = Some(what);
            }
        }
        self.save_state();
    }

    fn reload(&mut self) {
        // SAFETY: re-reads postgresql.conf in this process, as every
        // PostgreSQL process does on SIGHUP.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let new = EngineSettings::current();
        if new != self.settings {
            log!(
                "kvembed: engine settings changed (model '{}'); restarting the engine",
                new.model
            );
            self.settings = new;
            self.stop_engine("its settings changed");
            self.backoff = Duration::ZERO;
            self.next_start = Instant::now();
        }
    }

    /// SIGTERM, a grace period, then SIGKILL.
    fn stop_engine(&mut self, why: &str) {
        let Some((mut child, _)) = self.engine.take() else {
            return;
        };
        log!("kvembed: stopping engine pid {} ({why})", child.id());
        // SAFETY: signals our own child, which we have not reaped yet, so
        // its pid cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_file(socket_path());
        self.state.engine_pid = None;
        self.state.last_exit = Some(format!("stopped: {why}"));
        self.save_state();
    }

    fn save_state(&mut self) {
        self.state.next_start_in_ms = match self.engine {
            Some(_) => None,
            None => Some(
                self.next_start
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
            ),
        };
        write_state(&self.dir, &self.state);
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited normally".to_string(),
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig}{}",
            match sig {
                libc::SIGKILL => " (SIGKILL: killed, or out of memory)",
                libc::SIGABRT => " (SIGABRT: aborted, e.g. a failed memory allocation)",
                libc::SIGSEGV => " (SIGSEGV: crashed)",
                _ => "",
            }
        ),
        _ => format!("ended ({status})"),
    }
}
