//! TwoNN intrinsic-dimension estimation (Facco, d'Errico, Rodriguez & Laio,
//! "Estimating the intrinsic dimension of datasets by a minimal neighborhood
//! information", Sci. Rep. 2017) and the layer-window rule built on it.
//!
//! KV-Embedding re-routes at a few consecutive decoder layers; the layers are
//! chosen where the hidden-state manifold is most compressed, i.e. at the
//! minimum of the per-layer intrinsic-dimension (ID) curve, after skipping the
//! early layers whose ID is dominated by token-level (lexical) structure.

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
    let dim = points.first()?.len();
    if points.iter().any(|p| p.len() != dim) {
        return None;
    }
    // A NaN coordinate would poison every distance it touches and make the
    // neighbour search meaningless, so such points take no part at all.
    let valid: Vec<&[f32]> = points
        .iter()
        .filter(|p| p.iter().all(|x| x.is_finite()))
        .map(Vec::as_slice)
        .collect();
    let mut mu = two_nearest_ratios(&valid);
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

/// `r2 / r1` for every point with `0 < r1 < r2`.
///
/// `r1 == 0` (an exact duplicate) makes the ratio undefined. `r1 == r2` has
/// probability zero for continuous data and in practice means the two nearest
/// neighbours are copies of one point; such `mu = 1` values would pile up at
/// `ln mu = 0`, push every other point's empirical CDF up and inflate the
/// slope, so they are dropped as in the reference implementation. Duplicates
/// still serve as neighbours of the other points.
fn two_nearest_ratios(points: &[&[f32]]) -> Vec<f64> {
    let n = points.len();
    if n < 3 {
        return Vec::new();
    }
    // Squared distances to the nearest and second-nearest neighbour.
    let mut best = vec![(f64::INFINITY, f64::INFINITY); n];
    // Each unordered pair is visited once and updates both ends, halving the
    // O(N^2 D) work; no per-pair allocation.
    for i in 0..n {
        for j in (i + 1)..n {
            let d2 = squared_distance(points[i], points[j]);
            push_two_smallest(&mut best[i], d2);
            push_two_smallest(&mut best[j], d2);
        }
    }
    best.into_iter()
        .filter(|&(r1, r2)| r1 > 0.0 && r2 > r1)
        .map(|(r1, r2)| (r2 / r1).sqrt())
        .collect()
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

/// Depth (fraction of the layers) the fallback window is centred on.
const FALLBACK_DEPTH: f64 = 0.6;

/// Chooses `window` contiguous layers from a per-layer ID curve.
///
/// The first `ceil(skip_fraction * n)` layers are skipped; the window starts at
/// the layer of minimum ID among the rest and is shifted left when it would run
/// past the last layer. Non-finite entries are ignored. When no clear minimum
/// exists (fewer than one finite value after the skip, or a relative range
/// below 5%), the window is centred at 60% depth instead.
///
/// `window == 0` is treated as 1, and a window longer than the curve selects
/// every layer. When the region after the skip is shorter than the window, the
/// window keeps its length and ends at the last layer, reaching back into the
/// skipped layers.
pub fn select_window(curve: &[f64], skip_fraction: f64, window: usize) -> Selection {
    let n = curve.len();
    if n == 0 {
        return Selection {
            layers: Vec::new(),
            rule: "empty ID curve: no layers selected".to_string(),
        };
    }
    let window = window.clamp(1, n);
    let skip_fraction = if skip_fraction.is_nan() {
        0.0
    } else {
        skip_fraction.clamp(0.0, 1.0)
    };
    // At least one layer must stay eligible for the minimum.
    let skip = ((skip_fraction * n as f64).ceil() as usize).min(n - 1);
    let last_start = n - window;
    let layers_from = |start: usize| (start..start + window).collect::<Vec<_>>();
    let window_words = |w: usize| {
        if w == 1 {
            "window of 1 layer".to_string()
        } else {
            format!("window of {w}")
        }
    };

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

    // Either the clear minimum, or why there is none.
    let clear_minimum = match min {
        None => Err(format!(
            "no finite ID value after skipping {skip} of {n} layers"
        )),
        Some((argmin, m)) => {
            let spread = if max > 0.0 {
                (max - m) / max
            } else if max == m {
                0.0
            } else {
                f64::INFINITY
            };
            if spread < FLAT_RELATIVE_RANGE {
                Err(format!(
                    "ID curve flat after skipping {skip} of {n} layers (relative range {spread:.3} < {FLAT_RELATIVE_RANGE})"
                ))
            } else {
                Ok((argmin, m))
            }
        }
    };

    let (argmin, value) = match clear_minimum {
        Ok(found) => found,
        Err(reason) => {
            let centre = ((FALLBACK_DEPTH * n as f64).floor() as usize).min(n - 1);
            // Prefer staying out of the skipped layers when the window fits there.
            let lowest = skip.min(last_start);
            let start = centre
                .saturating_sub((window - 1) / 2)
                .clamp(lowest, last_start);
            return Selection {
                layers: layers_from(start),
                rule: format!(
                    "{reason}; fallback {} centred at 60% depth (layer {centre}), layers {}-{}",
                    window_words(window),
                    start,
                    start + window - 1
                ),
            };
        }
    };
    let start = argmin.min(last_start);
    let mut rule = format!(
        "ID minimum {value:.2} at layer {argmin} after skipping {skip} of {n} layers; {}",
        window_words(window)
    );
    if start != argmin {
        rule.push_str(&format!(
            ", shifted left to layers {}-{} to end at the last layer",
            start,
            start + window - 1
        ));
    }
    Selection {
        layers: layers_from(start),
        rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: tiny, deterministic, good enough for test data.
    struct SplitMix(u64);

    impl SplitMix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

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
        let sel = select_window(&curve, 0.2, 3);
        assert_eq!(sel.layers, vec![14, 15, 16]);
        assert_eq!(
            sel.rule,
            "ID minimum 5.00 at layer 14 after skipping 6 of 30 layers; window of 3"
        );
    }

    #[test]
    fn minimum_at_last_layer_shifts_window_left() {
        let curve = curve_with_min(30, 29);
        let sel = select_window(&curve, 0.2, 3);
        assert_eq!(sel.layers, vec![27, 28, 29]);
        assert!(sel.rule.contains("at layer 29"), "{}", sel.rule);
        assert!(sel.rule.contains("shifted left"), "{}", sel.rule);
        let near_end = select_window(&curve_with_min(30, 28), 0.2, 3);
        assert_eq!(near_end.layers, vec![27, 28, 29]);
    }

    #[test]
    fn minimum_in_skipped_region_is_ignored() {
        let mut curve = curve_with_min(30, 20);
        curve[2] = 1.0; // early lexical layers often have a low ID
        let sel = select_window(&curve, 0.2, 3);
        assert_eq!(sel.layers, vec![20, 21, 22]);
        // ceil(0.2 * 32) = 7: layer 6 is skipped too, layer 7 is not.
        let mut c = vec![10.0; 32];
        c[6] = 1.0;
        c[7] = 2.0;
        assert_eq!(select_window(&c, 0.2, 2).layers, vec![7, 8]);
    }

    #[test]
    fn flat_curve_falls_back_to_sixty_percent_depth() {
        let curve: Vec<f64> = (0..30).map(|i| 10.0 + (i % 2) as f64 * 0.1).collect();
        let sel = select_window(&curve, 0.2, 3);
        // centre floor(0.6 * 30) = 18
        assert_eq!(sel.layers, vec![17, 18, 19]);
        assert!(sel.rule.contains("flat"), "{}", sel.rule);
        assert!(sel.rule.contains("60% depth"), "{}", sel.rule);
        let even = select_window(&curve, 0.2, 4);
        assert_eq!(even.layers, vec![17, 18, 19, 20]);
    }

    #[test]
    fn nan_entries_are_ignored() {
        let mut curve = curve_with_min(30, 12);
        curve[20] = f64::NAN;
        curve[25] = f64::NEG_INFINITY;
        let sel = select_window(&curve, 0.2, 3);
        assert_eq!(sel.layers, vec![12, 13, 14]);

        let all_nan = vec![f64::NAN; 10];
        let sel = select_window(&all_nan, 0.2, 3);
        // centre floor(0.6 * 10) = 6
        assert_eq!(sel.layers, vec![5, 6, 7]);
        assert!(sel.rule.contains("no finite ID"), "{}", sel.rule);
    }

    #[test]
    fn degenerate_sizes() {
        let empty = select_window(&[], 0.2, 3);
        assert!(empty.layers.is_empty());
        assert!(empty.rule.contains("empty"));

        // Window longer than the curve: every layer.
        assert_eq!(select_window(&[3.0, 1.0], 0.2, 5).layers, vec![0, 1]);
        // Window 0 behaves as 1.
        let one = select_window(&curve_with_min(10, 6), 0.2, 0);
        assert_eq!(one.layers, vec![6]);
        assert!(one.rule.contains("window of 1 layer"), "{}", one.rule);
        // Single layer curve.
        assert_eq!(select_window(&[4.0], 0.5, 3).layers, vec![0]);
        // Skip everything: the last layer stays eligible.
        assert_eq!(select_window(&curve_with_min(8, 7), 1.0, 1).layers, vec![7]);
    }

    #[test]
    fn short_tail_keeps_window_length() {
        // n = 10, skip ceil(0.8 * 10) = 8, window 3 cannot fit in [8, 9]:
        // it ends at the last layer and reaches into the skipped region.
        let sel = select_window(&curve_with_min(10, 9), 0.8, 3);
        assert_eq!(sel.layers, vec![7, 8, 9]);
    }

    #[test]
    fn selection_serialises() {
        let sel = select_window(&curve_with_min(12, 5), 0.25, 2);
        let json = serde_json::to_string(&sel).unwrap();
        let back: Selection = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sel);
    }
}
