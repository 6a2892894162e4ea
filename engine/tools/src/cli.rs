//! Command implementations of the `kvembed` tool.

use crate::eval::{self, StsSet};
use crate::{MethodArgs, ModelArgs};
use indicatif::{ProgressBar, ProgressStyle};
use kvembed_core::proto::{EmbedOptions, Role, SelectOptions};
use kvembed_core::space::{self, SpaceFit};
use kvembed_core::{Embedder, EngineError, Result};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::io(path, e)
}

pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let lines: Vec<String> = if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(io_err(path))?
    } else {
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        std::io::BufReader::new(f)
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(io_err(path))?
    };
    Ok(lines.into_iter().filter(|l| !l.trim().is_empty()).collect())
}

pub fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Embed many texts in chunks so a progress bar can follow.
/// Tokens (prompts included) embedded by `embed_all` so far in this process.
pub static TOKENS_EMBEDDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn embed_all(
    e: &Embedder,
    texts: &[String],
    role: Role,
    opts: &EmbedOptions,
    what: &str,
) -> Result<Vec<Vec<f32>>> {
    let pb = progress(texts.len(), what);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(256) {
        let r = e.embed(chunk, role, opts)?;
        TOKENS_EMBEDDED.fetch_add(r.tokens, std::sync::atomic::Ordering::Relaxed);
        out.extend(r.vectors);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

pub fn embed(
    model: &ModelArgs,
    method: &MethodArgs,
    query: bool,
    file: Option<&Path>,
    npy: Option<&Path>,
    mut texts: Vec<String>,
) -> Result<()> {
    if let Some(f) = file {
        texts.extend(read_lines(f)?);
    }
    if texts.is_empty() {
        return Err(EngineError::invalid(
            "input",
            "no texts (give them as arguments or with --file)",
        ));
    }
    let e = model.load_for(method)?;
    let role = if query { Role::Query } else { Role::Document };
    let opts = method.options()?;
    let out = e.embed(&texts, role, &opts)?;
    for t in &out.truncated {
        eprintln!(
            "kvembed: notice: text {} truncated from {} to {} tokens",
            t.index, t.tokens, t.kept
        );
    }
    match npy {
        Some(p) => {
            crate::npy::write_npy_f32(p, &out.vectors).map_err(io_err(p))?;
            eprintln!(
                "wrote {} x {} to {}",
                out.vectors.len(),
                e.info().dim,
                p.display()
            );
        }
        None => println!(
            "{}",
            serde_json::to_string(&out.vectors).map_err(|e| EngineError::Other(e.to_string()))?
        ),
    }
    Ok(())
}

pub fn select_layers(
    model: &ModelArgs,
    file: &Path,
    sample: usize,
    opts: &SelectOptions,
    representation: String,
) -> Result<()> {
    let mut texts = read_lines(file)?;
    texts.truncate(sample.max(1));
    let mut e = model.load()?;
    e.knobs.id_representation = Some(representation);
    let pb = progress(texts.len(), "layers");
    let sel = e.select_layers_with_progress(&texts, opts, |n| {
        pb.inc(n as u64);
        true
    })?;
    pb.finish_and_clear();
    println!("layer\tintrinsic_dimension\tselected");
    for p in &sel.curve {
        println!("{}\t{:.3}\t{}", p.layer, p.intrinsic_dimension, p.selected);
    }
    println!("# {}", sel.rule);
    Ok(())
}

/// The agreement rule's choice of window and bias on the first `sample`
/// lines of `file`, with every candidate's score.
pub fn choose_by_agreement(
    model: &ModelArgs,
    method: &MethodArgs,
    file: &Path,
    sample: usize,
    window: usize,
) -> Result<()> {
    let mut texts = read_lines(file)?;
    texts.truncate(sample.max(1));
    let mut e = model.load()?;
    e.knobs = method.knobs();
    let base = method.options()?;
    let n = e.decoder()?.cfg.n_layers;
    let family = e.decoder()?.cfg.family;
    let candidates = kvembed_core::agreement::windows_to_score(n, window, family).len();
    let total = 2 * texts.len() * (candidates + kvembed_core::agreement::BIASES.len() - 1);
    let pb = progress(total, "texts");
    let choice = e.choose_by_agreement(&texts, &base, window, true, |k| {
        pb.inc(k as u64);
        true
    })?;
    pb.finish_and_clear();
    println!("layers\tbias\tagreement\tstability\tchosen");
    for p in &choice.points {
        let layers = match (p.layers.first(), p.layers.last()) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "none".to_string(),
        };
        let chosen = p.layers == choice.layers && p.bias == choice.bias;
        println!(
            "{layers}\t{}\t{:.4}\t{:.4}\t{chosen}",
            p.bias, p.score, p.stability
        );
    }
    let default = kvembed_core::method::LayerChoice::KvDefault { width: window }.resolve(n, family);
    if let (Some(a), Some(b)) = (default.first(), default.last()) {
        println!("# default window {a}-{b}");
    }
    println!("# {}", choice.rule);
    Ok(())
}

/// Spearman × 100 per STS file, embedding each distinct sentence once.
pub fn eval_sts(
    e: &Embedder,
    sets: &[StsSet],
    opts: &EmbedOptions,
    limit: usize,
) -> Result<Vec<(String, String, f64)>> {
    let mut out = eval_sts_spaces(e, sets, opts, limit, &[])?;
    Ok(out.remove(0).1)
}

/// A corpus calibration of the space to evaluate: fitted on `sample` of the
/// evaluation texts themselves (drawn with a fixed seed), as a user
/// calibrates on a sample of the column being embedded; gold scores are
/// never used.
#[derive(Clone, Copy, Debug)]
pub struct SpaceSpec {
    pub fit: SpaceFit,
    pub sample: usize,
}

impl SpaceSpec {
    pub fn label(&self) -> String {
        format!("{}@{}", self.fit.name(), self.sample)
    }

    /// Every fit of `fits` (comma-separated) with every size of `samples`.
    pub fn parse_list(fits: &str, samples: &str) -> Result<Vec<SpaceSpec>> {
        let mut out = Vec::new();
        for f in fits.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let fit = SpaceFit::parse(f)?;
            for n in samples.split(',').map(str::trim) {
                let sample = n.parse::<usize>().ok().filter(|&n| n >= 2).ok_or_else(|| {
                    EngineError::invalid("space sample size", format!("'{n}' (2 or more)"))
                })?;
                out.push(SpaceSpec { fit, sample });
            }
        }
        Ok(out)
    }

    /// Fits on a seeded sample of `fit_on` and maps `targets`.
    pub fn map_all(&self, fit_on: &[Vec<f32>], targets: &mut [&mut Vec<Vec<f32>>]) -> Result<()> {
        let picked: Vec<Vec<f32>> = sample_indices(fit_on.len(), self.sample, SPACE_SEED)
            .into_iter()
            .map(|i| fit_on[i].clone())
            .collect();
        let map = space::fit(&picked, self.fit)?;
        for vecs in targets.iter_mut() {
            for v in vecs.iter_mut() {
                map.apply(v);
            }
        }
        Ok(())
    }
}

/// The seed of the evaluation's calibration samples.
pub const SPACE_SEED: u64 = 0x6b76_656d_6265_6421;

/// `k` distinct indices below `n` (all of them when `k >= n`), a seeded
/// partial Fisher-Yates shuffle.
pub fn sample_indices(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut state = seed | 1;
    let k = k.min(n);
    for i in 0..k {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = i + (state % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// Spearman x 100 per STS file, for the raw space (label "raw") and then for
/// each calibration of `spaces`; the texts are embedded once.
pub fn eval_sts_spaces(
    e: &Embedder,
    sets: &[StsSet],
    opts: &EmbedOptions,
    limit: usize,
    spaces: &[SpaceSpec],
) -> Result<Vec<(String, Vec<(String, String, f64)>)>> {
    let take = if limit == 0 { usize::MAX } else { limit };
    let mut uniq: HashMap<&str, usize> = HashMap::new();
    let mut texts: Vec<String> = Vec::new();
    for s in sets {
        for p in s.pairs.iter().take(take) {
            for t in [&p.a, &p.b] {
                if !uniq.contains_key(t.as_str()) {
                    uniq.insert(t.as_str(), texts.len());
                    texts.push(t.clone());
                }
            }
        }
    }
    let raw = embed_all(e, &texts, Role::Document, opts, "sts")?;
    let score = |vecs: &[Vec<f32>]| -> Vec<(String, String, f64)> {
        sets.iter()
            .map(|s| {
                let pairs: Vec<_> = s.pairs.iter().take(take).collect();
                let sims: Vec<f64> = pairs
                    .iter()
                    .map(|p| eval::cosine(&vecs[uniq[p.a.as_str()]], &vecs[uniq[p.b.as_str()]]))
                    .collect();
                let gold: Vec<f64> = pairs.iter().map(|p| p.score).collect();
                (
                    s.group.clone(),
                    s.name.clone(),
                    100.0 * eval::spearman(&sims, &gold),
                )
            })
            .collect()
    };
    let mut out = vec![("raw".to_string(), score(&raw))];
    for spec in spaces {
        let mut vecs = raw.clone();
        spec.map_all(&raw, &mut [&mut vecs])?;
        out.push((spec.label(), score(&vecs)));
    }
    Ok(out)
}

/// Average per group (STS12, ..., SICK) of the per-file scores.
pub fn group_means(rows: &[(String, String, f64)]) -> Vec<(String, f64)> {
    let mut groups: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    groups.dedup();
    groups
        .into_iter()
        .map(|g| {
            let xs: Vec<f64> = rows.iter().filter(|r| r.0 == g).map(|r| r.2).collect();
            (g, eval::mean(&xs))
        })
        .collect()
}

pub struct RetrievalResult {
    pub ndcg10: f64,
    pub alignment: f64,
    pub uniformity: f64,
    pub queries: usize,
    pub docs: usize,
}

/// nDCG@10, alignment and uniformity on a BEIR folder. `max_queries` keeps
/// the first N queries (0 = all); the corpus keeps every document judged for
/// the kept queries plus unjudged distractors up to `max_docs` (0 = all).
pub fn eval_beir(
    e: &Embedder,
    root: &Path,
    split: &str,
    opts: &EmbedOptions,
    max_docs: usize,
    max_queries: usize,
) -> Result<RetrievalResult> {
    let mut out = eval_beir_spaces(e, root, split, opts, max_docs, max_queries, &[])?;
    Ok(out.remove(0).1)
}

/// [`eval_beir`] for the raw space (label "raw") and then for each
/// calibration of `spaces`, fitted on a sample of the documents and applied
/// to documents and queries alike; the texts are embedded once.
pub fn eval_beir_spaces(
    e: &Embedder,
    root: &Path,
    split: &str,
    opts: &EmbedOptions,
    max_docs: usize,
    max_queries: usize,
    spaces: &[SpaceSpec],
) -> Result<Vec<(String, RetrievalResult)>> {
    let mut b = eval::load_beir(root, split).map_err(io_err(root))?;
    if max_queries > 0 && b.queries.len() > max_queries {
        b.queries.truncate(max_queries);
        let kept: std::collections::HashSet<String> =
            b.queries.iter().map(|q| q.0.clone()).collect();
        b.qrels.retain(|q, _| kept.contains(q));
    }
    let judged: std::collections::HashSet<&str> = b
        .qrels
        .values()
        .flat_map(|m| m.keys().map(String::as_str))
        .collect();
    let mut docs: Vec<&(String, String)> = b
        .corpus
        .iter()
        .filter(|d| judged.contains(d.0.as_str()))
        .collect();
    for d in &b.corpus {
        if max_docs > 0 && docs.len() >= max_docs {
            break;
        }
        if !judged.contains(d.0.as_str()) {
            docs.push(d);
        }
    }
    let doc_ids: Vec<String> = docs.iter().map(|d| d.0.clone()).collect();
    let doc_texts: Vec<String> = docs.iter().map(|d| d.1.clone()).collect();
    let q_ids: Vec<String> = b.queries.iter().map(|q| q.0.clone()).collect();
    let q_texts: Vec<String> = b.queries.iter().map(|q| q.1.clone()).collect();
    let raw_dv = embed_all(e, &doc_texts, Role::Document, opts, "documents")?;
    let raw_qv = embed_all(e, &q_texts, Role::Query, opts, "queries")?;
    // Alignment over (query, relevant document) pairs; uniformity over documents.
    let pos: HashMap<&str, usize> = doc_ids
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect();
    let mut pairs = Vec::new();
    for (qi, q) in q_ids.iter().enumerate() {
        if let Some(rel) = b.qrels.get(q) {
            for d in rel.keys() {
                if let Some(&di) = pos.get(d.as_str()) {
                    pairs.push((qi, di));
                }
            }
        }
    }
    let result = |qv: &[Vec<f32>], dv: &[Vec<f32>]| {
        let ndcg = eval::retrieval_ndcg(qv, &q_ids, dv, &doc_ids, &b.qrels, 10);
        let pa: Vec<Vec<f32>> = pairs.iter().map(|&(q, _)| qv[q].clone()).collect();
        let pb: Vec<Vec<f32>> = pairs.iter().map(|&(_, d)| dv[d].clone()).collect();
        RetrievalResult {
            ndcg10: 100.0 * ndcg,
            alignment: eval::alignment(&pa, &pb),
            uniformity: eval::uniformity(dv),
            queries: q_ids.len(),
            docs: doc_ids.len(),
        }
    };
    let mut out = vec![("raw".to_string(), result(&raw_qv, &raw_dv))];
    for spec in spaces {
        let (mut dv, mut qv) = (raw_dv.clone(), raw_qv.clone());
        spec.map_all(&raw_dv, &mut [&mut dv, &mut qv])?;
        out.push((spec.label(), result(&qv, &dv)));
    }
    Ok(out)
}

/// How much of the evaluation data `kvembed eval` uses (0 = all).
pub struct EvalLimits {
    /// Pairs per STS file.
    pub sts_pairs: usize,
    /// BEIR queries (the first N).
    pub beir_queries: usize,
    /// BEIR documents (judged ones first, then distractors).
    pub beir_docs: usize,
}

pub fn eval(
    model: &ModelArgs,
    method: &MethodArgs,
    sts: Option<&Path>,
    beir: Option<&Path>,
    split: &str,
    limits: EvalLimits,
    spaces: &[SpaceSpec],
    json: bool,
) -> Result<()> {
    if sts.is_none() && beir.is_none() {
        return Err(EngineError::invalid(
            "eval",
            "give --sts DIR and/or --beir DIR",
        ));
    }
    let e = model.load_for(method)?;
    let opts = method.options()?;
    let mut report = serde_json::Map::new();
    if let Some(root) = sts {
        let sets = eval::load_sts_root(root).map_err(io_err(root))?;
        let t0 = Instant::now();
        let by_space = eval_sts_spaces(&e, &sets, &opts, limits.sts_pairs, spaces)?;
        if json {
            let mut files = serde_json::Map::new();
            let mut groups = serde_json::Map::new();
            for (label, rows) in &by_space {
                files.insert(label.clone(), serde_json::json!(rows));
                groups.insert(label.clone(), serde_json::json!(group_means(rows)));
            }
            // "sts_files"/"sts_groups" stay the raw space's, as before.
            report.insert("sts_files".into(), files["raw"].clone());
            report.insert("sts_groups".into(), groups["raw"].clone());
            if !spaces.is_empty() {
                report.insert("sts_groups_by_space".into(), groups.into());
            }
        } else {
            let labels: Vec<&str> = by_space.iter().map(|(l, _)| l.as_str()).collect();
            println!("group\tfile\t{}", labels.join("\t"));
            let rows = &by_space[0].1;
            for (i, (g, n, _)) in rows.iter().enumerate() {
                let cells: Vec<String> = by_space
                    .iter()
                    .map(|(_, r)| format!("{:.2}", r[i].2))
                    .collect();
                println!("{g}\t{n}\t{}", cells.join("\t"));
            }
            let means: Vec<Vec<(String, f64)>> =
                by_space.iter().map(|(_, r)| group_means(r)).collect();
            for (i, (g, _)) in means[0].iter().enumerate() {
                let cells: Vec<String> = means.iter().map(|m| format!("{:.2}", m[i].1)).collect();
                println!("{g}\tmean\t{}", cells.join("\t"));
            }
            let avg: Vec<String> = means
                .iter()
                .map(|m| {
                    format!(
                        "{:.2}",
                        eval::mean(&m.iter().map(|x| x.1).collect::<Vec<_>>())
                    )
                })
                .collect();
            println!("all\tmean of groups\t{}", avg.join("\t"));
            println!("# {:.1}s", t0.elapsed().as_secs_f64());
        }
    }
    if let Some(root) = beir {
        let by_space = eval_beir_spaces(
            &e,
            root,
            split,
            &opts,
            limits.beir_docs,
            limits.beir_queries,
            spaces,
        )?;
        let as_json = |r: &RetrievalResult| serde_json::json!({"ndcg@10": r.ndcg10, "alignment": r.alignment, "uniformity": r.uniformity, "queries": r.queries, "docs": r.docs});
        if json {
            report.insert("retrieval".into(), as_json(&by_space[0].1));
            if !spaces.is_empty() {
                let all: serde_json::Map<String, serde_json::Value> = by_space
                    .iter()
                    .map(|(l, r)| (l.clone(), as_json(r)))
                    .collect();
                report.insert("retrieval_by_space".into(), all.into());
            }
        } else {
            println!("space\tnDCG@10\talignment\tuniformity");
            for (label, r) in &by_space {
                println!(
                    "{label}\t{:.2}\t{:.4}\t{:.4}",
                    r.ndcg10, r.alignment, r.uniformity
                );
            }
            let r = &by_space[0].1;
            println!("# {} queries, {} documents", r.queries, r.docs);
        }
    }
    if json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

/// Synthetic texts of exactly `tokens` tokens each (cycling a vocabulary of
/// ordinary words), so the shape is what was asked.
pub fn synthetic_texts(e: &Embedder, batch: usize, tokens: usize) -> Result<Vec<Vec<u32>>> {
    let base = "the quick brown fox jumps over the lazy dog while a database indexes vectors for semantic search ";
    let ids = e.tokenizer.encode(&base.repeat(tokens / 8 + 2))?;
    Ok((0..batch)
        .map(|i| {
            ids.iter()
                .cycle()
                .skip(i % 7)
                .take(tokens)
                .copied()
                .collect()
        })
        .collect())
}

/// The forward options of `m` (its re-routing resolved for this model).
fn forward_options(
    e: &Embedder,
    m: &kvembed_core::method::Method,
) -> Result<kvembed_core::model::decoder::ForwardOptions> {
    let n = e.decoder()?.cfg.n_layers;
    let reroute = match &m.reroute {
        Some(r) => Some(kvembed_core::model::decoder::Reroute::new(
            &r.layers.resolve(n, e.decoder()?.cfg.family),
            n,
            r.bias,
            r.prefix,
        )?),
        None => None,
    };
    Ok(kvembed_core::model::decoder::ForwardOptions {
        reroute,
        ..Default::default()
    })
}

/// Seconds of one pass over `seqs`, packed by the embedder's token budget as
/// embedding does.
fn forward_seconds(
    e: &Embedder,
    seqs: &[Vec<u32>],
    fo: &kvembed_core::model::decoder::ForwardOptions,
) -> Result<f64> {
    let per_batch = (e.batch_tokens / seqs.first().map_or(1, |s| s.len().max(1))).max(1);
    let t0 = Instant::now();
    for chunk in seqs.chunks(per_batch) {
        e.decoder()?.forward(chunk, fo)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Median seconds of the forward pass (no prompt, no pooling) over `batch`
/// synthetic texts of exactly `len` tokens with `method`'s re-routing, after
/// a warm-up, and the tokens/s that gives.
pub fn time_forward(
    e: &Embedder,
    method: &str,
    batch: usize,
    len: usize,
    repeat: usize,
) -> Result<(f64, f64)> {
    let fopts = forward_options(e, &kvembed_core::method::Method::from_name(method)?)?;
    let seqs = synthetic_texts(e, batch, len)?;
    forward_seconds(e, &seqs, &fopts)?;
    let times = (0..repeat.max(1))
        .map(|_| forward_seconds(e, &seqs, &fopts))
        .collect::<Result<Vec<f64>>>()?;
    let med = median(&times);
    Ok((med, (batch * len) as f64 / med))
}

/// The median of run times (the mean of the two middle values for an even
/// count; NaN for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn bench(
    model: &ModelArgs,
    method: &MethodArgs,
    batch: usize,
    tokens: usize,
    repeat: usize,
    json: bool,
    dump_tokens: Option<&Path>,
    vs: Option<&str>,
) -> Result<()> {
    let e = model.load_for(method)?;
    let opts = method.options()?;
    let m = kvembed_core::method::Method::from_name(opts.method.as_deref().unwrap_or("kv"))?
        .with_options(&opts)?
        .with_knobs(&e.knobs)?;
    let seqs = synthetic_texts(&e, batch, tokens)?;
    if let Some(p) = dump_tokens {
        // The exact ids the timed forward passes see (no prompt, no BOS), so
        // that other runtimes can be timed on identical input.
        let doc = serde_json::json!({"batch": batch, "tokens": tokens, "ids": seqs});
        std::fs::write(p, doc.to_string()).map_err(io_err(p))?;
        eprintln!("wrote {} x {} token ids to {}", batch, tokens, p.display());
        return Ok(());
    }
    let fopts = forward_options(&e, &m)?;
    // `--vs METHOD`: a second method timed in the same process, its runs
    // alternating with the first's, so that noise hits both alike.
    let other = match vs {
        Some(name) => {
            let mut o = opts.clone();
            o.method = Some(name.to_string());
            let m2 = kvembed_core::method::Method::from_name(name)?
                .with_options(&o)?
                .with_knobs(&e.knobs)?;
            let f2 = forward_options(&e, &m2)?;
            Some((m2, f2))
        }
        None => None,
    };
    // Warm-up, then timed runs packed by the same token budget as embedding.
    let run = |fo: &kvembed_core::model::decoder::ForwardOptions| forward_seconds(&e, &seqs, fo);
    run(&fopts)?;
    if let Some((_, f2)) = &other {
        run(f2)?;
    }
    let mut times = Vec::new();
    let mut times2 = Vec::new();
    for i in 0..repeat.max(1) {
        match &other {
            Some((_, f2)) if i % 2 == 1 => {
                times2.push(run(f2)?);
                times.push(run(&fopts)?);
            }
            Some((_, f2)) => {
                times.push(run(&fopts)?);
                times2.push(run(f2)?);
            }
            None => times.push(run(&fopts)?),
        }
    }
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.total_cmp(b));
    sort(&mut times);
    sort(&mut times2);
    let total = (batch * tokens) as f64;
    let med = median(&times);
    if json {
        let mut doc = serde_json::json!({"method": m.name, "batch": batch, "tokens": tokens, "seconds": times,
            "tokens_per_s_median": total / med, "texts_per_s_median": batch as f64 / med,
            "matmul": e.matmul_kernel()});
        if let Some((m2, _)) = &other {
            let med2 = median(&times2);
            doc["vs_method"] = serde_json::json!(m2.name);
            doc["vs_seconds"] = serde_json::json!(times2);
            doc["vs_tokens_per_s_median"] = serde_json::json!(total / med2);
        }
        println!("{doc}");
    } else {
        let line = |name: &str, t: &[f64]| {
            let med = median(t);
            println!(
                "{} {}x{}: {:.0} tokens/s, {:.1} texts/s (median of {}; min {:.3}s max {:.3}s)",
                name,
                batch,
                tokens,
                total / med,
                batch as f64 / med,
                t.len(),
                t[0],
                t[t.len() - 1]
            );
        };
        line(&m.name, &times);
        if let Some((m2, _)) = &other {
            line(&m2.name, &times2);
        }
    }
    Ok(())
}

/// `bench --file`: end-to-end embedding (prompt, tokenizer, forward passes
/// packed by `--batch-tokens`, pooling) of real texts, as the server does for
/// one large request. A warm-up on the first 64 texts, then `repeat` timed runs.
pub fn bench_texts(
    model: &ModelArgs,
    method: &MethodArgs,
    file: &Path,
    repeat: usize,
    json: bool,
) -> Result<()> {
    let texts = read_lines(file)?;
    if texts.is_empty() {
        return Err(EngineError::invalid("file", "no texts"));
    }
    let e = model.load_for(method)?;
    let opts = method.options()?;
    e.embed(&texts[..texts.len().min(64)], Role::Document, &opts)?;
    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        tokens = e.embed(&texts, Role::Document, &opts)?.tokens;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = median(&times);
    let n = texts.len() as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({"method": opts.method.clone().unwrap_or(e.info().default_method), "matmul": e.matmul_kernel(), "texts": texts.len(), "tokens": tokens,
                "seconds": times, "texts_per_s_median": n / med, "tokens_per_s_median": tokens as f64 / med})
        );
    } else {
        println!(
            "{} texts ({} tokens with prompts): {:.1} texts/s, {:.0} tokens/s (median of {}; min {:.3}s max {:.3}s)",
            texts.len(),
            tokens,
            n / med,
            tokens as f64 / med,
            times.len(),
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{median, sample_indices};

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_two_middle_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn space_samples_are_distinct_seeded_and_bounded() {
        let a = sample_indices(1000, 256, 7);
        assert_eq!(a.len(), 256);
        let distinct: std::collections::HashSet<usize> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256, "no index twice");
        assert!(a.iter().all(|&i| i < 1000));
        assert_eq!(
            a,
            sample_indices(1000, 256, 7),
            "the same seed, the same sample"
        );
        assert_ne!(
            a,
            sample_indices(1000, 256, 8),
            "another seed, another sample"
        );
        // Not the first k: a sample spread over the whole set.
        assert!(a.iter().any(|&i| i >= 500));
        // Asking for more than there are gives every index once.
        let mut all = sample_indices(10, 50, 1);
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(sample_indices(0, 5, 1).is_empty());
    }
}
