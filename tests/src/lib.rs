//! Helpers for the end-to-end tests: they run against a real PostgreSQL 18 +
//! pgvector cluster with kvembed installed (`scripts/pg.sh start` after
//! `scripts/install-ext.sh`; `scripts/test.sh` does both).
//!
//! The cluster is found through `$KVEMBED_PG_URL` (a libpq conninfo string,
//! what `scripts/pg.sh url` prints), else `PGHOST`/`PGPORT`/`PGUSER`. Each
//! test file works in its own database, recreated at its first connection,
//! so files do not see each other's tables or calibrations.

use once_cell::sync::Lazy;
use postgres::error::DbError;
use postgres::{Client, Config, NoTls};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The model the tests use (fetched by `scripts/fetch-models.sh smollm2`).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn model_path() -> PathBuf {
    let dir = std::env::var_os("KVEMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/models"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        repo_root().join(dir)
    };
    let path = dir.join(MODEL_FILE);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh smollm2",
        path.display()
    );
    path
}

/// Connection settings for the test cluster, as the superuser `postgres`.
pub fn base_config() -> Config {
    let url = std::env::var("KVEMBED_PG_URL")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let url = url.or_else(|| {
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/pg.sh"))
            .arg("url")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let mut config: Config = match url {
        Some(url) => url
            .parse()
            .unwrap_or_else(|e| panic!("bad KVEMBED_PG_URL '{url}': {e}")),
        None => {
            let mut c = Config::new();
            c.host(&std::env::var("PGHOST").unwrap_or_else(|_| "/tmp".into()));
            c.port(
                std::env::var("PGPORT")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(5432),
            );
            c.user(&std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()));
            c.dbname("postgres");
            c
        }
    };
    config.connect_timeout(Duration::from_secs(10));
    config
}

/// A client on `dbname` as `user`, with its NOTICEs collected.
pub struct Session {
    pub client: Client,
    pub notices: Arc<Mutex<Vec<String>>>,
}

impl Session {
    pub fn connect(dbname: &str, user: &str) -> Session {
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let mut config = base_config();
        config
            .dbname(dbname)
            .user(user)
            .notice_callback(move |n: DbError| {
                sink.lock().unwrap().push(n.message().to_string());
            });
        let client = config
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to the test cluster as {user}/{dbname}: {e} (run scripts/pg.sh start)"));
        Session { client, notices }
    }

    pub fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *self.notices.lock().unwrap())
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The SQLSTATE and message of a failed statement.
pub fn sql_error(e: &postgres::Error) -> (String, String) {
    let (code, message, _) = sql_error_full(e);
    (code, message)
}

/// Creates the login role `name` unless it exists (roles are cluster-wide
/// and outlive the test databases).
pub fn ensure_login_role(s: &mut Client, name: &str) {
    s.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN CREATE ROLE {name} LOGIN; END IF;
         END $$"
    ))
    .unwrap_or_else(|e| panic!("creating role {name}: {e}"));
}

static MODEL_CONFIGURED: Lazy<()> = Lazy::new(|| configure_model(&model_path().to_string_lossy()));

/// Points the cluster's engine at `model` (ALTER SYSTEM + reload) and waits
/// until the engine reports that model as loaded (or failed).
pub fn configure_model(model: &str) {
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute("LOAD 'kvembed'")
        .expect("the kvembed library is installed");
    let current: String = admin
        .query_one("SELECT current_setting('kvembed.model')", &[])
        .expect("kvembed.model is defined")
        .get(0);
    if current != model {
        admin
            .execute(
                &format!(
                    "ALTER SYSTEM SET kvembed.model = '{}'",
                    model.replace('\'', "''")
                ),
                &[],
            )
            .expect("ALTER SYSTEM as superuser");
        admin.execute("SELECT pg_reload_conf()", &[]).unwrap();
    }
}

/// A fresh database named `name` with kvembed installed, the cluster's
/// engine serving the test model. Returns a superuser session on it.
pub fn fresh_database(name: &str) -> Session {
    Lazy::force(&MODEL_CONFIGURED);
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let mut s = Session::connect(name, "postgres");
    s.batch_execute("CREATE EXTENSION kvembed CASCADE")
        .expect("CREATE EXTENSION kvembed CASCADE");
    wait_for_model(
        &mut s,
        &model_path().to_string_lossy(),
        Duration::from_secs(180),
    );
    s
}

/// Waits until the engine has `model` loaded (state ready) or failed on it.
pub fn wait_for_model(s: &mut Session, model: &str, timeout: Duration) -> (String, Option<String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let row = s.query_one("SELECT state, model, load_error FROM kv_status()", &[]);
        if let Ok(row) = row {
            let (state, loaded, err): (String, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            if loaded == model && state != "loading" {
                return (state, err);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not load {model} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads a pgvector value through its `real[]` cast.
pub fn vector(
    s: &mut Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Vec<f32> {
    let row = s
        .query_one(sql, params)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get::<_, Vec<f32>>(0)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dimensions differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// A small labelled corpus: 8 sentences in each of 4 topics.
pub const CORPUS: &[(&str, &str)] = &[
    (
        "cooking",
        "Simmer the tomato sauce with garlic and basil for twenty minutes.",
    ),
    (
        "cooking",
        "Knead the bread dough until it is smooth, then let it rise for an hour.",
    ),
    (
        "cooking",
        "Whisk the eggs with sugar before folding in the flour for the sponge cake.",
    ),
    (
        "cooking",
        "Season the steak with salt and pepper and sear it in a hot cast-iron pan.",
    ),
    (
        "cooking",
        "Chop the onions finely and fry them in butter until golden brown.",
    ),
    (
        "cooking",
        "Roast the vegetables in the oven at 200 degrees with olive oil and rosemary.",
    ),
    (
        "cooking",
        "Boil the pasta in salted water and drain it while it is still al dente.",
    ),
    (
        "cooking",
        "Marinate the chicken in yogurt and spices overnight before grilling it.",
    ),
    (
        "astronomy",
        "The telescope revealed the rings of Saturn and several of its moons.",
    ),
    (
        "astronomy",
        "A supernova is the explosion of a massive star at the end of its life.",
    ),
    (
        "astronomy",
        "The Milky Way galaxy contains hundreds of billions of stars.",
    ),
    (
        "astronomy",
        "Astronomers detected an exoplanet orbiting in the habitable zone of a red dwarf.",
    ),
    (
        "astronomy",
        "A black hole's gravity is so strong that not even light can escape it.",
    ),
    (
        "astronomy",
        "The Moon's phases are caused by its changing position relative to the Sun.",
    ),
    (
        "astronomy",
        "Comets develop bright tails of gas and dust as they approach the Sun.",
    ),
    (
        "astronomy",
        "Jupiter is the largest planet in the solar system, a giant made of gas.",
    ),
    (
        "football",
        "The striker scored a stunning goal from outside the penalty area.",
    ),
    (
        "football",
        "The goalkeeper saved the penalty kick in the final minute of the match.",
    ),
    (
        "football",
        "The referee showed the defender a red card for a dangerous tackle.",
    ),
    (
        "football",
        "The team won the championship after beating their rivals two goals to one.",
    ),
    (
        "football",
        "The coach changed the formation at half-time to strengthen the midfield.",
    ),
    (
        "football",
        "Fans filled the stadium to watch the cup final between the two clubs.",
    ),
    (
        "football",
        "The winger crossed the ball and the forward headed it into the net.",
    ),
    (
        "football",
        "The match ended in a draw after extra time and went to a penalty shootout.",
    ),
    (
        "programming",
        "The function returns a null pointer when the memory allocation fails.",
    ),
    (
        "programming",
        "Compile the program with optimizations enabled and run the unit tests.",
    ),
    (
        "programming",
        "The compiler reported a type error on line 42 of the source file.",
    ),
    (
        "programming",
        "Use a hash map to look up each key in constant time.",
    ),
    (
        "programming",
        "The loop iterates over the array and sums the elements into a variable.",
    ),
    (
        "programming",
        "Refactor the class so that every method has a single responsibility.",
    ),
    (
        "programming",
        "The database query was slow until we added an index on the column.",
    ),
    (
        "programming",
        "Git merge conflicts happen when two branches change the same lines of code.",
    ),
];

/// Queries with the topic their nearest neighbours should come from.
pub const QUERIES: &[(&str, &str)] = &[
    (
        "cooking",
        "How do I make a tasty dinner recipe in the kitchen?",
    ),
    (
        "astronomy",
        "What objects can you see in the night sky through a telescope?",
    ),
    (
        "football",
        "Which team scored more goals in the soccer game?",
    ),
    ("programming", "How can I fix a bug in my code?"),
];

/// The SQLSTATE, message and detail of a failed statement.
pub fn sql_error_full(e: &postgres::Error) -> (String, String, String) {
    match e.as_db_error() {
        Some(db) => (
            db.code().code().to_string(),
            db.message().to_string(),
            db.detail().unwrap_or("").to_string(),
        ),
        None => (String::new(), e.to_string(), String::new()),
    }
}

/// A PostgreSQL client program (`pg_dump`, `pgbench`, ...) of the test
/// cluster's own installation: from `$PG_BINDIR` (what `scripts/env.sh`
/// exports), else the server's BINDIR (`pg_config` view), so that a client
/// of another major version on `PATH` is never picked.
pub fn pg_bin(name: &str) -> PathBuf {
    static BINDIR: Lazy<PathBuf> = Lazy::new(|| match std::env::var_os("PG_BINDIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let mut s = Session::connect("postgres", "postgres");
            let dir: String = s
                .query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[])
                .expect("the pg_config view (superuser)")
                .get(0);
            PathBuf::from(dir)
        }
    });
    BINDIR.join(name)
}

/// Runs a PostgreSQL client program against the test cluster (connection
/// settings from `base_config()`), returning its stdout; panics with its
/// stderr when it fails.
pub fn run_pg_tool(name: &str, args: &[&str]) -> String {
    let config = base_config();
    let mut cmd = std::process::Command::new(pg_bin(name));
    if let Some(postgres::config::Host::Unix(dir)) = config.get_hosts().first() {
        cmd.env("PGHOST", dir);
    } else if let Some(postgres::config::Host::Tcp(h)) = config.get_hosts().first() {
        cmd.env("PGHOST", h);
    }
    if let Some(port) = config.get_ports().first() {
        cmd.env("PGPORT", port.to_string());
    }
    cmd.env("PGUSER", config.get_user().unwrap_or("postgres"));
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pid of the engine process (`kv_status().engine_pid`).
pub fn engine_pid(s: &mut Client) -> i32 {
    s.query_one("SELECT engine_pid FROM kv_status()", &[])
        .expect("kv_status()")
        .get(0)
}

/// Appends one line of figures (calls made, faults injected, rows checked,
/// timings) for `docs/RELIABILITY.md` to `$KVEMBED_FIGURES`, default
/// `target/reliability-figures.jsonl`; `scripts/reliability-report.py`
/// turns the file into the page's table.
pub fn record_figures(test: &str, figures: serde_json::Value) {
    let path = std::env::var_os("KVEMBED_FIGURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/reliability-figures.jsonl"));
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let line = serde_json::json!({"test": test, "figures": figures}).to_string();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("figures file");
    writeln!(f, "{line}").expect("write figures");
}
