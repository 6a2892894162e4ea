//! The `native` method, a model's own embedding, against Hugging Face
//! transformers + sentence-transformers' pooling on tiny generated models
//! (goldens made by scripts/make_encoder_goldens.py): a BERT encoder with
//! CLS pooling, prompts and a 24-token max_seq_length, and a decoder
//! embedding model in the Qwen3-Embedding layout (last token, EOS appended,
//! a query instruction).

use kvembed_core::embedder::Backbone;
use kvembed_core::model::loader::WeightFormat;
use kvembed_core::{Embedder, LoadSpec};
use kvembed_proto::{EmbedOptions, Role};
use std::path::PathBuf;

fn golden(name: &str) -> (Embedder, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let g =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    // f32 products, as the goldens (the decoder's default on a CPU without
    // AMX quantizes its weights to int8).
    let spec = LoadSpec {
        weights: Some(WeightFormat::F32),
        ..LoadSpec::new(dir.to_str().unwrap())
    };
    (Embedder::load(&spec).unwrap(), g)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Token ids and vectors as transformers gives them, each role embedded as
/// one padded batch of texts of different lengths (one over the model's
/// max_seq_length, cut as sentence-transformers cuts it).
fn matches_transformers(name: &str) -> Embedder {
    let (e, g) = golden(name);
    assert_eq!(e.info().default_method, "native", "{name}");
    let opts = EmbedOptions::default();
    for role in [Role::Query, Role::Document] {
        let role_name = if role == Role::Query {
            "query"
        } else {
            "document"
        };
        let cases: Vec<&serde_json::Value> = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["role"] == role_name)
            .collect();
        let texts: Vec<String> = cases
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect();
        for (c, t) in cases.iter().zip(&texts) {
            assert_eq!(
                e.prompt_ids(t, role, &opts).unwrap(),
                ids(&c["input_ids"]),
                "{name} {role_name}: {t:?}"
            );
        }
        let out = e.embed(&texts, role, &opts).unwrap();
        for ((c, t), v) in cases.iter().zip(&texts).zip(&out.vectors) {
            let want = floats(&c["embedding"]);
            assert_eq!(v.len(), want.len());
            let diff = v
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 2e-5, "{name} {role_name}: {t:?} differs by {diff}");
        }
        let longest = cases
            .iter()
            .map(|c| c["input_ids"].as_array().unwrap().len())
            .max()
            .unwrap();
        if longest == g["max_seq_length"].as_u64().unwrap() as usize {
            assert!(
                !out.truncated.is_empty(),
                "{name}: a text over max_seq_length is reported as truncated"
            );
        }
    }
    e
}

#[test]
fn a_bert_encoder_embeds_as_transformers_and_sentence_transformers() {
    let e = matches_transformers("bert");
    let (_, g) = golden("bert");
    // The encoder's final states, position by position.
    let Backbone::Encoder(enc) = &e.backbone else {
        panic!("bert loads as an encoder")
    };
    for h in g["hidden"].as_array().unwrap() {
        let want: Vec<Vec<f32>> = h["final_hidden"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let got = enc.forward(&[ids(&h["input_ids"])]).unwrap();
        let got = got.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }
    let info = e.info();
    assert_eq!(info.architecture, "bert");
    assert_eq!(info.dim, 32);
    assert_eq!(
        info.context, 24,
        "sentence_bert_config.json's max_seq_length"
    );
    assert_eq!(info.max_tokens, 22, "the context less [CLS] and [SEP]");
}

#[test]
fn a_decoder_embedding_model_gets_its_own_embedding_by_default() {
    let e = matches_transformers("qwen3-embedding");
    assert!(matches!(e.backbone, Backbone::Decoder(_)));
    // KV-Embedding still runs on it when asked for.
    let kv = EmbedOptions {
        method: Some("kv".into()),
        ..Default::default()
    };
    let v = e.embed(&["a cat".into()], Role::Document, &kv).unwrap();
    assert_eq!(v.vectors[0].len(), 32);
}

#[test]
fn an_encoder_refuses_the_decoder_methods_and_layer_selection_clearly() {
    let (e, _) = golden("bert");
    for m in ["kv", "prompteol", "token-prepending", "mean"] {
        let opts = EmbedOptions {
            method: Some(m.into()),
            ..Default::default()
        };
        let err = e.embed(&["a".into()], Role::Document, &opts).unwrap_err();
        assert_eq!(err.kind(), kvembed_proto::ErrorKind::InvalidInput, "{m}");
        assert!(
            err.to_string().contains("is an encoder (bert)"),
            "{m}: {err}"
        );
    }
    let unknown = EmbedOptions {
        method: Some("nope".into()),
        ..Default::default()
    };
    let err = e
        .embed(&["a".into()], Role::Document, &unknown)
        .unwrap_err();
    assert!(err.to_string().contains("'nope'"), "{err}");
    let texts: Vec<String> = (0..10).map(|i| format!("text {i}")).collect();
    let err = e
        .select_layers(&texts, &Default::default())
        .err()
        .expect("no layer selection on an encoder");
    assert!(err.to_string().contains("is an encoder"), "{err}");
}

#[test]
fn a_roberta_style_encoder_is_refused_by_name_not_run_wrongly() {
    let dir = std::env::temp_dir().join(format!("kvembed-roberta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "hidden_size": 32}"#,
    )
    .unwrap();
    let err = Embedder::load(&LoadSpec::new(dir.to_str().unwrap()))
        .err()
        .expect("an XLM-R directory does not load");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.kind(), kvembed_proto::ErrorKind::ModelLoad, "{err}");
    assert!(
        err.to_string()
            .contains("unsupported architecture 'xlm-roberta'")
            && err.to_string().contains("the encoder bert"),
        "{err}"
    );
}

#[test]
fn a_plain_decoder_has_no_native_method() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/qwen3");
    let e = Embedder::load(&LoadSpec::new(dir.to_str().unwrap())).unwrap();
    assert_eq!(e.info().default_method, "kv");
    let opts = EmbedOptions {
        method: Some("native".into()),
        ..Default::default()
    };
    let err = e.embed(&["a".into()], Role::Document, &opts).unwrap_err();
    assert!(err.to_string().contains("no embedding of its own"), "{err}");
}

/// A GGUF embedding model as llama.cpp converts one (here SmolLM2's weights
/// with `llama.pooling_type = 3` and `tokenizer.ggml.add_eos_token`, written
/// to a new file): `native` by default, the text's tokens and a final EOS,
/// the vector the final state of that EOS.
#[test]
fn a_gguf_embedding_model_pools_as_its_metadata_says() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::Device;
    let dir = std::env::var("KVEMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let src = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        src.is_file(),
        "{} missing: run scripts/fetch-models.sh smollm2",
        src.display()
    );
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| *k != "llama.pooling_type" && *k != "tokenizer.ggml.add_eos_token")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.push(("llama.pooling_type".into(), Value::U32(3)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)));
    let tensors: Vec<(String, _)> = content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let out = std::env::temp_dir().join(format!("kvembed-embedding-{}.gguf", std::process::id()));
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &_)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &md_refs, &t_refs).unwrap();
    }
    let e = Embedder::load(&LoadSpec::new(out.to_str().unwrap()));
    std::fs::remove_file(&out).unwrap();
    let e = e.unwrap();
    assert_eq!(e.info().default_method, "native");
    let text = "A man is playing a guitar.";
    let opts = EmbedOptions::default();
    let ids = e.prompt_ids(text, Role::Query, &opts).unwrap();
    let eos = e.tokenizer.eos.expect("SmolLM2 has an EOS");
    let mut want = e.tokenizer.specials.0.clone();
    want.extend(e.tokenizer.encode(text).unwrap());
    want.push(eos);
    assert_eq!(ids, want, "no prompt, the text, then EOS");
    let v = &e.embed(&[text.into()], Role::Query, &opts).unwrap().vectors[0];
    let hidden = e.forward_hidden(&ids, None).unwrap();
    let last = kvembed_core::embedder::normalize(hidden.last().unwrap().clone());
    let diff = v
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-5,
        "the final EOS state, normalised: off by {diff}"
    );
    let kv = EmbedOptions {
        method: Some("kv".into()),
        ..Default::default()
    };
    let other = &e.embed(&[text.into()], Role::Query, &kv).unwrap().vectors[0];
    assert!(
        v.iter().zip(other).any(|(a, b)| (a - b).abs() > 1e-3),
        "kv is another method"
    );
}
