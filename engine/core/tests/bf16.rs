//! The bf16 compute path (the GPU's default dtype) checked on the CPU: candle's
//! CPU backend runs the same tensor ops in bf16 (the GPU attention path, f32
//! norms, RoPE, logits and softmax), so the dtype plumbing the GPU uses is
//! proven here against the f32 engine, for plain and re-routed methods,
//! batched with texts of different lengths.
//!
//! `cargo test --release -p kvembed-core --test bf16 -- --nocapture` prints
//! the figures.

use candle_core::DType;
use kvembed_core::model::loader::WeightFormat;
use kvembed_core::proto::{EmbedOptions, Role};
use kvembed_core::{Embedder, LoadSpec};
use std::path::PathBuf;

/// The acceptance bar of the GPU issue: bf16 embeddings within this cosine of f32.
const MIN_COSINE: f32 = 0.999;

const METHODS: [&str; 6] = [
    "kv",
    "kv-no-reroute",
    "kv-paper",
    "mean",
    "last",
    "token-prepending",
];

fn golden_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(arch)
}

fn real_model(file: &str) -> String {
    let dir = std::env::var("KVEMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-models.sh smollm2 gemma3",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

fn texts() -> Vec<String> {
    [
        "a",
        "The cat sat on the mat.",
        "A man is playing a guitar on stage in front of a large crowd.",
        "The stock market fell sharply after the central bank raised interest rates again, \
         surprising analysts who had expected a pause until the end of the year.",
        "PostgreSQL is a relational database.",
        "",
        "Zwei Hunde spielen im Schnee.",
        "What is the boiling point of water at sea level, in degrees Celsius?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

fn load(model: &str, dtype: DType) -> Embedder {
    // Dense weights in both dtypes: the f32 reference, not the int8
    // products that f32 on a CPU without AMX defaults to.
    let spec = LoadSpec {
        weights: Some(WeightFormat::F32),
        ..LoadSpec::new(model)
    };
    let e = Embedder::load_with_dtype(&spec, Some(dtype)).unwrap();
    assert_eq!(e.decoder().unwrap().dtype(), dtype);
    e
}

/// The lowest cosine between bf16 and f32 embeddings over the texts, per
/// method; `queries`: the methods whose query-side template is run too.
fn compare(model: &str, name: &str, methods: &[&str], queries: &[&str]) -> f32 {
    let f32e = load(model, DType::F32);
    let bf16e = load(model, DType::BF16);
    assert!(
        f32e.info().device == "cpu" && bf16e.info().device == "cpu (bf16)",
        "{}",
        bf16e.info().device
    );
    let texts = texts();
    let mut worst = 1f32;
    for &method in methods {
        let roles: &[Role] = if queries.contains(&method) {
            &[Role::Document, Role::Query]
        } else {
            &[Role::Document]
        };
        for &role in roles {
            let opts = EmbedOptions {
                method: Some(method.into()),
                ..Default::default()
            };
            let a = f32e.embed(&texts, role, &opts).unwrap().vectors;
            let b = bf16e.embed(&texts, role, &opts).unwrap().vectors;
            let cos: Vec<f32> = a.iter().zip(&b).map(|(x, y)| cosine(x, y)).collect();
            let min = cos.iter().copied().fold(1f32, f32::min);
            let mean = cos.iter().sum::<f32>() / cos.len() as f32;
            println!("{name:>14} {method:>16} {role:>8?}: cosine bf16 vs f32 min {min:.6} mean {mean:.6}");
            // bf16 really ran: the vectors are close, not identical.
            assert!(
                a != b,
                "{name}/{method}: bf16 gave the f32 vectors bit for bit"
            );
            assert!(
                min >= MIN_COSINE,
                "{name}/{method}/{role:?}: cosine {min} < {MIN_COSINE} ({cos:?})"
            );
            worst = worst.min(min);
        }
    }
    worst
}

#[test]
fn bf16_matches_f32_on_the_tiny_golden_models() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma3"] {
        let dir = golden_dir(arch);
        compare(dir.to_str().unwrap(), arch, &METHODS, &METHODS);
    }
}

#[test]
fn bf16_matches_f32_on_smollm2() {
    compare(
        &real_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "smollm2-135m",
        &METHODS,
        &["kv", "kv-paper"],
    );
}

#[test]
fn bf16_matches_f32_on_gemma3() {
    // Gemma's scaled embeddings and sandwich norms are the hardest case for bf16.
    compare(
        &real_model("gemma-3-270m-q4_k_m.gguf"),
        "gemma3-270m",
        &["kv", "kv-paper", "mean"],
        &["kv"],
    );
}

#[test]
fn bf16_batched_and_one_by_one_agree() {
    // Padding never leaks in bf16 either: each text alone gives (nearly) the
    // vector it gets in a batch with longer and shorter texts.
    let e = load(golden_dir("gemma3").to_str().unwrap(), DType::BF16);
    let texts = texts();
    for method in ["kv", "kv-paper", "token-prepending"] {
        let opts = EmbedOptions {
            method: Some(method.into()),
            ..Default::default()
        };
        let batched = e.embed(&texts, Role::Document, &opts).unwrap().vectors;
        for (i, t) in texts.iter().enumerate() {
            let single = e
                .embed(std::slice::from_ref(t), Role::Document, &opts)
                .unwrap()
                .vectors;
            let c = cosine(&batched[i], &single[0]);
            assert!(
                c >= 0.9999,
                "{method}: text {i} batched vs single cosine {c}"
            );
        }
    }
}

#[test]
fn dtype_names_parse() {
    use kvembed_core::model::decoder::parse_dtype;
    assert_eq!(parse_dtype("bf16").unwrap(), Some(DType::BF16));
    assert_eq!(parse_dtype(" F32 ").unwrap(), Some(DType::F32));
    assert_eq!(parse_dtype("f16").unwrap(), Some(DType::F16));
    assert_eq!(parse_dtype("auto").unwrap(), None);
    assert_eq!(parse_dtype("").unwrap(), None);
    let err = parse_dtype("int8").unwrap_err().to_string();
    assert!(err.contains("dtype") && err.contains("int8"), "{err}");
    // The default stays f32 on the CPU.
    let e = Embedder::load(&LoadSpec::new(golden_dir("llama").to_str().unwrap())).unwrap();
    assert_eq!(e.decoder().unwrap().dtype(), DType::F32);
    assert_eq!(e.info().device, "cpu");
}
