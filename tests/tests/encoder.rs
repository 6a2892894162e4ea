//! A supervised encoder served by the same engine, seen from SQL: with
//! kvembed.model pointing at all-MiniLM-L6-v2 (a BERT sentence-transformers
//! directory, `scripts/fetch-models.sh minilm`), `kv_embed` returns the
//! vectors transformers gives (mean pooling, normalised), generated columns
//! and HNSW work unchanged, and the methods that need a decoder LLM are
//! clear errors. (Its own test binary: it changes the cluster-wide engine.)

use kvembed_tests::*;
use std::path::PathBuf;
use std::time::Duration;

const DB: &str = "kvembed_test_encoder";

/// Puts the test model back even when an assertion fails.
struct RestoreModel;

impl Drop for RestoreModel {
    fn drop(&mut self) {
        configure_model(&model_path().to_string_lossy());
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
