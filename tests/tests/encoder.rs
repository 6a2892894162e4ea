//! A supervised encoder served by the same engine, seen from SQL: with
//! kvembed.model pointing at all-MiniLM-L6-v2 (a BERT sentence-transformers
//! directory, `scripts/fetch-models.sh minilm`), `kv_embed` returns the
//! vectors transformers gives (mean pooling, normalised), generated columns
//! and HNSW work unchanged, and the methods that need a decoder LLM are
//! clear errors; and with kvembed.models, the engine serves the encoder
//! beside the decoder LLM, each session and profile choosing its model.
//! (Its own test binary: it changes the cluster-wide engine.)

use kvembed_tests::*;
use std::path::PathBuf;
use std::time::Duration;

const DB: &str = "kvembed_test_encoder";

/// Puts the test model back even when an assertion fails.
struct RestoreModel;

impl Drop for RestoreModel {
    fn drop(&mut self) {
        configure_models("");
        configure_model(&model_path().to_string_lossy());
    }
}

/// Sets kvembed.models (ALTER SYSTEM + reload): the engine restarts.
fn configure_models(list: &str) {
    let mut admin = Session::connect("postgres", "postgres");
    admin.batch_execute("LOAD 'kvembed'").unwrap();
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET kvembed.models = '{}'",
            list.replace('\'', "''")
        ))
        .expect("ALTER SYSTEM as superuser");
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Waits until kv_models() lists `names` in that order, none loading;
/// returns each one's (state, load_error).
fn wait_for_models(s: &mut Session, names: &[&str]) -> Vec<(String, Option<String>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(rows) = s.query("SELECT name, state, load_error FROM kv_models()", &[]) {
            let listed: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let loading = rows.iter().any(|r| r.get::<_, String>(1) == "loading");
            if listed == names && !loading {
                return rows.iter().map(|r| (r.get(1), r.get(2))).collect();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the engine did not serve {names:?} in time"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn minilm() -> String {
    let dir = model_path()
        .parent()
        .expect("the models directory")
        .join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh minilm",
        dir.display()
    );
    dir.to_string_lossy().into_owned()
}

/// transformers' vectors for a few sentences (scripts/make_encoder_goldens.py).
fn reference() -> Vec<(String, Vec<f32>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/all-MiniLM-L6-v2.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn minilm_from_sql_gives_transformers_vectors_in_generated_columns_and_hnsw() {
    let mut s = fresh_database(DB);
    let _restore = RestoreModel;
    let model = minilm();
    configure_model(&model);
    let (state, err) = wait_for_model(&mut s, &model, Duration::from_secs(180));
    assert_eq!(state, "ready", "{err:?}");
    let row = s
        .query_one("SELECT architecture, dim, method FROM kv_status()", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "bert");
    assert_eq!(row.get::<_, i32>(1), 384);
    assert_eq!(
        row.get::<_, String>(2),
        "native",
        "the model's own embedding by default"
    );

    // The vectors transformers gives, one text at a time and in one batch.
    let cases = reference();
    for (text, want) in &cases {
        let got = vector(&mut s, "SELECT kv_embed($1)::real[]", &[text]);
        let cos = cosine(&got, want);
        assert!(cos >= 0.9999, "{text:?}: cosine {cos} against transformers");
        let q = vector(&mut s, "SELECT kv_embed($1, 'query')::real[]", &[text]);
        assert!(
            max_abs_diff(&q, &got) < 1e-6,
            "no prompts: query = document"
        );
    }
    let texts: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let rows = s
        .query(
            "SELECT v::real[] FROM unnest(kv_embed_batch($1)) WITH ORDINALITY AS t(v, i) ORDER BY i",
            &[&texts],
        )
        .unwrap();
    for (row, (text, want)) in rows.iter().zip(&cases) {
        let got: Vec<f32> = row.get(0);
        assert!(cosine(&got, want) >= 0.9999, "batched {text:?}");
    }

    // A text longer than the model's 256 positions is cut with a NOTICE to
    // what they leave after [CLS] and [SEP], or refused (54000).
    let long = "lorem ipsum dolor sit amet ".repeat(200);
    s.take_notices();
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&long]);
    assert_eq!(v.len(), 384);
    let notices = s.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("truncated") && n.contains("254")),
        "expected a truncation NOTICE keeping 254 tokens, got {notices:?}"
    );
    s.batch_execute("SET kvembed.on_overflow = 'error'")
        .unwrap();
    let e = s.query_one("SELECT kv_embed($1)", &[&long]).unwrap_err();
    assert_eq!(sql_error(&e).0, "54000", "{}", sql_error(&e).1);
    s.batch_execute("RESET kvembed.on_overflow").unwrap();

    // A generated column and an HNSW index, unchanged.
    s.batch_execute(
        "CREATE TABLE docs (id serial PRIMARY KEY, topic text, body text,
                            embedding vector(384) GENERATED ALWAYS AS (kv_embed(body)) STORED);
         CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops);",
    )
    .unwrap();
    for (topic, body) in CORPUS {
        s.execute(
            "INSERT INTO docs (topic, body) VALUES ($1, $2)",
            &[topic, body],
        )
        .unwrap();
    }
    s.batch_execute("SET enable_seqscan = off").unwrap();
    let plan: String = s
        .query(
            "EXPLAIN SELECT id FROM docs ORDER BY embedding <=> kv_embed('pasta', 'query') LIMIT 3",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(plan.contains("docs_embedding_idx"), "{plan}");
    let topics: Vec<String> = s
        .query(
            "SELECT topic FROM docs ORDER BY embedding <=> kv_embed('How long should I cook the sauce with garlic?', 'query') LIMIT 3",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        topics.iter().all(|t| t == "cooking"),
        "the nearest three are about cooking: {topics:?}"
    );
    s.batch_execute("RESET enable_seqscan").unwrap();

    // The methods of a decoder LLM and layer selection are clear errors.
    s.batch_execute("SET kvembed.method = 'kv'").unwrap();
    let e = s.query_one("SELECT kv_embed('hello')", &[]).unwrap_err();
    let (code, msg) = sql_error(&e);
    assert_eq!(code, "22023", "{msg}");
    assert!(msg.contains("is an encoder (bert)"), "{msg}");
    s.batch_execute("SET kvembed.method = 'native'").unwrap();
    let native = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&cases[0].0]);
    assert!(cosine(&native, &cases[0].1) >= 0.9999);
    s.batch_execute("RESET kvembed.method").unwrap();
    let e = s
        .query_one("SELECT kv_select_layers('docs', 'body')", &[])
        .unwrap_err();
    let (_, msg) = sql_error(&e);
    assert!(msg.contains("is an encoder"), "{msg}");

    // A profile made on the encoder embeds with it, and refuses to once the
    // engine serves another model.
    s.query_one("SELECT kv_create_profile('mini')", &[])
        .unwrap();
    let p = vector(
        &mut s,
        "SELECT kv_embed($1, 'document', 'mini')::real[]",
        &[&cases[0].0],
    );
    assert!(cosine(&p, &cases[0].1) >= 0.9999);
    let decoder = model_path().to_string_lossy().into_owned();
    configure_model(&decoder);
    let (state, err) = wait_for_model(&mut s, &decoder, Duration::from_secs(180));
    assert_eq!(state, "ready", "{err:?}");
    let e = s
        .query_one("SELECT kv_embed('hello', 'document', 'mini')", &[])
        .unwrap_err();
    let (_, msg) = sql_error(&e);
    assert!(
        msg.contains("profile 'mini' was made with model 'bert:"),
        "{msg}"
    );
}

#[test]
fn two_models_at_once_each_session_and_profile_choosing_its_own() {
    let mut s = fresh_database("kvembed_test_two_models");
    let _restore = RestoreModel;
    let first = model_path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    configure_models(&format!("mini={}", minilm()));
    let states = wait_for_models(&mut s, &[&first, "mini"]);
    assert!(
        states.iter().all(|(state, _)| state == "ready"),
        "{states:?}"
    );
    let cases = reference();
    let (text, want) = &cases[0];

    // Without kvembed.use_model the first model embeds; with it, the
    // encoder, giving transformers' vectors.
    let decoder_dim: i32 = s
        .query_one("SELECT dim FROM kv_models() WHERE name = $1", &[&first])
        .unwrap()
        .get(0);
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[text]);
    assert_eq!(v.len() as i32, decoder_dim);
    s.batch_execute("SET kvembed.use_model = 'mini'").unwrap();
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[text]);
    assert!(cosine(&v, want) >= 0.9999, "cosine {}", cosine(&v, want));
    let row = s
        .query_one("SELECT architecture, dim, method FROM kv_status()", &[])
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, String>(2)
        ),
        ("bert".to_string(), 384, "native".to_string())
    );
    let in_use: String = s
        .query_one("SELECT name FROM kv_models() WHERE in_use", &[])
        .unwrap()
        .get(0);
    assert_eq!(in_use, "mini");
    // kv_chunk works on the chosen model too.
    let chunks: i64 = s
        .query_one(
            "SELECT count(*) FROM kv_chunk(repeat('word ', 2000), 254, 0)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(chunks >= 7, "{chunks} chunks of 254 WordPiece tokens");

    // A name the engine does not serve is a clear error.
    s.batch_execute("SET kvembed.use_model = 'nope'").unwrap();
    let e = s.query_one("SELECT kv_embed('x')", &[]).unwrap_err();
    let (code, msg) = sql_error(&e);
    assert_eq!(code, "22023", "{msg}");
    assert!(
        msg.contains("names no model") && msg.contains("mini"),
        "{msg}"
    );

    // A profile embeds with the model it was made with, whatever the
    // session has chosen; in a generated column too.
    s.batch_execute("SET kvembed.use_model = 'mini'").unwrap();
    s.query_one("SELECT kv_create_profile('mini_p')", &[])
        .unwrap();
    s.batch_execute("RESET kvembed.use_model").unwrap();
    s.query_one("SELECT kv_create_profile('llm_p')", &[])
        .unwrap();
    s.batch_execute("SET kvembed.use_model = 'mini'").unwrap();
    let p = vector(
        &mut s,
        "SELECT kv_embed($1, 'document', 'llm_p')::real[]",
        &[text],
    );
    assert_eq!(p.len() as i32, decoder_dim);
    s.batch_execute("RESET kvembed.use_model").unwrap();
    let p = vector(
        &mut s,
        "SELECT kv_embed($1, 'document', 'mini_p')::real[]",
        &[text],
    );
    assert!(cosine(&p, want) >= 0.9999);
    s.batch_execute(
        "CREATE TABLE both_models (id serial PRIMARY KEY, body text,
            small vector(384) GENERATED ALWAYS AS (kv_embed(body, 'document', 'mini_p')) STORED);",
    )
    .unwrap();
    s.execute("INSERT INTO both_models (body) VALUES ($1)", &[text])
        .unwrap();
    let stored = vector(&mut s, "SELECT small::real[] FROM both_models", &[]);
    assert!(cosine(&stored, want) >= 0.9999);

    // Sessions on different models at the same time: each gets its own
    // model's vectors (batches never mix models).
    let texts: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    let workers: Vec<_> = [Some("mini"), None, Some("mini"), None]
        .into_iter()
        .map(|model| {
            let texts = texts.clone();
            std::thread::spawn(move || {
                let mut c = Session::connect("kvembed_test_two_models", "postgres");
                if let Some(m) = model {
                    c.batch_execute(&format!("SET kvembed.use_model = '{m}'"))
                        .unwrap();
                }
                let mut out = Vec::new();
                for _ in 0..3 {
                    let rows = c
                        .query(
                            "SELECT v::real[] FROM unnest(kv_embed_batch($1)) WITH ORDINALITY AS t(v, i) ORDER BY i",
                            &[&texts],
                        )
                        .unwrap();
                    out.push(rows.iter().map(|r| r.get::<_, Vec<f32>>(0)).collect::<Vec<_>>());
                }
                (model, out)
            })
        })
        .collect();
    for w in workers {
        let (model, rounds) = w.join().unwrap();
        for vectors in rounds {
            for (v, (t, want)) in vectors.iter().zip(&cases) {
                match model {
                    Some(_) => assert!(cosine(v, want) >= 0.9999, "{t:?} on mini"),
                    None => assert_eq!(v.len() as i32, decoder_dim, "{t:?} on the first"),
                }
            }
        }
    }
    let served: i64 = s
        .query_one(
            "SELECT texts_served FROM kv_models() WHERE name = 'mini'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(served >= 6 * texts.len() as i64, "{served}");

    // A bad list fails alone and visibly; the first model still serves.
    configure_models("a=/nonexistent/a, a=/nonexistent/b");
    let states = wait_for_models(&mut s, &[&first, "kvembed.models"]);
    assert_eq!(states[0].0, "ready");
    assert!(
        states[1]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("two models are named 'a'"),
        "{states:?}"
    );
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[text]);
    assert_eq!(v.len() as i32, decoder_dim);
    // A model that cannot load fails alone, with its own error.
    configure_models("gone=/nonexistent/gone.gguf");
    let states = wait_for_models(&mut s, &[&first, "gone"]);
    assert_eq!(states[0].0, "ready");
    assert_eq!(states[1].0, "failed");
    s.batch_execute("SET kvembed.use_model = 'gone'").unwrap();
    let e = s.query_one("SELECT kv_embed('x')", &[]).unwrap_err();
    let (code, msg) = sql_error(&e);
    assert_eq!(code, "58P01", "{msg}");
    assert!(
        msg.contains("'gone'") && msg.contains("/nonexistent/gone.gguf"),
        "{msg}"
    );
}

/// Resets kvembed.engine_memory_limit and kvembed.models even when an
/// assertion fails.
struct ResetMemoryLimit;

impl Drop for ResetMemoryLimit {
    fn drop(&mut self) {
        let mut admin = Session::connect("postgres", "postgres");
        admin.batch_execute("LOAD 'kvembed'").unwrap();
        admin
            .batch_execute("ALTER SYSTEM RESET kvembed.engine_memory_limit")
            .unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        configure_models("");
    }
}

/// The engine's address space now, in MB (VmSize).
fn engine_vm_mb(s: &mut Session) -> i64 {
    let pid = engine_pid(s);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb >> 10
}

#[test]
fn a_second_model_too_large_for_the_memory_limit_fails_alone() {
    let mut s = fresh_database("kvembed_test_model_memory");
    let _reset = ResetMemoryLimit;
    let _restore = RestoreModel;
    let first = model_path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let big = model_path()
        .parent()
        .unwrap()
        .join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert!(
        big.is_file(),
        "{} is missing: run scripts/fetch-models.sh qwen05",
        big.display()
    );
    // A fresh engine with the first model, then a limit 100 MB above what
    // it holds: the first model fits again, the 491 MB one cannot.
    s.query_one("SELECT kv_restart()", &[]).unwrap();
    let (state, err) = wait_for_model(
        &mut s,
        &model_path().to_string_lossy(),
        Duration::from_secs(180),
    );
    assert_eq!(state, "ready", "{err:?}");
    let reference = vector(&mut s, "SELECT kv_embed('memory check')::real[]", &[]);
    let limit = engine_vm_mb(&mut s) + 100;
    {
        let mut admin = Session::connect("postgres", "postgres");
        admin.batch_execute("LOAD 'kvembed'").unwrap();
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET kvembed.engine_memory_limit = {limit}"
            ))
            .unwrap();
    }
    configure_models(&format!("big={}", big.display()));
    let states = wait_for_models(&mut s, &[&first, "big"]);
    assert_eq!(states[0].0, "ready", "{states:?}");
    assert_eq!(states[1].0, "failed", "{states:?}");
    let why = states[1].1.clone().unwrap_or_default();
    assert!(
        why.contains("address space") && why.contains("kvembed.engine_memory_limit"),
        "{why}"
    );
    // The engine stays up, serving the first model with the same vectors.
    let pid = engine_pid(&mut s);
    let v = vector(&mut s, "SELECT kv_embed('memory check')::real[]", &[]);
    assert!(max_abs_diff(&v, &reference) <= 1e-6);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(engine_pid(&mut s), pid, "the engine restarted");
}
