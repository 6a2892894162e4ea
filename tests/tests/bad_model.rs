//! The engine's life cycle, seen from SQL: a model path that does not exist,
//! or a file that is not a model, gives an ERROR naming the setting and the
//! file; the database keeps working; fixing the setting brings the engine
//! back; `kv_restart()` replaces the engine. (Its own test binary: these
//! change the cluster-wide engine, which would disturb tests beside them.)

use kvembed_tests::*;
use std::sync::Mutex;
use std::time::Duration;

const DB: &str = "kvembed_test_bad_model";

static SERIAL: Mutex<()> = Mutex::new(());

/// Puts the real model back even when an assertion fails.
struct RestoreModel;

impl Drop for RestoreModel {
    fn drop(&mut self) {
        configure_model(&model_path().to_string_lossy());
    }
}

fn expect_model_error(s: &mut Session, bad: &str) {
    let (state, err) = wait_for_model(s, bad, Duration::from_secs(60));
    assert_eq!(state, "failed", "loading {bad} must fail");
    assert!(
        err.unwrap_or_default().contains(bad),
        "the load error names the file"
    );
    let e = s
        .query_one("SELECT kv_embed('hello')", &[])
        .expect_err("kv_embed with a bad model");
    let (code, msg) = sql_error(&e);
    assert_eq!(code, "58P01", "{msg}");
    assert!(
        msg.contains("kvembed.model"),
        "the message names the setting: {msg}"
    );
    assert!(msg.contains(bad), "the message names the file: {msg}");
}

#[test]
fn bad_model_path_is_a_clear_error_and_the_database_keeps_working() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = fresh_database(DB);
    let _restore = RestoreModel;
    let mut bystander = Session::connect(DB, "postgres");
    let bystander_pid: i32 = bystander
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let started: String = s
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);

    // A path that does not exist.
    let missing = "/nonexistent/kvembed/no-such-model.gguf";
    configure_model(missing);
    expect_model_error(&mut s, missing);

    // A file that exists but is not a model.
    let not_a_model = std::env::temp_dir().join("kvembed-not-a-model.gguf");
    std::fs::write(&not_a_model, b"this is not a GGUF file at all").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&not_a_model, std::fs::Permissions::from_mode(0o644));
    }
    let not_a_model = not_a_model.to_string_lossy().into_owned();
    configure_model(&not_a_model);
    expect_model_error(&mut s, &not_a_model);

    // The database is untouched: same postmaster, the other session alive.
    let one: i32 = s.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
    let pid: i32 = bystander
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert_eq!(pid, bystander_pid);
    let now: String = s
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(now, started, "the cluster must not restart");

    // Back to the real model: embedding works again.
    configure_model(&model_path().to_string_lossy());
    let (state, _) = wait_for_model(
        &mut s,
        &model_path().to_string_lossy(),
        Duration::from_secs(120),
    );
    assert_eq!(state, "ready");
    let v = vector(&mut s, "SELECT kv_embed('hello')::real[]", &[]);
    assert_eq!(v.len(), 576);
}

#[test]
fn kv_restart_starts_a_fresh_engine() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = fresh_database(DB);
    let before = vector(&mut s, "SELECT kv_embed('restart me')::real[]", &[]);
    let old_pid: i32 = s
        .query_one("SELECT engine_pid FROM kv_status()", &[])
        .unwrap()
        .get(0);
    let restarted: bool = s.query_one("SELECT kv_restart()", &[]).unwrap().get(0);
    assert!(restarted);
    let after = vector(&mut s, "SELECT kv_embed('restart me')::real[]", &[]);
    assert!(
        max_abs_diff(&before, &after) <= 1e-6,
        "same text, same vector after a restart"
    );
    let row = s
        .query_one("SELECT engine_pid, state FROM kv_status()", &[])
        .unwrap();
    assert_ne!(row.get::<_, i32>(0), old_pid, "a new engine process serves");
    assert_eq!(row.get::<_, String>(1), "ready");
}
