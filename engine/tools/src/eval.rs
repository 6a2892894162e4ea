//! Evaluation data loaders and metrics, following MTEB / BEIR conventions.
//!
//! The data itself lives outside the repository and is passed by path at run
//! time. Supported layouts:
//!
//! * STS: `<root>/<YYYY>/<name>.test.tsv` with lines `score<TAB>s1<TAB>s2`, and
//!   `<root>/sick/SICK_trial.txt` (TSV with a `pair_ID sentence_A sentence_B
//!   relatedness_score entailment_judgment` header).
//! * BEIR: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.
//!
//! Metrics: Spearman/Pearson (STS), nDCG@k with graded gains as computed by
//! pytrec_eval (retrieval), and the alignment/uniformity pair of Wang & Isola
//! (2020).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

/// One sentence pair with its gold similarity (0–5 for STS, 1–5 for SICK).
#[derive(Debug, Clone, PartialEq)]
pub struct StsPair {
    pub a: String,
    pub b: String,
    pub score: f64,
}

/// One STS file.
#[derive(Debug, Clone, PartialEq)]
pub struct StsSet {
    /// "STS12", "STS13", "STS14", …, or "SICK".
    pub group: String,
    /// File stem, e.g. "MSRpar" or "SICK_trial".
    pub name: String,
    pub pairs: Vec<StsPair>,
    /// Non-blank lines that could not be parsed and were skipped; reported so
    /// that a silently truncated set does not pass unnoticed.
    pub skipped: usize,
}

/// Loads STS sets.
///
/// `root` may be the STS root (every 4-digit year folder `YYYY` becomes group
/// `"STS" + YY`, and `sick/SICK_trial.txt` becomes group "SICK"), a single year
/// folder or `sick` folder, or a single file. Sets are sorted by group, then
/// name. Malformed lines are skipped and counted in [`StsSet::skipped`].
///
/// # Errors
/// I/O errors (a missing root included), non-UTF-8 files, and a SICK header
/// lacking the sentence or score columns.
pub fn load_sts_root(root: &Path) -> io::Result<Vec<StsSet>> {
    let mut sets = Vec::new();
    if root.is_file() {
        let group = root
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(group_of_folder)
            .unwrap_or_else(|| {
                if file_name(root).to_ascii_lowercase().starts_with("sick") {
                    "SICK".to_string()
                } else {
                    "STS".to_string()
                }
            });
        sets.push(load_sts_file(root, &group)?);
    } else if let Some(group) = root
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(group_of_folder)
    {
        load_group_folder(root, &group, &mut sets)?;
    } else {
        for entry in read_dir_sorted(root)? {
            if !entry.is_dir() {
                continue;
            }
            if let Some(group) = entry
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(group_of_folder)
            {
                load_group_folder(&entry, &group, &mut sets)?;
            }
        }
    }
    sets.sort_by(|x, y| (&x.group, &x.name).cmp(&(&y.group, &y.name)));
    Ok(sets)
}

/// "2012" → "STS12", "sick" → "SICK"; anything else is not an STS folder.
fn group_of_folder(name: &str) -> Option<String> {
    if name.len() == 4 && name.bytes().all(|b| b.is_ascii_digit()) {
        Some(format!("STS{}", &name[2..]))
    } else if name.eq_ignore_ascii_case("sick") {
        Some("SICK".to_string())
    } else {
        None
    }
}

fn load_group_folder(dir: &Path, group: &str, sets: &mut Vec<StsSet>) -> io::Result<()> {
    if group == "SICK" {
        let trial = dir.join("SICK_trial.txt");
        if trial.is_file() {
            sets.push(load_sts_file(&trial, group)?);
        }
        return Ok(());
    }
    for path in read_dir_sorted(dir)? {
        if path.is_file() && file_name(&path).ends_with(".test.tsv") {
            sets.push(load_sts_file(&path, group)?);
        }
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut paths = fs::read_dir(dir)
        .map_err(|e| with_path(e, dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// "MSRpar.test.tsv" → "MSRpar", "SICK_trial.txt" → "SICK_trial".
fn set_name(path: &Path) -> String {
    let name = file_name(path);
    let name = name
        .strip_suffix(".tsv")
        .or_else(|| name.strip_suffix(".txt"))
        .unwrap_or(&name);
    name.strip_suffix(".test").unwrap_or(name).to_string()
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Loads one STS file; the SICK layout is recognised by its `pair_ID` header,
/// whatever the file is called.
fn load_sts_file(path: &Path, group: &str) -> io::Result<StsSet> {
    let text = fs::read_to_string(path).map_err(|e| with_path(e, path))?;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let mut pairs = Vec::new();
    let mut skipped = 0;

    let first = lines.next().map(|l| l.trim_start_matches('\u{feff}'));
    // Column indices of (sentence A, sentence B, score) for SICK; None for the
    // plain `score s1 s2` layout.
    let mut sick_columns = None;
    let mut pending_first = None;
    if let Some(first) = first {
        let header: Vec<&str> = first.split('\t').collect();
        if header.first().map(|h| h.trim()) == Some("pair_ID") {
            let col = |name: &str| header.iter().position(|h| h.trim() == name);
            match (
                col("sentence_A"),
                col("sentence_B"),
                col("relatedness_score"),
            ) {
                (Some(a), Some(b), Some(s)) => sick_columns = Some((a, b, s)),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: SICK header lacks sentence_A/sentence_B/relatedness_score",
                            path.display()
                        ),
                    ))
                }
            }
        } else {
            pending_first = Some(first);
        }
    }

    for line in pending_first.into_iter().chain(lines) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let parsed = match sick_columns {
            Some((a, b, s)) => parse_pair(fields.get(s), fields.get(a), fields.get(b)),
            // Exactly three fields: an extra tab would make the sentence
            // boundary ambiguous, so such lines count as malformed.
            None if fields.len() == 3 => parse_pair(fields.first(), fields.get(1), fields.get(2)),
            None => None,
        };
        match parsed {
            Some(pair) => pairs.push(pair),
            None => skipped += 1,
        }
    }
    Ok(StsSet {
        group: group.to_string(),
        name: set_name(path),
        pairs,
        skipped,
    })
}

fn parse_pair(score: Option<&&str>, a: Option<&&str>, b: Option<&&str>) -> Option<StsPair> {
    let score: f64 = score?.trim().parse().ok()?;
    let (a, b) = (a?.trim(), b?.trim());
    if !score.is_finite() || a.is_empty() || b.is_empty() {
        return None;
    }
    Some(StsPair {
        a: a.to_string(),
        b: b.to_string(),
        score,
    })
}

/// A BEIR retrieval set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Beir {
    /// (doc id, `title + " " + text` trimmed, or just the text without title),
    /// in file order.
    pub corpus: Vec<(String, String)>,
    /// (query id, text), in file order; only queries with qrels.
    pub queries: Vec<(String, String)>,
    /// query id → doc id → graded relevance; only for loaded queries.
    pub qrels: HashMap<String, HashMap<String, f64>>,
}

/// Loads `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv` from `root`.
/// Queries without qrels are dropped (as BEIR's loader does), and qrels of
/// queries missing from `queries.jsonl` are dropped too, so both agree.
///
/// # Errors
/// A missing file (`NotFound`, naming the path), an unparsable JSON line or
/// `_id`, or a qrels line after the header without a numeric score
/// (`InvalidData`, naming file and line).
pub fn load_beir(root: &Path, split: &str) -> io::Result<Beir> {
    let mut qrels = load_qrels(&root.join("qrels").join(format!("{split}.tsv")))?;
    let corpus = read_jsonl(&root.join("corpus.jsonl"), |v| {
        let text = str_field(v, "text");
        let title = str_field(v, "title");
        let joined = if title.trim().is_empty() {
            text.trim().to_string()
        } else {
            format!("{title} {text}").trim().to_string()
        };
        Some((id_field(v)?, joined))
    })?;
    let queries: Vec<(String, String)> = read_jsonl(&root.join("queries.jsonl"), |v| {
        Some((id_field(v)?, str_field(v, "text").trim().to_string()))
    })?
    .into_iter()
    .filter(|(id, _)| qrels.contains_key(id))
    .collect();
    let kept: HashSet<&str> = queries.iter().map(|(id, _)| id.as_str()).collect();
    qrels.retain(|qid, _| kept.contains(qid.as_str()));
    Ok(Beir {
        corpus,
        queries,
        qrels,
    })
}

/// `_id` as a string; some BEIR exports store numeric ids as JSON numbers.
fn id_field(v: &serde_json::Value) -> Option<String> {
    match v.get("_id")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key).and_then(|t| t.as_str()).unwrap_or("")
}

/// Parses every non-blank line; a bad line is an error because a BEIR file is
/// machine-written and a partial corpus would skew every score.
fn read_jsonl<T>(
    path: &Path,
    mut extract: impl FnMut(&serde_json::Value) -> Option<T>,
) -> io::Result<Vec<T>> {
    let file = fs::File::open(path).map_err(|e| with_path(e, path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| with_path(e, path))?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}:{}: {why}", path.display(), i + 1),
            )
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        out.push(extract(&value).ok_or_else(|| bad("missing or invalid \"_id\"".to_string()))?);
    }
    Ok(out)
}

/// `query-id corpus-id score` lines; the header (or any line whose score does
/// not parse, which can only be a header in a well-formed file) is skipped.
fn load_qrels(path: &Path) -> io::Result<HashMap<String, HashMap<String, f64>>> {
    let text = fs::read_to_string(path).map_err(|e| with_path(e, path))?;
    let mut qrels: HashMap<String, HashMap<String, f64>> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let mut fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        if fields.len() < 3 {
            fields = line.split_whitespace().collect();
        }
        let score = fields.get(2).and_then(|s| s.parse::<f64>().ok());
        match (fields.first(), fields.get(1), score) {
            (Some(q), Some(d), Some(s)) => {
                qrels
                    .entry(q.to_string())
                    .or_default()
                    .insert(d.to_string(), s);
            }
            _ if i == 0 => {} // header
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}:{}: malformed qrels line", path.display(), i + 1),
                ))
            }
        }
    }
    Ok(qrels)
}

/// Arithmetic mean; NaN for an empty slice (no data is not a score of zero).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Pearson correlation. NaN when the lengths differ, for fewer than two
/// values, when either side is constant, or when any value is NaN (as SciPy).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.len() < 2 {
        return f64::NAN;
    }
    let (ma, mb) = (mean(a), mean(b));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return f64::NAN;
    }
    (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman rank correlation: Pearson correlation of the ranks, tied values
/// sharing their average rank (scipy.stats.spearmanr).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| x.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

/// 1-based ranks, ties replaced by the mean of the ranks they span.
fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut ranks = vec![0.0; xs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        // `==` rather than total_cmp so that 0.0 and -0.0 tie.
        while end < order.len() && xs[order[end]] == xs[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end, averaged.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Dot product in f64 with independent accumulators (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += f64::from(xa[k]) * f64::from(xb[k]);
        }
    }
    let tail: f64 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    acc.iter().sum::<f64>() + tail
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

/// Cosine similarity in f64; 0 when either vector is zero.
///
/// # Panics
/// If the lengths differ: comparing vectors of different models or layers is
/// a bug that must not be averaged into a score.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors with different lengths");
    let denom = norm(a) * norm(b);
    if denom > 0.0 {
        dot(a, b) / denom
    } else {
        0.0
    }
}

/// Expected nDCG@k of a random ranking of `n_docs` documents of which one
/// is relevant (binary gain): the mean over its possible ranks r = 1..n of
/// `1 / log2(r + 1)` for r <= k, 0 beyond. The chance level of a
/// one-relevant-document retrieval check. 0 for no documents.
pub fn chance_ndcg_at_k(n_docs: usize, k: usize) -> f64 {
    if n_docs == 0 {
        return 0.0;
    }
    let hits: f64 = (1..=n_docs.min(k))
        .map(|r| 1.0 / ((r + 1) as f64).log2())
        .sum();
    hits / n_docs as f64
}

/// nDCG@k with graded gains, as pytrec_eval's `ndcg_cut_k` (used by BEIR and
/// MTEB): `DCG = Σ rel_i / log2(i + 2)` over the first `k` ranked documents,
/// divided by the DCG of the relevance values sorted in decreasing order.
/// Non-positive relevance counts as zero gain; a document repeated in the
/// ranking only counts at its first position. Returns 0 when nothing is
/// relevant or `k == 0`.
pub fn ndcg_at_k(ranked_doc_ids: &[String], relevant: &HashMap<String, f64>, k: usize) -> f64 {
    let gain = |r: f64| if r > 0.0 { r } else { 0.0 };
    let mut ideal: Vec<f64> = relevant
        .values()
        .map(|&r| gain(r))
        .filter(|&r| r > 0.0)
        .collect();
    ideal.sort_by(|x, y| y.total_cmp(x));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, r)| r / (i as f64 + 2.0).log2())
        .sum();
    if idcg <= 0.0 {
        return 0.0;
    }
    let mut seen = HashSet::with_capacity(k.min(ranked_doc_ids.len()));
    let mut dcg = 0.0;
    let mut position = 0usize;
    for id in ranked_doc_ids {
        if position >= k {
            break;
        }
        if !seen.insert(id.as_str()) {
            continue;
        }
        dcg += gain(relevant.get(id).copied().unwrap_or(0.0)) / (position as f64 + 2.0).log2();
        position += 1;
    }
    dcg / idcg
}

/// Mean nDCG@k over the queries that have an entry in `qrels` (queries without
/// judgements are not evaluated, as in BEIR). Documents are ranked by exact
/// cosine similarity; ties are broken by corpus order so results are
/// reproducible. NaN when no query is evaluated.
///
/// # Panics
/// If `query_vecs`/`query_ids` or `doc_vecs`/`doc_ids` differ in length.
pub fn retrieval_ndcg(
    query_vecs: &[Vec<f32>],
    query_ids: &[String],
    doc_vecs: &[Vec<f32>],
    doc_ids: &[String],
    qrels: &HashMap<String, HashMap<String, f64>>,
    k: usize,
) -> f64 {
    assert_eq!(query_vecs.len(), query_ids.len(), "one id per query vector");
    assert_eq!(doc_vecs.len(), doc_ids.len(), "one id per document vector");
    // Inverse norms once, instead of per (query, doc) pair.
    let inv_norm = |v: &Vec<f32>| {
        let n = norm(v);
        if n > 0.0 {
            1.0 / n
        } else {
            0.0
        }
    };
    let doc_inv: Vec<f64> = doc_vecs.iter().map(inv_norm).collect();
    let top = k.min(doc_vecs.len());
    let mut scored: Vec<(f64, usize)> = Vec::with_capacity(doc_vecs.len());
    let mut per_query = Vec::new();

    for (q, qid) in query_vecs.iter().zip(query_ids) {
        let Some(relevant) = qrels.get(qid) else {
            continue;
        };
        let q_inv = inv_norm(q);
        scored.clear();
        scored.extend(
            doc_vecs
                .iter()
                .zip(&doc_inv)
                .enumerate()
                .map(|(i, (d, &d_inv))| {
                    let s = dot(q, d) * q_inv * d_inv;
                    // NaN (from non-finite embeddings) must rank last, not first.
                    (if s.is_nan() { f64::NEG_INFINITY } else { s }, i)
                }),
        );
        let by_rank = |x: &(f64, usize), y: &(f64, usize)| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1));
        if top > 0 && top < scored.len() {
            scored.select_nth_unstable_by(top - 1, by_rank);
        }
        scored.truncate(top);
        scored.sort_unstable_by(by_rank);
        let ranked: Vec<String> = scored.iter().map(|&(_, i)| doc_ids[i].clone()).collect();
        per_query.push(ndcg_at_k(&ranked, relevant, k));
    }
    mean(&per_query)
}

/// Alignment (Wang & Isola, 2020, α = 2): mean squared Euclidean distance
/// between the L2-normalised members of positive pairs. Lower is better. NaN
/// when there are no pairs.
///
/// # Panics
/// If the two slices differ in length or a pair's vectors differ in length.
pub fn alignment(pairs_a: &[Vec<f32>], pairs_b: &[Vec<f32>]) -> f64 {
    assert_eq!(
        pairs_a.len(),
        pairs_b.len(),
        "alignment needs paired vectors"
    );
    let distances: Vec<f64> = pairs_a
        .iter()
        .zip(pairs_b)
        .map(|(a, b)| normalised_sq_distance(a, b, norm(a), norm(b)))
        .collect();
    mean(&distances)
}

/// Most vectors used by [`uniformity`]; the pair count grows quadratically.
pub const UNIFORMITY_MAX_VECTORS: usize = 2000;

/// Uniformity (Wang & Isola, 2020, t = 2): `log mean exp(-2 ||x - y||²)` over
/// all distinct pairs of L2-normalised vectors, using at most the first
/// [`UNIFORMITY_MAX_VECTORS`]. Lower (more negative) is more uniform. NaN for
/// fewer than two vectors.
pub fn uniformity(vecs: &[Vec<f32>]) -> f64 {
    let vecs = &vecs[..vecs.len().min(UNIFORMITY_MAX_VECTORS)];
    if vecs.len() < 2 {
        return f64::NAN;
    }
    let norms: Vec<f64> = vecs.iter().map(|v| norm(v)).collect();
    // Every term lies in [exp(-8), 1] for unit vectors, so a plain sum is
    // numerically safe without log-sum-exp.
    let mut sum = 0.0;
    let mut count = 0u64;
    for i in 0..vecs.len() {
        for j in (i + 1)..vecs.len() {
            let d2 = normalised_sq_distance(&vecs[i], &vecs[j], norms[i], norms[j]);
            sum += (-2.0 * d2).exp();
            count += 1;
        }
    }
    (sum / count as f64).ln()
}

/// `||x/|x| - y/|y|||²` from a single dot product, without normalised copies;
/// a zero vector stays zero after "normalisation".
fn normalised_sq_distance(a: &[f32], b: &[f32], na: f64, nb: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of different lengths");
    let unit = |n: f64| if n > 0.0 { 1.0 } else { 0.0 };
    let cos = if na > 0.0 && nb > 0.0 {
        dot(a, b) / (na * nb)
    } else {
        0.0
    };
    (unit(na) + unit(nb) - 2.0 * cos).max(0.0)
}

/// One case of the long-context check: a claim (the query) and a passage
/// judged relevant to it (the needle), to be hidden in unrelated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Needle {
    pub query: String,
    pub passage: String,
}

/// Picks up to `n` needles from a BEIR set: the queries in file order, each
/// with its first judged document (by id) that is at most
/// `max_passage_tokens` long and not already used by an earlier needle. Also
/// returns the haystack: every document judged for no loaded query, in corpus
/// order, so filler never answers a query.
pub fn needles_from_beir(
    beir: &Beir,
    n: usize,
    max_passage_tokens: usize,
    count_tokens: impl Fn(&str) -> usize,
) -> (Vec<Needle>, Vec<String>) {
    let text: HashMap<&str, &str> = beir
        .corpus
        .iter()
        .map(|(id, t)| (id.as_str(), t.as_str()))
        .collect();
    let judged: HashSet<&str> = beir
        .qrels
        .values()
        .flat_map(|m| m.keys().map(String::as_str))
        .collect();
    let mut used = HashSet::new();
    let mut needles = Vec::new();
    for (qid, query) in &beir.queries {
        if needles.len() == n {
            break;
        }
        let mut relevant: Vec<&str> = beir.qrels[qid]
            .iter()
            .filter(|(_, &g)| g > 0.0)
            .map(|(d, _)| d.as_str())
            .collect();
        relevant.sort_unstable();
        let pick = relevant.into_iter().find(|d| {
            !used.contains(d)
                && text
                    .get(d)
                    .is_some_and(|t| !t.is_empty() && count_tokens(t) <= max_passage_tokens)
        });
        if let Some(d) = pick {
            used.insert(d);
            needles.push(Needle {
                query: query.clone(),
                passage: text[d].to_string(),
            });
        }
    }
    let filler = beir
        .corpus
        .iter()
        .filter(|(id, t)| !judged.contains(id.as_str()) && !t.is_empty())
        .map(|(_, t)| t.clone())
        .collect();
    (needles, filler)
}

/// One long document per needle: passages of `filler` (each document starts
/// at its own offset, so documents differ) with the needle inserted at a
/// pseudo-random depth drawn from `seed`, the filler added until the
/// document, needle included, holds at least `len` tokens (it may run over
/// by one filler passage). `len == 0` gives the needle alone. Parts are
/// joined with a space. Deterministic for a given seed.
///
/// # Panics
/// If `len > 0` and `filler` is empty.
pub fn needle_documents(
    needles: &[&str],
    filler: &[String],
    len: usize,
    seed: u64,
    count_tokens: impl Fn(&str) -> usize,
) -> Vec<String> {
    assert!(len == 0 || !filler.is_empty(), "no filler text");
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let stride = (filler.len() / needles.len().max(1)).max(1);
    needles
        .iter()
        .enumerate()
        .map(|(i, needle)| {
            let mut parts: Vec<&str> = Vec::new();
            let mut tokens = if len == 0 { 0 } else { count_tokens(needle) };
            let mut k = i * stride;
            while tokens < len {
                let f = &filler[k % filler.len()];
                tokens += count_tokens(f);
                parts.push(f);
                k += 1;
            }
            let at = (next() as usize) % (parts.len() + 1);
            parts.insert(at, needle);
            parts.join(" ")
        })
        .collect()
}

/// Share of queries whose nearest document by cosine is their own (query `i`
/// belongs with document `i`).
pub fn top1_accuracy(query_vecs: &[Vec<f32>], doc_vecs: &[Vec<f32>]) -> f64 {
    let hits = query_vecs
        .iter()
        .enumerate()
        .filter(|(qi, q)| {
            let best = doc_vecs
                .iter()
                .map(|d| cosine(q, d))
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|x| x.0);
            best == Some(*qi)
        })
        .count();
    hits as f64 / query_vecs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "kvembed-eval-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, rel: &str, content: &str) -> PathBuf {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn ids(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn rel(xs: &[(&str, f64)]) -> HashMap<String, f64> {
        xs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn spearman_perfect_and_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!(close(spearman(&a, &[10.0, 20.0, 25.0, 100.0, 1e6]), 1.0));
        assert!(close(spearman(&a, &[5.0, 4.0, 3.0, 2.0, 1.0]), -1.0));
    }

    #[test]
    fn spearman_with_ties_matches_hand_computation() {
        // a ranks [1, 2.5, 2.5, 4], b ranks [1, 2, 3, 4].
        // Centred: a [-1.5, 0, 0, 1.5], b [-1.5, -0.5, 0.5, 1.5]
        // cov 4.5; |a| = sqrt(4.5), |b| = sqrt(5) -> rho = 4.5 / sqrt(22.5).
        let rho = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!(close(rho, 4.5 / 22.5f64.sqrt()), "{rho}");
        assert!(close(rho, 0.948_683_298_050_513_8));

        // Ties on both sides: a ranks [1.5, 1.5, 3, 4, 5], b ranks [2, 2, 2, 4.5, 4.5].
        // Centred a [-1.5, -1.5, 0, 1, 2], b [-1, -1, -1, 1.5, 1.5]
        // cov 1.5 + 1.5 + 0 + 1.5 + 3 = 7.5; |a|² = 9.5; |b|² = 7.5
        let rho = spearman(&[3.0, 3.0, 5.0, 6.0, 7.0], &[0.0, 0.0, 0.0, 1.0, 1.0]);
        assert!(close(rho, 7.5 / (9.5f64 * 7.5).sqrt()), "{rho}");
        assert!(close(rho, 0.888_523_316_638_638_6), "{rho}");
    }

    #[test]
    fn average_ranks_of_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 10.0, 30.0, 10.0]),
            vec![2.0, 4.0, 2.0, 5.0, 2.0]
        );
        assert_eq!(average_ranks(&[0.0, -0.0]), vec![1.5, 1.5]);
        assert!(average_ranks(&[]).is_empty());
    }

    #[test]
    fn correlation_degenerate_inputs_are_nan() {
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(spearman(&[1.0, 2.0], &[1.0]).is_nan());
        assert!(spearman(&[1.0], &[1.0]).is_nan());
        assert!(spearman(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(pearson(&[], &[]).is_nan());
    }

    #[test]
    fn pearson_known_value() {
        // x = [1,2,3], y = [1,3,2]: cov = 1, var_x = var_y = 2 -> 0.5.
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]), 0.5));
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), 1.0));
    }

    #[test]
    fn mean_and_cosine() {
        assert!(close(mean(&[1.0, 2.0, 6.0]), 3.0));
        assert!(mean(&[]).is_nan());
        assert!(close(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0));
        assert!(close(cosine(&[1.0, 1.0], &[2.0, 2.0]), 1.0));
        assert!(close(cosine(&[1.0, 2.0, 3.0], &[-1.0, -2.0, -3.0]), -1.0));
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
        // Longer than one accumulator chunk.
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..19).map(|i| (i % 5) as f32 - 2.0).collect();
        let naive = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x * y))
            .sum::<f64>()
            / (a.iter().map(|&x| f64::from(x * x)).sum::<f64>().sqrt()
                * b.iter().map(|&x| f64::from(x * x)).sum::<f64>().sqrt());
        assert!(close(cosine(&a, &b), naive));
    }

    #[test]
    #[should_panic(expected = "different lengths")]
    fn cosine_rejects_mismatched_lengths() {
        cosine(&[1.0], &[1.0, 2.0]);
    }

    #[test]
    fn ndcg_hand_examples() {
        let relevant = rel(&[("d1", 1.0)]);
        assert!(close(ndcg_at_k(&ids(&["d1", "d2"]), &relevant, 10), 1.0));
        assert!(close(
            ndcg_at_k(&ids(&["d2", "d1", "d3"]), &relevant, 10),
            1.0 / 3f64.log2()
        ));
        // Cut-off excludes the relevant document.
        assert_eq!(ndcg_at_k(&ids(&["d2", "d1"]), &relevant, 1), 0.0);
        assert_eq!(ndcg_at_k(&ids(&["d1"]), &relevant, 0), 0.0);
        // Nothing relevant (only zero / negative judgements).
        assert_eq!(
            ndcg_at_k(&ids(&["d1"]), &rel(&[("d1", 0.0), ("d2", -1.0)]), 10),
            0.0
        );
    }

    #[test]
    fn ndcg_graded_gains() {
        // Relevance a:2, b:1. Ranking [b, x, a]:
        // DCG = 1/log2(2) + 0 + 2/log2(4) = 1 + 1 = 2
        // IDCG = 2/log2(2) + 1/log2(3)
        let relevant = rel(&[("a", 2.0), ("b", 1.0)]);
        let got = ndcg_at_k(&ids(&["b", "x", "a"]), &relevant, 10);
        assert!(close(got, 2.0 / (2.0 + 1.0 / 3f64.log2())), "{got}");
        // k = 1 truncates both DCG (b: 1) and IDCG (a: 2).
        assert!(close(ndcg_at_k(&ids(&["b", "a"]), &relevant, 1), 0.5));
        // Perfect graded ranking.
        assert!(close(ndcg_at_k(&ids(&["a", "b"]), &relevant, 10), 1.0));
        // A repeated document does not earn its gain twice.
        let dup = ndcg_at_k(&ids(&["b", "b", "a"]), &relevant, 10);
        let expected = (1.0 + 2.0 / 3f64.log2()) / (2.0 + 1.0 / 3f64.log2());
        assert!(close(dup, expected), "{dup} vs {expected}");
    }

    #[test]
    fn retrieval_ndcg_ranks_by_cosine() {
        let docs = vec![vec![1.0f32, 0.0], vec![0.0, 1.0], vec![0.7, 0.7]];
        let doc_ids = ids(&["dx", "dy", "dxy"]);
        // Un-normalised queries: cosine must not depend on norms.
        let queries = vec![vec![5.0f32, 0.1], vec![0.0, 3.0], vec![1.0, 1.0]];
        let query_ids = ids(&["q1", "q2", "q3"]);
        let mut qrels = HashMap::new();
        // q1 ranks dx first: nDCG 1.
        qrels.insert("q1".to_string(), rel(&[("dx", 1.0)]));
        // q2 ranks dy, then dxy: its relevant dxy at rank 2 gives 1/log2(3).
        qrels.insert("q2".to_string(), rel(&[("dxy", 1.0)]));
        // q3 has no qrels and is not evaluated.
        let got = retrieval_ndcg(&queries, &query_ids, &docs, &doc_ids, &qrels, 10);
        assert!(close(got, (1.0 + 1.0 / 3f64.log2()) / 2.0), "{got}");
        // k = 1: q2's document falls outside the cut.
        let got = retrieval_ndcg(&queries, &query_ids, &docs, &doc_ids, &qrels, 1);
        assert!(close(got, 0.5), "{got}");
        // No query with qrels.
        assert!(
            retrieval_ndcg(&queries, &query_ids, &docs, &doc_ids, &HashMap::new(), 10).is_nan()
        );
    }

    #[test]
    fn retrieval_ties_break_by_corpus_order_and_nan_ranks_last() {
        let docs = vec![vec![f32::NAN, 0.0], vec![1.0, 0.0], vec![1.0, 0.0]];
        let doc_ids = ids(&["bad", "first", "second"]);
        let mut qrels = HashMap::new();
        qrels.insert("q".to_string(), rel(&[("second", 1.0)]));
        let got = retrieval_ndcg(&[vec![1.0, 0.0]], &ids(&["q"]), &docs, &doc_ids, &qrels, 2);
        assert!(close(got, 1.0 / 3f64.log2()), "{got}");
        let got = retrieval_ndcg(&[vec![1.0, 0.0]], &ids(&["q"]), &docs, &doc_ids, &qrels, 1);
        assert_eq!(got, 0.0);
    }

    #[test]
    fn chance_ndcg_matches_the_mean_over_every_ranking() {
        // One document: always first.
        assert!(close(chance_ndcg_at_k(1, 10), 1.0));
        assert_eq!(chance_ndcg_at_k(0, 10), 0.0);
        // Brute force: put the relevant document at every rank and average
        // ndcg_at_k of the resulting rankings.
        for (n, k) in [(2usize, 10usize), (12, 10), (30, 10), (5, 3)] {
            let rel: HashMap<String, f64> = [("r".to_string(), 1.0)].into_iter().collect();
            let mut total = 0.0;
            for pos in 0..n {
                let mut ranked: Vec<String> = (0..n - 1).map(|i| format!("d{i}")).collect();
                ranked.insert(pos, "r".into());
                total += ndcg_at_k(&ranked, &rel, k);
            }
            assert!(
                close(chance_ndcg_at_k(n, k), total / n as f64),
                "n={n} k={k}"
            );
        }
    }

    #[test]
    fn alignment_and_uniformity() {
        // Identical directions (after normalisation) are perfectly aligned.
        let a = vec![vec![1.0f32, 0.0], vec![0.0, 2.0]];
        let b = vec![vec![3.0f32, 0.0], vec![0.0, 0.5]];
        assert!(close(alignment(&a, &b), 0.0));
        // Orthogonal unit vectors are at squared distance 2; opposite at 4.
        let b = vec![vec![0.0f32, 1.0], vec![0.0, -1.0]];
        assert!(close(alignment(&a, &b), 3.0));
        assert!(alignment(&[], &[]).is_nan());

        // Two antipodal points: log exp(-2 * 4) = -8.
        assert!(close(uniformity(&[vec![1.0, 0.0], vec![-2.0, 0.0]]), -8.0));
        // Three points at 120°: every squared distance is 3.
        let s = 3f32.sqrt() / 2.0;
        let tri = vec![vec![1.0f32, 0.0], vec![-0.5, s], vec![-0.5, -s]];
        assert!((uniformity(&tri) + 6.0).abs() < 1e-6);
        // Collapsed representations: log 1 = 0.
        assert!(close(
            uniformity(&[vec![1.0, 1.0], vec![2.0, 2.0], vec![3.0, 3.0]]),
            0.0
        ));
        assert!(uniformity(&[vec![1.0]]).is_nan());
    }

    #[test]
    fn uniformity_uses_first_2000_vectors() {
        // 2000 copies of one direction (all terms 1), then an opposite vector
        // that must be ignored.
        let mut vecs = vec![vec![1.0f32, 0.0]; UNIFORMITY_MAX_VECTORS];
        vecs.push(vec![-1.0, 0.0]);
        assert!(close(uniformity(&vecs), 0.0));
    }

    #[test]
    fn loads_sts_root_with_years_and_sick() {
        let dir = TempDir::new("sts");
        dir.write(
            "2012/MSRpar.test.tsv",
            "4.5\tA man plays guitar.\tA man is playing a guitar.\n\
             not-a-number\tbroken\tline\n\
             3\tonly two fields\n\
             \n\
             0.0\tCats sleep.\tStocks fell.\r\n",
        );
        dir.write("2012/OnWN.test.tsv", "2.5\ta\tb\n");
        dir.write("2012/notes.txt", "ignored\n");
        dir.write("2014/images.test.tsv", "5\tx\ty\n1\tz\tw\n");
        dir.write("misc/other.test.tsv", "1\tignored\tfolder\n");
        dir.write(
            "sick/SICK_trial.txt",
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n\
             1\tA dog runs.\tA dog is running.\t4.8\tENTAILMENT\n\
             2\tbad\tline\tNaNish\tNEUTRAL\n\
             3\tA kid eats.\tNobody eats.\t2.1\tCONTRADICTION\n",
        );
        dir.write(
            "sick/SICK_train.txt",
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\n",
        );

        let sets = load_sts_root(&dir.0).unwrap();
        let keys: Vec<(&str, &str)> = sets
            .iter()
            .map(|s| (s.group.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("SICK", "SICK_trial"),
                ("STS12", "MSRpar"),
                ("STS12", "OnWN"),
                ("STS14", "images")
            ]
        );

        let sick = &sets[0];
        assert_eq!(sick.pairs.len(), 2);
        assert_eq!(sick.skipped, 1);
        assert_eq!(
            sick.pairs[0],
            StsPair {
                a: "A dog runs.".into(),
                b: "A dog is running.".into(),
                score: 4.8
            }
        );

        let msr = &sets[1];
        assert_eq!(msr.pairs.len(), 2);
        assert_eq!(msr.skipped, 2);
        assert_eq!(msr.pairs[1].b, "Stocks fell.");
        assert_eq!(msr.pairs[1].score, 0.0);
    }

    #[test]
    fn loads_single_year_folder_and_single_file() {
        let dir = TempDir::new("sts-single");
        let file = dir.write("2013/FNWN.test.tsv", "3.2\tone\ttwo\n");
        dir.write("2013/headlines.test.tsv", "1.0\tthree\tfour\n");

        let year = load_sts_root(&dir.0.join("2013")).unwrap();
        assert_eq!(year.len(), 2);
        assert!(year.iter().all(|s| s.group == "STS13"));

        let single = load_sts_root(&file).unwrap();
        assert_eq!(single.len(), 1);
        assert_eq!(
            (single[0].group.as_str(), single[0].name.as_str()),
            ("STS13", "FNWN")
        );
        assert_eq!(single[0].pairs[0].score, 3.2);

        let sick = dir.write(
            "elsewhere/SICK_trial.txt",
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n1\tp\tq\t3.0\tNEUTRAL\n",
        );
        let sets = load_sts_root(&sick).unwrap();
        assert_eq!(
            (sets[0].group.as_str(), sets[0].name.as_str()),
            ("SICK", "SICK_trial")
        );
        assert_eq!(sets[0].pairs.len(), 1);

        let missing = load_sts_root(&dir.0.join("missing"));
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn set_names() {
        assert_eq!(set_name(Path::new("a/MSRpar.test.tsv")), "MSRpar");
        assert_eq!(set_name(Path::new("a/SICK_trial.txt")), "SICK_trial");
        assert_eq!(set_name(Path::new("x.tsv")), "x");
        assert_eq!(group_of_folder("2016").as_deref(), Some("STS16"));
        assert_eq!(group_of_folder("Sick").as_deref(), Some("SICK"));
        assert_eq!(group_of_folder("201"), None);
        assert_eq!(group_of_folder("20a2"), None);
    }

    fn write_beir(dir: &TempDir) {
        dir.write(
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"title\": \"Title One\", \"text\": \"Body one.\"}\n\
             {\"_id\": \"d2\", \"title\": \"\", \"text\": \" Body two. \"}\n\
             \n\
             {\"_id\": 3, \"text\": \"Numeric id, no title.\"}\n",
        );
        dir.write(
            "queries.jsonl",
            "{\"_id\": \"q1\", \"text\": \"first query\"}\n\
             {\"_id\": \"q2\", \"text\": \"no judgements\"}\n\
             {\"_id\": \"q3\", \"text\": \"third query\", \"metadata\": {}}\n",
        );
        dir.write(
            "qrels/test.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t3\t2\nq3\td2\t1\nq9\td1\t1\n",
        );
    }

    #[test]
    fn loads_beir() {
        let dir = TempDir::new("beir");
        write_beir(&dir);
        let beir = load_beir(&dir.0, "test").unwrap();
        assert_eq!(
            beir.corpus,
            vec![
                ("d1".to_string(), "Title One Body one.".to_string()),
                ("d2".to_string(), "Body two.".to_string()),
                ("3".to_string(), "Numeric id, no title.".to_string()),
            ]
        );
        assert_eq!(
            beir.queries,
            vec![
                ("q1".to_string(), "first query".to_string()),
                ("q3".to_string(), "third query".to_string())
            ]
        );
        assert_eq!(beir.qrels.len(), 2, "q9 has no query text and is dropped");
        assert_eq!(beir.qrels["q1"], rel(&[("d1", 1.0), ("3", 2.0)]));
        assert_eq!(beir.qrels["q3"], rel(&[("d2", 1.0)]));
    }

    #[test]
    fn beir_errors_are_reported() {
        let dir = TempDir::new("beir-bad");
        write_beir(&dir);
        let missing = load_beir(&dir.0, "dev").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("dev.tsv"), "{missing}");

        dir.write(
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"text\": \"ok\"}\n{not json}\n",
        );
        let bad = load_beir(&dir.0, "test").unwrap_err();
        assert_eq!(bad.kind(), io::ErrorKind::InvalidData);
        assert!(bad.to_string().contains("corpus.jsonl:2"), "{bad}");

        write_beir(&dir);
        dir.write("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\tx\n");
        assert_eq!(
            load_beir(&dir.0, "test").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn beir_end_to_end_with_toy_vectors() {
        let dir = TempDir::new("beir-e2e");
        write_beir(&dir);
        let beir = load_beir(&dir.0, "test").unwrap();
        // Toy "embeddings": one axis per document.
        let doc_vecs: Vec<Vec<f32>> = (0..3)
            .map(|i| (0..3).map(|j| (i == j) as u8 as f32).collect())
            .collect();
        let doc_ids: Vec<String> = beir.corpus.iter().map(|(id, _)| id.clone()).collect();
        // q1 points at doc "3" (gain 2) then d1 (gain 1): a perfect ranking.
        // q3 points at d1, so its relevant d2 ties with "3" and wins on order.
        let query_vecs = vec![vec![0.5f32, 0.0, 1.0], vec![1.0, 0.0, 0.0]];
        let query_ids: Vec<String> = beir.queries.iter().map(|(id, _)| id.clone()).collect();
        let got = retrieval_ndcg(
            &query_vecs,
            &query_ids,
            &doc_vecs,
            &doc_ids,
            &beir.qrels,
            10,
        );
        assert!(close(got, (1.0 + 1.0 / 3f64.log2()) / 2.0), "{got}");
    }

    fn words(t: &str) -> usize {
        t.split_whitespace().count()
    }

    #[test]
    fn needle_documents_hide_each_needle_once_at_varied_depths() {
        let filler: Vec<String> = (0..40)
            .map(|i| format!("filler{i} a b c d e f g h i"))
            .collect();
        let needles = ["needleA x y", "needleB x y", "needleC x y", "needleD x y"];
        let docs = needle_documents(&needles, &filler, 100, 7, words);
        assert_eq!(docs.len(), 4);
        let mut depths = HashSet::new();
        for (i, d) in docs.iter().enumerate() {
            assert!(words(d) >= 100, "doc {i} has {} words", words(d));
            assert!(words(d) < 100 + 12, "doc {i} overshoots: {}", words(d));
            for (j, n) in needles.iter().enumerate() {
                assert_eq!(
                    d.matches(n).count(),
                    usize::from(i == j),
                    "doc {i}, needle {j}"
                );
            }
            depths.insert(d.find(needles[i]).unwrap());
        }
        assert!(depths.len() > 1, "every needle at the same depth");
        // Documents start from different filler passages.
        assert_ne!(
            docs[0].replace(needles[0], ""),
            docs[1].replace(needles[1], "")
        );
        assert_eq!(docs, needle_documents(&needles, &filler, 100, 7, words));
        assert_ne!(docs, needle_documents(&needles, &filler, 100, 8, words));
        assert_eq!(
            needle_documents(&needles, &filler, 0, 7, words),
            needles.map(String::from).to_vec()
        );
    }

    #[test]
    fn needles_come_from_judged_documents_and_filler_from_the_rest() {
        let corpus: Vec<(String, String)> = [
            ("d1", "one two three"),
            ("d2", "a much longer relevant text here"),
            ("d3", "unjudged filler"),
            ("d4", "also relevant"),
            ("d5", "more filler"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let q = |pairs: &[(&str, f64)]| -> HashMap<String, f64> {
            pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
        };
        let beir = Beir {
            corpus,
            queries: vec![
                ("q1".into(), "claim one".into()),
                ("q2".into(), "claim two".into()),
                ("q3".into(), "claim three".into()),
            ],
            qrels: [
                ("q1".to_string(), q(&[("d2", 1.0), ("d1", 1.0)])),
                ("q2".to_string(), q(&[("d1", 1.0)])),
                ("q3".to_string(), q(&[("d2", 2.0), ("d4", 1.0)])),
            ]
            .into_iter()
            .collect(),
        };
        let (needles, filler) = needles_from_beir(&beir, 10, 4, words);
        // q1 takes d1 (first by id), q2's only document is used, q3 skips d2
        // (too long) and takes d4.
        assert_eq!(
            needles,
            vec![
                Needle {
                    query: "claim one".into(),
                    passage: "one two three".into()
                },
                Needle {
                    query: "claim three".into(),
                    passage: "also relevant".into()
                },
            ]
        );
        assert_eq!(
            filler,
            vec!["unjudged filler".to_string(), "more filler".to_string()]
        );
        assert_eq!(needles_from_beir(&beir, 1, 4, words).0.len(), 1);
    }

    #[test]
    fn top1_counts_queries_nearest_to_their_own_document() {
        let docs = vec![vec![1.0f32, 0.0], vec![0.0, 1.0], vec![0.7, 0.7]];
        let queries = vec![vec![0.9f32, 0.1], vec![0.6, 0.8], vec![0.1, 0.9]];
        // q0 -> d0 (hit), q1 -> d2 (miss), q2 -> d1 (miss).
        assert!(close(top1_accuracy(&queries, &docs), 1.0 / 3.0));
    }
}
