//! `kvembed`: the program the PostgreSQL extension starts. It links the
//! embedding core and the server, nothing of the research tools
//! (`kvembed-lab` has those).
//!
//! ```text
//! kvembed serve --socket PATH --model M [--models LIST] [--device D] [--threads N] [--batch-tokens N]
//!               [--max-tokens N] [--max-tokens-limit N] [--max-calibration-texts N] [--allow-faults]
//! kvembed embed --model M [--device D] [--threads N] [--query] TEXT...
//! kvembed cpu
//! ```

use kvembed_core::proto::{
    EmbedOptions, Role, DEFAULT_BATCH_TOKENS, DEFAULT_MAX_CALIBRATION_TEXTS,
    DEFAULT_MAX_TOKENS_LIMIT,
};
use kvembed_core::{Embedder, EngineError, LoadSpec, Result};
use kvembed_server::{serve, ServeOptions};
use std::collections::HashMap;
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  kvembed serve --socket PATH --model MODEL [--models [NAME=]MODEL,...]
                [--device cpu|cuda|cuda:N|auto] [--threads N]
                [--batch-tokens N] [--max-tokens N] [--max-tokens-limit N] [--max-calibration-texts N]
                [--allow-faults]
      serve embeddings on a Unix socket (started by the PostgreSQL extension's worker);
      --models serves more models beside --model (requests name them);
      --allow-faults honours fault-injection requests (for the reliability tests)
  kvembed embed --model MODEL [--device D] [--threads N] [--query] TEXT...
      print the vectors of TEXTs (the server's defaults) as a JSON array
  kvembed cpu
      print the CPU features the engine's kernels use here (after KVEMBED_CPU), as JSON
  kvembed --version";

/// Flags of one subcommand: `--name value`, `--name=value` or a bare
/// switch, then positional arguments. Unknown flags are errors.
struct Args {
    values: HashMap<&'static str, String>,
    switches: Vec<&'static str>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String], valued: &[&'static str], switches: &[&'static str]) -> Result<Args> {
        let mut out = Args {
            values: HashMap::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(flag) = a.strip_prefix("--") else {
                out.positional.push(a.clone());
                continue;
            };
            if flag.is_empty() {
                out.positional.extend(it.by_ref().cloned());
                break;
            }
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if let Some(&n) = valued.iter().find(|&&n| n == name) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| EngineError::invalid(n, "needs a value"))?,
                };
                out.values.insert(n, v);
            } else if let Some(&n) = switches.iter().find(|&&n| n == name && inline.is_none()) {
                out.switches.push(n);
            } else {
                return Err(EngineError::invalid(
                    "arguments",
                    format!("unknown flag --{name}\n{USAGE}"),
                ));
            }
        }
        Ok(out)
    }

    fn string(&self, name: &'static str) -> Option<String> {
        self.values.get(name).cloned()
    }

    fn required(&self, name: &'static str) -> Result<String> {
        self.string(name)
            .ok_or_else(|| EngineError::invalid(name, format!("--{name} is required")))
    }

    fn number(&self, name: &'static str, default: usize) -> Result<usize> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| EngineError::invalid(name, format!("not a number: {v:?}"))),
        }
    }
}

fn serve_command(args: &[String]) -> Result<()> {
    let a = Args::parse(
        args,
        &[
            "socket",
            "model",
            "models",
            "device",
            "threads",
            "batch-tokens",
            "max-tokens",
            "max-tokens-limit",
            "max-calibration-texts",
        ],
        &["allow-faults"],
    )?;
    serve(ServeOptions {
        socket: a.required("socket")?.into(),
        model: a.required("model")?,
        models: a.string("models").unwrap_or_default(),
        device: a.string("device").unwrap_or_else(|| "cpu".into()),
        threads: a.number("threads", 0)?,
        batch_tokens: a.number("batch-tokens", DEFAULT_BATCH_TOKENS)?,
        max_tokens: a.number("max-tokens", DEFAULT_MAX_TOKENS_LIMIT)?,
        max_tokens_limit: a.number("max-tokens-limit", DEFAULT_MAX_TOKENS_LIMIT)?,
        max_calibration_texts: a.number("max-calibration-texts", DEFAULT_MAX_CALIBRATION_TEXTS)?,
        allow_faults: a.switches.contains(&"allow-faults"),
    })
}

fn embed_command(args: &[String]) -> Result<()> {
    let a = Args::parse(args, &["model", "device", "threads"], &["query"])?;
    if a.positional.is_empty() {
        return Err(EngineError::invalid("input", "no texts to embed"));
    }
    let spec = LoadSpec {
        model: a.required("model")?,
        device: a.string("device").unwrap_or_else(|| "cpu".into()),
        threads: a.number("threads", 0)?,
        weights: None,
    };
    let e = Embedder::load(&spec)?;
    let role = if a.switches.contains(&"query") {
        Role::Query
    } else {
        Role::Document
    };
    let out = e.embed(&a.positional, role, &EmbedOptions::default())?;
    for t in &out.truncated {
        eprintln!(
            "kvembed: notice: text {} truncated from {} to {} tokens",
            t.index, t.tokens, t.kept
        );
    }
    println!(
        "{}",
        serde_json::to_string(&out.vectors).map_err(|e| EngineError::Other(e.to_string()))?
    );
    Ok(())
}

fn cpu_command() -> Result<()> {
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = kvembed_core::model::cpu::check_env() {
        eprintln!("kvembed: error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve_command(&args[1..]),
        Some("embed") => embed_command(&args[1..]),
        Some("cpu") => cpu_command(),
        Some("--version" | "-V") => {
            println!("kvembed {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvembed: error: {e}");
            ExitCode::FAILURE
        }
    }
}
