//! Choosing the re-routing window and bias from unlabeled text: the
//! *agreement* rule.
//!
//! Every text of the sample gets a lightly perturbed copy (a seeded 15 % of
//! its words dropped, at least one, for texts of three words or more). A
//! configuration (window, bias) is scored by how far each text's copy stands
//! out from the other texts' copies, seen from the text's own embedding: for
//! text `i`, `z_i = (cos(e_i, c_i) - mean_j cos(e_i, c_j)) / sd_j cos(e_i,
//! c_j)` over the copies `c_j` of the other texts, averaged over the sample.
//! Subtracting the mean over the other copies makes the score indifferent to
//! the common component that makes decoder embeddings anisotropic, and
//! dividing by their spread rewards a space where unrelated texts are told
//! apart. No labels, no gold scores: only the user's texts.
//!
//! The candidates are windows of the same width starting every
//! [`window_step`] layers after the first fifth of the depth, plus no
//! re-routing at all; then the bias is chosen among [`BIASES`] at the best
//! window. Each candidate embeds the sample twice, so the cost is about
//! `2 × sample × (candidates + biases)` embeddings.

use crate::method::LayerChoice;
use crate::twonn::SplitMix;
use kvembed_model::arch::Family;

/// Biases tried at the chosen window (the paper's range; stable up to 3).
pub const BIASES: &[f32] = &[0.0, 0.5, 1.0, 2.0, 3.0];

/// The fraction of a text's words dropped in its copy.
const DROP_FRACTION: f64 = 0.15;

/// The copy of `text` with a seeded `DROP_FRACTION` of its words (at least
/// one) dropped; texts of fewer than three words are kept as they are.
pub fn perturb(text: &str, seed: u64) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 3 {
        return text.to_string();
    }
    let drop = ((words.len() as f64 * DROP_FRACTION).round() as usize).clamp(1, words.len() - 1);
    let mut rng = SplitMix(seed ^ 0xA6EE_0000_0000_0000);
    let mut order: Vec<usize> = (0..words.len()).collect();
    for i in 0..drop {
        let j = i + (rng.next_u64() % (words.len() - i) as u64) as usize;
        order.swap(i, j);
    }
    let dropped = &order[..drop];
    words
        .iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, w)| *w)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The perturbed copies of a sample (text `i` seeded with `i`).
pub fn copies(texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| perturb(t, i as u64))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Each text's agreement: how many standard deviations its own copy lies
/// above the other texts' copies, by cosine with the text's embedding
/// (module documentation). Texts whose other copies all lie at one cosine
/// give NaN. `None` with fewer than three texts or when the lengths differ.
pub fn agreement_per_text(originals: &[Vec<f32>], copies: &[Vec<f32>]) -> Option<Vec<f64>> {
    let n = originals.len();
    if n < 3 || copies.len() != n {
        return None;
    }
    let m = (n - 1) as f64;
    Some(
        originals
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut own = 0.0;
                let (mut sum, mut sq) = (0.0f64, 0.0f64);
                for (j, c) in copies.iter().enumerate() {
                    let s = cosine(e, c);
                    if i == j {
                        own = s;
                    } else {
                        sum += s;
                        sq += s * s;
                    }
                }
                let mean = sum / m;
                let sd = (sq / m - mean * mean).max(0.0).sqrt();
                if sd > 0.0 {
                    (own - mean) / sd
                } else {
                    f64::NAN
                }
            })
            .collect(),
    )
}

/// The mean of the finite values (`None` when there is none).
pub fn mean(values: &[f64]) -> Option<f64> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64)
}

/// The agreement score of one configuration: the mean of
/// [`agreement_per_text`].
pub fn agreement(originals: &[Vec<f32>], copies: &[Vec<f32>]) -> Option<f64> {
    mean(&agreement_per_text(originals, copies)?)
}

/// The mean and standard error of the per-text differences `a - b` (texts
/// where either is not finite left out): how far one configuration's
/// agreement lies above another's on the same texts, and how sure that is.
pub fn paired_difference(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x - y)
        .filter(|v| v.is_finite())
        .collect();
    if d.len() < 2 {
        return None;
    }
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    Some((mean, (var / n).sqrt()))
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma) * (x - ma);
        bb += (y - mb) * (y - mb);
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa * bb).sqrt()
    }
}

/// How stable the similarity structure is under the perturbation: the
/// Spearman correlation between the cosines of every pair of originals and
/// those of the same pair of copies. `None` with fewer than three texts.
pub fn stability(originals: &[Vec<f32>], copies: &[Vec<f32>]) -> Option<f64> {
    let n = originals.len();
    if n < 3 || copies.len() != n {
        return None;
    }
    let mut a = Vec::with_capacity(n * (n - 1) / 2);
    let mut b = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            a.push(cosine(&originals[i], &originals[j]));
            b.push(cosine(&copies[i], &copies[j]));
        }
    }
    Some(pearson(&ranks(&a), &ranks(&b)))
}

/// The spacing of candidate window starts: about fifteen candidates
/// whatever the depth.
pub fn window_step(n_layers: usize) -> usize {
    n_layers.div_ceil(15).max(1)
}

/// Candidate windows of `width` layers: starts from the first fifth of the
/// depth to the last start that fits, every [`window_step`] layers.
pub fn candidate_windows(n_layers: usize, width: usize) -> Vec<Vec<usize>> {
    let width = width.clamp(1, n_layers.max(1));
    if n_layers == 0 {
        return Vec::new();
    }
    let first = (n_layers as f64 * 0.2).ceil() as usize;
    let last = n_layers - width;
    let first = first.min(last);
    (first..=last)
        .step_by(window_step(n_layers))
        .map(|s| (s..s + width).collect())
        .collect()
}

/// Every configuration the rule scores at the method's bias: no
/// re-routing (empty), the [`candidate_windows`], and the family's default
/// window where the grid misses it.
pub fn windows_to_score(n_layers: usize, width: usize, family: Family) -> Vec<Vec<usize>> {
    let mut windows = vec![Vec::new()];
    windows.extend(candidate_windows(n_layers, width));
    let default = LayerChoice::KvDefault {
        width: width.clamp(1, n_layers.max(1)),
    }
    .resolve(n_layers, family);
    if !windows.contains(&default) {
        windows.push(default);
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturb_drops_some_words_and_is_seeded() {
        let t = "a man is playing a large guitar on the stage tonight";
        let p = perturb(t, 7);
        assert_eq!(p, perturb(t, 7));
        let n = t.split_whitespace().count();
        let m = p.split_whitespace().count();
        assert!(m < n && m >= n - 2, "{p}");
        // Every kept word is in order.
        let mut rest = t.split_whitespace();
        for w in p.split_whitespace() {
            assert!(rest.any(|x| x == w), "{p}");
        }
        assert_eq!(perturb("two words", 1), "two words");
        assert_ne!(perturb(t, 1), perturb(t, 2));
    }

    /// `n` seeded vectors of `d` uniform values in [-1, 1), each plus `shift`.
    fn points(n: usize, d: usize, seed: u64, shift: f32) -> Vec<Vec<f32>> {
        let mut rng = SplitMix(seed);
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0 + shift)
                    .collect()
            })
            .collect()
    }

    fn plus(a: &[Vec<f32>], b: &[Vec<f32>], w: f32) -> Vec<Vec<f32>> {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + w * q).collect())
            .collect()
    }

    #[test]
    fn agreement_rewards_copies_that_stand_out() {
        let orig = points(40, 16, 1, 0.0);
        let noise = points(40, 16, 2, 0.0);
        let close = plus(&orig, &noise, 0.2);
        let far = plus(&orig, &noise, 1.5);
        let a_close = agreement(&orig, &close).unwrap();
        let a_far = agreement(&orig, &far).unwrap();
        assert!(a_close > a_far && a_far > 0.0, "{a_close} {a_far}");
        // Copies that are other texts' score about nothing.
        let mut swapped = close.clone();
        swapped.rotate_left(1);
        assert!(agreement(&orig, &swapped).unwrap() < 0.5 * a_far);
        // A component shared by every copy moves the cosines of one text
        // alike: the ranking of copies, and so the score, barely changes.
        let common = vec![vec![1.0f32; 16]; 40];
        let shifted = plus(&close, &common, 2.0);
        let a_shifted = agreement(&orig, &shifted).unwrap();
        assert!((a_shifted - a_close).abs() < 0.25 * a_close, "{a_shifted} {a_close}");
        assert!(agreement(&orig[..2], &close[..2]).is_none());
        assert!(agreement(&orig, &close[..5]).is_none());
        let a = agreement_per_text(&orig, &close).unwrap();
        let b = agreement_per_text(&orig, &far).unwrap();
        let (d, se) = paired_difference(&a, &b).unwrap();
        assert!((d - (a_close - a_far)).abs() < 1e-9 && se > 0.0 && d > 2.0 * se);
        // The similarity structure survives a small perturbation better.
        assert!(stability(&orig, &close).unwrap() > stability(&orig, &far).unwrap());
    }

    #[test]
    fn candidates_cover_the_depth_after_the_first_fifth() {
        let c = candidate_windows(30, 3);
        assert_eq!(c.first().unwrap(), &vec![6, 7, 8]);
        assert!(c.iter().all(|w| w.len() == 3 && *w.last().unwrap() < 30));
        assert_eq!(c[1][0] - c[0][0], window_step(30));
        let c = candidate_windows(18, 3);
        assert_eq!(c.first().unwrap()[0], 4);
        assert_eq!(c.last().unwrap()[0], 14);
        assert_eq!(candidate_windows(2, 3), vec![vec![0, 1]]);
        // Qwen2's default window (half the depth: 12-14 of 24) is off the
        // grid of starts 5, 7, ...: it is scored too, once.
        let w = windows_to_score(24, 3, Family::Qwen2);
        assert!(w[0].is_empty());
        assert_eq!(w.iter().filter(|x| **x == vec![12, 13, 14]).count(), 1);
        let w = windows_to_score(30, 3, Family::Llama);
        assert_eq!(w.iter().filter(|x| **x == vec![20, 21, 22]).count(), 1);
    }
}
