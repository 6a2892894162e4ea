//! The SQL API of kvembed against a real cluster: install, values equal to
//! the engine's, generated columns, HNSW, semantic search, layer selection,
//! concurrency, privileges, NULL/empty input, overflow, settings validation,
//! chunking.

use kvembed_core::{Embedder, LoadSpec};
use kvembed_proto::{EmbedOptions, Role};
use kvembed_tests::*;
use once_cell::sync::Lazy;
use std::io::Write;
use std::sync::Mutex;

const DB: &str = "kvembed_test_sql";

/// Tests share one database and run one at a time within this file (the
/// calibration test changes what `layers = auto` means for everyone).
static SERIAL: Mutex<()> = Mutex::new(());

fn session() -> (std::sync::MutexGuard<'static, ()>, Session) {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    static CREATED: Lazy<()> = Lazy::new(|| drop(fresh_database(DB)));
    Lazy::force(&CREATED);
    let mut s = Session::connect(DB, "postgres");
    // Pin the layers: a calibration stored by another test must not change
    // what these tests compare.
    s.batch_execute("SET kvembed.layers = 'default'").unwrap();
    (guard, s)
}

fn dim(s: &mut Session) -> i32 {
    s.query_one("SELECT dim FROM kv_status()", &[])
        .unwrap()
        .get(0)
}

/// The engine itself, loaded in this process, to compare values with.
static ENGINE: Lazy<Embedder> = Lazy::new(|| {
    Embedder::load(&LoadSpec {
        model: model_path().to_string_lossy().into_owned(),
        device: "cpu".into(),
        threads: 0,
        weights: None,
    })
    .expect("the test model loads in-process")
});

fn engine_embed(texts: &[&str], role: Role) -> Vec<Vec<f32>> {
    let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    // What a session with default settings sends (kvembed.max_tokens = 512,
    // on_overflow = truncate, layers = default).
    let options = EmbedOptions {
        max_tokens: Some(512),
        truncate: Some(true),
        ..Default::default()
    };
    ENGINE
        .embed(&texts, role, &options)
        .expect("engine embed")
        .vectors
}

#[test]
fn extension_installs_with_its_objects() {
    let (_g, mut s) = session();
    let exts: Vec<String> = s
        .query("SELECT extname::text FROM pg_extension ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        exts.contains(&"vector".to_string()) && exts.contains(&"kvembed".to_string()),
        "{exts:?}"
    );
    for f in [
        "kv_embed",
        "kv_embed_half",
        "kv_embed_batch",
        "kv_select_layers",
        "kv_status",
        "kv_restart",
        "kv_chunk",
        "kv_stats_reset",
        "kv_create_profile",
        "kv_drop_profile",
        "kv_backfill",
    ] {
        let n: i64 = s
            .query_one("SELECT count(*) FROM pg_proc WHERE proname = $1", &[&f])
            .unwrap()
            .get(0);
        assert!(n >= 1, "{f} is missing");
    }
    // Each form (with and without a profile).
    for f in ["kv_embed", "kv_embed_half", "kv_embed_batch"] {
        let rows = s
            .query(
                "SELECT provolatile::text, proisstrict, proparallel::text FROM pg_proc WHERE proname = $1",
                &[&f],
            )
            .unwrap();
        assert_eq!(rows.len(), 2, "{f}: with and without a profile");
        for row in rows {
            let (vol, strict, par): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(
                (vol.as_str(), strict, par.as_str()),
                ("i", true, "s"),
                "{f} must be IMMUTABLE STRICT PARALLEL SAFE"
            );
        }
    }
    let row = s
        .query_one(
            "SELECT state, dim, architecture, device FROM kv_status()",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    assert_eq!(row.get::<_, i32>(1), 576);
    assert_eq!(row.get::<_, String>(2), "llama");
    assert_eq!(row.get::<_, String>(3), "cpu");
}

#[test]
fn kv_embed_equals_the_engine() {
    let (_g, mut s) = session();
    let texts = [
        "The cat sat on the mat.",
        "Ünïcödé, emoji 😀 and עברית",
        "",
        "   ",
        "SELECT * FROM t;",
    ];
    for role in [Role::Document, Role::Query] {
        let role_name = if role == Role::Query {
            "query"
        } else {
            "document"
        };
        let expected = engine_embed(&texts, role);
        for (text, want) in texts.iter().zip(&expected) {
            let got = vector(
                &mut s,
                "SELECT kv_embed($1, $2)::real[]",
                &[text, &role_name],
            );
            let diff = max_abs_diff(&got, want);
            assert!(
                diff <= 1e-6,
                "kv_embed({text:?}, {role_name}) differs from the engine by {diff}"
            );
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
        }
        // The batch form gives the same vectors.
        let arr: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let rows = s
            .query(
                "SELECT v::real[] FROM unnest(kv_embed_batch($1, $2)) AS v",
                &[&arr, &role_name],
            )
            .unwrap();
        assert_eq!(rows.len(), texts.len());
        for (row, want) in rows.iter().zip(&expected) {
            let got: Vec<f32> = row.get(0);
            assert!(max_abs_diff(&got, want) <= 1e-5, "kv_embed_batch differs");
        }
    }
    // Default role is document; queries differ from documents.
    let d = vector(&mut s, "SELECT kv_embed('hello world')::real[]", &[]);
    let q = vector(
        &mut s,
        "SELECT kv_embed('hello world', 'query')::real[]",
        &[],
    );
    assert!(max_abs_diff(&d, &engine_embed(&["hello world"], Role::Document)[0]) <= 1e-6);
    assert!(
        max_abs_diff(&d, &q) > 1e-4,
        "query and document prompts should differ"
    );
    // halfvec is the same vector rounded to half precision, exactly as
    // pgvector's own cast rounds it.
    let same: bool = s
        .query_one(
            "SELECT kv_embed_half('hello world') = kv_embed('hello world')::halfvec",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(same, "kv_embed_half must equal kv_embed(...)::halfvec");
}

#[test]
fn null_and_empty_input() {
    let (_g, mut s) = session();
    let null: bool = s
        .query_one(
            "SELECT kv_embed(NULL) IS NULL AND kv_embed_half(NULL) IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(null);
    let null_role: bool = s
        .query_one("SELECT kv_embed('x', NULL) IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(null_role);
    let d = dim(&mut s);
    for text in ["", " ", "\n\t  "] {
        let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&text]);
        assert_eq!(
            v.len() as i32,
            d,
            "empty/whitespace input {text:?} still embeds"
        );
    }
    let row = s
        .query_one(
            "SELECT kv_embed_batch(ARRAY['a', NULL, '']) IS NOT NULL,
                    (kv_embed_batch(ARRAY['a', NULL, '']))[2] IS NULL,
                    (kv_embed_batch(ARRAY['a', NULL, '']))[3] IS NOT NULL,
                    cardinality(kv_embed_batch('{}'::text[])),
                    kv_embed_batch(NULL::text[]) IS NULL,
                    cardinality(kv_embed_batch(ARRAY[NULL, NULL]::text[]))",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i32>(3), 0);
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, i32>(5), 2);
    let a = vector(
        &mut s,
        "SELECT (kv_embed_batch(ARRAY[NULL, 'a']))[2]::real[]",
        &[],
    );
    let b = vector(&mut s, "SELECT kv_embed('a')::real[]", &[]);
    assert!(max_abs_diff(&a, &b) <= 1e-5);
}

#[test]
fn generated_column_fills_on_insert_update_and_copy() {
    let (_g, mut s) = session();
    let d = dim(&mut s);
    s.batch_execute(&format!(
        "DROP TABLE IF EXISTS gen_docs;
         CREATE TABLE gen_docs (id int PRIMARY KEY, body text,
           emb vector({d}) GENERATED ALWAYS AS (kv_embed(body)) STORED);"
    ))
    .unwrap();
    s.execute(
        "INSERT INTO gen_docs (id, body) VALUES (1, 'first row'), (2, NULL), (3, '')",
        &[],
    )
    .unwrap();
    let mut w = s.copy_in("COPY gen_docs (id, body) FROM STDIN").unwrap();
    w.write_all(b"4\tcopied row\n5\t\\N\n6\tanother copied row\n")
        .unwrap();
    w.finish().unwrap();
    let before = vector(&mut s, "SELECT emb::real[] FROM gen_docs WHERE id = 1", &[]);
    s.execute(
        "UPDATE gen_docs SET body = 'first row, edited' WHERE id = 1",
        &[],
    )
    .unwrap();
    s.execute("UPDATE gen_docs SET body = 'was null' WHERE id = 2", &[])
        .unwrap();
    let after = vector(&mut s, "SELECT emb::real[] FROM gen_docs WHERE id = 1", &[]);
    assert!(
        max_abs_diff(&before, &after) > 1e-4,
        "UPDATE must recompute the embedding"
    );
    for row in s
        .query(
            "SELECT id, body, emb IS NULL, emb::real[] FROM gen_docs ORDER BY id",
            &[],
        )
        .unwrap()
    {
        let (id, body, is_null): (i32, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            is_null,
            body.is_none(),
            "row {id}: NULL text ⇔ NULL embedding"
        );
        if let Some(body) = body {
            let stored: Vec<f32> = row.get(3);
            let fresh = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&body]);
            assert!(
                max_abs_diff(&stored, &fresh) <= 1e-6,
                "row {id}: stored embedding is stale"
            );
        }
    }
    let n: i64 = s
        .query_one("SELECT count(*) FROM gen_docs WHERE emb IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
}

fn load_corpus(s: &mut Session, table: &str) {
    let d = dim(s);
    s.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id serial PRIMARY KEY, topic text, body text,
           emb vector({d}) GENERATED ALWAYS AS (kv_embed(body)) STORED);"
    ))
    .unwrap();
    let topics: Vec<String> = CORPUS.iter().map(|(t, _)| t.to_string()).collect();
    let bodies: Vec<String> = CORPUS.iter().map(|(_, b)| b.to_string()).collect();
    s.execute(
        &format!("INSERT INTO {table} (topic, body) SELECT * FROM unnest($1::text[], $2::text[])"),
        &[&topics, &bodies],
    )
    .unwrap();
}

#[test]
fn hnsw_index_is_built_and_used() {
    let (_g, mut s) = session();
    load_corpus(&mut s, "hnsw_docs");
    s.batch_execute("CREATE INDEX hnsw_docs_emb ON hnsw_docs USING hnsw (emb vector_cosine_ops)")
        .unwrap();
    s.batch_execute("ANALYZE hnsw_docs; SET enable_seqscan = off")
        .unwrap();
    let plan: Vec<String> = s
        .query("EXPLAIN SELECT id FROM hnsw_docs ORDER BY emb <=> kv_embed('a goal in the match', 'query') LIMIT 5", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("hnsw_docs_emb")),
        "the HNSW index is not used: {plan:#?}"
    );
    let ids: Vec<i32> = s
        .query("SELECT id FROM hnsw_docs ORDER BY emb <=> kv_embed('a goal in the match', 'query') LIMIT 5", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 5);
    // halfvec: the recipe for models wider than 2,000 dimensions.
    let d = dim(&mut s);
    s.batch_execute(&format!(
        "DROP TABLE IF EXISTS half_docs;
         CREATE TABLE half_docs (id int, body text,
           emb halfvec({d}) GENERATED ALWAYS AS (kv_embed_half(body)) STORED);
         INSERT INTO half_docs SELECT id, body FROM hnsw_docs;
         CREATE INDEX half_docs_emb ON half_docs USING hnsw (emb halfvec_cosine_ops);
         ANALYZE half_docs;"
    ))
    .unwrap();
    let plan: Vec<String> = s
        .query("EXPLAIN SELECT id FROM half_docs ORDER BY emb <=> kv_embed_half('stars', 'query') LIMIT 3", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("half_docs_emb")),
        "the halfvec HNSW index is not used: {plan:#?}"
    );
}

#[test]
fn semantic_search_finds_the_right_topic() {
    let (_g, mut s) = session();
    load_corpus(&mut s, "search_docs");
    let mut hits = 0;
    let mut total = 0;
    for (topic, query) in QUERIES {
        let rows = s
            .query(
                "SELECT topic, body FROM search_docs ORDER BY emb <=> kv_embed($1, 'query') LIMIT 3",
                &[query],
            )
            .unwrap();
        let top: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            &top[0], topic,
            "nearest neighbour of {query:?} is off-topic: {top:?}"
        );
        hits += top.iter().filter(|t| t == topic).count();
        total += top.len();
    }
    assert!(
        hits * 4 >= total * 3,
        "only {hits}/{total} of the top-3 neighbours are on topic"
    );
}

#[test]
fn select_layers_stores_a_calibration_that_kv_embed_uses() {
    let (_g, mut s) = session();
    load_corpus(&mut s, "calib_docs");
    s.batch_execute("DELETE FROM kvembed.calibration").unwrap();
    s.take_notices();
    let rows = s.query("SELECT layer, intrinsic_dimension, selected FROM kv_select_layers('calib_docs', 'body', 32)", &[]).unwrap();
    let n_layers: i32 = s
        .query_one("SELECT n_layers FROM kv_status()", &[])
        .unwrap()
        .get(0);
    assert!(
        rows.len() as i32 >= n_layers - 1,
        "one row per layer: {} rows for {n_layers} layers",
        rows.len()
    );
    let selected: Vec<i32> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(2))
        .map(|r| r.get(0))
        .collect();
    assert!(!selected.is_empty(), "no layer selected");
    assert!(rows.iter().all(|r| r.get::<_, f64>(1).is_finite()));
    let notices = s.take_notices();
    assert!(
        notices.iter().any(|n| n.contains("sampling")),
        "progress NOTICEs expected: {notices:?}"
    );

    let stored: Vec<i32> = s
        .query_one("SELECT layers FROM kvembed.calibration", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, selected);
    s.batch_execute("SET kvembed.layers = 'auto'").unwrap();
    let row = s
        .query_one("SELECT layers, layers_source FROM kv_status()", &[])
        .unwrap();
    assert_eq!(row.get::<_, Vec<i32>>(0), selected);
    assert_eq!(row.get::<_, String>(1), "calibration");
    let auto = vector(&mut s, "SELECT kv_embed('calibrated text')::real[]", &[]);
    let auto_query = vector(
        &mut s,
        "SELECT kv_embed('calibrated text', 'query')::real[]",
        &[],
    );
    let list = selected
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",");
    s.batch_execute(&format!("SET kvembed.layers = '{list}'"))
        .unwrap();
    let explicit = vector(&mut s, "SELECT kv_embed('calibrated text')::real[]", &[]);
    let explicit_query = vector(
        &mut s,
        "SELECT kv_embed('calibrated text', 'query')::real[]",
        &[],
    );
    // With layers = auto the stored space calibration, fitted on the same
    // sample, maps documents and queries alike.
    let row = s
        .query_one(
            "SELECT space_mean, space_directions, space_gains FROM kvembed.calibration",
            &[],
        )
        .unwrap();
    let map = kvembed_proto::SpaceMap {
        mean: row.get(0),
        directions: row.get(1),
        gains: row.get(2),
    };
    map.validate().unwrap();
    assert!(
        !map.gains.is_empty(),
        "the default fit (whiten) has directions"
    );
    for (stored_layers, plain) in [(auto.clone(), explicit), (auto_query, explicit_query)] {
        let mut mapped = plain.clone();
        map.apply(&mut mapped);
        assert!(
            max_abs_diff(&stored_layers, &mapped) <= 1e-5,
            "auto must use the stored layers and space calibration"
        );
        assert!(
            max_abs_diff(&stored_layers, &plain) > 1e-3,
            "the space calibration changes the vectors"
        );
    }
    // A new session sees it too.
    let mut other = Session::connect(DB, "postgres");
    let src: String = other
        .query_one("SELECT layers_source FROM kv_status()", &[])
        .unwrap()
        .get(0);
    assert_eq!(src, "calibration");
    // A profile made now freezes the calibrated layers and space: it gives
    // the calibrated vectors, and still does once the calibration is gone.
    s.batch_execute(
        "SET kvembed.layers = 'auto'; SELECT kv_drop_profile('calibrated', force => true); \
         SELECT kv_create_profile('calibrated')",
    )
    .unwrap();
    let fit: Option<String> = s
        .query_one(
            "SELECT space_fit FROM kvembed.profiles WHERE name = 'calibrated'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        fit.is_some_and(|f| f.starts_with("whiten")),
        "the profile keeps the space map"
    );
    let profiled = "SELECT kv_embed('calibrated text', 'document', 'calibrated')::real[]";
    let under_profile = vector(&mut other, profiled, &[]);
    assert!(
        max_abs_diff(&under_profile, &auto) <= 1e-5,
        "the profile gives the calibrated vector"
    );
    // store => false computes without writing.
    s.batch_execute("DELETE FROM kvembed.calibration").unwrap();
    let uncalibrated = vector(&mut s, "SELECT kv_embed('calibrated text')::real[]", &[]);
    assert!(max_abs_diff(&uncalibrated, &auto) > 1e-3);
    let still = vector(&mut s, profiled, &[]);
    assert!(max_abs_diff(&still, &auto) <= 1e-5, "a profile is frozen");
    s.batch_execute("SELECT kv_drop_profile('calibrated')")
        .unwrap();
    let rows = s
        .query(
            "SELECT * FROM kv_select_layers('calib_docs', 'body', 16, store => false)",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty());
    let n: i64 = s
        .query_one("SELECT count(*) FROM kvembed.calibration", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn hostile_identifiers_are_quoted() {
    let (_g, mut s) = session();
    s.batch_execute(
        r#"DROP TABLE IF EXISTS "we""ird; DROP TABLE x; --";
           CREATE TABLE "we""ird; DROP TABLE x; --" ("co""l; --" text, "v e c" vector);
           INSERT INTO "we""ird; DROP TABLE x; --" SELECT 'text number ' || i FROM generate_series(1, 10) i;"#,
    )
    .unwrap();
    let rows = s
        .query(r#"SELECT * FROM kv_select_layers('"we""ird; DROP TABLE x; --"', 'co"l; --', 10, store => false)"#, &[])
        .unwrap();
    assert!(!rows.is_empty());
    s.batch_execute(r#"CALL kv_backfill('"we""ird; DROP TABLE x; --"', 'co"l; --', 'v e c', 3)"#)
        .unwrap();
    let n: i64 = s
        .query_one(
            r#"SELECT count(*) FROM "we""ird; DROP TABLE x; --" WHERE "v e c" IS NULL"#,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn backfill_fills_null_vectors_in_batches() {
    let (_g, mut s) = session();
    s.batch_execute(
        "DROP TABLE IF EXISTS backfill_docs;
         CREATE TABLE backfill_docs (id int PRIMARY KEY, body text, emb vector);
         INSERT INTO backfill_docs SELECT i, 'document number ' || i FROM generate_series(1, 23) i;
         INSERT INTO backfill_docs VALUES (100, NULL);",
    )
    .unwrap();
    s.take_notices();
    s.batch_execute("CALL kv_backfill('backfill_docs', 'body', 'emb', 5)")
        .unwrap();
    let notices = s.take_notices();
    assert!(
        notices.iter().any(|n| n.contains("23 rows")),
        "progress: {notices:?}"
    );
    assert!(
        notices.iter().filter(|n| n.contains("rows/s")).count() >= 5,
        "one NOTICE per batch: {notices:?}"
    );
    let row = s
        .query_one("SELECT count(*) FILTER (WHERE emb IS NULL), count(*) FROM backfill_docs WHERE body IS NOT NULL", &[])
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 23));
    let stored = vector(
        &mut s,
        "SELECT emb::real[] FROM backfill_docs WHERE id = 7",
        &[],
    );
    let fresh = vector(&mut s, "SELECT kv_embed('document number 7')::real[]", &[]);
    assert!(max_abs_diff(&stored, &fresh) <= 1e-5);
}

/// Every row of `table` has `emb = kv_embed(body)`; returns how many rows.
fn assert_each_row_has_its_own_vector(s: &mut Session, table: &str) -> usize {
    let rows = s
        .query(
            &format!(
                "SELECT tableoid::regclass::text, body, emb::real[] FROM {table} ORDER BY 1, 2"
            ),
            &[],
        )
        .unwrap();
    for row in &rows {
        let (part, body): (String, String) = (row.get(0), row.get(1));
        let stored: Option<Vec<f32>> = row.get(2);
        let stored = stored.unwrap_or_else(|| panic!("{part}: '{body}' was left NULL"));
        let own = vector(s, "SELECT kv_embed($1)::real[]", &[&body]);
        let d = max_abs_diff(&stored, &own);
        assert!(
            d <= 1e-5,
            "{part}: '{body}' holds another row's vector (max difference {d}, cosine {})",
            cosine(&stored, &own)
        );
    }
    rows.len()
}

/// Row identity is (tableoid, ctid): ctids repeat across the partitions of a
/// partitioned table and the children of an inherited one, and a backfill
/// that matched rows by ctid alone wrote the first partition's vectors into
/// the second's rows.
#[test]
fn backfill_gives_each_row_of_partitioned_and_inherited_tables_its_own_vector() {
    let (_g, mut s) = session();
    s.batch_execute(
        "DROP TABLE IF EXISTS part_docs, inh_docs CASCADE;
         CREATE TABLE part_docs (lang text NOT NULL, body text, emb vector) PARTITION BY LIST (lang);
         CREATE TABLE part_docs_en PARTITION OF part_docs FOR VALUES IN ('en');
         CREATE TABLE part_docs_de PARTITION OF part_docs FOR VALUES IN ('de');
         INSERT INTO part_docs (lang, body) VALUES
           ('en', 'The cat sat on the mat.'), ('en', 'Stock markets fell sharply.'),
           ('de', 'Zwei Hunde spielen im Schnee.'), ('de', 'Der Zug hat Verspätung.');
         CREATE TABLE inh_docs (body text, emb vector);
         CREATE TABLE inh_docs_child () INHERITS (inh_docs);
         INSERT INTO inh_docs (body) VALUES ('A parent row about astronomy.'), ('A parent row about cooking.');
         INSERT INTO inh_docs_child (body) VALUES ('A child row about football.'), ('A child row about compilers.');",
    )
    .unwrap();
    // Both partitions start with rows at ctid (0,1) and (0,2).
    let ctids: Vec<String> = s
        .query("SELECT ctid::text FROM part_docs ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ctids,
        ["(0,1)", "(0,1)", "(0,2)", "(0,2)"],
        "the test needs repeated ctids"
    );
    for batch in [4, 2, 1] {
        s.batch_execute("UPDATE part_docs SET emb = NULL; UPDATE inh_docs SET emb = NULL")
            .unwrap();
        s.batch_execute(&format!(
            "CALL kv_backfill('part_docs', 'body', 'emb', {batch})"
        ))
        .unwrap();
        assert_eq!(
            assert_each_row_has_its_own_vector(&mut s, "part_docs"),
            4,
            "batch size {batch}"
        );
        s.batch_execute(&format!(
            "CALL kv_backfill('inh_docs', 'body', 'emb', {batch})"
        ))
        .unwrap();
        assert_eq!(
            assert_each_row_has_its_own_vector(&mut s, "inh_docs"),
            4,
            "batch size {batch}"
        );
    }
    s.batch_execute("DROP TABLE part_docs, inh_docs CASCADE")
        .unwrap();
}

#[test]
fn several_sessions_at_once() {
    let (_g, mut s) = session();
    let texts: Vec<String> = CORPUS.iter().map(|(_, b)| b.to_string()).collect();
    let expected: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| vector(&mut s, "SELECT kv_embed($1)::real[]", &[t]))
        .collect();
    let before: i64 = s
        .query_one("SELECT requests_served FROM kv_status()", &[])
        .unwrap()
        .get(0);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let texts = texts.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let mut c = Session::connect(DB, "postgres");
                c.batch_execute("SET kvembed.layers = 'default'").unwrap();
                for k in 0..12 {
                    let j = (i * 5 + k * 3) % texts.len();
                    let got = vector(&mut c, "SELECT kv_embed($1)::real[]", &[&texts[j]]);
                    let diff = max_abs_diff(&got, &expected[j]);
                    assert!(
                        diff <= 1e-5,
                        "session {i}: text {j} differs by {diff} under concurrency"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a concurrent session failed");
    }
    let after: i64 = s
        .query_one("SELECT requests_served FROM kv_status()", &[])
        .unwrap()
        .get(0);
    assert!(
        after - before >= 96,
        "requests_served grew by {}",
        after - before
    );
}

#[test]
fn only_superusers_change_what_the_engine_loads() {
    let (_g, mut s) = session();
    ensure_login_role(&mut s, "kvembed_test_user");
    s.batch_execute("GRANT ALL ON SCHEMA public TO kvembed_test_user")
        .unwrap();
    let mut u = Session::connect(DB, "kvembed_test_user");
    // Ordinary users embed...
    let v = vector(&mut u, "SELECT kv_embed('hello')::real[]", &[]);
    assert_eq!(v.len() as i32, dim(&mut s));
    // ...but cannot change the model, the device or the engine binary.
    for stmt in [
        "SET kvembed.model = '/tmp/evil.gguf'",
        "SET kvembed.device = 'cuda'",
        "SET kvembed.engine_path = '/bin/sh'",
        "ALTER SYSTEM SET kvembed.model = '/tmp/evil.gguf'",
        "ALTER SYSTEM SET kvembed.engine_path = '/bin/sh'",
        "SELECT kv_restart()",
        "INSERT INTO kvembed.calibration (model_id, layers, curve) VALUES ('x', '{1}', '[]')",
    ] {
        let err = u.batch_execute(stmt).expect_err(stmt);
        let (code, msg) = sql_error(&err);
        assert!(
            ["55P02", "42501"].contains(&code.as_str()),
            "{stmt}: unexpected {code} {msg}"
        );
    }
    u.batch_execute("CREATE TABLE IF NOT EXISTS user_docs (body text); INSERT INTO user_docs VALUES ('a'), ('b'), ('c'), ('d')").unwrap();
    let err = u
        .query(
            "SELECT * FROM kv_select_layers('user_docs', 'body', 4)",
            &[],
        )
        .expect_err("store needs privilege");
    assert_eq!(sql_error(&err).0, "42501");
    // Session settings stay free for everyone.
    u.batch_execute("SET kvembed.max_tokens = 64; SET kvembed.layers = 'default'")
        .unwrap();
    // The engine's socket directory is private to the server's OS user.
    let socket_dir: String = s
        .query_one(
            "SELECT current_setting('data_directory') || '/kvembed'",
            &[],
        )
        .unwrap()
        .get(0);
    if let Ok(meta) = std::fs::metadata(&socket_dir) {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "{socket_dir} must be 0700"
        );
    }
}

#[test]
fn overlong_input_truncates_with_a_notice_or_errors() {
    let (_g, mut s) = session();
    let d = dim(&mut s) as usize;
    let unit = |v: &[f32]| {
        v.len() == d && (v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4
    };
    let long = "lorem ipsum dolor sit amet ".repeat(200);
    s.batch_execute("SET kvembed.max_tokens = 16").unwrap();
    s.take_notices();
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&long]);
    assert!(unit(&v), "a {d}-dimensional unit vector");
    let notices = s.take_notices();
    assert!(
        notices.iter().any(|n| n.contains("truncated")),
        "expected a truncation NOTICE, got {notices:?}"
    );
    // Truncation keeps the beginning: a shorter text with the same first 16
    // tokens gives the same vector, and keeping 32 tokens gives another.
    let shorter = "lorem ipsum dolor sit amet ".repeat(20);
    let same = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&shorter]);
    assert!(
        max_abs_diff(&v, &same) <= 1e-6,
        "the kept tokens are the text's first 16"
    );
    s.batch_execute("SET kvembed.max_tokens = 32").unwrap();
    let more = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&long]);
    assert!(
        max_abs_diff(&v, &more) > 1e-3,
        "32 tokens must give another vector than 16"
    );
    s.batch_execute("SET kvembed.max_tokens = 16; SET kvembed.on_overflow = 'error'")
        .unwrap();
    let err = s
        .query_one("SELECT kv_embed($1)", &[&long])
        .expect_err("too long must fail");
    let (code, msg) = sql_error(&err);
    assert_eq!(code, "54000", "{msg}");
    // Short texts are unaffected (the same vector as without a limit), and
    // 10 MB of text is handled: cut to its first 16 tokens like a shorter run.
    let short = vector(&mut s, "SELECT kv_embed('short')::real[]", &[]);
    s.batch_execute("SET kvembed.max_tokens = 0").unwrap();
    let unlimited = vector(&mut s, "SELECT kv_embed('short')::real[]", &[]);
    assert!(unit(&short) && max_abs_diff(&short, &unlimited) <= 1e-6);
    s.batch_execute("SET kvembed.max_tokens = 16; SET kvembed.on_overflow = 'truncate'")
        .unwrap();
    let huge = "x".repeat(10 << 20);
    let v = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&huge]);
    let run = vector(&mut s, "SELECT kv_embed($1)::real[]", &[&"x".repeat(4096)]);
    assert!(
        unit(&v) && max_abs_diff(&v, &run) <= 1e-6,
        "10 MB is its first 16 tokens"
    );
}

#[test]
fn invalid_settings_and_roles_are_clear_errors() {
    let (_g, mut s) = session();
    let cases = [
        (
            "SET kvembed.layers = 'six'",
            "SELECT kv_embed('x')",
            "22023",
        ),
        ("SET kvembed.bias = 'lots'", "SELECT kv_embed('x')", "22023"),
        (
            "SET kvembed.document_prompt = 'no placeholder'",
            "SELECT kv_embed('x')",
            "22023",
        ),
        ("RESET ALL", "SELECT kv_embed('x', 'banana')", "22023"),
    ];
    for (set, query, want) in cases {
        s.batch_execute("RESET ALL").unwrap();
        s.batch_execute(set).unwrap();
        let err = s.query_one(query, &[]).expect_err(set);
        let (code, msg) = sql_error(&err);
        assert_eq!(code, want, "{set}; {query}: {msg}");
    }
    s.batch_execute("RESET ALL").unwrap();
    let err = s
        .batch_execute("SET kvembed.no_such_setting = 1")
        .expect_err("reserved prefix");
    assert!(sql_error(&err).1.contains("kvembed"), "{err}");
    // The session still works.
    s.batch_execute("SET kvembed.layers = 'default'").unwrap();
    let v = vector(&mut s, "SELECT kv_embed('x')::real[]", &[]);
    assert!(
        max_abs_diff(&v, &engine_embed(&["x"], Role::Document)[0]) <= 1e-6,
        "the session's settings are back to the defaults"
    );
}

#[test]
fn statement_timeout_interrupts_a_waiting_kv_embed() {
    let (_g, mut s) = session();
    let texts: Vec<String> = (0..120)
        .map(|i| format!("a somewhat longer text to embed, number {i}"))
        .collect();
    s.batch_execute("SET statement_timeout = '200ms'").unwrap();
    let started = std::time::Instant::now();
    let err = s
        .query_one("SELECT kv_embed_batch($1)", &[&texts])
        .expect_err("must time out");
    let waited = started.elapsed();
    assert_eq!(sql_error(&err).0, "57014", "{err}");
    assert!(
        waited < std::time::Duration::from_secs(1),
        "cancellation took {waited:?}"
    );
    // The abandoned request does not poison the session or the engine.
    s.batch_execute("RESET statement_timeout").unwrap();
    let v = vector(&mut s, "SELECT kv_embed('after the timeout')::real[]", &[]);
    assert_eq!(v.len() as i32, dim(&mut s));
}

#[test]
fn non_utf8_databases_convert_or_refuse_clearly() {
    let (_g, mut s) = session();
    let want = vector(&mut s, "SELECT kv_embed('café au lait')::real[]", &[]);
    let mut admin = Session::connect("postgres", "postgres");
    for (db, encoding) in [
        ("kvembed_test_ascii", "SQL_ASCII"),
        ("kvembed_test_latin1", "LATIN1"),
    ] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {db} ENCODING '{encoding}' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap();
        let mut c = Session::connect(db, "postgres");
        c.batch_execute("CREATE EXTENSION kvembed CASCADE; SET kvembed.layers = 'default'")
            .unwrap();
        // UTF-8 text (client and server agree on the bytes or convert them)
        // embeds exactly as in a UTF-8 database.
        let got = vector(&mut c, "SELECT kv_embed('café au lait')::real[]", &[]);
        assert!(
            max_abs_diff(&got, &want) <= 1e-6,
            "{encoding}: converted text must embed the same"
        );
        // kv_chunk cuts the same chunks, and its positions are the
        // database's characters (bytes in SQL_ASCII), as substr counts them.
        let text = "Crème brûlée, café. Naïve résumé! ".repeat(12);
        let chunk_query = "SELECT array_agg(chunk ORDER BY ord), \
             bool_and(substr($1, start_char, end_char - start_char + 1) = chunk) \
             FROM kv_chunk($1, 16, 4)";
        let row = c.query_one(chunk_query, &[&text]).unwrap();
        let (chunks, positions_agree): (Vec<String>, bool) = (row.get(0), row.get(1));
        let utf8: Vec<String> = s.query_one(chunk_query, &[&text]).unwrap().get(0);
        assert!(chunks.len() > 2, "{encoding}: {chunks:?}");
        assert_eq!(chunks, utf8, "{encoding}: the same chunks");
        assert!(positions_agree, "{encoding}: positions");
        if encoding == "SQL_ASCII" {
            // SQL_ASCII stores any bytes: invalid UTF-8 is an ERROR, not a crash.
            for q in [
                "SELECT kv_embed(E'bad \\xff byte')",
                "SELECT kv_embed_batch(ARRAY['ok', E'bad \\xff'])",
            ] {
                let err = c.batch_execute(q).expect_err(q);
                let (code, msg) = sql_error(&err);
                assert_eq!(code, "22021", "{q}: {msg}");
            }
            // The role argument too (it was a pgrx panic, XX000).
            let err = c
                .batch_execute("SELECT kv_embed('x', E'r\\xf4le')")
                .expect_err("invalid UTF-8 role");
            assert_eq!(sql_error(&err).0, "22021", "{err}");
            let one: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
            assert_eq!(one, 1);
        } else {
            // A role that is not ASCII is converted, then refused by name
            // (non-ASCII escaped: message text is taken to be LATIN1 here).
            let err = c
                .batch_execute("SELECT kv_embed('x', 'rôle')")
                .expect_err("unknown role");
            let (code, msg) = sql_error(&err);
            assert_eq!(code, "22023", "{msg}");
            assert!(msg.contains("unknown role 'r\\u{f4}le'"), "{msg}");
        }
        drop(c);
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .unwrap();
    }
}

/// A long document of paragraphs from a seeded generator (no evaluation
/// text): sentences of common words, a URL, numbers, accents and CJK.
fn generated_document(paragraphs: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "engine",
        "reads",
        "every",
        "row",
        "of",
        "a",
        "table",
        "and",
        "writes",
        "vectors",
        "quickly",
        "café",
        "naïve",
        "résumé",
        "index",
        "search",
        "query",
        "model",
        "tokens",
        "were",
        "counted",
        "twice",
        "before",
        "it",
        "stopped",
        "on",
        "Tuesday",
        "1,024",
        "3.5",
        "https://example.org/a?b=c",
        "don't",
        "isn't",
        "paragraph",
        "sentence",
        "日本語の文章",
        "emoji😀",
        "back-end",
        "(maybe)",
        "\"quoted\"",
    ];
    let mut state = seed;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut doc = String::new();
    for p in 0..paragraphs {
        if p > 0 {
            doc.push_str(if next(4) == 0 { "\n" } else { "\n\n" });
        }
        for k in 0..3 + next(4) {
            if k > 0 {
                doc.push(' ');
            }
            let n = 5 + next(12);
            for w in 0..n {
                let word = WORDS[next(WORDS.len())];
                if w == 0 {
                    let mut c = word.chars();
                    let first = c.next().unwrap();
                    doc.extend(first.to_uppercase());
                    doc.push_str(c.as_str());
                } else {
                    doc.push(' ');
                    doc.push_str(word);
                }
            }
            doc.push_str([".", "?", "!", "。"][next(4)]);
        }
    }
    doc
}

#[test]
fn kv_chunk_stays_within_the_limit_and_covers_the_text() {
    let (_g, mut s) = session();
    let doc = generated_document(40, 7);
    let rows = |s: &mut Session, max: i32, overlap: i32| -> Vec<(i32, String, i32, i32, i32)> {
        s.query(
            "SELECT ord, chunk, start_char, end_char, tokens FROM kv_chunk($1, $2, $3) ORDER BY ord",
            &[&doc, &max, &overlap],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
    };
    let chunks = rows(&mut s, 64, 0);
    assert!(chunks.len() >= 10, "{} chunks", chunks.len());
    let chars: Vec<char> = doc.chars().collect();
    for (i, (ord, chunk, start, end, tokens)) in chunks.iter().enumerate() {
        assert_eq!(*ord as usize, i + 1);
        assert!(
            *tokens >= 1 && *tokens <= 64,
            "chunk {ord}: {tokens} tokens"
        );
        // The positions are characters from 1, as substr counts them.
        let at: String = chars[*start as usize - 1..*end as usize].iter().collect();
        assert_eq!(&at, chunk, "chunk {ord}'s positions");
        assert_eq!(chunk.trim(), chunk, "chunk {ord} is trimmed");
    }
    // Without overlap nothing is lost: only whitespace lies between chunks.
    let squash = |t: &str| t.split_whitespace().collect::<String>();
    let joined: String = chunks.iter().map(|c| squash(&c.1)).collect();
    assert_eq!(joined, squash(&doc));
    // Most cuts fall at a sentence end or a line break, not inside a
    // sentence (64 tokens hold several sentences).
    let at_sentence = chunks
        .iter()
        .filter(|c| c.1.ends_with(['.', '?', '!', '。']))
        .count();
    assert!(
        at_sentence * 10 >= chunks.len() * 9,
        "{at_sentence} of {} end a sentence",
        chunks.len()
    );
    // The engine in this process cuts the same chunks, and each one embeds
    // under kvembed.max_tokens = 64 without truncation: counted as kv_embed
    // counts.
    let engine: Vec<(usize, usize)> = ENGINE
        .chunk(&doc, 64, 0)
        .unwrap()
        .iter()
        .map(|c| (c.start, c.end))
        .collect();
    let sql: Vec<(usize, usize)> = chunks
        .iter()
        .map(|c| {
            let start = chars[..c.2 as usize - 1]
                .iter()
                .map(|ch| ch.len_utf8())
                .sum::<usize>();
            (start, start + c.1.len())
        })
        .collect();
    assert_eq!(sql, engine);
    s.batch_execute("SET kvembed.max_tokens = 64; SET kvembed.on_overflow = 'error'")
        .unwrap();
    let texts: Vec<String> = chunks.iter().map(|c| c.1.clone()).collect();
    let n: i64 = s
        .query_one(
            "SELECT count(*) FROM unnest(kv_embed_batch($1)) AS v WHERE v IS NOT NULL",
            &[&texts],
        )
        .unwrap()
        .get(0);
    assert_eq!(n as usize, texts.len());
    s.batch_execute("RESET kvembed.max_tokens; RESET kvembed.on_overflow")
        .unwrap();
    // Deterministic.
    assert_eq!(rows(&mut s, 64, 0), chunks);
    // With overlap, each chunk starts inside the one before it, and the
    // chunks still reach the end.
    let over = rows(&mut s, 64, 16);
    assert!(over.len() >= chunks.len());
    for w in over.windows(2) {
        assert!(
            w[1].2 > w[0].2 && w[1].2 <= w[0].3,
            "{:?} then {:?}",
            w[0],
            w[1]
        );
    }
    assert_eq!(over.last().unwrap().3, chunks.last().unwrap().3);
    // Bad arguments are clear errors; NULL and empty text give no rows.
    for (q, code) in [
        ("SELECT * FROM kv_chunk('x', 4)", "22023"),
        ("SELECT * FROM kv_chunk('x', 64, 40)", "22023"),
        ("SELECT * FROM kv_chunk('x', -1, 0)", "22023"),
        ("SELECT * FROM kv_chunk(repeat('x', 40000000))", "54000"),
    ] {
        let err = s.batch_execute(q).expect_err(q);
        assert_eq!(sql_error(&err).0, code, "{q}: {err}");
    }
    for q in [
        "SELECT count(*) FROM kv_chunk(NULL)",
        "SELECT count(*) FROM kv_chunk(' \n ')",
    ] {
        let n: i64 = s.query_one(q, &[]).unwrap().get(0);
        assert_eq!(n, 0, "{q}");
    }
}

/// Waits until the queue of `table` satisfies `done(pending, failed_rows)`;
/// returns the last (pending, failed_rows).
fn wait_queue(s: &mut Session, table: &str, done: impl Fn(i64, i64) -> bool) -> (i64, i64) {
    let started = std::time::Instant::now();
    loop {
        let row = s
            .query_one(
                "SELECT pending, failed_rows FROM kvembed.vectorized WHERE table_name = $1::text::regclass",
                &[&table],
            )
            .unwrap();
        let (pending, failed): (i64, i64) = (row.get(0), row.get(1));
        if done(pending, failed) {
            return (pending, failed);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(180),
            "the queue of {table} is stuck: {pending} pending, {failed} set aside"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_queue_quotes_hostile_identifiers() {
    let (_g, mut s) = session();
    s.batch_execute(
        r#"DROP TABLE IF EXISTS "q""ueue; DROP TABLE x; --";
           CREATE TABLE "q""ueue; DROP TABLE x; --" ("te""xt; --" text);
           INSERT INTO "q""ueue; DROP TABLE x; --" SELECT 'queued text ' || i FROM generate_series(1, 12) i;"#,
    )
    .unwrap();
    let pending: i64 = s
        .query_one(
            r#"SELECT kv_vectorize('"q""ueue; DROP TABLE x; --"', 'te"xt; --', 'v"e c', batch_size => 5)"#,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pending, 12);
    wait_queue(&mut s, r#""q""ueue; DROP TABLE x; --""#, |p, _| p == 0);
    let n: i64 = s
        .query_one(
            r#"SELECT count(*) FROM "q""ueue; DROP TABLE x; --" WHERE "v""e c" IS NOT NULL"#,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 12);
    s.batch_execute(
        r#"SELECT kv_unvectorize('"q""ueue; DROP TABLE x; --"'); DROP TABLE "q""ueue; DROP TABLE x; --";"#,
    )
    .unwrap();
}

#[test]
fn a_text_the_engine_refuses_is_set_aside_and_the_others_are_embedded() {
    let (_g, mut s) = session();
    s.batch_execute(
        "SELECT kv_drop_profile('queue_strict', true);
         SET kvembed.on_overflow = 'error';
         SET kvembed.max_tokens = 48;
         SELECT kv_create_profile('queue_strict');
         RESET kvembed.on_overflow; RESET kvembed.max_tokens;
         DROP TABLE IF EXISTS strict_docs;
         CREATE TABLE strict_docs (id int PRIMARY KEY, body text);
         INSERT INTO strict_docs SELECT i, 'a short text ' || i FROM generate_series(1, 11) i;
         UPDATE strict_docs SET body = repeat('far too long for the profile ', 40) WHERE id = 6;
         SELECT kv_vectorize('strict_docs', 'body', 'emb', profile => 'queue_strict', batch_size => 4);",
    )
    .unwrap();
    // The batch holding row 6 fails; the worker embeds its rows one by one
    // and sets row 6 aside; every other row gets its vector.
    assert_eq!(
        wait_queue(&mut s, "strict_docs", |p, f| p == 1 && f == 1),
        (1, 1)
    );
    let row = s
        .query_one(
            "SELECT last_error_sqlstate, last_error, embedded FROM kvembed.vectorized WHERE table_name = 'strict_docs'::regclass",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("54000"));
    assert_eq!(row.get::<_, i64>(2), 10);
    let missing: Vec<i32> = s
        .query("SELECT id FROM strict_docs WHERE emb IS NULL", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(missing, vec![6]);
    // A new text is a new row version: it is tried again, and embedded.
    s.batch_execute("UPDATE strict_docs SET body = 'short now' WHERE id = 6")
        .unwrap();
    assert_eq!(
        wait_queue(&mut s, "strict_docs", |p, f| p == 0 && f == 0),
        (0, 0)
    );
    let same: bool = s
        .query_one(
            "SELECT emb <=> kv_embed(body, 'document', 'queue_strict') < 1e-5 FROM strict_docs WHERE id = 6",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(same);
    s.batch_execute(
        "SELECT kv_unvectorize('strict_docs'); DROP TABLE strict_docs; SELECT kv_drop_profile('queue_strict');",
    )
    .unwrap();
}

#[test]
fn rows_arriving_by_logical_replication_are_embedded_and_re_embedded() {
    let (_g, mut s) = session();
    const PUB: &str = "kvembed_test_publisher";
    let mut admin = Session::connect("postgres", "postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {PUB} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {PUB}"))
        .unwrap();
    let mut publisher = Session::connect(PUB, "postgres");
    for q in [
        "CREATE TABLE articles (id int PRIMARY KEY, body text)",
        "CREATE PUBLICATION kvembed_articles FOR TABLE articles",
        "SELECT pg_create_logical_replication_slot('kvembed_test_slot', 'pgoutput')",
    ] {
        publisher.batch_execute(q).unwrap();
    }
    let config = base_config();
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
        postgres::config::Host::Tcp(h) => h.clone(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    for q in [
        "DROP SUBSCRIPTION IF EXISTS kvembed_articles".to_string(),
        "DROP TABLE IF EXISTS articles".to_string(),
        "CREATE TABLE articles (id int PRIMARY KEY, body text)".to_string(),
        "SELECT kv_drop_profile('queue_replica', true)".to_string(),
        "SELECT kv_create_profile('queue_replica')".to_string(),
        "SELECT kv_vectorize('articles', 'body', 'emb', profile => 'queue_replica')".to_string(),
        format!(
            "CREATE SUBSCRIPTION kvembed_articles
               CONNECTION 'host={host} port={port} dbname={PUB} user=postgres'
               PUBLICATION kvembed_articles WITH (create_slot = false, slot_name = 'kvembed_test_slot')"
        ),
    ] {
        s.batch_execute(&q).unwrap();
    }
    publisher
        .batch_execute(
            "INSERT INTO articles SELECT i, 'replicated article ' || i FROM generate_series(1, 20) i",
        )
        .unwrap();
    let arrived = |s: &mut Session, body: &str| -> bool {
        s.query_one(
            "SELECT count(*) = 1 FROM articles WHERE body = $1",
            &[&body],
        )
        .unwrap()
        .get(0)
    };
    let started = std::time::Instant::now();
    while !arrived(&mut s, "replicated article 20") {
        assert!(
            started.elapsed().as_secs() < 120,
            "replication never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    wait_queue(&mut s, "articles", |p, _| p == 0);
    let check = "SELECT count(*) FILTER (WHERE emb <=> kv_embed(body, 'document', 'queue_replica') < 1e-5) FROM articles";
    assert_eq!(s.query_one(check, &[]).unwrap().get::<_, i64>(0), 20);
    // An UPDATE of the text on the publisher fires the trigger in the apply
    // worker (ENABLE ALWAYS): the row is embedded again.
    publisher
        .batch_execute("UPDATE articles SET body = 'a revised replicated article' WHERE id = 3")
        .unwrap();
    let started = std::time::Instant::now();
    while !arrived(&mut s, "a revised replicated article") {
        assert!(
            started.elapsed().as_secs() < 120,
            "the update never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    wait_queue(&mut s, "articles", |p, _| p == 0);
    assert_eq!(s.query_one(check, &[]).unwrap().get::<_, i64>(0), 20);
    for q in [
        "DROP SUBSCRIPTION kvembed_articles",
        "SELECT kv_unvectorize('articles')",
        "DROP TABLE articles",
        "SELECT kv_drop_profile('queue_replica')",
    ] {
        s.batch_execute(q).unwrap();
    }
    drop(publisher);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {PUB} WITH (FORCE)"))
        .unwrap();
}
