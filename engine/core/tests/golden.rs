//! The shared decoder against Hugging Face transformers on tiny generated
//! models of every supported family (goldens made by scripts/make_goldens.py),
//! with and without KV re-routing.

use kvembed_core::model::loader::WeightFormat;
use kvembed_core::{Embedder, LoadSpec};
use std::path::PathBuf;

fn golden_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(arch)
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "sequence length differs");
    let mut m: f64 = 0.0;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len(), "hidden size differs");
        for (x, y) in ra.iter().zip(rb) {
            m = m.max((*x as f64 - y).abs());
        }
    }
    m
}

/// The largest elementwise difference of two vectors.
fn gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The largest elementwise difference of two lists of vectors.
fn rows_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).map(|(x, y)| gap(x, y)).fold(0f32, f32::max)
}

fn check(arch: &str) {
    check_with(arch, true);
    // The tensor-op attention (the GPU path) must agree too.
    check_with(arch, false);
}

fn check_with(arch: &str, kernel: bool) {
    let dir = golden_dir(arch);
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    // f32 matmuls: the goldens are f32 (AMX's bf16 products are checked
    // against them below, with a tolerance for bf16).
    let spec = LoadSpec {
        weights: Some(WeightFormat::F32),
        ..LoadSpec::new(dir.to_str().unwrap())
    };
    let mut e = Embedder::load(&spec).unwrap();
    assert!(!e.decoder().unwrap().amx);
    e.decoder_mut().unwrap().cpu_attention_kernel = kernel;
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        // The tokenizer reproduces the reference ids (BOS included where the model wants it).
        let mut ours = Vec::new();
        if e.tokenizer.add_bos {
            ours.extend(e.tokenizer.bos);
        }
        ours.extend(e.tokenizer.encode(case["text"].as_str().unwrap()).unwrap());
        assert_eq!(
            ours, ids,
            "{arch}/{name}: token ids differ from the reference tokenizer"
        );

        let expected: Vec<Vec<f64>> = serde_json::from_value(case["final_hidden"].clone()).unwrap();
        let layers: Option<Vec<usize>> = case
            .get("reroute_layers")
            .map(|v| serde_json::from_value(v.clone()).unwrap());
        let bias = case.get("bias").and_then(|b| b.as_f64()).unwrap_or(0.0) as f32;
        let got = e
            .forward_hidden(&ids, layers.as_deref().map(|l| (l, bias)))
            .unwrap();
        let d = max_abs_diff(&got, &expected);
        assert!(
            d < 1e-4,
            "{arch}/{name} (kernel {kernel}): max |diff| {d:e} against transformers"
        );
    }
    // Re-routing must change something, or the reroute goldens prove nothing.
    let plain = &golden["cases"][0];
    let rr = &golden["cases"][1];
    let a: Vec<Vec<f64>> = serde_json::from_value(plain["final_hidden"].clone()).unwrap();
    let b: Vec<Vec<f64>> = serde_json::from_value(rr["final_hidden"].clone()).unwrap();
    if plain["input_ids"] == rr["input_ids"] {
        let diff: f64 = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff > 1e-3,
            "{arch}: re-routing golden equals the plain one"
        );
    }
}

/// The smallest cosine, over every token of every golden case of every
/// family, between the final states with the weights held as `format` and
/// transformers' f32 states; checks on the way that each family loaded as
/// `loaded` says and that the result is not bit-identical to f32.
fn min_cosine_against_transformers(
    format: WeightFormat,
    loaded: impl Fn(&Embedder) -> bool,
) -> f64 {
    let mut min_cos = f64::INFINITY;
    for arch in [
        "llama",
        "llama-sharded",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma3",
    ] {
        let dir = golden_dir(arch);
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let spec = LoadSpec {
            weights: Some(format),
            ..LoadSpec::new(dir.to_str().unwrap())
        };
        let e = Embedder::load(&spec).unwrap();
        assert!(
            loaded(&e),
            "{arch}: the decoder did not load the weights as {format:?}"
        );
        for case in golden["cases"].as_array().unwrap() {
            let ids: Vec<u32> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let expected: Vec<Vec<f64>> =
                serde_json::from_value(case["final_hidden"].clone()).unwrap();
            let layers: Option<Vec<usize>> = case
                .get("reroute_layers")
                .map(|v| serde_json::from_value(v.clone()).unwrap());
            let bias = case.get("bias").and_then(|b| b.as_f64()).unwrap_or(0.0) as f32;
            let got = e
                .forward_hidden(&ids, layers.as_deref().map(|l| (l, bias)))
                .unwrap();
            assert_eq!(got.len(), expected.len());
            for (i, (g, x)) in got.iter().zip(&expected).enumerate() {
                let dot: f64 = g.iter().zip(x).map(|(a, b)| *a as f64 * b).sum();
                let ng: f64 = g.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                let nx: f64 = x.iter().map(|b| b * b).sum::<f64>().sqrt();
                let cos = dot / (ng * nx);
                eprintln!("{arch}/{} token {i}: cosine {cos:.6}", case["name"]);
                min_cos = min_cos.min(cos);
            }
            // The other format really ran: not bit-identical to f32.
            assert!(
                max_abs_diff(&got, &expected) > 1e-7,
                "{arch}: {format:?} result equals f32 exactly"
            );
        }
    }
    min_cos
}

/// With the AMX bf16 matmuls (the default where the CPU has them), every
/// token's final state stays within bf16 rounding of the f32 reference:
/// cosine >= 0.999 on every golden case of every family.
#[test]
fn amx_bf16_matmuls_stay_close_to_transformers() {
    if !kvembed_core::model::amx::available() {
        eprintln!("no AMX-BF16 on this CPU: nothing to check");
        return;
    }
    let min_cos = min_cosine_against_transformers(WeightFormat::Amx, |e| e.decoder().unwrap().amx);
    assert!(
        min_cos >= 0.999,
        "AMX: smallest cosine {min_cos} against transformers"
    );
}

/// With the int8 products (the default without AMX; the AVX2 kernel under
/// KVEMBED_CPU=x86-64-v3, the portable one below it), every token's final
/// state stays close to the f32 reference: cosine >= 0.995 on every golden
/// case of every family. (Random tiny models: a harder case for 7-bit
/// activations than trained ones, whose quality cost docs/QUALITY.md gives.)
#[test]
fn int8_matmuls_stay_close_to_transformers() {
    let kernel = kvembed_core::model::int8::Kernel::detect();
    let min_cos = min_cosine_against_transformers(WeightFormat::Int8, |e| {
        e.decoder().unwrap().int8 == Some(kernel)
    });
    eprintln!("{kernel:?}: smallest cosine {min_cos:.6}");
    assert!(
        min_cos >= 0.995,
        "{kernel:?}: smallest cosine {min_cos} against transformers"
    );
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn llama_sharded_safetensors_match_transformers() {
    check("llama-sharded");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check("qwen3");
}

#[test]
fn gemma3_matches_transformers() {
    check("gemma3");
}

#[test]
fn batched_and_one_by_one_embeddings_agree() {
    // Different lengths in one batch: each sequence re-routes its own last
    // real token and padding never leaks. Gemma adds BOS, Qwen2 does not
    // (Token Prepending's placeholder then follows the prompt's first token).
    let texts: Vec<String> = [
        "a",
        "The cat sat on the mat.",
        "We read the text and the query, twice over and again.",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for arch in ["gemma3", "qwen2"] {
        let dir = golden_dir(arch);
        let e = Embedder::load(&LoadSpec::new(dir.to_str().unwrap())).unwrap();
        for method in [
            "kv",
            "kv-paper",
            "mean",
            "echo",
            "token-prepending",
            "kv-tp",
        ] {
            let opts = kvembed_core::proto::EmbedOptions {
                method: Some(method.into()),
                ..Default::default()
            };
            let batched = e
                .embed(&texts, kvembed_core::proto::Role::Document, &opts)
                .unwrap()
                .vectors;
            for (i, t) in texts.iter().enumerate() {
                let single = e
                    .embed(
                        std::slice::from_ref(t),
                        kvembed_core::proto::Role::Document,
                        &opts,
                    )
                    .unwrap()
                    .vectors;
                let d = gap(&batched[i], &single[0]);
                assert!(
                    d < 1e-5,
                    "{arch} {method}: text {i} differs by {d} between batched and single"
                );
            }
        }
    }
}

#[test]
fn kv_tp_applies_both_re_routing_and_token_prepending() {
    let dir = golden_dir("llama");
    let e = Embedder::load(&LoadSpec::new(dir.to_str().unwrap())).unwrap();
    let texts = vec![
        "The cat sat on the mat.".to_string(),
        "Stocks fell sharply on Monday.".to_string(),
    ];
    let embed = |method: &str| {
        let opts = kvembed_core::proto::EmbedOptions {
            method: Some(method.into()),
            ..Default::default()
        };
        e.embed(&texts, kvembed_core::proto::Role::Document, &opts)
            .unwrap()
            .vectors
    };
    let (kv, tp, both) = (embed("kv"), embed("token-prepending"), embed("kv-tp"));
    // Without the placeholder kv-tp would equal kv; without re-routing, token-prepending.
    assert!(
        rows_gap(&both, &kv) > 1e-3,
        "kv-tp equals kv: no Token Prepending"
    );
    assert!(
        rows_gap(&both, &tp) > 1e-3,
        "kv-tp equals token-prepending: no re-routing"
    );
}

/// A prompt ensemble embeds a text once per template and returns the
/// normalized mean of the unit vectors; it costs the sum of its templates.
#[test]
fn prompt_ensembles_average_the_unit_vectors_of_each_template() {
    use kvembed_core::method::{Method, PROMPT_SEPARATOR};
    use kvembed_core::proto::{EmbedOptions, Role};
    let dir = golden_dir("llama");
    let e = Embedder::load(&LoadSpec::new(dir.to_str().unwrap())).unwrap();
    let texts = vec![
        "The cat sat on the mat.".to_string(),
        "Stocks fell sharply on Monday, didn't they?".to_string(),
    ];
    for (name, single) in [("kv-ensemble", "kv"), ("prompteol-ensemble", "prompteol")] {
        let ensemble = Method::from_name(name).unwrap();
        for role in [Role::Document, Role::Query] {
            let set = ensemble.prompts(role).clone();
            assert_eq!(set.templates().len(), 3, "{name}");
            let opts = |prompt: String| EmbedOptions {
                method: Some(single.into()),
                document_prompt: Some(prompt.clone()),
                query_prompt: Some(prompt),
                ..Default::default()
            };
            let mut mean = vec![vec![0f32; e.info().dim]; texts.len()];
            let (mut fixed, mut slots, mut tokens) = (0, 0, 0);
            for t in set.templates() {
                let o = opts(t.source());
                let out = e.embed(&texts, role, &o).unwrap();
                for (m, v) in mean.iter_mut().zip(&out.vectors) {
                    m.iter_mut().zip(v).for_each(|(a, x)| *a += x);
                }
                tokens += out.tokens;
                let (f, s) = e.prompt_cost(role, &o).unwrap();
                fixed += f;
                slots += s;
            }
            let named = EmbedOptions {
                method: Some(name.into()),
                ..Default::default()
            };
            let out = e.embed(&texts, role, &named).unwrap();
            // The same as the single method with the set written out.
            let written = e.embed(&texts, role, &opts(set.source())).unwrap();
            assert!(set.source().matches(PROMPT_SEPARATOR).count() == 2);
            for ((v, w), m) in out.vectors.iter().zip(&written.vectors).zip(&mean) {
                let m = kvembed_core::embedder::normalize(m.clone());
                let d = gap(v, &m);
                assert!(
                    d < 1e-5,
                    "{name} {role:?}: {d} from the mean of the templates"
                );
                assert_eq!(
                    v, w,
                    "{name} {role:?}: the named method and its written prompt"
                );
                let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{name}: norm {norm}");
            }
            assert_eq!(out.tokens, tokens, "{name} {role:?}: tokens run");
            assert_eq!(e.prompt_cost(role, &named).unwrap(), (fixed, slots));
            assert_eq!(slots, 3);
            // The first template alone differs from the ensemble.
            let first = e
                .embed(&texts, role, &opts(set.first().source()))
                .unwrap()
                .vectors;
            let d = gap(&first[0], &out.vectors[0]);
            assert!(d > 1e-4, "{name}: the ensemble equals its first template");
        }
    }
    // A set whose part has no placeholder is refused, naming the part.
    let bad = EmbedOptions {
        document_prompt: Some(format!("A {{text}}{PROMPT_SEPARATOR}no placeholder")),
        ..Default::default()
    };
    let err = e.embed(&texts, Role::Document, &bad).unwrap_err();
    assert!(err.to_string().contains("no placeholder"), "{err}");
}

#[test]
fn errors_are_specific() {
    let err = Embedder::load(&LoadSpec::new("/no/such/model.gguf"))
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("/no/such/model.gguf"), "{err}");

    // An unsupported architecture names itself.
    let tmp = std::env::temp_dir().join(format!("kvembed-arch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = golden_dir("llama");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "falcon".into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let err = Embedder::load(&LoadSpec::new(tmp.to_str().unwrap()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported architecture 'falcon'"),
        "{err}"
    );

    // A tokenizer larger than the embedding table does not match the weights.
    cfg["model_type"] = "llama".into();
    cfg["vocab_size"] = 100.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let err = Embedder::load(&LoadSpec::new(tmp.to_str().unwrap()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            kvembed_core::EngineError::TokenizerMismatch(_)
                | kvembed_core::EngineError::Corrupt { .. }
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn hf_repo_id_resolves_through_the_local_cache_only() {
    // Lay out a Hugging Face cache the way the hub client writes it.
    let cache = std::env::temp_dir().join(format!("kvembed-hf-cache-{}", std::process::id()));
    let snap = cache.join("models--tiny--llama/snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("models--tiny--llama/refs")).unwrap();
    std::fs::write(cache.join("models--tiny--llama/refs/main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(golden_dir("llama").join(f), snap.join(f)).unwrap();
    }
    std::env::set_var("HF_HUB_CACHE", &cache);
    let from_cache = Embedder::load(&LoadSpec::new("tiny/llama")).unwrap();
    let from_dir = Embedder::load(&LoadSpec::new(golden_dir("llama").to_str().unwrap())).unwrap();
    let ids = [5u32, 17, 42, 99];
    assert_eq!(
        from_cache.forward_hidden(&ids, None).unwrap(),
        from_dir.forward_hidden(&ids, None).unwrap()
    );
    // A repo that is not there is reported, never downloaded.
    let err = Embedder::load(&LoadSpec::new("tiny/absent"))
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("not in the local cache"), "{err}");
    std::fs::remove_dir_all(&cache).ok();
}
