//! A model's own embedding, the method `native`: how a model trained for
//! embeddings makes one, read from the sentence-transformers files beside
//! its weights (the format every such model on the Hugging Face hub ships):
//!
//! * `modules.json` lists the pipeline: Transformer → Pooling → (Normalize);
//!   a Dense projection after pooling is refused with a clear error;
//! * the pooling module's `config.json` (`1_Pooling/config.json`): mean,
//!   CLS (first token) or last token (decoder embedding models such as
//!   Qwen3-Embedding and gte-Qwen2);
//! * `config_sentence_transformers.json`: the prompts a query and a document
//!   are prefixed with (`Instruct: …\nQuery:` for Qwen3-Embedding,
//!   `query: ` / `passage: ` for e5);
//! * `sentence_bert_config.json`: the input length the model was trained on
//!   (`max_seq_length`, special tokens included).
//!
//! A GGUF file converted from such a model by llama.cpp carries the pooling
//! alone (`<arch>.pooling_type`: mean, CLS or last) and whether its
//! tokenizer ends an input with EOS; it has no prompts (set
//! `kvembed.query_prompt` for a query instruction) ([`from_gguf`]).
//!
//! Every input is wrapped in the special tokens the model's own tokenizer
//! adds (`[CLS]` … `[SEP]`, an EOS), and vectors are L2-normalised as for
//! every method. An encoder without these files gets mean pooling and no
//! prompts, as sentence-transformers gives a bare model.

use crate::method::{Method, Pooling, PromptSet, Template};
use kvembed_model::error::{EngineError, Result};
use serde_json::Value;
use std::path::Path;

/// The `native` method of one model, and what it was read from.
#[derive(Debug, Clone)]
pub struct Native {
    pub method: Method,
    /// Longest input the model was trained on, special tokens and prompt
    /// included (`max_seq_length`), where the files say.
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

/// The pooling a sentence-transformers Pooling config asks for.
fn pooling_of(config: &Value, path: &Path) -> Result<Pooling> {
    let on = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    let refuse = |what: &str| {
        Err(EngineError::NotAModel {
            path: path.to_path_buf(),
            reason: format!("{what} pooling is not supported (mean, CLS and last token are)"),
        })
    };
    // Newer files name the mode; older ones set one flag each.
    if let Some(mode) = config.get("pooling_mode").and_then(Value::as_str) {
        return match mode {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::First),
            "lasttoken" => Ok(Pooling::Last),
            other => refuse(other),
        };
    }
    let modes = [
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_cls_token", Some(Pooling::First)),
        ("pooling_mode_lasttoken", Some(Pooling::Last)),
        ("pooling_mode_max_tokens", None),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
    ];
    let chosen: Vec<_> = modes.iter().filter(|(k, _)| on(k)).collect();
    match chosen.as_slice() {
        [] => Ok(Pooling::Mean),
        [(_, Some(p))] => Ok(*p),
        [(k, None)] => refuse(
            k.trim_start_matches("pooling_mode_")
                .trim_end_matches("_tokens"),
        ),
        _ => refuse("combined"),
    }
}

/// The model's own embedding from the files in `dir`. `encoder`: the model
/// is an encoder, which gets mean pooling where no file says otherwise; a
/// decoder without a pooling config has no native embedding (`None`).
pub fn read(dir: &Path, encoder: bool) -> Result<Option<Native>> {
    let mut pooling_dir = None;
    if let Some(modules) = read_json(&dir.join("modules.json"))? {
        for m in modules.as_array().into_iter().flatten() {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            let sub = m.get("path").and_then(Value::as_str).unwrap_or("");
            match kind.rsplit('.').next().unwrap_or("") {
                "Transformer" | "Normalize" => {}
                "Pooling" => pooling_dir = Some(dir.join(sub)),
                other => {
                    return Err(EngineError::NotAModel {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "its sentence-transformers pipeline has a '{other}' module, which \
                             kvembed does not run (Transformer, Pooling and Normalize only)"
                        ),
                    })
                }
            }
        }
    } else if dir.join("1_Pooling/config.json").is_file() {
        pooling_dir = Some(dir.join("1_Pooling"));
    }
    let pooling = match &pooling_dir {
        Some(p) => {
            let path = p.join("config.json");
            match read_json(&path)? {
                Some(cfg) => {
                    if cfg.get("include_prompt").and_then(Value::as_bool) == Some(false) {
                        return Err(EngineError::NotAModel {
                            path,
                            reason: "pooling that leaves the prompt out (include_prompt: false) \
                                     is not supported"
                                .into(),
                        });
                    }
                    Some(pooling_of(&cfg, &path)?)
                }
                None => None,
            }
        }
        None => None,
    };
    let pooling = match (pooling, encoder) {
        (Some(p), _) => p,
        (None, true) => Pooling::Mean,
        (None, false) => return Ok(None),
    };
    let st = read_json(&dir.join("config_sentence_transformers.json"))?.unwrap_or(Value::Null);
    let prompts = st.get("prompts").cloned().unwrap_or(Value::Null);
    let prompt = |names: &[&str]| -> String {
        names
            .iter()
            .find_map(|n| prompts.get(*n).and_then(Value::as_str))
            .map(str::to_string)
            .or_else(|| {
                st.get("default_prompt_name")
                    .and_then(Value::as_str)
                    .and_then(|n| prompts.get(n))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    let template = |p: String| Template::parse(&format!("{}{{text}}", p.replace("{text}", "")));
    let method = Method {
        name: "native".into(),
        query: PromptSet::single(template(prompt(&["query"]))?),
        document: PromptSet::single(template(prompt(&[
            "document", "passage", "corpus", "text",
        ]))?),
        pooling,
        reroute: None,
        prepend: None,
        specials: true,
    };
    let max_seq_length = read_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|v| v.get("max_seq_length").and_then(Value::as_u64))
        .map(|n| n as usize)
        .filter(|&n| n > 0);
    Ok(Some(Native {
        method,
        max_seq_length,
    }))
}

/// The `native` method of a GGUF embedding model, from llama.cpp's
/// `<arch>.pooling_type` (1 mean, 2 CLS, 3 last token); `None` for a model
/// without one (0, or a generative model) and for a reranker (4, rank).
pub fn from_gguf(
    md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
) -> Option<Native> {
    let arch = md.get("general.architecture")?.to_string().ok()?.clone();
    let pooling = match md.get(&format!("{arch}.pooling_type"))?.to_u32().ok()? {
        1 => Pooling::Mean,
        2 => Pooling::First,
        3 => Pooling::Last,
        _ => return None,
    };
    let raw = Template::parse("{text}").expect("a template with its placeholder");
    Some(Native {
        method: Method {
            name: "native".into(),
            document: PromptSet::single(raw.clone()),
            query: PromptSet::single(raw),
            pooling,
            reroute: None,
            prepend: None,
            specials: true,
        },
        max_seq_length: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvembed-native-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, body) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        dir
    }

    #[test]
    fn a_decoder_embedding_model_gets_last_token_pooling_and_its_query_instruction() {
        let dir = dir_with(&[
            (
                "modules.json",
                r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                    {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                    {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
            ),
            (
                "1_Pooling/config.json",
                r#"{"word_embedding_dimension": 64, "pooling_mode_lasttoken": true, "include_prompt": true}"#,
            ),
            (
                "config_sentence_transformers.json",
                r#"{"prompts": {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:", "document": ""}, "default_prompt_name": null}"#,
            ),
        ]);
        let n = read(&dir, false).unwrap().expect("a native method");
        assert_eq!(n.method.pooling, Pooling::Last);
        assert!(n.method.specials);
        assert_eq!(
            n.method.query.first().render("x"),
            "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:x"
        );
        assert_eq!(n.method.document.first().render("x"), "x");
        assert_eq!(n.max_seq_length, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pooling_modes_are_read_and_unsupported_ones_refused() {
        let p = Path::new("x");
        let cfg = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(
            pooling_of(&cfg(r#"{"pooling_mode_cls_token": true}"#), p).unwrap(),
            Pooling::First
        );
        assert_eq!(
            pooling_of(
                &cfg(r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#),
                p
            )
            .unwrap(),
            Pooling::Mean
        );
        assert_eq!(
            pooling_of(&cfg(r#"{"pooling_mode": "lasttoken"}"#), p).unwrap(),
            Pooling::Last
        );
        let e = pooling_of(&cfg(r#"{"pooling_mode_max_tokens": true}"#), p).unwrap_err();
        assert!(
            e.to_string().contains("max pooling is not supported"),
            "{e}"
        );
        let e = pooling_of(
            &cfg(r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#),
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("combined"), "{e}");
    }

    #[test]
    fn a_dense_module_is_refused_and_a_bare_decoder_has_no_native_method() {
        let dir = dir_with(&[(
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
        )]);
        let e = read(&dir, true).unwrap_err();
        assert!(e.to_string().contains("'Dense' module"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
        let empty = dir_with(&[("config.json", "{}")]);
        assert!(read(&empty, false).unwrap().is_none());
        let enc = read(&empty, true)
            .unwrap()
            .expect("encoders default to mean pooling");
        assert_eq!(enc.method.pooling, Pooling::Mean);
        assert_eq!(enc.method.query.first().render("x"), "x");
        std::fs::remove_dir_all(empty).unwrap();
    }
}
