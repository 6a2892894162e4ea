//! TwoNN intrinsic-dimension estimation (Facco, d'Errico, Rodriguez & Laio,
//! "Estimating the intrinsic dimension of datasets by a minimal neighborhood
//! information", Sci. Rep. 2017) and the layer-window rule built on it.
//!
//! KV-Embedding re-routes at a few consecutive decoder layers; the layers are
//! chosen where the hidden-state manifold is most compressed, i.e. at the
//! minimum of the per-layer intrinsic-dimension (ID) curve, after skipping the
//! early layers whose ID is dominated by token-level (lexical) structure.

use crate::method::{kv_window_start, LayerChoice};
use kvembed_model::arch::Family;
use serde::{Deserialize, Serialize};

/// Fraction of the sorted `mu` ratios kept for the fit. The largest ratios come
/// from points in sparse regions (outliers, boundary) and bias the slope, so
/// the paper discards the top 10%.
pub const DEFAULT_KEEP_FRACTION: f64 = 0.9;

/// TwoNN intrinsic dimension of a point cloud, keeping the standard 90% of the
/// `mu = r2 / r1` ratios for the fit.
///
/// Returns `None` when fewer than 3 ratios survive (points with a non-finite
/// coordinate, points whose nearest neighbour is an exact duplicate, and
/// points whose two nearest neighbours are equidistant are dropped), when the
/// rows have different lengths, or when the fit is degenerate.
pub fn intrinsic_dimension(points: &[Vec<f32>]) -> Option<f64> {
    intrinsic_dimension_with(points, DEFAULT_KEEP_FRACTION)
}

/// TwoNN intrinsic dimension with an explicit fraction of ratios kept for the
/// fit (`0 < keep_fraction <= 1`; the paper uses 0.9).
///
/// Under local uniformity `mu` follows a Pareto law with exponent `d`, so
/// `-ln(1 - F(mu)) = d * ln(mu)`: `d` is the slope of a line through the origin
/// fitted to the empirical CDF `F(mu_(i)) = i / N` of the sorted ratios.
pub fn intrinsic_dimension_with(points: &[Vec<f32>], keep_fraction: f64) -> Option<f64> {
    if !(keep_fraction > 0.0 && keep_fraction <= 1.0) {
        return None;
    }
    let all: Vec<usize> = (0..points.len()).collect();
    PairDistances::new(points)?.intrinsic_dimension(&all, keep_fraction)
}

/// The slope through the origin of `-ln(1 - F(mu))` against `ln(mu)`, over
/// the smallest `keep_fraction` of the ratios.
fn fit(mut mu: Vec<f64>, keep_fraction: f64) -> Option<f64> {
    let n = mu.len();
    if n < 3 {
        return None;
    }
    mu.sort_by(f64::total_cmp);

    // `F = i / N` reaches 1 at the last ratio, where `-ln(1 - F)` is infinite;
    // capping at N - 1 keeps the fit finite even for keep_fraction = 1.
    let kept = ((n as f64 * keep_fraction).floor() as usize).min(n - 1);
    let (mut sxy, mut sxx) = (0.0f64, 0.0f64);
    for (i, &m) in mu.iter().take(kept).enumerate() {
        let x = m.ln();
        let y = -(1.0 - (i + 1) as f64 / n as f64).ln();
        sxy += x * y;
        sxx += x * x;
    }
    if sxx > 0.0 {
        Some(sxy / sxx)
    } else {
        None
    }
}

/// Squared distances between every two points of a sample, computed once
/// (row `i` holds the points after `i`; `N^2 / 2` values, 1 MB for 512
/// points): the TwoNN estimate of any subset then needs no distance work,
/// which keeps the split-half check of [`select_layers`] to a fraction of the
/// curve's cost.
struct PairDistances {
    rows: Vec<Vec<f64>>,
    /// Points with a non-finite coordinate take no part: a NaN would poison
    /// every distance it touches and make the neighbour search meaningless.
    finite: Vec<bool>,
}

impl PairDistances {
    /// `None` for an empty sample or rows of different lengths.
    fn new(points: &[Vec<f32>]) -> Option<PairDistances> {
        use rayon::prelude::*;
        let dim = points.first()?.len();
        if points.iter().any(|p| p.len() != dim) {
            return None;
        }
        let rows = (0..points.len())
            .into_par_iter()
            .map(|i| {
                points[i + 1..]
                    .iter()
                    .map(|q| squared_distance(&points[i], q))
                    .collect()
            })
            .collect();
        let finite = points
            .iter()
            .map(|p| p.iter().all(|x| x.is_finite()))
            .collect();
        Some(PairDistances { rows, finite })
    }

    fn get(&self, i: usize, j: usize) -> f64 {
        let (i, j) = if i < j { (i, j) } else { (j, i) };
        self.rows[i][j - i - 1]
    }

    /// TwoNN intrinsic dimension of the points in `subset` (distinct indices).
    ///
    /// Only points with `0 < r1 < r2` give a ratio `mu = r2 / r1`. `r1 == 0`
    /// (an exact duplicate) makes it undefined. `r1 == r2` has probability
    /// zero for continuous data and in practice means the two nearest
    /// neighbours are copies of one point; such `mu = 1` values would pile up
    /// at `ln mu = 0`, push every other point's empirical CDF up and inflate
    /// the slope, so they are dropped as in the reference implementation.
    /// Duplicates still serve as neighbours of the other points.
    fn intrinsic_dimension(&self, subset: &[usize], keep_fraction: f64) -> Option<f64> {
        let points: Vec<usize> = subset.iter().copied().filter(|&i| self.finite[i]).collect();
        let mut mu = Vec::with_capacity(points.len());
        for &i in &points {
            // Squared distances to the nearest and second-nearest neighbour.
            let mut best = (f64::INFINITY, f64::INFINITY);
            for &j in &points {
                if j != i {
                    push_two_smallest(&mut best, self.get(i, j));
                }
            }
            let (r1, r2) = best;
            if r1 > 0.0 && r2 > r1 {
                mu.push((r2 / r1).sqrt());
            }
        }
        fit(mu, keep_fraction)
    }
}

fn push_two_smallest(slot: &mut (f64, f64), d2: f64) {
    if d2 < slot.0 {
        *slot = (d2, slot.0);
    } else if d2 < slot.1 {
        slot.1 = d2;
    }
}

/// Squared Euclidean distance accumulated in f64.
///
/// The difference is taken directly rather than through `|x|^2 + |y|^2 - 2x.y`:
/// it costs the same number of operations per coordinate, but has no
/// catastrophic cancellation, so near neighbours of high-norm hidden states get
/// accurate ratios and exact duplicates give exactly zero. Eight independent
/// accumulators let the compiler vectorise despite strict f64 addition order.
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..LANES {
            let d = f64::from(xa[k]) - f64::from(xb[k]);
            acc[k] += d * d;
        }
    }
    let mut tail = 0.0f64;
    for (&x, &y) in ra.iter().zip(rb) {
        let d = f64::from(x) - f64::from(y);
        tail += d * d;
    }
    acc.iter().sum::<f64>() + tail
}

/// Layers chosen for re-routing, with the reason in words (for logs/reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// 0-based decoder layer indices, ascending and contiguous.
    pub layers: Vec<usize>,
    /// Human-readable account of how the layers were chosen.
    pub rule: String,
}

/// Relative range `(max - min) / max` below which the ID curve is considered to
/// have no clear minimum.
const FLAT_RELATIVE_RANGE: f64 = 0.05;

/// Random splits of the sample into two disjoint halves that
/// [`select_layers`] draws to check that the minimum belongs to the model
/// rather than to the sample.
pub const STABILITY_SPLITS: usize = 16;

/// In how many of those splits both halves must put their window within one
/// layer of the whole sample's for the minimum to be used.
pub const STABILITY_AGREEMENT: usize = 8;

/// Texts below which halves are too small to check anything.
const MIN_TEXTS_FOR_CHECK: usize = 32;

/// The minimum the method's rule finds on one curve.
struct Minimum {
    layer: usize,
    value: f64,
    /// First layer of the window (the minimum, shifted left near the end).
    start: usize,
}

/// `ceil(skip_fraction * n)`, keeping at least one layer. The small
/// tolerance keeps a fraction that arrived as `f32` (0.2 is 0.2000000030 in
/// f64) from skipping one layer more than the same fraction in `f64`.
fn skipped_layers(n: usize, skip_fraction: f64) -> usize {
    let f = if skip_fraction.is_nan() {
        0.0
    } else {
        skip_fraction.clamp(0.0, 1.0)
    };
    (((f * n as f64) - 1e-6).ceil().max(0.0) as usize).min(n - 1)
}

fn window_words(w: usize) -> String {
    if w == 1 {
        "window of 1 layer".to_string()
    } else {
        format!("window of {w}")
    }
}

/// The minimum of `curve` after the skip, or why there is none (no finite
/// value, or a curve flatter than [`FLAT_RELATIVE_RANGE`]). `n >= 1` and
/// `1 <= window <= n`.
fn find_minimum(curve: &[f64], skip: usize, window: usize) -> std::result::Result<Minimum, String> {
    let n = curve.len();
    let mut min: Option<(usize, f64)> = None;
    let mut max = f64::NEG_INFINITY;
    for (i, &v) in curve.iter().enumerate().skip(skip) {
        if !v.is_finite() {
            continue;
        }
        max = max.max(v);
        if min.is_none_or(|(_, m)| v < m) {
            min = Some((i, v));
        }
    }
    let Some((layer, value)) = min else {
        return Err(format!(
            "no finite ID value after skipping {skip} of {n} layers"
        ));
    };
    let spread = if max > 0.0 {
        (max - value) / max
    } else if max == value {
        0.0
    } else {
        f64::INFINITY
    };
    if spread < FLAT_RELATIVE_RANGE {
        return Err(format!(
            "ID curve flat after skipping {skip} of {n} layers (relative range {spread:.3} < {FLAT_RELATIVE_RANGE})"
        ));
    }
    Ok(Minimum {
        layer,
        value,
        start: layer.min(n - window),
    })
}

fn window_at(start: usize, window: usize) -> Vec<usize> {
    (start..start + window).collect()
}

/// What the rule found, in words.
fn minimum_words(m: &Minimum, skip: usize, n: usize, window: usize) -> String {
    let mut rule = format!(
        "ID minimum {:.2} at layer {} after skipping {skip} of {n} layers; {}",
        m.value,
        m.layer,
        window_words(window)
    );
    if m.start != m.layer {
        rule.push_str(&format!(
            ", shifted left to layers {}-{} to end at the last layer",
            m.start,
            m.start + window - 1
        ));
    }
    rule
}

/// The window used when the curve gives no usable minimum: the default
/// method's for the model's family ([`kv_window_start`] of the depth, after
/// the skipped layers where it fits), so a calibration that finds nothing
/// changes nothing.
fn fallback(n: usize, skip: usize, window: usize, reason: String, family: Family) -> Selection {
    let default = LayerChoice::KvDefault { width: window }.resolve(n, family);
    let start = default[0].max(skip).min(n - window);
    Selection {
        layers: window_at(start, window),
        rule: format!(
            "{reason}; fallback {} at {:.2} of the depth (the default window), layers {}-{}",
            window_words(window),
            kv_window_start(family),
            start,
            start + window - 1
        ),
    }
}

/// Chooses `window` contiguous layers from a per-layer ID curve: the
/// method's rule, without the stability check of [`select_layers`].
///
/// The first `ceil(skip_fraction * n)` layers are skipped; the window starts at
/// the layer of minimum ID among the rest and is shifted left when it would run
/// past the last layer. Non-finite entries are ignored. When no clear minimum
/// exists (no finite value after the skip, or a relative range below 5%), the
/// default method's window for `family` is used instead.
///
/// `window == 0` is treated as 1, and a window longer than the curve selects
/// every layer. When the region after the skip is shorter than the window, the
/// window keeps its length and ends at the last layer, reaching back into the
/// skipped layers.
pub fn select_window(
    curve: &[f64],
    skip_fraction: f64,
    window: usize,
    family: Family,
) -> Selection {
    let n = curve.len();
    if n == 0 {
        return Selection {
            layers: Vec::new(),
            rule: "empty ID curve: no layers selected".to_string(),
        };
    }
    let window = window.clamp(1, n);
    let skip = skipped_layers(n, skip_fraction);
    match find_minimum(curve, skip, window) {
        Ok(m) => Selection {
            layers: window_at(m.start, window),
            rule: minimum_words(&m, skip, n, window),
        },
        Err(reason) => fallback(n, skip, window, reason, family),
    }
}

/// `k` distinct indices below `n`, drawn by a partial Fisher-Yates shuffle
/// seeded with `seed` (deterministic: the same sample gives the same check).
fn random_subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}

/// The ID curve of per-layer representations (`reps[layer][text]`) and the
/// layers to re-route: the method's rule ([`select_window`]) with its
/// minimum checked for stability.
///
/// TwoNN on a few hundred texts is noisy: on small backbones the layer of the
/// minimum moves by ten layers or more between samples of the same data
/// (docs/QUALITY.md). So the sample is split [`STABILITY_SPLITS`] times at
/// random into two halves with no text in common, the rule is applied to
/// each half, and the minimum is used only when in at least
/// [`STABILITY_AGREEMENT`] splits both halves put their window within one
/// layer of the whole sample's. Otherwise, and when there are fewer than 32
/// texts, the default method's window is used (as for a flat curve). The rule
/// text says which happened and how many splits agreed.
///
/// `keep_going` is asked before each layer's distances (the costly part:
/// `N^2 / 2` of them); once it says no, the selection stops and gives `None`.
pub fn select_layers(
    reps: &[Vec<Vec<f32>>],
    skip_fraction: f64,
    window: usize,
    family: Family,
    keep_going: &mut dyn FnMut() -> bool,
) -> Option<(Vec<f64>, Selection)> {
    use rayon::prelude::*;
    let texts = reps.first().map_or(0, Vec::len);
    let checked = texts >= MIN_TEXTS_FOR_CHECK;
    // Halves of one split share no text, so they are two independent samples
    // of the same data; halves that overlapped would share the very texts
    // that can pull a noisy estimate down.
    let half = texts / 2;
    let halves: Vec<Vec<usize>> = if checked {
        (0..STABILITY_SPLITS as u64)
            .flat_map(|k| {
                let order = random_subset(texts, texts, 0x5EED_0000 + k);
                [order[..half].to_vec(), order[half..2 * half].to_vec()]
            })
            .collect()
    } else {
        Vec::new()
    };
    let everything: Vec<usize> = (0..texts).collect();
    let mut curve = Vec::with_capacity(reps.len());
    let mut half_curves = vec![Vec::with_capacity(reps.len()); halves.len()];
    for layer in reps {
        if !keep_going() {
            return None;
        }
        let distances = PairDistances::new(layer);
        let id = |subset: &[usize]| {
            distances
                .as_ref()
                .and_then(|d| d.intrinsic_dimension(subset, DEFAULT_KEEP_FRACTION))
                .unwrap_or(f64::NAN)
        };
        curve.push(id(&everything));
        let ids: Vec<f64> = halves.par_iter().map(|h| id(h)).collect();
        for (c, v) in half_curves.iter_mut().zip(ids) {
            c.push(v);
        }
    }

    let n = curve.len();
    if n == 0 {
        return Some((curve, select_window(&[], skip_fraction, window, family)));
    }
    let window = window.clamp(1, n);
    let skip = skipped_layers(n, skip_fraction);
    let whole = match find_minimum(&curve, skip, window) {
        Ok(m) => m,
        Err(reason) => return Some((curve, fallback(n, skip, window, reason, family))),
    };
    let found = minimum_words(&whole, skip, n, window);
    if !checked {
        let reason = format!(
            "{found}, but {texts} texts are too few to check that minimum (at least {MIN_TEXTS_FOR_CHECK})"
        );
        return Some((curve, fallback(n, skip, window, reason, family)));
    }
    let near = |c: &Vec<f64>| {
        find_minimum(c, skip, window).is_ok_and(|m| m.start.abs_diff(whole.start) <= 1)
    };
    let agree = half_curves
        .chunks(2)
        .filter(|pair| pair.iter().all(near))
        .count();
    let agreement = format!(
        "in {agree} of {STABILITY_SPLITS} random splits of the sample into two halves both halves put their window within one layer"
    );
    let selection = if agree >= STABILITY_AGREEMENT {
        Selection {
            layers: window_at(whole.start, window),
            rule: format!("{found}; {agreement}"),
        }
    } else {
        fallback(
            n,
            skip,
            window,
            format!("{found}, not stable: only {agreement} of it"),
            family,
        )
    };
    Some((curve, selection))
}

/// SplitMix64: tiny and deterministic, for the random halves (and test data).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The family of the tests' curves (its default window: two thirds).
    const FAMILY: Family = Family::Llama;

    impl SplitMix {
        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            // Box-Muller; 1 - u avoids ln(0).
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    /// How points are spread inside the subspace.
    #[derive(Clone, Copy)]
    enum Spread {
        /// Uniform in the unit cube.
        Cube,
        /// Isotropic Gaussian: no hard boundary.
        Gaussian,
    }

    /// `n` points in a random `d`-dimensional linear subspace of R^ambient
    /// (random Gaussian basis, random offset).
    fn subspace_points_with(
        n: usize,
        d: usize,
        ambient: usize,
        seed: u64,
        spread: Spread,
    ) -> Vec<Vec<f32>> {
        let mut rng = SplitMix(seed);
        let basis: Vec<Vec<f64>> = (0..d)
            .map(|_| (0..ambient).map(|_| rng.normal()).collect())
            .collect();
        let offset: Vec<f64> = (0..ambient).map(|_| rng.normal()).collect();
        (0..n)
            .map(|_| {
                let coeffs: Vec<f64> = (0..d)
                    .map(|_| match spread {
                        Spread::Cube => rng.uniform(),
                        Spread::Gaussian => rng.normal(),
                    })
                    .collect();
                (0..ambient)
                    .map(|k| {
                        let v = offset[k]
                            + coeffs
                                .iter()
                                .zip(&basis)
                                .map(|(c, b)| c * b[k])
                                .sum::<f64>();
                        v as f32
                    })
                    .collect()
            })
            .collect()
    }

    fn subspace_points(n: usize, d: usize, ambient: usize, seed: u64) -> Vec<Vec<f32>> {
        subspace_points_with(n, d, ambient, seed, Spread::Cube)
    }

    fn assert_close_relative(estimate: f64, truth: f64, tolerance: f64) {
        let rel = (estimate - truth).abs() / truth;
        assert!(
            rel <= tolerance,
            "estimate {estimate:.3} vs true {truth}: relative error {rel:.3} > {tolerance}"
        );
    }

    #[test]
    fn recovers_dimension_of_uniform_cubes_in_subspaces() {
        for (d, seed) in [(2usize, 11u64), (5, 12), (10, 13)] {
            let pts = subspace_points(1000, d, 50, seed);
            let id = intrinsic_dimension(&pts).expect("enough points");
            assert_close_relative(id, d as f64, 0.2);
        }
    }

    #[test]
    fn cube_boundary_bias_stays_bounded_across_seeds() {
        // Facco et al. benchmark on periodic cubes; with hard boundaries and
        // N = 1000 the d = 10 estimate is systematically ~15% low (boundary
        // points see compressed ratios), so over many seeds only the d <= 5
        // cases hold to 20%. This pins the bias down rather than relying on a
        // lucky seed in the test above.
        for seed in 0..3u64 {
            for d in [2usize, 5] {
                let id = intrinsic_dimension(&subspace_points(1000, d, 50, 100 + seed)).unwrap();
                assert_close_relative(id, d as f64, 0.2);
            }
            let id10 = intrinsic_dimension(&subspace_points(1000, 10, 50, 300 + seed)).unwrap();
            assert!((7.0..=11.0).contains(&id10), "d = 10 cube estimate {id10}");
        }
    }

    #[test]
    fn recovers_dimension_of_gaussian_clouds_in_subspaces() {
        // Without a boundary the estimate is tight for every seed.
        for seed in 0..3u64 {
            for d in [2usize, 5, 10] {
                let pts = subspace_points_with(1000, d, 50, 500 + seed, Spread::Gaussian);
                let id = intrinsic_dimension(&pts).unwrap();
                assert_close_relative(id, d as f64, 0.15);
            }
        }
    }

    #[test]
    fn recovers_dimension_of_a_line() {
        let pts = subspace_points(1000, 1, 50, 7);
        let id = intrinsic_dimension(&pts).unwrap();
        assert_close_relative(id, 1.0, 0.2);
    }

    #[test]
    fn keep_fraction_variant_is_consistent() {
        let pts = subspace_points(500, 3, 20, 3);
        assert_eq!(
            intrinsic_dimension(&pts),
            intrinsic_dimension_with(&pts, 0.9)
        );
        let full = intrinsic_dimension_with(&pts, 1.0).unwrap();
        assert!(full.is_finite());
        assert_close_relative(full, 3.0, 0.3);
        assert_eq!(intrinsic_dimension_with(&pts, 0.0), None);
        assert_eq!(intrinsic_dimension_with(&pts, 1.5), None);
        assert_eq!(intrinsic_dimension_with(&pts, f64::NAN), None);
    }

    #[test]
    fn duplicates_are_dropped_but_do_not_break_the_estimate() {
        let mut pts = subspace_points(600, 4, 30, 5);
        let reference = intrinsic_dimension(&pts).unwrap();
        // Duplicate a third of the points: those rows (and their copies) lose
        // their own ratio, but the estimate must stay finite and sensible.
        let copies: Vec<Vec<f32>> = pts.iter().step_by(3).cloned().collect();
        pts.extend(copies);
        let with_dups = intrinsic_dimension(&pts).unwrap();
        assert!(with_dups.is_finite());
        assert_close_relative(with_dups, reference, 0.25);
    }

    #[test]
    fn all_duplicates_or_too_few_points_give_none() {
        let same = vec![vec![1.0f32, 2.0, 3.0]; 10];
        assert_eq!(intrinsic_dimension(&same), None);
        assert_eq!(intrinsic_dimension(&[]), None);
        let two = vec![vec![0.0f32, 0.0], vec![1.0, 0.0]];
        assert_eq!(intrinsic_dimension(&two), None);
        // Three distinct points but one pair duplicated: only one usable ratio.
        let dup = vec![vec![0.0f32], vec![0.0], vec![1.0], vec![3.0]];
        assert_eq!(intrinsic_dimension(&dup), None);
    }

    #[test]
    fn three_points_on_a_line_by_hand() {
        // Points 0, 1, 3: ratios are 3/1, 2/1 and 3/2... sorted [1.5, 2, 3];
        // keep floor(2.7) = 2 -> x = ln 1.5, ln 2 ; y = -ln(2/3), -ln(1/3).
        let pts = vec![vec![0.0f32], vec![1.0], vec![3.0]];
        let (x1, x2) = (1.5f64.ln(), 2.0f64.ln());
        let (y1, y2) = (-(2.0f64 / 3.0).ln(), -(1.0f64 / 3.0).ln());
        let expected = (x1 * y1 + x2 * y2) / (x1 * x1 + x2 * x2);
        let got = intrinsic_dimension(&pts).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn ragged_rows_and_non_finite_points() {
        let ragged = vec![vec![0.0f32, 1.0], vec![1.0], vec![2.0, 2.0]];
        assert_eq!(intrinsic_dimension(&ragged), None);
        let mut pts = subspace_points(300, 2, 10, 9);
        let clean = intrinsic_dimension(&pts).unwrap();
        pts.push(vec![f32::NAN; 10]);
        pts.push(vec![f32::INFINITY; 10]);
        assert_eq!(intrinsic_dimension(&pts), Some(clean));
    }

    #[test]
    fn squared_distance_matches_naive_for_all_lengths() {
        let mut rng = SplitMix(1);
        for len in 0..20 {
            let a: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum();
            assert!((squared_distance(&a, &b) - naive).abs() < 1e-9);
        }
    }

    fn curve_with_min(n: usize, at: usize) -> Vec<f64> {
        (0..n)
            .map(|i| if i == at { 5.0 } else { 10.0 + i as f64 * 0.1 })
            .collect()
    }

    #[test]
    fn window_starts_at_minimum_in_the_middle() {
        let curve = curve_with_min(30, 14);
        let sel = select_window(&curve, 0.2, 3, FAMILY);
        assert_eq!(sel.layers, vec![14, 15, 16]);
        assert_eq!(
            sel.rule,
            "ID minimum 5.00 at layer 14 after skipping 6 of 30 layers; window of 3"
        );
    }

    #[test]
    fn minimum_at_last_layer_shifts_window_left() {
        let curve = curve_with_min(30, 29);
        let sel = select_window(&curve, 0.2, 3, FAMILY);
        assert_eq!(sel.layers, vec![27, 28, 29]);
        assert!(sel.rule.contains("at layer 29"), "{}", sel.rule);
        assert!(sel.rule.contains("shifted left"), "{}", sel.rule);
        let near_end = select_window(&curve_with_min(30, 28), 0.2, 3, FAMILY);
        assert_eq!(near_end.layers, vec![27, 28, 29]);
    }

    #[test]
    fn minimum_in_skipped_region_is_ignored() {
        let mut curve = curve_with_min(30, 20);
        curve[2] = 1.0; // early lexical layers often have a low ID
        let sel = select_window(&curve, 0.2, 3, FAMILY);
        assert_eq!(sel.layers, vec![20, 21, 22]);
        // ceil(0.2 * 32) = 7: layer 6 is skipped too, layer 7 is not.
        let mut c = vec![10.0; 32];
        c[6] = 1.0;
        c[7] = 2.0;
        assert_eq!(select_window(&c, 0.2, 2, FAMILY).layers, vec![7, 8]);
    }

    #[test]
    fn flat_curve_falls_back_to_the_default_window() {
        let curve: Vec<f64> = (0..30).map(|i| 10.0 + (i % 2) as f64 * 0.1).collect();
        let sel = select_window(&curve, 0.2, 3, FAMILY);
        // the default method's window: round(0.67 * 30) = 20
        assert_eq!(sel.layers, vec![20, 21, 22]);
        let kv = crate::method::Method::from_name("kv")
            .unwrap()
            .reroute
            .unwrap()
            .layers;
        assert_eq!(sel.layers, kv.resolve(30, FAMILY));
        assert!(sel.rule.contains("flat"), "{}", sel.rule);
        assert!(sel.rule.contains("at 0.67 of the depth"), "{}", sel.rule);
        // Qwen2's default window is at half the depth, and so is its fallback.
        let qwen = select_window(&curve, 0.2, 3, Family::Qwen2);
        assert_eq!(qwen.layers, vec![15, 16, 17]);
        assert_eq!(qwen.layers, kv.resolve(30, Family::Qwen2));
        assert!(qwen.rule.contains("at 0.50 of the depth"), "{}", qwen.rule);
        let even = select_window(&curve, 0.2, 4, FAMILY);
        assert_eq!(even.layers, vec![20, 21, 22, 23]);
        // A skip beyond two thirds keeps the fallback out of the skipped layers.
        assert_eq!(
            select_window(&curve, 0.8, 3, FAMILY).layers,
            vec![24, 25, 26]
        );
    }

    #[test]
    fn nan_entries_are_ignored() {
        let mut curve = curve_with_min(30, 12);
        curve[20] = f64::NAN;
        curve[25] = f64::NEG_INFINITY;
        let sel = select_window(&curve, 0.2, 3, FAMILY);
        assert_eq!(sel.layers, vec![12, 13, 14]);

        let all_nan = vec![f64::NAN; 10];
        let sel = select_window(&all_nan, 0.2, 3, FAMILY);
        // round(0.67 * 10) = 7
        assert_eq!(sel.layers, vec![7, 8, 9]);
        assert!(sel.rule.contains("no finite ID"), "{}", sel.rule);
    }

    #[test]
    fn a_fraction_passed_as_f32_skips_as_many_layers_as_in_f64() {
        // 0.2f32 is 0.2000000030 in f64: 30 layers must still skip 6, not 7.
        let curve = curve_with_min(30, 6);
        let wide = select_window(&curve, f64::from(0.2f32), 3, FAMILY);
        assert_eq!(wide.layers, vec![6, 7, 8], "{}", wide.rule);
        assert!(wide.rule.contains("skipping 6 of 30"), "{}", wide.rule);
        assert_eq!(select_window(&curve, 0.2, 3, FAMILY), wide);
    }

    /// `reps[layer][text]`: `texts` points per layer, each layer in a random
    /// subspace of R^48 of the dimension `dims[layer]`.
    fn layered_sample(dims: &[usize], texts: usize, seed: u64) -> Vec<Vec<Vec<f32>>> {
        dims.iter()
            .enumerate()
            .map(|(l, &d)| subspace_points_with(texts, d, 48, seed + l as u64, Spread::Gaussian))
            .collect()
    }

    #[test]
    fn a_clear_minimum_survives_the_halves() {
        // Layer 6 of 12 lives in 3 dimensions, the rest in 12.
        let mut dims = vec![12; 12];
        dims[6] = 3;
        let (curve, sel) =
            select_layers(&layered_sample(&dims, 200, 7), 0.2, 3, FAMILY, &mut || true).unwrap();
        assert_eq!(curve.len(), 12);
        assert!(curve[6] < 5.0 && curve[3] > 8.0, "{curve:?}");
        assert_eq!(sel.layers, vec![6, 7, 8], "{}", sel.rule);
        assert!(
            sel.rule.contains(&format!(
                "in {STABILITY_SPLITS} of {STABILITY_SPLITS} random splits"
            )),
            "{}",
            sel.rule
        );
        // The curve is the plain per-layer estimate.
        let reps = layered_sample(&dims, 200, 7);
        let plain: Vec<f64> = reps
            .iter()
            .map(|l| intrinsic_dimension(l).unwrap())
            .collect();
        assert_eq!(curve, plain);
    }

    #[test]
    fn a_minimum_made_of_noise_falls_back_to_the_default_window() {
        // Every layer draws its points from one and the same 10-dimensional
        // distribution: the curve still has a minimum, wherever sampling
        // noise puts it, and independent halves put theirs elsewhere.
        let (layers, texts) = (12, 64);
        let pool = subspace_points_with(layers * texts, 10, 48, 11, Spread::Gaussian);
        let reps: Vec<Vec<Vec<f32>>> = pool.chunks(texts).map(<[Vec<f32>]>::to_vec).collect();
        let curve: Vec<f64> = reps
            .iter()
            .map(|l| intrinsic_dimension(l).unwrap())
            .collect();
        let plain = select_window(&curve, 0.2, 3, FAMILY);
        assert!(plain.rule.starts_with("ID minimum"), "{}", plain.rule);
        let (_, sel) = select_layers(&reps, 0.2, 3, FAMILY, &mut || true).unwrap();
        // round(0.67 * 12) = 8
        assert_eq!(sel.layers, vec![8, 9, 10], "{}", sel.rule);
        assert!(sel.rule.contains("not stable"), "{}", sel.rule);
    }

    #[test]
    fn a_stopped_selection_computes_no_more_layers() {
        let dims = vec![12; 12];
        let reps = layered_sample(&dims, 64, 7);
        let mut asked = 0;
        let mut keep_going = || {
            asked += 1;
            asked <= 3
        };
        assert!(select_layers(&reps, 0.2, 3, FAMILY, &mut keep_going).is_none());
        // Three layers' distances, then the fourth question stopped it.
        assert_eq!(asked, 4);
    }

    #[test]
    fn too_few_texts_fall_back_and_say_why() {
        let mut dims = vec![12; 12];
        dims[6] = 3;
        let (_, sel) =
            select_layers(&layered_sample(&dims, 20, 7), 0.2, 3, FAMILY, &mut || true).unwrap();
        assert_eq!(sel.layers, vec![8, 9, 10]);
        assert!(sel.rule.contains("too few"), "{}", sel.rule);
    }

    #[test]
    fn pair_distances_match_the_direct_estimate_on_any_subset() {
        let mut points = subspace_points(120, 4, 16, 5);
        points[3] = points[4].clone(); // an exact duplicate
        points[7][2] = f32::NAN; // takes no part
        let distances = PairDistances::new(&points).unwrap();
        let all: Vec<usize> = (0..points.len()).collect();
        for subset in [all, random_subset(120, 60, 9), random_subset(120, 60, 10)] {
            let direct: Vec<Vec<f32>> = subset.iter().map(|&i| points[i].clone()).collect();
            let (a, b) = (
                distances.intrinsic_dimension(&subset, 0.9).unwrap(),
                intrinsic_dimension(&direct).unwrap(),
            );
            assert_eq!(a, b);
        }
        assert!(distances.intrinsic_dimension(&[0, 1], 0.9).is_none());
        assert!(PairDistances::new(&[vec![1.0, 2.0], vec![1.0]]).is_none());
        assert!(PairDistances::new(&[]).is_none());
    }

    #[test]
    fn random_subsets_are_distinct_deterministic_indices() {
        let a = random_subset(100, 50, 3);
        assert_eq!(a, random_subset(100, 50, 3));
        assert_ne!(a, random_subset(100, 50, 4));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 50);
        assert!(sorted.iter().all(|&i| i < 100));
    }

    #[test]
    fn degenerate_sizes() {
        let empty = select_window(&[], 0.2, 3, FAMILY);
        assert!(empty.layers.is_empty());
        assert!(empty.rule.contains("empty"));

        // Window longer than the curve: every layer.
        assert_eq!(
            select_window(&[3.0, 1.0], 0.2, 5, FAMILY).layers,
            vec![0, 1]
        );
        // Window 0 behaves as 1.
        let one = select_window(&curve_with_min(10, 6), 0.2, 0, FAMILY);
        assert_eq!(one.layers, vec![6]);
        assert!(one.rule.contains("window of 1 layer"), "{}", one.rule);
        // Single layer curve.
        assert_eq!(select_window(&[4.0], 0.5, 3, FAMILY).layers, vec![0]);
        // Skip everything: the last layer stays eligible.
        assert_eq!(
            select_window(&curve_with_min(8, 7), 1.0, 1, FAMILY).layers,
            vec![7]
        );
    }

    #[test]
    fn short_tail_keeps_window_length() {
        // n = 10, skip ceil(0.8 * 10) = 8, window 3 cannot fit in [8, 9]:
        // it ends at the last layer and reaches into the skipped region.
        let sel = select_window(&curve_with_min(10, 9), 0.8, 3, FAMILY);
        assert_eq!(sel.layers, vec![7, 8, 9]);
    }

    #[test]
    fn selection_serialises() {
        let sel = select_window(&curve_with_min(12, 5), 0.25, 2, FAMILY);
        let json = serde_json::to_string(&sel).unwrap();
        let back: Selection = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sel);
    }
}
