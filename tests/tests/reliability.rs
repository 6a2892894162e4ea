//! Fault isolation, cancellation, bad input, privileges and the extension's
//! life cycle, against a real cluster (see docs/RELIABILITY.md).
//!
//! Faults are real: the engine process is SIGKILLed, made to abort or panic
//! inside its inference code (`kv_debug_fault`), and started under an
//! address-space limit too small for the model. Every case checks that the
//! waiting statement gets a clear ERROR, that the cluster did not restart
//! (same postmaster start time, a bystander session keeps its backend pid),
//! and that the next `kv_embed` returns the very same vector as before.
//!
//! Its own test binary: these tests restart the engine and the cluster.

use kvembed_tests::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DB: &str = "kvembed_test_reliability";
const PROBE: &str = "the reliability probe sentence";

static SERIAL: Mutex<()> = Mutex::new(());

fn session() -> (std::sync::MutexGuard<'static, ()>, Session) {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    static CREATED: once_cell::sync::Lazy<()> =
        once_cell::sync::Lazy::new(|| drop(fresh_database(DB)));
    once_cell::sync::Lazy::force(&CREATED);
    let mut s = Session::connect(DB, "postgres");
    s.batch_execute("SET kvembed.layers = 'default'").unwrap();
    wait_ready(&mut s, Duration::from_secs(120));
    (guard, s)
}

fn connect() -> Session {
    let mut s = Session::connect(DB, "postgres");
    s.batch_execute("SET kvembed.layers = 'default'").unwrap();
    s
}

/// Retries `kv_embed(PROBE)` until it succeeds; returns the vector and how
/// long it took.
fn embed_until_ok(s: &mut Session, timeout: Duration) -> (Vec<f32>, Duration) {
    let started = Instant::now();
    loop {
        match s.query_one("SELECT kv_embed($1)::real[]", &[&PROBE]) {
            Ok(row) => return (row.get(0), started.elapsed()),
            Err(e) => assert!(
                started.elapsed() < timeout,
                "kv_embed still fails after {timeout:?}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_ready(s: &mut Session, timeout: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(row) = s.query_one("SELECT state FROM kv_status()", &[]) {
            if row.get::<_, String>(0) == "ready" {
                return;
            }
        }
        assert!(
            started.elapsed() < timeout,
            "the engine is not ready after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What must not change when the engine fails: the postmaster and another
/// session's backend.
struct Bystander {
    s: Session,
    pid: i32,
    postmaster_started: String,
}

impl Bystander {
    fn new() -> Bystander {
        let mut s = connect();
        let pid: i32 = s.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let postmaster_started: String = s
            .query_one("SELECT pg_postmaster_start_time()::text", &[])
            .unwrap()
            .get(0);
        Bystander {
            s,
            pid,
            postmaster_started,
        }
    }

    fn check(&mut self) {
        let row = self
            .s
            .query_one(
                "SELECT pg_backend_pid(), pg_postmaster_start_time()::text",
                &[],
            )
            .expect("the bystander session keeps its connection");
        assert_eq!(
            row.get::<_, i32>(0),
            self.pid,
            "the bystander's backend must be the same process"
        );
        assert_eq!(
            row.get::<_, String>(1),
            self.postmaster_started,
            "the cluster must not restart"
        );
    }
}

fn restarts(s: &mut Session) -> i64 {
    s.query_one("SELECT engine_restarts FROM kv_status()", &[])
        .unwrap()
        .get(0)
}

/// Runs `kv_embed('<marker>')` in another session on a thread; returns its
/// result and the instant it came back.
fn victim(
    marker: &'static str,
) -> std::thread::JoinHandle<(Result<Vec<f32>, (String, String)>, Instant)> {
    std::thread::spawn(move || {
        let mut v = connect();
        let r = v.query_one(&format!("SELECT kv_embed('{marker}')::real[]"), &[]);
        let at = Instant::now();
        (r.map(|row| row.get(0)).map_err(|e| sql_error(&e)), at)
    })
}

/// Waits until the session running `kv_embed('<marker>')` is blocked on the
/// engine (its wait event is kvembed's), then a little longer so that the
/// request is inside the engine's (stalled) batch.
fn wait_until_waiting_on_the_engine(s: &mut Session, marker: &str) {
    let started = Instant::now();
    loop {
        let n: i64 = s
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND state = 'active' AND wait_event_type = 'Extension'
                   AND strpos(query, $1) > 0",
                &[&marker],
            )
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the victim never reached the engine"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn kill_engine(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(
        status.success(),
        "kill {signal} {pid} failed (the tests must run as the cluster's OS user or root)"
    );
}

#[test]
fn sigkill_of_the_engine_fails_only_the_waiting_statement() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let mut bystander = Bystander::new();
    let before_restarts = restarts(&mut s);
    let pid = s
        .query_one("SELECT kv_debug_fault('stall:4000')", &[])
        .unwrap()
        .get::<_, i32>(0);
    assert_eq!(pid, engine_pid(&mut s));

    let waiting = victim("killed while waiting");
    wait_until_waiting_on_the_engine(&mut s, "killed while waiting");
    let killed_at = Instant::now();
    kill_engine(pid, "-KILL");
    let (result, failed_at) = waiting.join().unwrap();
    let (code, msg) = result.expect_err("the statement waiting on a killed engine must fail");
    assert_eq!(code, "58000", "{msg}");
    assert!(msg.contains("engine went away"), "{msg}");
    let error_after = failed_at.duration_since(killed_at);
    assert!(
        error_after < Duration::from_secs(2),
        "the error took {error_after:?}"
    );

    bystander.check();
    let (after, recovered_in) = embed_until_ok(&mut s, Duration::from_secs(60));
    assert!(
        max_abs_diff(&after, &reference) <= 1e-6,
        "same text, same vector after the restart"
    );
    let new_pid = engine_pid(&mut s);
    assert_ne!(new_pid, pid, "a new engine process serves");
    let row = s
        .query_one("SELECT engine_restarts, last_exit FROM kv_status()", &[])
        .unwrap();
    assert!(row.get::<_, i64>(0) > before_restarts);
    let last_exit: String = row.get(1);
    assert!(last_exit.contains("signal 9"), "{last_exit}");
    bystander.check();
    record_figures(
        "sigkill_of_the_engine_fails_only_the_waiting_statement",
        serde_json::json!({"faults": 1, "error_after_s": error_after.as_secs_f64(),
                           "next_kv_embed_ok_after_s": recovered_in.as_secs_f64()}),
    );
}

#[test]
fn an_abort_in_the_engine_fails_only_the_waiting_statement() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let mut bystander = Bystander::new();
    let pid: i32 = s
        .query_one("SELECT kv_debug_fault('abort')", &[])
        .unwrap()
        .get(0);
    let started = Instant::now();
    let err = s
        .query_one("SELECT kv_embed('this batch aborts the engine')", &[])
        .expect_err("abort");
    let (code, msg) = sql_error(&err);
    assert_eq!(code, "58000", "{msg}");
    assert!(msg.contains("engine went away"), "{msg}");
    bystander.check();
    let (after, recovered_in) = embed_until_ok(&mut s, Duration::from_secs(60));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
    assert_ne!(engine_pid(&mut s), pid);
    let last_exit: String = s
        .query_one("SELECT last_exit FROM kv_status()", &[])
        .unwrap()
        .get(0);
    assert!(last_exit.contains("signal 6"), "{last_exit}");
    bystander.check();
    record_figures(
        "an_abort_in_the_engine_fails_only_the_waiting_statement",
        serde_json::json!({"faults": 1, "fault_to_ok_s": started.elapsed().as_secs_f64(),
                           "next_kv_embed_ok_after_s": recovered_in.as_secs_f64()}),
    );
}

#[test]
fn a_panic_in_inference_fails_only_its_batch() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let mut bystander = Bystander::new();
    let pid: i32 = s
        .query_one("SELECT kv_debug_fault('panic')", &[])
        .unwrap()
        .get(0);
    let err = s
        .query_one("SELECT kv_embed('this batch panics')", &[])
        .expect_err("panic");
    let (code, msg) = sql_error(&err);
    assert_eq!(code, "XX000", "{msg}");
    assert!(
        msg.contains("panicked") && msg.contains("injected fault"),
        "{msg}"
    );
    // Caught inside the engine: the same process serves the next request.
    let (after, _) = embed_until_ok(&mut s, Duration::from_secs(10));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
    assert_eq!(
        engine_pid(&mut s),
        pid,
        "a caught panic must not restart the engine"
    );
    bystander.check();
    record_figures(
        "a_panic_in_inference_fails_only_its_batch",
        serde_json::json!({"faults": 1}),
    );
}

/// Puts the memory limit back even when an assertion fails.
/// Resets engine settings (`ALTER SYSTEM RESET`, reload) when a test ends,
/// however it ends.
struct ResetSettings(&'static [&'static str]);

impl Drop for ResetSettings {
    fn drop(&mut self) {
        let mut admin = Session::connect("postgres", "postgres");
        for name in self.0 {
            let _ = admin.batch_execute(&format!("ALTER SYSTEM RESET {name}"));
        }
        let _ = admin.batch_execute("SELECT pg_reload_conf()");
    }
}

#[test]
fn running_out_of_memory_while_loading_is_a_clear_error() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let mut bystander = Bystander::new();
    let old_pid = engine_pid(&mut s);
    let _reset = ResetSettings(&["kvembed.engine_memory_limit"]);
    // The engine needs ~0.3 GB of address space with int8 weights (~0.4 GB
    // counted by ulimit -v for `kvembed embed`; more with f32 or AMX weights).
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute("ALTER SYSTEM SET kvembed.engine_memory_limit = '128MB'")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.batch_execute("SET kvembed.start_timeout = '8s'").unwrap();
    // Wait until the old engine is gone (the supervisor restarts it on reload).
    let started = Instant::now();
    while s
        .query_one("SELECT engine_pid FROM kv_status()", &[])
        .ok()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        == Some(old_pid)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the engine did not restart after the reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = s
        .query_one("SELECT kv_embed($1)", &[&PROBE])
        .expect_err("the model cannot load in 128 MB");
    let (code, msg, detail) = sql_error_full(&err);
    assert!(
        ["58000", "58P01"].contains(&code.as_str()),
        "{code} {msg} {detail}"
    );
    let text = format!("{msg} {detail}").to_lowercase();
    assert!(
        text.contains("memory") || text.contains("signal 6") || text.contains("cannot allocate"),
        "the error must say the engine ran out of memory: {msg} / {detail}"
    );
    bystander.check();

    drop(_reset);
    s.batch_execute("RESET kvembed.start_timeout").unwrap();
    let (after, recovered_in) = embed_until_ok(&mut s, Duration::from_secs(90));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
    bystander.check();
    record_figures(
        "running_out_of_memory_while_loading_is_a_clear_error",
        serde_json::json!({"faults": 1, "limit_mb": 128, "error": msg,
                           "next_kv_embed_ok_after_s": recovered_in.as_secs_f64()}),
    );
}

#[test]
fn cancellation_interrupts_within_a_second_and_does_not_poison_later_requests() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let others: Vec<(String, Vec<f32>)> = (0..4)
        .map(|i| {
            let t = format!("another sentence, number {i}");
            let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&t]);
            (t, v)
        })
        .collect();

    // statement_timeout while the engine is stalled on this very request.
    s.query_one("SELECT kv_debug_fault('stall:3000')", &[])
        .unwrap();
    s.batch_execute("SET statement_timeout = '400ms'").unwrap();
    let started = Instant::now();
    let err = s
        .query_one("SELECT kv_embed('cancelled by statement_timeout')", &[])
        .expect_err("timeout");
    let timeout_took = started.elapsed();
    assert_eq!(sql_error(&err).0, "57014", "{err}");
    assert!(
        timeout_took < Duration::from_millis(400 + 1000),
        "statement_timeout took {timeout_took:?}"
    );
    s.batch_execute("RESET statement_timeout").unwrap();

    // pg_cancel_backend from another session.
    s.query_one("SELECT kv_debug_fault('stall:3000')", &[])
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        let mut v = connect();
        let pid: i32 = v.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        tx.send(pid).unwrap();
        let r = v.query_one("SELECT kv_embed('cancelled by pg_cancel_backend')", &[]);
        (r.map(|_| ()).map_err(|e| sql_error(&e)), Instant::now())
    });
    let victim_pid = rx.recv().unwrap();
    wait_until_waiting_on_the_engine(&mut s, "cancelled by pg_cancel_backend");
    let cancelled_at = Instant::now();
    let ok: bool = s
        .query_one("SELECT pg_cancel_backend($1)", &[&victim_pid])
        .unwrap()
        .get(0);
    assert!(ok);
    let (result, failed_at) = waiting.join().unwrap();
    let (code, msg) = result.expect_err("cancelled");
    assert_eq!(code, "57014", "{msg}");
    let cancel_took = failed_at.duration_since(cancelled_at);
    assert!(
        cancel_took < Duration::from_secs(1),
        "pg_cancel_backend took {cancel_took:?}"
    );

    // Later requests get their own, correct answers (from several sessions
    // at once, so a stale reply would land on someone).
    let (after, _) = embed_until_ok(&mut s, Duration::from_secs(30));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
    let handles: Vec<_> = others
        .into_iter()
        .map(|(t, want)| {
            std::thread::spawn(move || {
                let mut c = connect();
                let got = vector(&mut c, "SELECT kv_embed($1)::real[]", &[&t]);
                assert!(
                    max_abs_diff(&got, &want) <= 1e-6,
                    "{t}: wrong vector after a cancellation"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a later request got a wrong answer");
    }
    record_figures(
        "cancellation_interrupts_within_a_second_and_does_not_poison_later_requests",
        serde_json::json!({"cancellations": 2, "statement_timeout_400ms_took_s": timeout_took.as_secs_f64(),
                           "pg_cancel_backend_took_s": cancel_took.as_secs_f64()}),
    );
}

/// What a bad input must give.
enum Expect {
    Vector,
    VectorWithNotice,
    Error(&'static str),
}

#[test]
fn bad_input_corpus_gives_defined_results_and_crashes_nothing() {
    let (_g, mut s) = session();
    let pid = engine_pid(&mut s);
    let restarts_before = restarts(&mut s);
    let d: i32 = s
        .query_one("SELECT dim FROM kv_status()", &[])
        .unwrap()
        .get(0);
    let ten_mb_words: String = {
        let words = [
            "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
        ];
        let mut t = String::with_capacity(10 << 20);
        let mut i = 0usize;
        while t.len() < 10 << 20 {
            t.push_str(words[i % words.len()]);
            t.push(' ');
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        t
    };
    let hundred_k_tokens = "token ".repeat(100_000);
    let zalgo: String = "e\u{301}\u{302}\u{303}\u{304}".repeat(2000);
    let cases: Vec<(&str, &str, String, Expect)> = vec![
        ("empty", "", String::new(), Expect::Vector),
        ("whitespace", "", " \t \n  ".into(), Expect::Vector),
        (
            "control characters",
            "",
            "\u{1}\u{2}\u{7}\u{8}\u{b}\u{c}\u{1b}[31mred\u{1b}[0m\u{7f}\r\n".into(),
            Expect::Vector,
        ),
        (
            "emoji",
            "",
            "👩‍👩‍👧‍👦 🎉🚀 family party 🏳️‍🌈 🇫🇷".into(),
            Expect::Vector,
        ),
        (
            "right-to-left",
            "",
            "مرحبا بالعالم — שלום עולם — hello".into(),
            Expect::Vector,
        ),
        ("combining characters", "", zalgo, Expect::VectorWithNotice),
        (
            "unassigned and private-use code points",
            "",
            "\u{e000}\u{f8ff}\u{10fffd}\u{fffe}".into(),
            Expect::Vector,
        ),
        (
            "10 MB of words",
            "",
            ten_mb_words.clone(),
            Expect::VectorWithNotice,
        ),
        (
            "10 MB without a space",
            "",
            "x".repeat(10 << 20),
            Expect::VectorWithNotice,
        ),
        (
            "100,000 tokens, truncated",
            "",
            hundred_k_tokens.clone(),
            Expect::VectorWithNotice,
        ),
        (
            "100,000 tokens, kvembed.max_tokens = 0 (the model's 4,096)",
            "SET kvembed.max_tokens = 0",
            hundred_k_tokens.clone(),
            Expect::VectorWithNotice,
        ),
        (
            "100,000 tokens, on_overflow = error",
            "SET kvembed.on_overflow = 'error'",
            hundred_k_tokens,
            Expect::Error("54000"),
        ),
        (
            "10 MB, on_overflow = error",
            "SET kvembed.on_overflow = 'error'",
            ten_mb_words,
            Expect::Error("54000"),
        ),
    ];
    let mut checked = 0;
    for (label, setup, text, expect) in &cases {
        s.batch_execute("RESET ALL; SET kvembed.layers = 'default'")
            .unwrap();
        if !setup.is_empty() {
            s.batch_execute(setup).unwrap();
        }
        s.take_notices();
        let r = s.query_one("SELECT kv_embed($1)::real[]", &[text]);
        match (expect, r) {
            (Expect::Vector | Expect::VectorWithNotice, Ok(row)) => {
                let v: Vec<f32> = row.get(0);
                assert_eq!(v.len() as i32, d, "{label}");
                assert!(v.iter().all(|x| x.is_finite()), "{label}: non-finite value");
                let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-4, "{label}: norm {norm}");
                let notices = s.take_notices();
                if matches!(expect, Expect::VectorWithNotice) {
                    assert!(
                        notices.iter().any(|n| n.contains("truncated")),
                        "{label}: expected a NOTICE, got {notices:?}"
                    );
                }
            }
            (Expect::Error(want), Err(e)) => {
                let (code, msg) = sql_error(&e);
                assert_eq!(&code, want, "{label}: {msg}");
            }
            (_, Ok(_)) => panic!("{label}: expected an error, got a vector"),
            (_, Err(e)) => panic!("{label}: unexpected error {e}"),
        }
        checked += 1;
    }
    s.batch_execute("RESET ALL; SET kvembed.layers = 'default'")
        .unwrap();

    // NULLs: a NULL text is a NULL vector; NULL array elements stay NULL in
    // place, the others embed as they would alone.
    let row = s
        .query_one(
            "SELECT kv_embed(NULL) IS NULL, kv_embed_half(NULL) IS NULL, kv_embed_batch(NULL) IS NULL,
                    (SELECT array_agg(v IS NULL ORDER BY o) FROM unnest(kv_embed_batch(ARRAY[NULL, 'b', NULL, '', NULL]))
                       WITH ORDINALITY AS u(v, o))",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(
        row.get::<_, Vec<bool>>(3),
        vec![true, false, true, false, true]
    );
    let alone = vector(&mut s, "SELECT kv_embed('b')::real[]", &[]);
    let in_batch = vector(
        &mut s,
        "SELECT (kv_embed_batch(ARRAY[NULL, 'b', NULL]))[2]::real[]",
        &[],
    );
    assert!(max_abs_diff(&alone, &in_batch) <= 1e-5);
    checked += 3;

    // Nothing crashed: the same engine process answered everything.
    assert_eq!(engine_pid(&mut s), pid, "a bad input restarted the engine");
    assert_eq!(restarts(&mut s), restarts_before);
    record_figures(
        "bad_input_corpus_gives_defined_results_and_crashes_nothing",
        serde_json::json!({"inputs": checked, "engine_restarts": restarts(&mut s) - restarts_before}),
    );
}

#[test]
fn select_layers_reads_with_the_callers_privileges_and_row_level_security() {
    let (_g, mut s) = session();
    ensure_login_role(&mut s, "kvembed_test_alice");
    ensure_login_role(&mut s, "kvembed_test_mallory");
    s.batch_execute(
        "DROP TABLE IF EXISTS rls_docs;
         CREATE TABLE rls_docs (owner name, body text);
         ALTER TABLE rls_docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON rls_docs USING (owner = current_user);
         GRANT SELECT ON rls_docs TO kvembed_test_alice;
         GRANT kvembed_admin TO kvembed_test_alice;",
    )
    .unwrap();
    for (i, (_, body)) in CORPUS.iter().enumerate() {
        let owner = if i < 12 {
            "kvembed_test_alice"
        } else {
            "someone_else"
        };
        s.execute("INSERT INTO rls_docs VALUES ($1, $2)", &[&owner, body])
            .unwrap();
    }
    // Alice samples only the 12 rows the policy shows her.
    let mut alice = Session::connect(DB, "kvembed_test_alice");
    let rows = alice
        .query(
            "SELECT * FROM kv_select_layers('rls_docs', 'body', 512, store => false)",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty());
    let notices = alice.take_notices();
    assert!(
        notices.iter().any(|n| n.contains("over 12 texts")),
        "row-level security must limit the sample to alice's 12 rows: {notices:?}"
    );
    // Mallory may not read the table at all.
    let mut mallory = Session::connect(DB, "kvembed_test_mallory");
    let err = mallory
        .query(
            "SELECT * FROM kv_select_layers('rls_docs', 'body', 512, store => false)",
            &[],
        )
        .expect_err("no SELECT");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    // Nor inject faults, nor change the engine's memory limit.
    let err = mallory
        .query_one("SELECT kv_debug_fault('abort')", &[])
        .expect_err("superuser only");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    let err = mallory
        .batch_execute("ALTER SYSTEM SET kvembed.engine_memory_limit = '1MB'")
        .expect_err("superuser only");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    let err = mallory
        .batch_execute("SET kvembed.engine_memory_limit = '1MB'")
        .expect_err("sighup setting");
    assert_eq!(sql_error(&err).0, "55P02", "{err}");
    record_figures(
        "select_layers_reads_with_the_callers_privileges_and_row_level_security",
        serde_json::json!({"rows_visible_to_caller": 12, "rows_in_table": CORPUS.len(), "refusals": 4}),
    );
}

#[test]
fn the_engine_channel_is_private_and_there_is_no_tcp_listener() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (_g, mut s) = session();
    let data_dir: String = s
        .query_one("SELECT current_setting('data_directory')", &[])
        .unwrap()
        .get(0);
    let data_owner = std::fs::metadata(&data_dir)
        .expect("the tests read the data directory's metadata")
        .uid();
    let dir = std::path::Path::new(&data_dir).join("kvembed");
    let meta = std::fs::metadata(&dir).expect("the runtime directory exists");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "{} must be 0700",
        dir.display()
    );
    assert_eq!(meta.uid(), data_owner);
    let sock =
        std::fs::symlink_metadata(dir.join("engine.sock")).expect("the engine socket exists");
    assert_eq!(
        sock.permissions().mode() & 0o777,
        0o600,
        "the socket must be 0600"
    );
    assert_eq!(sock.uid(), data_owner);

    // The engine's open sockets: some Unix ones, no TCP or UDP one.
    let pid = engine_pid(&mut s);
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<engine>/fd is readable")
        .flatten()
    {
        let target = match std::fs::read_link(fd.path()) {
            Ok(target) => target,
            // Closed between the listing and the look: not a socket it holds.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("cannot read {}: {e}", fd.path().display()),
        };
        let t = target.to_string_lossy().into_owned();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            inodes.push(inode.to_string());
        }
    }
    assert!(
        !inodes.is_empty(),
        "the engine has at least its listening socket"
    );
    let inet_inodes = |table: &str| -> Vec<String> {
        let path = format!("/proc/{pid}/net/{table}");
        match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // No such protocol in this kernel (IPv6 off): no such socket either.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("cannot read {path}: {e}"),
        }
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(9).map(str::to_string))
        .collect()
    };
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
    assert!(inodes.iter().any(|i| unix
        .lines()
        .any(|l| l.split_whitespace().nth(6) == Some(i.as_str()))));
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let inet = inet_inodes(table);
        for inode in &inodes {
            assert!(
                !inet.contains(inode),
                "the engine has a {table} socket (inode {inode})"
            );
        }
    }
    record_figures(
        "the_engine_channel_is_private_and_there_is_no_tcp_listener",
        serde_json::json!({"engine_sockets": inodes.len(), "inet_sockets": 0}),
    );
}

/// Restarts the cluster (scripts/pg.sh restart).
fn restart_cluster() {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/pg.sh"))
        .arg("restart")
        .output()
        .expect("scripts/pg.sh restart");
    assert!(
        out.status.success(),
        "restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn calibration_survives_a_cluster_restart() {
    let (_g, mut s) = session();
    s.batch_execute("DROP TABLE IF EXISTS calib_docs; CREATE TABLE calib_docs (body text)")
        .unwrap();
    for (_, body) in CORPUS {
        s.execute("INSERT INTO calib_docs VALUES ($1)", &[body])
            .unwrap();
    }
    let selected: Vec<i32> = s
        .query("SELECT layer FROM kv_select_layers('calib_docs', 'body') WHERE selected ORDER BY layer", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!selected.is_empty());
    drop(s);
    restart_cluster();
    let mut s = connect();
    s.batch_execute("SET kvembed.layers = 'auto'").unwrap();
    wait_ready(&mut s, Duration::from_secs(120));
    let row = s
        .query_one("SELECT layers, layers_source FROM kv_status()", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "calibration");
    assert_eq!(row.get::<_, Vec<i32>>(0), selected);
    // The space calibration fitted with it is applied after the restart too.
    let space: Option<String> = s
        .query_one("SELECT space FROM kv_status()", &[])
        .unwrap()
        .get(0);
    assert!(
        space.as_deref().is_some_and(|s| s.starts_with("whiten")),
        "{space:?}"
    );
    s.batch_execute("DELETE FROM kvembed.calibration").unwrap();
    record_figures(
        "calibration_survives_a_cluster_restart",
        serde_json::json!({"cluster_restarts": 1}),
    );
}

/// The objects that belong to the extension in `db`, described.
fn extension_objects(db: &str) -> Vec<String> {
    let mut c = Session::connect(db, "postgres");
    c.query(
        "SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
                || coalesce(' ' || (SELECT provolatile::text || proisstrict::text || proparallel::text || coalesce(proacl::text, '')
                                           || ' ' || md5(prosrc)
                                    FROM pg_proc WHERE d.classid = 'pg_proc'::regclass AND oid = d.objid), '')
         FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid
         WHERE e.extname = 'kvembed' AND d.deptype = 'e' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn recreate(db: &str) -> Session {
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    Session::connect(db, "postgres")
}

#[test]
fn upgrade_from_0_1_0_gives_the_same_objects_as_a_fresh_install() {
    let (_g, _s) = session();
    let mut old = recreate("kvembed_test_upgrade");
    old.batch_execute("CREATE EXTENSION kvembed VERSION '0.1.0' CASCADE")
        .unwrap();
    let n: i64 = old
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname = 'kv_debug_fault'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "0.1.0 has no kv_debug_fault");
    let before = extension_objects("kvembed_test_upgrade");
    old.batch_execute("ALTER EXTENSION kvembed UPDATE").unwrap();
    let version: String = old
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'kvembed'",
            &[],
        )
        .unwrap()
        .get(0);
    let default: String = old
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'kvembed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, default);
    let upgraded = extension_objects("kvembed_test_upgrade");
    let mut fresh_db = recreate("kvembed_test_fresh");
    fresh_db
        .batch_execute("CREATE EXTENSION kvembed CASCADE")
        .unwrap();
    let fresh = extension_objects("kvembed_test_fresh");
    assert_eq!(
        upgraded, fresh,
        "an upgraded install must have exactly the objects of a fresh one"
    );
    assert!(upgraded.len() > before.len());
    old.batch_execute("SET kvembed.layers = 'default'").unwrap();
    let v = vector(
        &mut old,
        "SELECT kv_embed('after the upgrade')::real[]",
        &[],
    );
    assert_eq!(v.len(), 576);
    drop(old);
    drop(fresh_db);
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute("DROP DATABASE kvembed_test_upgrade WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("DROP DATABASE kvembed_test_fresh WITH (FORCE)")
        .unwrap();
    record_figures(
        "upgrade_from_0_1_0_gives_the_same_objects_as_a_fresh_install",
        serde_json::json!({"objects_0_1_0": before.len(), "objects_after_upgrade": upgraded.len()}),
    );
}

#[test]
fn drop_extension_removes_everything_it_created() {
    let (_g, _s) = session();
    let mut c = recreate("kvembed_test_drop");
    let baseline = |c: &mut Session| -> Vec<String> {
        c.query(
            "SELECT classid::regclass::text || ' ' || objid FROM (
               SELECT 'pg_proc'::regclass AS classid, oid AS objid FROM pg_proc WHERE pronamespace <> 'pg_catalog'::regnamespace
                 AND pronamespace <> 'information_schema'::regnamespace
               UNION ALL SELECT 'pg_class'::regclass, oid FROM pg_class WHERE relnamespace NOT IN
                 ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)
               UNION ALL SELECT 'pg_namespace'::regclass, oid FROM pg_namespace
               UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type WHERE typnamespace <> 'pg_catalog'::regnamespace
                 AND typnamespace <> 'information_schema'::regnamespace) o ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    c.batch_execute("CREATE EXTENSION vector").unwrap();
    let before = baseline(&mut c);
    c.batch_execute("CREATE EXTENSION kvembed").unwrap();
    let with = baseline(&mut c);
    assert!(
        with.len() > before.len() + 8,
        "kvembed creates functions, a schema and a table"
    );
    c.batch_execute("DROP EXTENSION kvembed").unwrap();
    let after = baseline(&mut c);
    assert_eq!(
        after, before,
        "DROP EXTENSION must leave exactly what was there before"
    );
    let schema: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'kvembed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(schema, 0);
    drop(c);
    Session::connect("postgres", "postgres")
        .batch_execute("DROP DATABASE kvembed_test_drop WITH (FORCE)")
        .unwrap();
    record_figures(
        "drop_extension_removes_everything_it_created",
        serde_json::json!({"objects_created": with.len() - before.len(), "objects_left": 0}),
    );
}

#[test]
fn pg_dump_and_pg_restore_round_trip_a_generated_embedding_column() {
    let (_g, mut s) = session();
    s.batch_execute(
        "DROP TABLE IF EXISTS dumped_docs;
         CREATE TABLE dumped_docs (id int PRIMARY KEY, body text,
           emb vector(576) GENERATED ALWAYS AS (kv_embed(body)) STORED);
         CREATE INDEX dumped_docs_hnsw ON dumped_docs USING hnsw (emb vector_cosine_ops);
         DELETE FROM kvembed.calibration;
         INSERT INTO kvembed.calibration (model_id, layers, curve, rule) VALUES ('dump-test-model', '{3,4,5}', '[]', 'test');",
    )
    .unwrap();
    for (i, (_, body)) in CORPUS.iter().enumerate() {
        s.execute(
            "INSERT INTO dumped_docs (id, body) VALUES ($1, $2)",
            &[&(i as i32), body],
        )
        .unwrap();
    }
    s.execute(
        "INSERT INTO dumped_docs (id, body) VALUES (1000, NULL)",
        &[],
    )
    .unwrap();
    let dump = std::env::temp_dir().join(format!("kvembed-test-{}.dump", std::process::id()));
    let dump_s = dump.to_string_lossy().into_owned();
    run_pg_tool("pg_dump", &["-Fc", "-d", DB, "-f", &dump_s]);
    let restored_db = "kvembed_test_restored";
    drop(recreate(restored_db));
    run_pg_tool(
        "pg_restore",
        &["--exit-on-error", "-d", restored_db, &dump_s],
    );
    let _ = std::fs::remove_file(&dump);

    let mut r = Session::connect(restored_db, "postgres");
    let load = |c: &mut Session| -> Vec<(i32, Option<Vec<f32>>)> {
        c.query("SELECT id, emb::real[] FROM dumped_docs ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };
    let original = load(&mut s);
    let restored = load(&mut r);
    assert_eq!(original.len(), restored.len(), "every row comes back");
    for ((id_a, a), (id_b, b)) in original.iter().zip(&restored) {
        assert_eq!(id_a, id_b);
        match (a, b) {
            (Some(a), Some(b)) => assert!(
                max_abs_diff(a, b) <= 1e-6,
                "row {id_a}: the restored embedding differs"
            ),
            (None, None) => {}
            _ => panic!("row {id_a}: NULL-ness of the embedding changed"),
        }
    }
    let index: i64 = r
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'dumped_docs_hnsw'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(index, 1);
    let calib: Vec<i32> = r
        .query_one(
            "SELECT layers FROM kvembed.calibration WHERE model_id = 'dump-test-model'",
            &[],
        )
        .expect("the stored calibration is part of the dump")
        .get(0);
    assert_eq!(calib, vec![3, 4, 5]);
    s.batch_execute("DELETE FROM kvembed.calibration").unwrap();
    drop(r);
    Session::connect("postgres", "postgres")
        .batch_execute(&format!("DROP DATABASE {restored_db} WITH (FORCE)"))
        .unwrap();
    record_figures(
        "pg_dump_and_pg_restore_round_trip_a_generated_embedding_column",
        serde_json::json!({"rows_checked": original.len()}),
    );
}

/// Forward passes the engine has run since it started.
fn forward_passes(s: &mut Session) -> i64 {
    s.query_one(
        "SELECT (kvembed.status_json()->>'forward_passes')::bigint",
        &[],
    )
    .unwrap()
    .get(0)
}

/// After a cancelled statement: the passes the engine runs until another
/// session's `kv_embed` comes back (which needs one of its own).
fn passes_until_the_next_kv_embed_is_served(s: &mut Session) -> (i64, Duration) {
    let at_cancel = forward_passes(s);
    let mut other = connect();
    let (_, took) = embed_until_ok(&mut other, Duration::from_secs(120));
    (forward_passes(s) - at_cancel, took)
}

#[test]
fn a_cancelled_kv_select_layers_frees_the_engine() {
    let (_g, mut s) = session();
    s.batch_execute("DROP TABLE IF EXISTS big_calib; CREATE TABLE big_calib (body text)")
        .unwrap();
    s.execute(
        "INSERT INTO big_calib SELECT format('calibration text number %s about %s', i, md5(i::text)) FROM generate_series(1, 2000) i",
        &[],
    )
    .unwrap();
    let before = forward_passes(&mut s);
    // The whole sample takes the engine far longer than the timeout.
    s.batch_execute("SET statement_timeout = '2s'").unwrap();
    let err = s
        .query(
            "SELECT * FROM kv_select_layers('big_calib', 'body', 2000, store => false)",
            &[],
        )
        .expect_err("cancelled by statement_timeout");
    assert_eq!(sql_error(&err).0, "57014", "{err}");
    s.batch_execute("RESET statement_timeout").unwrap();
    let ran = forward_passes(&mut s) - before;
    // Counted in units of work, not seconds: the pass running at the cancel
    // and the next statement's own, whatever the CPU's speed.
    let (after, took) = passes_until_the_next_kv_embed_is_served(&mut s);
    assert!(
        after <= 2,
        "the engine ran {after} forward passes for the cancelled selection and the next statement"
    );
    s.batch_execute("DROP TABLE big_calib").unwrap();
    record_figures(
        "a_cancelled_kv_select_layers_frees_the_engine",
        serde_json::json!({"sample": 2000, "passes_before_cancel": ran, "passes_after_cancel": after,
                           "next_kv_embed_s": took.as_secs_f64()}),
    );
}

#[test]
fn a_cancelled_kv_embed_batch_of_100000_texts_frees_the_engine_within_one_forward_pass() {
    let (_g, mut s) = session();
    let before = forward_passes(&mut s);
    s.batch_execute("SET statement_timeout = '3s'").unwrap();
    let err = s
        .query_one(
            "SELECT cardinality(kv_embed_batch(array_agg(format('text %s of a very large batch', i))))
             FROM generate_series(1, 100000) i",
            &[],
        )
        .expect_err("cancelled by statement_timeout");
    assert_eq!(sql_error(&err).0, "57014", "{err}");
    s.batch_execute("RESET statement_timeout").unwrap();
    let ran = forward_passes(&mut s) - before;
    assert!(ran > 0, "the batch never reached the engine");
    let (after, took) = passes_until_the_next_kv_embed_is_served(&mut s);
    assert!(
        after <= 2,
        "the engine ran {after} forward passes for the cancelled batch and the next statement"
    );
    record_figures(
        "a_cancelled_kv_embed_batch_of_100000_texts_frees_the_engine_within_one_forward_pass",
        serde_json::json!({"texts": 100000, "passes_before_cancel": ran, "passes_after_cancel": after,
                           "next_kv_embed_s": took.as_secs_f64()}),
    );
}

/// Waits until the engine reports `key` = `value` in its status.
fn wait_for_status(s: &mut Session, key: &str, value: i64) {
    let started = Instant::now();
    loop {
        let got: Option<i64> = s
            .query_one("SELECT (kvembed.status_json()->>$1)::bigint", &[&key])
            .ok()
            .and_then(|r| r.get(0));
        if got == Some(value) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the engine never reported {key} = {value} (last {got:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ordinary_roles_cannot_make_one_request_cost_more_than_the_administrators_limits() {
    let (_g, mut s) = session();
    ensure_login_role(&mut s, "kvembed_test_mallory");
    let _reset = ResetSettings(&["kvembed.max_tokens_limit", "kvembed.max_calibration_texts"]);
    let mut admin = Session::connect("postgres", "postgres");
    for sql in [
        "ALTER SYSTEM SET kvembed.max_tokens_limit = 64",
        "ALTER SYSTEM SET kvembed.max_calibration_texts = 16",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    wait_for_status(&mut s, "max_tokens_limit", 64);
    wait_ready(&mut s, Duration::from_secs(120));

    let mut mallory = Session::connect(DB, "kvembed_test_mallory");
    mallory
        .batch_execute("SET kvembed.layers = 'default'")
        .unwrap();
    // The ceiling itself is out of an ordinary role's reach.
    for sql in [
        "SET kvembed.max_tokens_limit = 100000",
        "SET kvembed.max_calibration_texts = 100000",
    ] {
        let err = mallory.batch_execute(sql).expect_err("sighup setting");
        assert_eq!(sql_error(&err).0, "55P02", "{sql}: {err}");
        let err = mallory
            .batch_execute(&format!("ALTER SYSTEM {sql}"))
            .expect_err("superuser only");
        assert_eq!(sql_error(&err).0, "42501", "{sql}: {err}");
    }
    // The review's case: ~15,000 tokens with max_tokens raised to 100,000.
    let long = "lorem ipsum dolor sit amet ".repeat(1500);
    mallory
        .batch_execute("SET kvembed.max_tokens = 100000")
        .unwrap();
    mallory.take_notices();
    let wide = vector(&mut mallory.client, "SELECT kv_embed($1)::real[]", &[&long]);
    let notices = mallory.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("truncated") && n.contains("to 64 tokens")),
        "the text must be cut at the administrator's 64 tokens, with a NOTICE: {notices:?}"
    );
    assert!(
        notices
            .iter()
            .any(|n| n.contains("kvembed.max_tokens_limit = 64")),
        "{notices:?}"
    );
    mallory
        .batch_execute("SET kvembed.max_tokens = 64")
        .unwrap();
    let at_limit = vector(&mut mallory.client, "SELECT kv_embed($1)::real[]", &[&long]);
    assert!(
        max_abs_diff(&wide, &at_limit) <= 1e-6,
        "not the text cut at 64 tokens"
    );
    // Refusing instead of truncating refuses; it never runs the text in full.
    mallory
        .batch_execute("SET kvembed.max_tokens = 100000; SET kvembed.on_overflow = 'error'")
        .unwrap();
    let passes = forward_passes(&mut mallory);
    let err = mallory
        .query_one("SELECT kv_embed($1)", &[&long])
        .expect_err("over the limit");
    let (code, message) = sql_error(&err);
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("max_tokens = 64"), "{message}");
    assert_eq!(
        forward_passes(&mut mallory),
        passes,
        "the refused text reached the model"
    );
    // A layer selection is not for ordinary roles at all...
    mallory
        .batch_execute("RESET kvembed.max_tokens; RESET kvembed.on_overflow")
        .unwrap();
    let err = mallory
        .query_one(
            "SELECT kvembed.select_layers_raw(array_fill('x'::text, ARRAY[50000]))",
            &[],
        )
        .expect_err("revoked from PUBLIC");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    s.batch_execute(
        "DROP TABLE IF EXISTS limit_docs; CREATE TABLE limit_docs (body text);
         INSERT INTO limit_docs SELECT format('document %s on subject %s', i, i % 7) FROM generate_series(1, 40) i;
         GRANT SELECT ON limit_docs TO kvembed_test_mallory;",
    )
    .unwrap();
    let err = mallory
        .query(
            "SELECT * FROM kv_select_layers('limit_docs', 'body', 40, store => false)",
            &[],
        )
        .expect_err("kvembed_admin only");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    // ... and even an administrator's sample is bounded.
    s.take_notices();
    let rows = s
        .query(
            "SELECT * FROM kv_select_layers('limit_docs', 'body', 40, store => false)",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty());
    let notices = s.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("above kvembed.max_calibration_texts")),
        "{notices:?}"
    );
    assert!(
        notices.iter().any(|n| n.contains("over 16 texts")),
        "{notices:?}"
    );
    let err = s
        .query_one(
            "SELECT kvembed.select_layers_raw(array_fill('x'::text, ARRAY[17]))",
            &[],
        )
        .expect_err("over the sample limit");
    assert_eq!(sql_error(&err).0, "54000", "{err}");
    s.batch_execute("DROP TABLE limit_docs").unwrap();
    drop(_reset);
    wait_for_status(&mut s, "max_tokens_limit", 4096);
    record_figures(
        "ordinary_roles_cannot_make_one_request_cost_more_than_the_administrators_limits",
        serde_json::json!({"max_tokens_limit": 64, "max_calibration_texts": 16, "refusals": 8}),
    );
}

/// Resumes a stopped engine when the test ends, however it ends.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Non-blocking connections to the engine's socket until its listen queue
/// is full (the engine accepts none while it is stopped).
fn fill_listen_queue(path: &std::path::Path) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let mut held = Vec::new();
    let bytes = path.as_os_str().as_bytes();
    loop {
        // SAFETY: a zeroed sockaddr_un is valid; the path fits (asserted).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        assert!(bytes.len() < addr.sun_path.len());
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: plain socket(2) and connect(2) on a socket this test owns.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        let rc = unsafe {
            libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "connect: {e}");
            return held;
        }
        held.push(fd);
        assert!(held.len() < 100_000, "the listen queue never filled");
    }
}

#[test]
fn a_wedged_engine_fails_statements_after_kvembed_engine_timeout_and_never_blocks_a_connect() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let mut bystander = Bystander::new();
    let data_dir: String = s
        .query_one("SELECT current_setting('data_directory')", &[])
        .unwrap()
        .get(0);
    let socket = std::path::Path::new(&data_dir).join("kvembed/engine.sock");
    let pid = engine_pid(&mut s);
    kill_engine(pid, "-STOP");
    let resume = Resume(pid);

    // A session already connected gets no answer: it fails after
    // kvembed.engine_timeout instead of waiting for statement_timeout (off).
    s.batch_execute("SET kvembed.engine_timeout = '2s'")
        .unwrap();
    let started = Instant::now();
    let err = s
        .query_one("SELECT kv_embed('asked of a stopped engine')", &[])
        .expect_err("no answer comes");
    let waited = started.elapsed();
    let (code, message) = sql_error(&err);
    assert_eq!(code, "58000", "{message}");
    assert!(message.contains("kvembed.engine_timeout"), "{message}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
        "failed after {waited:?}"
    );

    // A new session while the engine's listen queue is full: its connect
    // must not block (a blocking connect is deaf to statement_timeout).
    let held = fill_listen_queue(&socket);
    let queued = held.len();
    let newcomer = std::thread::spawn(|| {
        let mut n = connect();
        n.batch_execute("SET statement_timeout = '1s'").unwrap();
        let started = Instant::now();
        let r = n
            .query_one("SELECT kv_embed('a new session')", &[])
            .map(|_| ())
            .map_err(|e| sql_error(&e));
        (r, started.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !newcomer.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let finished = newcomer.is_finished();
    drop(held);
    drop(resume); // the engine goes on (and a hung connect would return now)
    assert!(
        finished,
        "a new session's kv_embed hung in connect() while the engine's listen queue was full"
    );
    let (result, took) = newcomer.join().unwrap();
    assert_eq!(
        result.map_err(|e| e.0),
        Err("57014".to_string()),
        "statement_timeout must cancel the wait"
    );
    assert!(took < Duration::from_secs(3), "cancelled after {took:?}");

    // The engine, resumed, serves the same vectors; nothing else noticed.
    s.batch_execute("RESET kvembed.engine_timeout").unwrap();
    let (after, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
    bystander.check();
    record_figures(
        "a_wedged_engine_fails_statements_after_kvembed_engine_timeout_and_never_blocks_a_connect",
        serde_json::json!({"engine_timeout_s": 2, "failed_after_s": waited.as_secs_f64(),
                           "queued_connections": queued, "new_session_cancelled_after_s": took.as_secs_f64()}),
    );
}

/// Puts the real kvembed_admin back (renamed away by the test below) and
/// drops the impostor, however the test ends.
struct RestoreAdminRole;

impl Drop for RestoreAdminRole {
    fn drop(&mut self) {
        let mut admin = Session::connect("postgres", "postgres");
        let _ = admin.batch_execute("DROP DATABASE IF EXISTS kvembed_test_impostor WITH (FORCE)");
        let _ = admin.batch_execute(
            "DO $$ BEGIN
               IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'kvembed_admin_saved') THEN
                 BEGIN
                   DROP ROLE IF EXISTS kvembed_admin;
                 EXCEPTION WHEN dependent_objects_still_exist THEN
                   -- Privileges it was given (where the check failed) pin it: set it aside.
                   EXECUTE format('ALTER ROLE kvembed_admin RENAME TO %I',
                                  'kvembed_test_impostor_' || (extract(epoch FROM now()) * 1000)::bigint);
                 END;
                 ALTER ROLE kvembed_admin_saved RENAME TO kvembed_admin;
               END IF;
             END $$",
        );
    }
}

#[test]
fn installing_over_a_kvembed_admin_someone_else_created_is_refused() {
    let (_g, mut s) = session();
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kvembed_test_creator') THEN
                 CREATE ROLE kvembed_test_creator LOGIN CREATEROLE;
               END IF;
             END $$",
        )
        .unwrap();
    admin
        .batch_execute("DROP DATABASE IF EXISTS kvembed_test_impostor WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE kvembed_test_impostor")
        .unwrap();
    // The real role (which other databases' kvembed grants to) steps aside.
    admin
        .batch_execute("ALTER ROLE kvembed_admin RENAME TO kvembed_admin_saved")
        .unwrap();
    let restore = RestoreAdminRole;
    // A CREATEROLE user creates the role first.
    let mut creator = Session::connect("postgres", "kvembed_test_creator");
    creator
        .batch_execute("CREATE ROLE kvembed_admin NOLOGIN")
        .unwrap();
    let mut fresh = Session::connect("kvembed_test_impostor", "postgres");
    let err = fresh
        .batch_execute("CREATE EXTENSION kvembed CASCADE")
        .expect_err("an impostor kvembed_admin");
    let (code, message) = sql_error(&err);
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("kvembed_test_creator") && message.contains("ADMIN OPTION"),
        "{message}"
    );
    let installed: i64 = fresh
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'kvembed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(installed, 0);
    // A login role of that name is refused as well.
    admin
        .batch_execute("DROP ROLE kvembed_admin; CREATE ROLE kvembed_admin LOGIN")
        .unwrap();
    let err = fresh
        .batch_execute("CREATE EXTENSION kvembed CASCADE")
        .expect_err("a login kvembed_admin");
    assert_eq!(sql_error(&err).0, "42501", "{err}");
    // The role kvembed creates itself, with members a superuser granted, is
    // accepted: the real one, back in place.
    drop(fresh);
    drop(restore);
    let mut other = fresh_database("kvembed_test_impostor");
    let v = vector(&mut other.client, "SELECT kv_embed('x')::real[]", &[]);
    assert_eq!(
        v.len() as i32,
        s.query_one("SELECT dim FROM kv_status()", &[])
            .unwrap()
            .get::<_, i32>(0)
    );
    drop(other);
    admin
        .batch_execute("DROP DATABASE kvembed_test_impostor WITH (FORCE)")
        .unwrap();
    record_figures(
        "installing_over_a_kvembed_admin_someone_else_created_is_refused",
        serde_json::json!({"refusals": 2}),
    );
}

/// Waits until the supervisor has replaced the engine `old_pid` (after a
/// reload changed an engine setting) and the new one is ready.
fn wait_engine_replaced(s: &mut Session, old_pid: i32) {
    let started = Instant::now();
    while s
        .query_one("SELECT engine_pid FROM kv_status()", &[])
        .ok()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        == Some(old_pid)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the engine did not restart after the reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(s, Duration::from_secs(120));
}

/// Fault injection is a test-only path: with `kvembed.debug_faults` off (its
/// default; the development cluster of scripts/pg.sh turns it on) a
/// superuser's `kv_debug_fault` is refused with 55000 and nothing reaches
/// the engine, which runs without `--allow-faults` and would refuse too.
#[test]
fn fault_injection_is_refused_unless_kvembed_debug_faults_is_on() {
    let (_g, mut s) = session();
    let (reference, _) = embed_until_ok(&mut s, Duration::from_secs(60));
    let on: String = s
        .query_one("SHOW kvembed.debug_faults", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        on, "on",
        "the test cluster runs with kvembed.debug_faults = on (scripts/pg.sh)"
    );
    let reset = ResetSettings(&["kvembed.debug_faults"]);
    let mut admin = Session::connect("postgres", "postgres");
    let old_pid = engine_pid(&mut s);
    admin
        .batch_execute("ALTER SYSTEM SET kvembed.debug_faults = off")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_engine_replaced(&mut s, old_pid);

    let mut fresh = connect();
    let err = fresh
        .query_one("SELECT kv_debug_fault('panic')", &[])
        .expect_err("fault injection must be off");
    let (code, msg) = sql_error(&err);
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("fault injection is off"), "{msg}");
    // Nothing was armed: the next statement is served, with the same vector.
    let (after, _) = embed_until_ok(&mut fresh, Duration::from_secs(30));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);

    // Back on: the engine is restarted with --allow-faults and arms faults.
    let off_pid = engine_pid(&mut s);
    drop(reset);
    wait_engine_replaced(&mut s, off_pid);
    let mut fresh = connect();
    let armed: i32 = fresh
        .query_one("SELECT kv_debug_fault('stall:1')", &[])
        .unwrap()
        .get(0);
    assert_eq!(armed, engine_pid(&mut fresh));
    let (after, _) = embed_until_ok(&mut fresh, Duration::from_secs(30));
    assert!(max_abs_diff(&after, &reference) <= 1e-6);
}

/// (pending, embedded, errors of the batches) of a vectorized table.
fn queue_state(s: &mut Session, table: &str) -> (i64, i64, Option<String>) {
    let row = s
        .query_one(
            "SELECT pending, embedded, last_error FROM kvembed.vectorized WHERE table_name = $1::text::regclass",
            &[&table],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn wait_drained(s: &mut Session, table: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let (pending, _, error) = queue_state(s, table);
        if pending == 0 {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{pending} rows of {table} still pending after {timeout:?} (last error: {error:?})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_queue_loses_nothing_when_the_engine_dies_mid_drain_or_the_cluster_restarts() {
    let (_g, mut s) = session();
    s.batch_execute(
        "SELECT kv_drop_profile('queue_kill', true);
         SELECT kv_create_profile('queue_kill');
         DROP TABLE IF EXISTS queued;
         CREATE TABLE queued (id int PRIMARY KEY, body text);
         INSERT INTO queued SELECT i, 'queued sentence number ' || i || ' is about '
           || (ARRAY['cats', 'rivers', 'engines', 'music'])[1 + i % 4] FROM generate_series(1, 400) i;
         SELECT kv_vectorize('queued', 'body', 'emb', profile => 'queue_kill', batch_size => 16);",
    )
    .unwrap();
    let before = restarts(&mut s);
    // Kill the engine while the worker waits on it, with a batch in flight.
    let started = Instant::now();
    loop {
        let waiting: i64 = s
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'kvembed queue'
                   AND datname = current_database() AND wait_event_type = 'Extension'",
                &[],
            )
            .unwrap()
            .get(0);
        let (_, embedded, _) = queue_state(&mut s, "queued");
        if waiting > 0 && embedded >= 32 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the worker never drained"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill_engine(engine_pid(&mut s), "-KILL");
    wait_drained(&mut s, "queued", Duration::from_secs(300));
    assert!(restarts(&mut s) > before, "the engine was not restarted");
    let (_, _, error) = queue_state(&mut s, "queued");
    assert!(
        error.is_some(),
        "the batch in flight when the engine died failed and was retried"
    );
    let check = "SELECT count(*) FILTER (WHERE emb IS NULL),
                        count(*) FILTER (WHERE emb <=> kv_embed(body, 'document', 'queue_kill') < 1e-5)
                   FROM queued";
    let row = s.query_one(check, &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 400));

    // New texts, then a restart of the cluster before they are embedded: the
    // supervisor starts the queue worker again and nothing is lost.
    s.batch_execute("UPDATE queued SET body = body || ' (revised)' WHERE id <= 150")
        .unwrap();
    drop(s);
    restart_cluster();
    let mut s = connect();
    wait_ready(&mut s, Duration::from_secs(120));
    wait_drained(&mut s, "queued", Duration::from_secs(300));
    let row = s.query_one(check, &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 400));
    let revised: i64 = s
        .query_one(
            "SELECT count(*) FROM queued WHERE body LIKE '%(revised)'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(revised, 150);
    s.batch_execute(
        "SELECT kv_unvectorize('queued'); DROP TABLE queued; SELECT kv_drop_profile('queue_kill');",
    )
    .unwrap();
    record_figures(
        "the_queue_loses_nothing_when_the_engine_dies_mid_drain_or_the_cluster_restarts",
        serde_json::json!({"rows": 400, "engine_kills": 1, "cluster_restarts": 1}),
    );
}
