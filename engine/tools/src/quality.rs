//! The quality study behind docs/QUALITY.md: every method on the STS sets
//! and SciFact, the TwoNN curve (with an SVG plot), a bias sweep, a
//! layer-window comparison and a long-context retrieval check. Everything in
//! the page comes from this command.

use crate::cli::{eval_beir, eval_sts, group_means};
use crate::eval::{self, StsSet};
use kvembed_core::method::{Template, COMPRESS_DOC, METHOD_NAMES};
use kvembed_core::model::decoder::LayerPooling;
use kvembed_core::proto::{EmbedOptions, Role};
use kvembed_core::{Embedder, EngineError, LoadSpec, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct QualityArgs {
    /// Models to study: GGUF files or HF directories.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Evaluation data root (holds sts/ and scifact/).
    #[arg(long, default_value = "../shared/data")]
    pub data: PathBuf,
    /// Output markdown file.
    #[arg(long, default_value = "docs/QUALITY.md")]
    pub out: PathBuf,
    /// Pairs per STS file for the sweeps (0 = all).
    #[arg(long, default_value_t = 0)]
    pub sweep_limit: usize,
    /// Documents kept for SciFact (judged ones plus distractors; 0 = all).
    #[arg(long, default_value_t = 0)]
    pub scifact_docs: usize,
    /// SciFact queries kept (the first N; 0 = all 809). The corpus then
    /// holds their judged documents plus distractors up to --scifact-docs.
    #[arg(long, default_value_t = 0)]
    pub scifact_queries: usize,
    /// Claims (one document each) per length in the long-context check.
    #[arg(long, default_value_t = 24)]
    pub long_docs: usize,
    /// Methods of the long-context check (comma-separated).
    #[arg(long, default_value = "kv,kv-no-reroute,mean")]
    pub long_methods: String,
    /// Document lengths of the long-context check, in tokens (0 = the
    /// abstract alone; comma-separated).
    #[arg(long, default_value = "0,512,1024,2048,4096")]
    pub long_lengths: String,
    /// Chunks for the long-context check's chunked column: `kv_chunk`'s
    /// max_tokens and overlap.
    #[arg(long, default_value = "256,32")]
    pub long_chunk: String,
    /// Only the long-context check (for a page of its own).
    #[arg(long)]
    pub long_only: bool,
    /// Methods run on SciFact (comma-separated).
    #[arg(
        long,
        default_value = "kv,kv-no-reroute,kv-paper,mean,last,token-prepending,echo"
    )]
    pub scifact_methods: String,
    /// Texts sampled for TwoNN.
    #[arg(long, default_value_t = 512)]
    pub id_sample: usize,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Skip the SciFact and long-context parts.
    #[arg(long)]
    pub sts_only: bool,
    /// Methods also run on the full STS sets (every pair), timed; the speed
    /// section reports their throughput (comma-separated; empty = none).
    #[arg(long, default_value = "kv,prompteol,token-prepending")]
    pub full_sts: String,
    /// Leave the hand-written findings (docs/quality-notes.md) out of the
    /// page: for pages beside docs/QUALITY.md, e.g. more backbones.
    #[arg(long)]
    pub no_notes: bool,
    /// Only the ID curve, the methods table and the speed section (no
    /// sweeps, SciFact or long context): for larger backbones.
    #[arg(long)]
    pub light: bool,
}

/// The hand-written findings that head docs/QUALITY.md (kept in
/// docs/quality-notes.md so regenerating the page keeps them).
pub const QUALITY_NOTES: &str = include_str!("../../../docs/quality-notes.md");

struct Row {
    label: String,
    groups: Vec<(String, f64)>,
}

impl Row {
    fn avg(&self) -> f64 {
        eval::mean(&self.groups.iter().map(|g| g.1).collect::<Vec<_>>())
    }
}

fn sts_row(
    e: &Embedder,
    sets: &[StsSet],
    label: &str,
    opts: &EmbedOptions,
    limit: usize,
) -> Result<Row> {
    let t0 = Instant::now();
    let rows = eval_sts(e, sets, opts, limit)?;
    let row = Row {
        label: label.to_string(),
        groups: group_means(&rows),
    };
    eprintln!(
        "  {label}: avg {:.2} ({:.0}s)",
        row.avg(),
        t0.elapsed().as_secs_f64()
    );
    Ok(row)
}

fn table(md: &mut String, rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    let groups: Vec<&str> = rows[0].groups.iter().map(|g| g.0.as_str()).collect();
    let _ = writeln!(md, "| configuration | {} | avg |", groups.join(" | "));
    let _ = writeln!(md, "|---|{}---|", "---|".repeat(groups.len()));
    let best = rows.iter().map(Row::avg).fold(f64::NEG_INFINITY, f64::max);
    for r in rows {
        let cells: Vec<String> = r.groups.iter().map(|g| format!("{:.1}", g.1)).collect();
        let avg = if (r.avg() - best).abs() < 1e-9 {
            format!("**{:.1}**", r.avg())
        } else {
            format!("{:.1}", r.avg())
        };
        let _ = writeln!(md, "| {} | {} | {} |", r.label, cells.join(" | "), avg);
    }
    md.push('\n');
}

fn opts(method: &str) -> EmbedOptions {
    EmbedOptions {
        method: Some(method.into()),
        ..Default::default()
    }
}

/// Options for a method of the study: `kv-paper` re-routes at the window the
/// TwoNN rule chose on this model, as the paper does.
fn study_opts(method: &str, id_layers: &[usize]) -> EmbedOptions {
    let mut o = opts(method);
    if method == "kv-paper" {
        o.layers = Some(id_layers.to_vec());
    }
    o
}

fn study_label(method: &str, id_layers: &[usize]) -> String {
    if method == "kv-paper" {
        format!("kv-paper (ID layers {id_layers:?}, b=1)")
    } else {
        method.to_string()
    }
}

/// Writes the page as it stands, so that a failure late in a long study
/// keeps what was measured before it.
fn save(out: &Path, md: &str) -> Result<()> {
    std::fs::write(out, md).map_err(|e| EngineError::io(out, e))
}

fn method_list(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect()
}

/// A line plot of the ID curve, as a small standalone SVG.
fn svg_curve(title: &str, curves: &[(&str, &[f64])], selected: &[usize]) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let n = curves.iter().map(|c| c.1.len()).max().unwrap_or(1).max(2);
    let vals: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{pad}\" y=\"18\" font-size=\"13\">{title}</text>"
    );
    for &l in selected {
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{pad}\" width=\"6\" height=\"{:.1}\" fill=\"#fde68a\"/>",
            x(l) - 3.0,
            h - 2.0 * pad
        );
    }
    let _ = write!(
        s,
        "<line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{:.1}\" stroke=\"black\"/>",
        h - pad, w - pad, h - pad, h - pad
    );
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\">layer</text>",
        w / 2.0,
        h - 8.0
    );
    let _ = write!(
        s,
        "<text x=\"4\" y=\"{:.1}\">{hi:.1}</text><text x=\"4\" y=\"{:.1}\">{lo:.1}</text>",
        pad + 4.0,
        h - pad
    );
    for i in (0..n).step_by((n / 10).max(1)) {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{i}</text>",
            x(i) - 3.0,
            h - pad + 14.0
        );
    }
    let colors = ["#1d4ed8", "#dc2626", "#059669"];
    for (k, (name, c)) in curves.iter().enumerate() {
        let pts: Vec<String> = c
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let color = colors[k % colors.len()];
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{name}</text>",
            w - pad - 120.0,
            pad + 14.0 * k as f64
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Long-context check for one method: `queries[i]` must find `docs[i]`
/// among `docs`. Returns nDCG@10 and top-1, both × 100.
fn long_context(
    e: &Embedder,
    docs: &[String],
    queries: &[String],
    max_tokens: usize,
    o: &EmbedOptions,
) -> Result<(f64, f64)> {
    let mut o = o.clone();
    o.max_tokens = Some(max_tokens);
    let dv = e.embed(docs, Role::Document, &o)?.vectors;
    let qv = e.embed(queries, Role::Query, &o)?.vectors;
    let ids: Vec<String> = (0..docs.len()).map(|i| i.to_string()).collect();
    let qrels = ids
        .iter()
        .map(|i| (i.clone(), [(i.clone(), 1.0)].into_iter().collect()))
        .collect();
    let ndcg = eval::retrieval_ndcg(&qv, &ids, &dv, &ids, &qrels, 10);
    Ok((100.0 * ndcg, 100.0 * eval::top1_accuracy(&qv, &dv)))
}

/// Longest abstract used as a needle in the long-context check.
const LONG_PASSAGE_TOKENS: usize = 320;

/// The long-context check with the chunking recipe: every document cut by
/// `kv_chunk` (`max_tokens`, `overlap`), each chunk embedded, and a
/// document scored by its best chunk. Returns nDCG@10 and top-1, both × 100,
/// and the chunks per document (mean).
fn long_context_chunked(
    e: &Embedder,
    docs: &[String],
    queries: &[String],
    (max_tokens, overlap): (usize, usize),
    o: &EmbedOptions,
) -> Result<(f64, f64, f64)> {
    let mut o = o.clone();
    o.max_tokens = Some(max_tokens);
    let mut chunks = Vec::new();
    let mut owner = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        for c in e.chunk(d, max_tokens, overlap)? {
            chunks.push(d[c.start..c.end].to_string());
            owner.push(i);
        }
    }
    let cv = e.embed(&chunks, Role::Document, &o)?.vectors;
    let qv = e.embed(queries, Role::Query, &o)?.vectors;
    let mut ndcg = 0.0;
    let mut top1 = 0.0;
    for (qi, q) in qv.iter().enumerate() {
        let mut best = vec![f64::NEG_INFINITY; docs.len()];
        for (c, &d) in cv.iter().zip(&owner) {
            best[d] = best[d].max(eval::cosine(q, c));
        }
        // The rank of the query's own document (ties count against it).
        let rank = 1 + best
            .iter()
            .enumerate()
            .filter(|&(d, &s)| d != qi && s >= best[qi])
            .count();
        if rank <= 10 {
            ndcg += 1.0 / (rank as f64 + 1.0).log2();
        }
        if rank == 1 {
            top1 += 1.0;
        }
    }
    let n = queries.len().max(1) as f64;
    Ok((
        100.0 * ndcg / n,
        100.0 * top1 / n,
        chunks.len() as f64 / docs.len().max(1) as f64,
    ))
}

pub fn run(a: &QualityArgs) -> Result<()> {
    let sts_root = a.data.join("sts");
    let sets = eval::load_sts_root(&sts_root).map_err(|e| EngineError::io(&sts_root, e))?;
    let mut md = String::new();
    page_header(&mut md, a);
    let plot_dir = a.out.parent().unwrap_or(Path::new(".")).join("img");
    std::fs::create_dir_all(&plot_dir).map_err(|e| EngineError::io(&plot_dir, e))?;
    for model in &a.models {
        eprintln!("== {model}");
        let e = Embedder::load(&LoadSpec {
            model: model.clone(),
            device: "cpu".into(),
            threads: a.threads,
            weights: None,
        })?;
        let info = e.info();
        let name = Path::new(model)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or(model.clone());
        let _ = writeln!(
            md,
            "## {name}\n\n{} layers, hidden size {}, {}.\n",
            info.layers, info.dim, info.architecture
        );
        let study = Study {
            a,
            e: &e,
            sets: &sets,
        };
        if a.long_only {
            study.long_context(&mut md)?;
            save(&a.out, &md)?;
            continue;
        }
        let id_layers = study.intrinsic_dimension(&mut md, &name, &plot_dir)?;
        study.methods(&mut md, &id_layers)?;
        save(&a.out, &md)?;
        study.speed(&mut md, &id_layers)?;
        if a.light {
            save(&a.out, &md)?;
            continue;
        }
        study.bias_sweep(&mut md, &id_layers)?;
        save(&a.out, &md)?;
        study.layer_windows(&mut md, &id_layers)?;
        save(&a.out, &md)?;
        if !a.sts_only {
            study.scifact(&mut md, &id_layers)?;
            save(&a.out, &md)?;
            study.long_context(&mut md)?;
        }
        save(&a.out, &md)?;
    }
    save(&a.out, &md)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// The page's title, the command that wrote it, and the hand-written notes.
fn page_header(md: &mut String, a: &QualityArgs) {
    let cmd: Vec<String> = std::env::args().collect();
    let cmd = cmd
        .join(" ")
        .replace(&*a.data.to_string_lossy(), "../shared/data");
    if a.long_only {
        let _ = writeln!(
            md,
            "# Long context: whole documents and chunks\n\nGenerated by `{cmd}` on the development data \
(`../shared/data`): the long-context check of [QUALITY.md](QUALITY.md), with the chunking recipe of the README beside \
whole-document embedding.\n"
        );
        return;
    }
    let _ = writeln!(md, "# Quality results\n");
    let _ = writeln!(
        md,
        "Generated by `{cmd}` on the development data (`../shared/data`). Spearman × 100 of cosine similarity \
against the gold scores, per file, averaged per group (STS12/13/14, SICK trial). {}\n",
        if a.sweep_limit > 0 {
            format!("**The methods table and the sweeps use the first {} pairs of each file** (a subsample, to fit the study on 2 CPU cores; `--sweep-limit 0` runs the full sets); the full-size table uses every pair.", a.sweep_limit)
        } else {
            "Full STS files.".into()
        }
    );
    if !a.no_notes {
        let _ = writeln!(md, "{}\n", QUALITY_NOTES);
    }
}

/// One backbone's part of the study; each method writes one section.
struct Study<'a> {
    a: &'a QualityArgs,
    e: &'a Embedder,
    sets: &'a [StsSet],
}

impl Study<'_> {
    /// TwoNN over a sample of STS sentences, last-token and mean
    /// representations, with its plot; returns the layers the paper's rule
    /// picks on last-token states (the study's "ID-selected" window).
    fn intrinsic_dimension(
        &self,
        md: &mut String,
        name: &str,
        plot_dir: &Path,
    ) -> Result<Vec<usize>> {
        let (a, e) = (self.a, self.e);
        let n = e.info().layers;
        let mut sample: Vec<String> = self
            .sets
            .iter()
            .flat_map(|s| s.pairs.iter().map(|p| p.a.clone()))
            .collect();
        sample.dedup();
        let step = (sample.len() / a.id_sample.max(1)).max(1);
        let sample: Vec<String> = sample.into_iter().step_by(step).take(a.id_sample).collect();
        let template = Template::parse(COMPRESS_DOC)?;
        // The paper's rule as written (`select_window`) and the product's,
        // which checks the minimum on both halves of random splits of the sample.
        let family = e.decoder()?.cfg.family;
        let mut curves = Vec::new();
        let mut checked = Vec::new();
        for pooling in [LayerPooling::Last, LayerPooling::Mean] {
            let reps = e.layer_representations(&sample, &template, pooling, 256, |_| true)?;
            let (c, sel) = kvembed_core::twonn::select_layers(&reps, 0.2, 3, family, &mut || true)
                .expect("never stopped");
            curves.push(c);
            checked.push(sel);
        }
        let sel_last = kvembed_core::twonn::select_window(&curves[0], 0.2, 3, family);
        let sel_mean = kvembed_core::twonn::select_window(&curves[1], 0.2, 3, family);
        let svg = svg_curve(
            &format!("TwoNN intrinsic dimension per layer: {name}"),
            &[("last token", &curves[0]), ("mean", &curves[1])],
            &sel_last.layers,
        );
        let svg_name = format!("id-{}.svg", name.replace(['.', ' '], "_"));
        std::fs::write(plot_dir.join(&svg_name), svg).map_err(|e| EngineError::io(plot_dir, e))?;
        let _ = writeln!(
            md,
            "### Intrinsic dimension (TwoNN, {} texts in the compression prompt)\n",
            sample.len()
        );
        let _ = writeln!(md, "![ID curve](img/{svg_name})\n");
        let _ = writeln!(md, "| layer | ID (last token) | ID (mean) |\n|---|---|---|");
        for l in 0..n {
            let _ = writeln!(md, "| {l} | {:.2} | {:.2} |", curves[0][l], curves[1][l]);
        }
        let _ = writeln!(
            md,
            "\nSelection on last-token states: {}.  \nSelection on mean states: {}.\n",
            sel_last.rule, sel_mean.rule
        );
        let _ = writeln!(
            md,
            "With the stability check of `select-layers` and `kv_select_layers` (the same rule on both halves of {} random splits of the sample): last-token states {:?} ({}); mean states {:?} ({}).\n",
            kvembed_core::twonn::STABILITY_SPLITS,
            checked[0].layers,
            checked[0].rule,
            checked[1].layers,
            checked[1].rule
        );
        Ok(sel_last.layers)
    }

    /// Every method on STS.
    fn methods(&self, md: &mut String, id_layers: &[usize]) -> Result<()> {
        let _ = writeln!(md, "### Methods (STS)\n");
        let mut rows = Vec::new();
        for m in METHOD_NAMES {
            rows.push(sts_row(
                self.e,
                self.sets,
                &study_label(m, id_layers),
                &study_opts(m, id_layers),
                self.a.sweep_limit,
            )?);
        }
        table(md, &rows);
        Ok(())
    }

    /// Full-size STS for the chosen methods, timed, and forward-pass
    /// throughput at two batch shapes.
    fn speed(&self, md: &mut String, id_layers: &[usize]) -> Result<()> {
        let (e, sets) = (self.e, self.sets);
        let full = method_list(&self.a.full_sts);
        let _ = writeln!(md, "### Speed, and full-size STS\n");
        let _ = writeln!(
            md,
            "{} compute threads. Full-size rows embed every pair of every file (tokens include the prompt); the forward-pass rows time `Decoder::forward` alone on synthetic texts of exactly that many tokens, as `kvembed-lab bench` does (median of 3 after a warm-up).\n",
            rayon::current_num_threads()
        );
        let mut full_rows = Vec::new();
        let _ = writeln!(
            md,
            "| run | texts | tokens | seconds | tokens/s |\n|---|---|---|---|---|"
        );
        for m in &full {
            let o = study_opts(m, id_layers);
            let t0 = Instant::now();
            let tokens_before =
                crate::cli::TOKENS_EMBEDDED.load(std::sync::atomic::Ordering::Relaxed);
            full_rows.push(sts_row(
                e,
                sets,
                &format!("{} (all pairs)", study_label(m, id_layers)),
                &o,
                0,
            )?);
            let secs = t0.elapsed().as_secs_f64();
            let tokens = crate::cli::TOKENS_EMBEDDED.load(std::sync::atomic::Ordering::Relaxed)
                - tokens_before;
            let texts: std::collections::HashSet<&str> = sets
                .iter()
                .flat_map(|s| s.pairs.iter().flat_map(|p| [p.a.as_str(), p.b.as_str()]))
                .collect();
            let _ = writeln!(
                md,
                "| full STS, {m} | {} | {tokens} | {secs:.0} | {:.0} |",
                texts.len(),
                tokens as f64 / secs
            );
        }
        for (batch, len) in [(64usize, 32usize), (16, 512)] {
            let (secs, tps) = crate::cli::time_forward(e, "kv", batch, len, 3)?;
            let _ = writeln!(
                md,
                "| forward pass, kv, {batch} x {len} | {batch} | {} | {secs:.2} | {tps:.0} |",
                batch * len
            );
        }
        md.push('\n');
        if !full_rows.is_empty() {
            let _ = writeln!(md, "Full-size STS (every pair):\n");
            table(md, &full_rows);
        }
        Ok(())
    }

    /// The bias at the default window and at the ID-selected window.
    fn bias_sweep(&self, md: &mut String, id_layers: &[usize]) -> Result<()> {
        let default_layers = self.e.info().default_layers.clone();
        let _ = writeln!(md, "### Bias sweep (kv prompt and pooling)\n");
        let mut rows = Vec::new();
        for (wname, layers) in [("default", &default_layers[..]), ("ID-selected", id_layers)] {
            for b in [0.0f32, 0.5, 1.0, 2.0, 3.0, 5.0] {
                let mut o = opts("kv");
                o.layers = Some(layers.to_vec());
                o.bias = Some(b);
                rows.push(sts_row(
                    self.e,
                    self.sets,
                    &format!("{wname} layers {layers:?}, b={b}"),
                    &o,
                    self.a.sweep_limit,
                )?);
            }
        }
        table(md, &rows);
        Ok(())
    }

    /// Layer windows at the default bias.
    fn layer_windows(&self, md: &mut String, id_layers: &[usize]) -> Result<()> {
        let info = self.e.info();
        let n = info.layers;
        let _ = writeln!(
            md,
            "### Layer windows (kv, default bias {})\n",
            info.default_bias
        );
        let mut rows = Vec::new();
        let early: Vec<usize> = vec![1, 2, 3];
        let late: Vec<usize> = (n - 3..n).collect();
        for (wname, layers) in [
            ("early", early),
            ("default", info.default_layers.clone()),
            ("ID-selected", id_layers.to_vec()),
            ("late", late),
        ] {
            let mut o = opts("kv");
            o.layers = Some(layers.clone());
            rows.push(sts_row(
                self.e,
                self.sets,
                &format!("{wname} {layers:?}"),
                &o,
                self.a.sweep_limit,
            )?);
        }
        table(md, &rows);
        Ok(())
    }

    /// Retrieval on SciFact's train queries: nDCG@10, alignment, uniformity.
    fn scifact(&self, md: &mut String, id_layers: &[usize]) -> Result<()> {
        let a = self.a;
        let scifact = a.data.join("scifact");
        let _ = writeln!(md, "### SciFact (train queries), nDCG@10\n");
        let mut scifact_rows = Vec::new();
        for m in method_list(&a.scifact_methods) {
            let mut o = study_opts(m, id_layers);
            o.max_tokens = Some(512);
            let t0 = Instant::now();
            let r = eval_beir(
                self.e,
                &scifact,
                "train",
                &o,
                a.scifact_docs,
                a.scifact_queries,
            )?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("  scifact {m}: {:.2} ({secs:.0}s)", r.ndcg10);
            scifact_rows.push((study_label(m, id_layers), r, secs));
        }
        if let Some((_, r, _)) = scifact_rows.first() {
            let _ = writeln!(
                md,
                "{} queries against {} documents ({}); documents cut at 512 tokens. Alignment: mean squared distance \
of (query, relevant document) pairs, lower is better; uniformity: log of the mean Gaussian potential over documents, \
lower is better.\n",
                r.queries,
                r.docs,
                if a.scifact_docs > 0 {
                    "every document judged for these queries plus the first unjudged ones as distractors"
                } else if a.scifact_queries > 0 {
                    "the full corpus; the other queries left out"
                } else {
                    "the full corpus"
                }
            );
        }
        let _ = writeln!(
            md,
            "| method | nDCG@10 | alignment | uniformity | seconds |\n|---|---|---|---|---|"
        );
        let best = scifact_rows
            .iter()
            .map(|r| r.1.ndcg10)
            .fold(f64::NEG_INFINITY, f64::max);
        for (label, r, secs) in &scifact_rows {
            let ndcg = if r.ndcg10 == best {
                format!("**{:.2}**", r.ndcg10)
            } else {
                format!("{:.2}", r.ndcg10)
            };
            let _ = writeln!(
                md,
                "| {label} | {ndcg} | {:.3} | {:.3} | {secs:.0} |",
                r.alignment, r.uniformity
            );
        }
        md.push('\n');
        Ok(())
    }

    /// Each SciFact claim must find its abstract hidden in ever longer
    /// documents of unjudged abstracts.
    fn long_context(&self, md: &mut String) -> Result<()> {
        let (a, e) = (self.a, self.e);
        let scifact = a.data.join("scifact");
        let beir = eval::load_beir(&scifact, "train").map_err(|e| EngineError::io(&scifact, e))?;
        let (needles, filler) =
            eval::needles_from_beir(&beir, a.long_docs, LONG_PASSAGE_TOKENS, |t| {
                e.count_tokens(t)
            });
        let n = needles.len();
        let _ = writeln!(
            md,
            "### Long context\n\nEach of {n} SciFact train claims must find its document among {n}: the document holds an \
abstract judged relevant to the claim (at most {LONG_PASSAGE_TOKENS} tokens), hidden at a random depth among abstracts judged \
for no query, which fill it to about the given length (\"alone\": the abstract by itself, the ceiling). Only the hidden \
abstract tells the documents apart. A random ranking scores nDCG@10 {:.1} and top-1 {:.1} %. Methods at their defaults; \
nothing is truncated.\n",
            100.0 * eval::chance_ndcg_at_k(n, 10),
            100.0 / n.max(1) as f64
        );
        let methods: Vec<&str> = a
            .long_methods
            .split(',')
            .filter(|m| !m.is_empty())
            .collect();
        let lengths: Vec<usize> = a
            .long_lengths
            .split(',')
            .map(|l| l.trim().parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| EngineError::invalid("--long-lengths", a.long_lengths.clone()))?;
        let chunking = match a
            .long_chunk
            .split_once(',')
            .map(|(m, o)| (m.trim().parse(), o.trim().parse()))
        {
            Some((Ok(m), Ok(o))) => (m, o),
            _ => return Err(EngineError::invalid("--long-chunk", a.long_chunk.clone())),
        };
        let _ = writeln!(
            md,
            "\"chunked\": the README's recipe, each document cut by `kv_chunk(doc, {}, {})`, every chunk embedded, and a \
document scored by its best chunk (the chunks per document in the column after the length).\n",
            chunking.0, chunking.1
        );
        let cols: Vec<String> = methods
            .iter()
            .map(|m| format!("{m} nDCG@10 | {m} top-1 | {m} chunked nDCG@10 | {m} chunked top-1"))
            .collect();
        let _ = writeln!(
            md,
            "| tokens | document tokens (mean) | chunks (mean) | {} |\n|---|---|---|{}",
            cols.join(" | "),
            "---|".repeat(4 * methods.len())
        );
        let queries: Vec<String> = needles.iter().map(|n| n.query.clone()).collect();
        let passages: Vec<&str> = needles.iter().map(|n| n.passage.as_str()).collect();
        for len in lengths {
            // The same documents for every method: each SciFact claim's
            // abstract at a seeded random depth in unjudged abstracts.
            let docs =
                eval::needle_documents(&passages, &filler, len, 0x9e37_79b9_7f4a_7c15, |t| {
                    e.count_tokens(t)
                });
            let lens: Vec<usize> = docs.iter().map(|d| e.count_tokens(d)).collect();
            let doc_tokens = eval::mean(&lens.iter().map(|&l| l as f64).collect::<Vec<_>>());
            // Filler may run over `len` by one abstract; room for the
            // prompt around it, so nothing is truncated.
            let max_tokens = lens.iter().copied().max().unwrap_or(0) + 128;
            let mut cells = Vec::new();
            let mut per_doc = 0.0;
            for m in &methods {
                let t0 = Instant::now();
                let (ndcg, top1) = long_context(e, &docs, &queries, max_tokens, &opts(m))?;
                let whole = t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                let (c_ndcg, c_top1, chunks) =
                    long_context_chunked(e, &docs, &queries, chunking, &opts(m))?;
                per_doc = chunks;
                eprintln!(
                    "  long {len} {m}: {ndcg:.1} ({whole:.0}s), chunked {c_ndcg:.1} ({:.0}s)",
                    t0.elapsed().as_secs_f64()
                );
                cells.push(format!(
                    "{ndcg:.1} | {top1:.0}% | {c_ndcg:.1} | {c_top1:.0}%"
                ));
            }
            let label = if len == 0 {
                "alone".to_string()
            } else {
                len.to_string()
            };
            let _ = writeln!(
                md,
                "| {label} | {doc_tokens:.0} | {per_doc:.1} | {} |",
                cells.join(" | ")
            );
            save(&a.out, md)?;
        }
        md.push('\n');
        Ok(())
    }
}
