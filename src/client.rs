//! A session's connection to the engine (`kvembed serve`).
//!
//! One Unix-socket connection per backend, kept between statements. Every
//! wait (for the engine to start, for its model to load, for a reply) sleeps
//! on the backend's latch together with the socket, so `statement_timeout`
//! and `pg_cancel_backend()` interrupt it at once. A cancelled request simply
//! closes the socket (the connection is a local that the error unwinds
//! through); the engine notices and drops the work.

use crate::worker;
use kvembed_proto::{self as proto, EngineState, ErrorKind, Request, Response, Status};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// An open, greeted connection and what the engine said about itself.
pub struct Engine {
    stream: UnixStream,
    /// The engine's status when this connection was made ready.
    pub status: Status,
}

thread_local! {
    static CACHED: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// What one `Embed` request returned.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub truncated: Vec<proto::Truncation>,
}

/// Runs `f` on the session's engine connection, connecting (and starting the
/// engine) first if needed. Any I/O failure drops the connection and raises
/// an ERROR: a request is never silently retried, since the engine may have
/// died because of it.
pub fn with_engine<T>(wait_ready: bool, f: impl FnOnce(&mut Engine) -> io::Result<T>) -> T {
    try_with_engine(wait_ready, f).unwrap_or_else(|e| io_failure(e))
}

/// Raises the ERROR that fits a failed exchange with the engine.
fn io_failure(e: io::Error) -> ! {
    match e.kind() {
        // Refused before a byte was sent (the frame limit): the request,
        // not the engine, is the problem.
        io::ErrorKind::InvalidInput => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("kvembed: the request is too large to send to the engine: {e}"),
                "kvembed",
            )
            .set_hint(
                "Embed fewer or shorter texts per call, or SET kvembed.on_overflow = 'truncate'.",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
        io::ErrorKind::OutOfMemory => out_of_memory(&e.to_string()),
        io::ErrorKind::InvalidData => raise(ErrorKind::Protocol, &e.to_string()),
        io::ErrorKind::TimedOut => {
            ErrorReport::new(PgSqlErrorCode::ERRCODE_SYSTEM_ERROR, format!("kvembed: {e}"), "kvembed")
                .set_detail("The engine is running but does not answer (stopped, deadlocked or starved of memory); this statement gave up and closed its connection.")
                .set_hint("See the server log and kv_status(); SELECT kv_restart() starts a fresh engine. Raise kvembed.engine_timeout for very long requests.")
                .report(PgLogLevel::ERROR);
            unreachable!()
        }
        _ => lost_connection(e),
    }
}

/// An allocation this backend could not make: an ERROR (the statement
/// fails), never an abort (which would restart every session).
pub fn out_of_memory(what: &str) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
        format!("kvembed: out of memory: {what}"),
        "kvembed",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// `with_engine`, returning the I/O error instead of raising it.
fn try_with_engine<T>(
    wait_ready: bool,
    f: impl FnOnce(&mut Engine) -> io::Result<T>,
) -> io::Result<T> {
    let cached = CACHED
        .with(|c| c.borrow_mut().take())
        .filter(|e| e.is_idle_and_alive());
    let mut engine = match cached {
        Some(e) if !wait_ready || e.status.state != EngineState::Loading => e,
        _ => connect(wait_ready),
    };
    let result = f(&mut engine);
    if result.is_ok() {
        CACHED.with(|c| *c.borrow_mut() = Some(engine));
    }
    result
}

/// Embeds `texts` with the session's settings; ERRORs carry the engine's
/// message under a SQLSTATE that fits it. A text refused as too long is
/// named by `name(index in texts)`, in the caller's terms.
pub fn embed(
    texts: Vec<String>,
    role: proto::Role,
    options: proto::EmbedOptions,
    name: &dyn Fn(usize) -> String,
) -> Embedded {
    let asked = texts.len();
    let model = options.model.clone();
    let request = Request::Embed {
        texts,
        role,
        options,
        caller: caller(),
    };
    let (response, vectors) = with_engine(true, |engine| {
        let response = engine.call(&request)?;
        let values = match &response {
            // The shape is checked against the request and the model before
            // a single value is allocated.
            Response::Embeddings { count, dim, .. } => {
                let expected_dim = engine
                    .status
                    .model_named(model.as_deref())
                    .map_or(0, |m| m.dim);
                if *count != asked || (expected_dim != 0 && *dim != expected_dim) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("asked for {asked} embeddings of dimension {expected_dim}, the engine announced {count} of {dim}"),
                    ));
                }
                Some(proto::read_f32s_exact(&mut engine.io(), count * dim)?)
            }
            _ => None,
        };
        Ok((response, values))
    });
    match response {
        Response::Error { kind, message } => raise(kind, &message),
        Response::TooLong { index, tokens, max } => {
            let message = match tokens {
                Some(n) => format!(
                    "{} has {n} tokens, more than max_tokens = {max}",
                    name(index)
                ),
                None => format!("{} has more than max_tokens = {max} tokens", name(index)),
            };
            raise(ErrorKind::TooLong, &message)
        }
        Response::Embeddings {
            count,
            dim,
            truncated,
            ..
        } => {
            let values = vectors.unwrap_or_default();
            if values.len() != count * dim {
                protocol_error(&format!(
                    "expected {count}x{dim} values, got {}",
                    values.len()
                ));
            }
            let vectors = if dim == 0 {
                vec![Vec::new(); count]
            } else {
                values.chunks_exact(dim).map(<[f32]>::to_vec).collect()
            };
            if vectors.iter().flatten().any(|v| !v.is_finite()) {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "kvembed: the engine returned a non-finite value",
                    "kvembed",
                )
                .report(PgLogLevel::ERROR);
            }
            Embedded { vectors, truncated }
        }
        other => unexpected(other),
    }
}

/// The model requests naming `name` run on (`None`: the first,
/// kvembed.model), as the engine reported it when this session connected:
/// an ERROR when the engine serves no model of that name or it failed to
/// load.
pub fn model(name: Option<&str>) -> proto::ModelStatus {
    let (found, names) = with_engine(true, |e| {
        Ok((e.status.model_named(name).cloned(), e.status.model_names()))
    });
    match found {
        Some(m) if m.state == EngineState::Failed => raise(
            ErrorKind::ModelLoad,
            m.load_error.as_deref().unwrap_or("failed"),
        ),
        Some(m) => m,
        None => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "kvembed: kvembed.use_model = '{}' names no model the engine serves (it serves: {names})",
                    crate::text::for_message(name.unwrap_or_default())
                ),
                "kvembed",
            )
            .set_hint("SELECT name FROM kv_models() lists them; an administrator adds one to kvembed.models.")
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
    }
}

/// The session's model (`kvembed.use_model`).
pub fn session_model() -> proto::ModelStatus {
    model(crate::settings::use_model().as_deref())
}

/// Sends `SelectLayers` and returns the raw response (the SQL side turns it
/// into rows and stores it). The engine's progress reports become NOTICEs,
/// at most one every few seconds.
pub fn select_layers(texts: Vec<String>, options: proto::SelectOptions) -> Response {
    let request = Request::SelectLayers {
        texts,
        options,
        caller: caller(),
    };
    let response = with_engine(true, |engine| {
        proto::write_json(&mut engine.io(), &request)?;
        let started = Instant::now();
        let mut last_notice = Instant::now();
        loop {
            match proto::read_json(&mut engine.io())? {
                Response::Progress { done, total } => {
                    if last_notice.elapsed() >= Duration::from_secs(5) && done < total {
                        last_notice = Instant::now();
                        notice!(
                            "kv_select_layers: {done}/{total} texts through the model ({:.0} s)",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
                other => return Ok(other),
            }
        }
    });
    match response {
        Response::Error { kind, message } => raise(kind, &message),
        r @ Response::Layers { .. } => r,
        other => unexpected(other),
    }
}

/// The engine's status without waiting for a model load (it may be
/// `loading` or `failed`); starts the engine if it is not running.
pub fn status() -> Status {
    // Asking for the status is harmless, so unlike other requests it is
    // retried once on a fresh connection: the engine may have been
    // restarting (settings change, kv_restart) just as it was asked.
    let ask = |engine: &mut Engine| engine.call(&Request::Status);
    let response = try_with_engine(false, ask).unwrap_or_else(|_| with_engine(false, ask));
    match response {
        Response::Error { kind, message } => raise(kind, &message),
        Response::Status(s) => s,
        other => unexpected(other),
    }
}

/// What `options` resolve to on the loaded model; `None` when the engine
/// cannot say (no model loaded, or options it refuses).
pub fn describe(options: proto::EmbedOptions) -> Option<proto::MethodInfo> {
    match try_with_engine(false, |engine| engine.call(&Request::Describe { options })) {
        Ok(Response::Described(info)) => Some(info),
        _ => None,
    }
}

/// This session's database and current role, under which the engine counts
/// its requests (`kvembed.stats`).
fn caller() -> proto::Caller {
    // SAFETY: both look the session's own ids up in the syscache; they
    // return a palloc'd name, or NULL (noerr) for a dropped role.
    let (database, role) = unsafe {
        (
            pg_sys::get_database_name(pg_sys::MyDatabaseId),
            pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true),
        )
    };
    let name = |p: *mut std::ffi::c_char| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: a NUL-terminated name from the catalog.
        let bytes = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec();
        // Never an ERROR for a name: lossy where the bytes are not UTF-8.
        if bytes.is_ascii() || crate::text::database_encoding() != crate::text::Encoding::Other {
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            crate::text::DbText::from_bytes(bytes).into_utf8()
        }
    };
    proto::Caller {
        database: name(database),
        role: name(role),
    }
}

/// The engine's metrics per database and role; `reset` empties them after.
pub fn stats(reset: bool) -> (f64, Vec<proto::StatsRow>) {
    match with_engine(false, |engine| engine.call(&Request::Stats { reset })) {
        Response::Stats { since, rows } => (since, rows),
        Response::Error { kind, message } => raise(kind, &message),
        other => unexpected(other),
    }
}

/// The loaded model's chunks of `text` (`kv_chunk`), and the text back
/// (it is not copied for the request).
pub fn chunk(text: String, max_tokens: usize, overlap: usize) -> (String, Vec<proto::ChunkSpan>) {
    let request = Request::Chunk {
        text,
        max_tokens,
        overlap,
        caller: caller(),
        model: crate::settings::use_model(),
    };
    let response = with_engine(true, |engine| engine.call(&request));
    let Request::Chunk { text, .. } = request else {
        unreachable!("built above")
    };
    match response {
        Response::Chunks { chunks } => (text, chunks),
        Response::Error { kind, message } => raise(kind, &message),
        other => unexpected(other),
    }
}

/// Asks the engine to exit; its supervisor starts a new one at once.
/// Returns the pid that was asked, or None when no engine was running.
pub fn shutdown() -> Option<u32> {
    CACHED.with(|c| c.borrow_mut().take());
    let stream = connect_nonblocking(&worker::socket_path()).ok()?;
    stream.set_nonblocking(true).ok()?;
    let mut engine = Engine {
        stream,
        status: Status::default(),
    };
    match engine.call(&Request::Shutdown) {
        Ok(Response::ShuttingDown { pid }) => Some(pid),
        _ => None,
    }
}

/// Arms a fault in the engine for its next embedding batch; returns the
/// engine's pid.
pub fn fault(fault: proto::Fault) -> u32 {
    match with_engine(false, |engine| engine.call(&Request::Fault { fault })) {
        Response::FaultArmed { pid } => pid,
        Response::Error { kind, message } => raise(kind, &message),
        other => unexpected(other),
    }
}

impl Engine {
    fn io(&self) -> Interruptible<'_> {
        Interruptible(&self.stream)
    }

    /// One request, one JSON response (an `Embeddings` response's vectors
    /// are read by the caller). Engine errors come back as
    /// `Response::Error`: the connection is still good, and the caller raises
    /// them once the connection is back in the cache.
    fn call(&mut self, request: &Request) -> io::Result<Response> {
        proto::write_json(&mut self.io(), request)?;
        proto::read_json(&mut self.io())
    }

    /// An idle connection has nothing to read; if it is readable, the engine
    /// closed it (it exited or restarted since the last statement).
    fn is_idle_and_alive(&self) -> bool {
        matches!(proto::peek(&self.stream), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Connects, starting the supervisor if nobody listens, and (if asked)
/// waits until the model has loaded or failed. Bounded by
/// `kvembed.start_timeout`; interruptible throughout.
fn connect(wait_ready: bool) -> Engine {
    let timeout = crate::settings::start_timeout();
    let deadline = Instant::now() + timeout;
    let path = worker::socket_path();
    let mut last_problem = String::from("the engine socket does not exist yet");
    loop {
        match connect_nonblocking(&path) {
            Ok(stream) => match greet(stream, wait_ready, deadline) {
                Ok(engine) if wait_ready && engine.status.state == EngineState::Loading => {
                    last_problem = format!("the engine is still loading '{}'", engine.status.model);
                }
                Ok(engine) => return engine,
                Err(e) => last_problem = format!("the engine closed the connection: {e}"),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                worker::ensure_supervisor();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                last_problem =
                    "the engine does not accept connections (its listen queue is full)".into();
            }
            Err(e) => last_problem = format!("cannot connect to {}: {e}", path.display()),
        }
        if Instant::now() >= deadline {
            let mut report = ErrorReport::new(
                PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                format!(
                    "kvembed: the engine did not start within kvembed.start_timeout ({} s): {last_problem}",
                    timeout.as_secs()
                ),
                "kvembed",
            );
            if let Some(exit) = worker::read_state().and_then(|s| s.last_exit) {
                report = report.set_detail(format!("The engine's last exit: it {exit}."));
            }
            report
            .set_hint("See the server log for lines from \"kvembed\"; SELECT * FROM kv_status() shows the engine's state.")
            .report(PgLogLevel::ERROR);
        }
        sleep_interruptibly(Duration::from_millis(100));
    }
}

/// `UnixStream::connect` without ever blocking: a blocking connect to an
/// engine whose listen queue is full would wait, deaf to interrupts, for as
/// long as the engine does not accept. Here a full queue is `WouldBlock`
/// (`EAGAIN`), which the caller retries with interruptible sleeps.
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed sockaddr_un is a valid value (family set below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn greet(stream: UnixStream, wait_ready: bool, deadline: Instant) -> io::Result<Engine> {
    stream.set_nonblocking(true)?;
    let mut engine = Engine {
        stream,
        status: Status::default(),
    };
    match engine.call(&Request::Hello {
        version: proto::PROTOCOL_VERSION,
    })? {
        Response::Hello { .. } => {}
        Response::Error { kind, message } => raise(kind, &message),
        other => unexpected(other),
    }
    loop {
        match engine.call(&Request::Status)? {
            Response::Status(s) => engine.status = s,
            Response::Error { kind, message } => raise(kind, &message),
            other => unexpected(other),
        }
        if !wait_ready || engine.status.state != EngineState::Loading || Instant::now() >= deadline
        {
            return Ok(engine);
        }
        sleep_interruptibly(Duration::from_millis(100));
    }
}

/// Reads and writes on the non-blocking socket, sleeping on the latch and
/// the socket between attempts and checking for interrupts on every wake-up.
/// A read or write that makes no progress for `kvembed.engine_timeout`
/// fails with `TimedOut`: the engine is wedged.
struct Interruptible<'a>(&'a UnixStream);

impl Interruptible<'_> {
    fn wait(&self, event: u32, since: Instant) -> io::Result<()> {
        if let Some(limit) = crate::settings::engine_timeout() {
            if since.elapsed() >= limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no word from the engine for kvembed.engine_timeout ({} s)",
                        limit.as_secs()
                    ),
                ));
            }
        }
        wait_socket(self.0, event);
        Ok(())
    }
}

impl Read for Interruptible<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            match (&*self.0).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(pg_sys::WL_SOCKET_READABLE, since)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Write for Interruptible<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            match (&*self.0).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(pg_sys::WL_SOCKET_WRITEABLE, since)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn wait_socket(stream: &UnixStream, event: u32) {
    let events =
        (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH | event) as i32;
    // SAFETY: MyLatch is the backend's own latch; the socket fd stays open for
    // the duration of the call (we hold a reference to the stream).
    unsafe {
        let rc = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events,
            stream.as_raw_fd(),
            1000,
            pg_sys::PG_WAIT_EXTENSION,
        );
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    pg_sys::check_for_interrupts!();
}

pub fn sleep_interruptibly(d: Duration) {
    let events = (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32;
    // SAFETY: waits on the backend's own latch.
    unsafe {
        let rc = pg_sys::WaitLatch(
            pg_sys::MyLatch,
            events,
            d.as_millis() as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    pg_sys::check_for_interrupts!();
}

/// Maps the engine's error classes to SQLSTATEs.
pub fn raise(kind: ErrorKind, message: &str) -> ! {
    let (code, text, hint) = match kind {
        ErrorKind::InvalidInput => {
            (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("kvembed: {message}"), None)
        }
        ErrorKind::TooLong => (
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("kvembed: {message}"),
            Some("Raise kvembed.max_tokens, or SET kvembed.on_overflow = 'truncate'.".to_string()),
        ),
        ErrorKind::ModelLoad if crate::settings::use_model().is_some() => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
            format!(
                "kvembed could not load the model kvembed.use_model names ('{}'): {message}",
                crate::settings::use_model().unwrap_or_default()
            ),
            Some(
                "Fix its entry in kvembed.models (ALTER SYSTEM SET kvembed.models = '...'; SELECT pg_reload_conf();), \
                 or RESET kvembed.use_model to embed with kvembed.model."
                    .to_string(),
            ),
        ),
        ErrorKind::ModelLoad => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
            format!(
                "kvembed could not load the model set in kvembed.model ('{}'): {message}",
                crate::settings::model()
            ),
            Some(
                "Point kvembed.model at a GGUF file, a Hugging Face model directory or a cached repo id: \
                 ALTER SYSTEM SET kvembed.model = '...'; SELECT pg_reload_conf(); \
                 after fixing the file itself, SELECT kv_restart();"
                    .to_string(),
            ),
        ),
        ErrorKind::Loading => (
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("kvembed: the engine is still loading its model: {message}"),
            None,
        ),
        ErrorKind::Protocol => (
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("kvembed: protocol mismatch with the engine: {message}"),
            Some("The extension and the kvembed binary come from different builds; reinstall both.".into()),
        ),
        ErrorKind::ModelChanged => (
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("kvembed: the engine's model changed while this statement ran: {message}"),
            Some("Retry the statement: it will use the model loaded now (and its calibration).".into()),
        ),
        ErrorKind::Internal => {
            (PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("kvembed engine error: {message}"), None)
        }
    };
    let mut report = ErrorReport::new(code, text, "kvembed");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!()
}

fn lost_connection(e: io::Error) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                "kvembed: the engine went away while handling this statement".to_string()
            }
            _ => format!("kvembed: lost the connection to the engine: {e}"),
        },
        "kvembed",
    )
    .set_detail(
        "The engine process exited (crash, out of memory, kill, or restart); its supervisor starts a new one.",
    )
    .set_hint("Retry the statement; see the server log for why the engine exited.")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

fn protocol_error(what: &str) -> ! {
    CACHED.with(|c| c.borrow_mut().take());
    raise(ErrorKind::Protocol, what)
}

fn unexpected(r: Response) -> ! {
    let what = match r {
        Response::Hello { .. } => "hello",
        Response::Embeddings { .. } => "embeddings",
        Response::Layers { .. } => "layers",
        Response::Progress { .. } => "progress",
        Response::Status(_) => "status",
        Response::Described(_) => "described",
        Response::Chunks { .. } => "chunks",
        Response::Stats { .. } => "stats",
        Response::ShuttingDown { .. } => "shutting_down",
        Response::FaultArmed { .. } => "fault_armed",
        Response::Error { .. } => "error",
        Response::TooLong { .. } => "too_long",
    };
    protocol_error(&format!("unexpected '{what}' response"))
}
