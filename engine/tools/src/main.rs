//! `kvembed-lab`: the research command line. Every method and knob of the
//! core (pooling overrides, prefix and placeholder positions, ID
//! representations), STS/BEIR evaluation, the quality study behind
//! docs/QUALITY.md, forward-pass benchmarks and .npy output. The product
//! binary that PostgreSQL starts is `kvembed` (engine/server).

use clap::{Parser, Subcommand};
use kvembed_core::method::Knobs;
use kvembed_core::proto::{EmbedOptions, SelectOptions};
use kvembed_core::{Embedder, LoadSpec};
use kvembed_tools::{conformance, eval};
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
mod npy;
mod quality;

#[derive(Parser)]
#[command(
    name = "kvembed-lab",
    version,
    about = "The research command line of kvembed: every method and knob, evaluation, the quality study, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// GGUF file, Hugging Face model directory, or HF repo id in the local cache.
    #[arg(long, short, env = "KVEMBED_MODEL")]
    pub model: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Inference threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute dtype: f32, bf16, f16 or auto (f32 on the CPU, bf16 on CUDA).
    #[arg(long, env = "KVEMBED_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = kvembed_core::proto::DEFAULT_BATCH_TOKENS)]
    pub batch_tokens: usize,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Embedder, kvembed_core::EngineError> {
        let dtype = kvembed_core::model::decoder::parse_dtype(&self.dtype)?;
        let spec = LoadSpec {
            model: self.model.clone(),
            device: self.device.clone(),
            threads: self.threads,
            weights: None,
        };
        let mut e = Embedder::load_with_dtype(&spec, dtype)?;
        e.batch_tokens = self.batch_tokens.max(1);
        Ok(e)
    }

    /// Loads the model with `method`'s study overrides in effect.
    pub fn load_for(&self, method: &MethodArgs) -> Result<Embedder, kvembed_core::EngineError> {
        let mut e = self.load()?;
        e.knobs = method.knobs();
        Ok(e)
    }
}

#[derive(clap::Args, Clone, Default)]
pub struct MethodArgs {
    /// Method: kv (default), kv-no-reroute, kv-paper, kv-paper-no-reroute,
    /// kv-compress, kv-compress-no-reroute, kv-last, kv-echo, kv-tp, mean,
    /// last, prompteol, echo, token-prepending, kv-ensemble,
    /// prompteol-ensemble (see docs/METHODS.md).
    #[arg(long)]
    pub method: Option<String>,
    /// Re-routed layers, e.g. 6,7,8 or 6-8.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long)]
    pub bias: Option<f32>,
    /// Document prompt template with {text}; templates joined by {+} make
    /// a prompt ensemble (one pass each, unit vectors averaged).
    #[arg(long)]
    pub document_prompt: Option<String>,
    /// The same for queries.
    #[arg(long)]
    pub query_prompt: Option<String>,
    /// Maximum tokens per text (the prompt comes on top).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Fail instead of truncating texts longer than --max-tokens.
    #[arg(long)]
    pub no_truncate: bool,
    /// Pooling override: mean, last, hybrid, echo.
    #[arg(long)]
    pub pooling: Option<String>,
    /// Re-routed key position: last (as written) or zero.
    #[arg(long)]
    pub prefix_position: Option<String>,
    /// Token Prepending's placeholder position, 0 or 1 (default: right
    /// after BOS where the model adds one, else first).
    #[arg(long)]
    pub placeholder_position: Option<usize>,
}

impl MethodArgs {
    pub fn options(&self) -> Result<EmbedOptions, kvembed_core::EngineError> {
        Ok(EmbedOptions {
            method: self.method.clone(),
            layers: match &self.layers {
                Some(s) => kvembed_core::method::LayerChoice::parse_list(s)?,
                None => None,
            },
            bias: self.bias,
            document_prompt: self.document_prompt.clone(),
            query_prompt: self.query_prompt.clone(),
            max_tokens: self.max_tokens,
            truncate: Some(!self.no_truncate),
            expect_model: None,
            model: None,
        })
    }

    /// The study's overrides, which only this tool sets.
    pub fn knobs(&self) -> Knobs {
        Knobs {
            pooling: self.pooling.clone(),
            prefix_position: self.prefix_position.clone(),
            placeholder_position: self.placeholder_position,
            id_representation: None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Embed texts (arguments, or one per line from --file / stdin) to JSON or .npy.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        method: MethodArgs,
        /// Embed as queries (query-side prompt).
        #[arg(long)]
        query: bool,
        /// Read texts from this file, one per line ('-' for stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Write a .npy file instead of JSON on stdout.
        #[arg(long)]
        npy: Option<PathBuf>,
        texts: Vec<String>,
    },
    /// TwoNN intrinsic dimension per layer and the selected re-routing window.
    SelectLayers {
        #[command(flatten)]
        model: ModelArgs,
        /// Texts, one per line.
        #[arg(long)]
        file: PathBuf,
        /// Use at most this many texts.
        #[arg(long, default_value_t = 512)]
        sample: usize,
        #[arg(long, default_value_t = 0.2)]
        skip_fraction: f32,
        #[arg(long, default_value_t = 3)]
        window: usize,
        /// Representation: last or mean.
        #[arg(long, default_value = "last")]
        representation: String,
        /// twonn (the paper's: minimum intrinsic dimension) or agreement
        /// (the window and bias whose embeddings best tell each text's
        /// perturbed copy from the others'; see docs/QUALITY.md).
        #[arg(long, default_value = "twonn")]
        rule: String,
        /// The method the agreement rule chooses for (its layers and bias).
        #[command(flatten)]
        method: MethodArgs,
    },
    /// Evaluate on STS folders (Spearman) and/or a BEIR folder (nDCG@10).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        method: MethodArgs,
        /// STS root (year folders and/or sick/).
        #[arg(long)]
        sts: Option<PathBuf>,
        /// BEIR folder (corpus.jsonl, queries.jsonl, qrels/).
        #[arg(long)]
        beir: Option<PathBuf>,
        #[arg(long, default_value = "train")]
        split: String,
        /// Use at most this many pairs per STS file (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// BEIR: keep the first N queries (0 = all); the corpus then holds
        /// their judged documents plus distractors up to --beir-docs.
        #[arg(long, default_value_t = 0)]
        beir_queries: usize,
        /// BEIR: documents kept (every judged one, then distractors; 0 = all).
        #[arg(long, default_value_t = 0)]
        beir_docs: usize,
        /// Also score corpus calibrations of the space, each fitted on a
        /// seeded sample of the evaluation texts (STS: the sentences;
        /// BEIR: the documents): comma-separated `center`, `remove:K`,
        /// `whiten[:A]`.
        #[arg(long, default_value = "")]
        space: String,
        /// Sample sizes of the calibrations (comma-separated).
        #[arg(long, default_value = "1024")]
        space_sample: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Tokens/s for a batch shape (texts x tokens).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        method: MethodArgs,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long)]
        json: bool,
        /// Write the synthetic token id sequences of the shape as JSON to this
        /// file and exit without timing (so other runtimes get the same ids).
        #[arg(long)]
        dump_tokens: Option<PathBuf>,
        /// Time end-to-end embedding (prompt, tokenizer, forward pass, pooling)
        /// of the texts in this file, one per line, instead of a synthetic shape.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Also time this method, its runs alternating with --method's in the
        /// same process (e.g. --method kv-no-reroute --vs kv: the re-routing overhead).
        #[arg(long)]
        vs: Option<String>,
    },
    /// Greedy continuation of a prompt (checks that a backbone really works).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8)]
        max_new: usize,
        prompt: String,
    },
    /// Token ids, one JSON line per text: the tokenizer's own (default), or
    /// with --method what the model reads (BOS, prompt and text tokenized
    /// together). --corpus prints the tokenizer conformance corpus instead
    /// (one JSON string per line; see scripts/tokenizer_goldens.py).
    Tokenize {
        /// GGUF file or Hugging Face model directory.
        #[arg(long, short, env = "KVEMBED_MODEL")]
        model: Option<PathBuf>,
        /// Wrap each text as this method does (loads the whole model).
        #[arg(long)]
        method: Option<String>,
        /// With --method: the query-side prompt.
        #[arg(long)]
        query: bool,
        /// Print the conformance corpus (no model needed).
        #[arg(long)]
        corpus: bool,
        /// The corpus's STS root (its sentences in the prompts); without it
        /// the corpus holds the generated strings only.
        #[arg(long)]
        sts: Option<PathBuf>,
        /// Generated strings in the corpus.
        #[arg(long, default_value_t = conformance::DEFAULT_SYNTHETIC)]
        synthetic: usize,
        texts: Vec<String>,
    },
    /// The quality study: writes docs/QUALITY.md and its plots.
    Quality(quality::QualityArgs),
    /// The CPU features the engine's kernels use here (after KVEMBED_CPU), as JSON.
    Cpu,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = kvembed_core::model::cpu::check_env() {
        eprintln!("kvembed-lab: error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.cmd {
        Cmd::Cpu => {
            let f = kvembed_core::model::cpu::features();
            let json = serde_json::json!({
                "level": f.to_string(),
                "avx2_fma": f.avx2_fma,
                "avx512f": f.avx512f,
                "avx512bf16": f.avx512bf16,
                "amx_bf16": f.amx_bf16,
            });
            println!("{json}");
            Ok(())
        }
        Cmd::Embed {
            model,
            method,
            query,
            file,
            npy,
            texts,
        } => cli::embed(
            &model,
            &method,
            query,
            file.as_deref(),
            npy.as_deref(),
            texts,
        ),
        Cmd::SelectLayers {
            model,
            file,
            sample,
            skip_fraction,
            window,
            representation,
            rule,
            method,
        } => match rule.as_str() {
            "twonn" => {
                let opts = SelectOptions {
                    skip_fraction: Some(skip_fraction),
                    window: Some(window),
                    ..Default::default()
                };
                cli::select_layers(&model, &file, sample, &opts, representation)
            }
            "agreement" => cli::choose_by_agreement(&model, &method, &file, sample, window),
            other => Err(kvembed_core::EngineError::invalid(
                "rule",
                format!("'{other}' (twonn, agreement)"),
            )),
        },
        Cmd::Eval {
            model,
            method,
            sts,
            beir,
            split,
            limit,
            beir_queries,
            beir_docs,
            space,
            space_sample,
            json,
        } => cli::SpaceSpec::parse_list(&space, &space_sample).and_then(|spaces| {
            cli::eval(
                &model,
                &method,
                sts.as_deref(),
                beir.as_deref(),
                &split,
                cli::EvalLimits {
                    sts_pairs: limit,
                    beir_queries,
                    beir_docs,
                },
                &spaces,
                json,
            )
        }),
        Cmd::Bench {
            model,
            method,
            batch,
            tokens,
            repeat,
            json,
            dump_tokens,
            file,
            vs,
        } => match file {
            Some(f) => cli::bench_texts(&model, &method, &f, repeat, json),
            None => cli::bench(
                &model,
                &method,
                batch,
                tokens,
                repeat,
                json,
                dump_tokens.as_deref(),
                vs.as_deref(),
            ),
        },
        Cmd::Generate {
            model,
            max_new,
            prompt,
        } => model
            .load()
            .and_then(|e| e.generate(&prompt, max_new))
            .map(|s| println!("{prompt}{s}")),
        Cmd::Quality(args) => quality::run(&args),
        Cmd::Tokenize {
            model,
            method,
            query,
            corpus,
            sts,
            synthetic,
            texts,
        } => tokenize(model, method, query, corpus, sts, synthetic, texts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvembed-lab: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `kvembed-lab tokenize`.
fn tokenize(
    model: Option<PathBuf>,
    method: Option<String>,
    query: bool,
    corpus: bool,
    sts: Option<PathBuf>,
    synthetic: usize,
    texts: Vec<String>,
) -> kvembed_core::Result<()> {
    use kvembed_core::EngineError;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) ends the output quietly.
    let mut json = |v: serde_json::Value| writeln!(out, "{v}").is_ok();
    if corpus {
        let sentences = match &sts {
            Some(root) => conformance::sts_sentences(root)
                .map_err(|e| EngineError::invalid("--sts", e.to_string()))?,
            None => Vec::new(),
        };
        for s in conformance::corpus(&sentences, synthetic) {
            if !json(serde_json::Value::String(s)) {
                break;
            }
        }
        return Ok(());
    }
    let model =
        model.ok_or_else(|| EngineError::invalid("--model", "a model is needed (or --corpus)"))?;
    match method {
        None => {
            let tk = kvembed_core::model::tokenizer::TextTokenizer::open(&model)?;
            for t in &texts {
                json(serde_json::json!(tk.encode(t)?));
            }
        }
        Some(method) => {
            let e = Embedder::load(&LoadSpec::new(model.to_string_lossy().into_owned()))?;
            let role = if query {
                kvembed_core::proto::Role::Query
            } else {
                kvembed_core::proto::Role::Document
            };
            let opts = EmbedOptions {
                method: Some(method),
                ..Default::default()
            };
            for t in &texts {
                json(serde_json::json!(e.prompt_ids(t, role, &opts)?));
            }
        }
    }
    Ok(())
}
