//! Fitting the corpus calibration of the embedding space (the map itself,
//! and how it is applied, is [`kvembed_proto::SpaceMap`]).
//!
//! From a sample of a corpus's embeddings, training-free statistics: the
//! mean, and the principal directions of the covariance with their
//! variances. Three maps use them:
//!
//! * `center`: subtract the mean (the common component every embedding of a
//!   decoder shares).
//! * `remove:K`: subtract the mean and remove the top `K` principal
//!   directions (Mu & Viswanath, "All-but-the-Top", 2018).
//! * `whiten:A`: subtract the mean and whiten with the covariance shrunk
//!   towards a multiple of the identity, `S_A = (1 - A) S + A (tr S / d) I`
//!   (Ledoit-Wolf style shrinkage; `A = 1` is centring only, `A = 0` full
//!   whitening, which a sample smaller than the dimension cannot support).
//!   The map is `S_A^{-1/2}` scaled by `sqrt(A tr S / d)`, so directions the
//!   sample did not see are left as they are.
//! * `whiten:auto`: the same with `A` estimated from the sample by Ledoit
//!   and Wolf's formula ("A well-conditioned estimator for large-dimensional
//!   covariance matrices", 2004): the spread of the per-text outer products
//!   around `S` against the distance of `S` from isotropy. Small samples in
//!   many dimensions get more shrinkage, large ones less.

use crate::{EngineError, Result};
use kvembed_proto::SpaceMap;
use nalgebra::{DMatrix, SymmetricEigen};

/// How to fit a [`SpaceMap`] (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SpaceFit {
    Center,
    Remove {
        top: usize,
    },
    Whiten {
        shrink: f64,
    },
    /// Whitening with the Ledoit-Wolf shrinkage of the sample.
    WhitenAuto,
}

/// The default: whitening with the covariance shrunk halfway to isotropy.
pub const DEFAULT_FIT: SpaceFit = SpaceFit::Whiten { shrink: 0.5 };

impl SpaceFit {
    /// Parses `center`, `remove:K`, `whiten[:A]` and `whiten:auto`.
    pub fn parse(s: &str) -> Result<SpaceFit> {
        let bad = || {
            EngineError::invalid(
                "space calibration",
                format!("'{s}' (center, remove:K with K >= 1, whiten, whiten:auto or whiten:A with 0 < A <= 1)"),
            )
        };
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        match (name, arg) {
            ("center", None) => Ok(SpaceFit::Center),
            ("remove", Some(k)) => match k.parse::<usize>() {
                Ok(top) if top >= 1 => Ok(SpaceFit::Remove { top }),
                _ => Err(bad()),
            },
            ("whiten", None) => Ok(DEFAULT_FIT),
            ("whiten", Some("auto")) => Ok(SpaceFit::WhitenAuto),
            ("whiten", Some(a)) => match a.parse::<f64>() {
                Ok(shrink) if shrink > 0.0 && shrink <= 1.0 => Ok(SpaceFit::Whiten { shrink }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }

    pub fn name(&self) -> String {
        match self {
            SpaceFit::Center => "center".into(),
            SpaceFit::Remove { top } => format!("remove:{top}"),
            SpaceFit::Whiten { shrink } => format!("whiten:{shrink}"),
            SpaceFit::WhitenAuto => "whiten:auto".into(),
        }
    }
}

/// Gains smaller than this are left out of the map (they change nothing a
/// cosine would show).
const MIN_GAIN: f64 = 1e-4;

/// Fits a map on `vecs` (at least 2 embeddings of one dimension).
pub fn fit(vecs: &[Vec<f32>], how: SpaceFit) -> Result<SpaceMap> {
    let n = vecs.len();
    if n < 2 {
        return Err(EngineError::invalid(
            "space calibration",
            format!("needs at least 2 texts, got {n}"),
        ));
    }
    let dim = vecs[0].len();
    if dim == 0 || vecs.iter().any(|v| v.len() != dim) {
        return Err(EngineError::invalid(
            "space calibration",
            "the embeddings differ in dimension",
        ));
    }
    let mut mean = vec![0f64; dim];
    for v in vecs {
        for (m, x) in mean.iter_mut().zip(v) {
            *m += *x as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    if how == SpaceFit::Center {
        return Ok(SpaceMap {
            mean: mean32,
            directions: vec![],
            gains: vec![],
        });
    }
    // Centred sample, one row per text.
    let x = DMatrix::<f64>::from_fn(n, dim, |i, j| vecs[i][j] as f64 - mean[j]);
    let (variances, dirs) = principal_directions(&x);
    let trace: f64 = variances.iter().sum();
    let tau = trace / dim as f64;
    let how = match how {
        SpaceFit::WhitenAuto => SpaceFit::Whiten {
            shrink: ledoit_wolf_shrinkage(&x, &variances),
        },
        other => other,
    };
    let mut directions = Vec::new();
    let mut gains = Vec::new();
    for (k, (&var, u)) in variances.iter().zip(&dirs).enumerate() {
        let gain = match how {
            SpaceFit::Center | SpaceFit::WhitenAuto => unreachable!(),
            SpaceFit::Remove { top } => {
                if k >= top {
                    break;
                }
                -1.0
            }
            SpaceFit::Whiten { shrink } => {
                let a = shrink * tau;
                (a / ((1.0 - shrink) * var + a)).sqrt() - 1.0
            }
        };
        if gain.abs() < MIN_GAIN {
            continue;
        }
        directions.extend(u.iter().map(|&v| v as f32));
        gains.push(gain as f32);
    }
    let map = SpaceMap {
        mean: mean32,
        directions,
        gains,
    };
    map.validate()
        .map_err(|e| EngineError::Other(format!("space calibration: {e}")))?;
    Ok(map)
}

/// Ledoit and Wolf's shrinkage intensity for the sample covariance `S` of
/// `x` (centred rows) towards `(tr S / d) I`, in (0, 1]: `b^2 / d^2`, with
/// `d^2 = |S - m I|^2` (m = tr S / d) and `b^2` the mean squared distance of
/// the texts' outer products from `S` over n, at most `d^2`. `variances` are
/// the non-zero eigenvalues of `S`, which give `|S|^2` and `tr S`.
fn ledoit_wolf_shrinkage(x: &DMatrix<f64>, variances: &[f64]) -> f64 {
    let (n, dim) = x.shape();
    let n_f = n as f64;
    let trace: f64 = variances.iter().sum();
    let s2: f64 = variances.iter().map(|l| l * l).sum();
    let d2 = s2 - trace * trace / dim as f64;
    // sum_k |x_k x_k^T - S|^2 = sum_k |x_k|^4 - n |S|^2.
    let fourth: f64 = x.row_iter().map(|r| r.norm_squared().powi(2)).sum();
    let b2 = ((fourth - n_f * s2) / (n_f * n_f)).max(0.0).min(d2);
    if d2 <= 0.0 {
        return 1.0;
    }
    (b2 / d2).clamp(1e-3, 1.0)
}

/// The covariance's eigenpairs of `x` (centred rows), largest variance
/// first, those above rounding only: through the `n x n` Gram matrix when
/// there are fewer samples than dimensions (its eigenvectors map to the
/// covariance's), else through the `d x d` covariance.
fn principal_directions(x: &DMatrix<f64>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (n, dim) = x.shape();
    let mut pairs: Vec<(f64, Vec<f64>)> = Vec::new();
    if n <= dim {
        let gram = (x * x.transpose()) / n as f64;
        let eig = SymmetricEigen::new(gram);
        let top = eig.eigenvalues.iter().cloned().fold(0.0, f64::max);
        for (k, &lambda) in eig.eigenvalues.iter().enumerate() {
            if lambda <= top * 1e-10 {
                continue;
            }
            // u = X^T v / sqrt(n lambda) is a unit eigenvector of X^T X / n.
            let u = x.transpose() * eig.eigenvectors.column(k);
            let norm = u.norm();
            pairs.push((lambda, u.iter().map(|v| v / norm).collect()));
        }
    } else {
        let cov = (x.transpose() * x) / n as f64;
        let eig = SymmetricEigen::new(cov);
        let top = eig.eigenvalues.iter().cloned().fold(0.0, f64::max);
        for (k, &lambda) in eig.eigenvalues.iter().enumerate() {
            if lambda <= top * 1e-10 {
                continue;
            }
            pairs.push((lambda, eig.eigenvectors.column(k).iter().cloned().collect()));
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    pairs.into_iter().unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded sample with a common component and one dominant direction.
    fn sample(n: usize, dim: usize) -> Vec<Vec<f32>> {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        (0..n)
            .map(|_| {
                let big = 10.0 * next();
                (0..dim)
                    .map(|j| {
                        let common = 3.0;
                        let dominant = if j == 1 { big } else { 0.0 };
                        (common + dominant + next()) as f32
                    })
                    .collect()
            })
            .collect()
    }

    fn mapped(map: &SpaceMap, vecs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        vecs.iter()
            .map(|v| {
                let mut v = v.clone();
                map.apply(&mut v);
                v
            })
            .collect()
    }

    /// Variance of the mapped sample along coordinate `j`.
    fn variance(vecs: &[Vec<f32>], j: usize) -> f64 {
        let m = vecs.iter().map(|v| v[j] as f64).sum::<f64>() / vecs.len() as f64;
        vecs.iter().map(|v| (v[j] as f64 - m).powi(2)).sum::<f64>() / vecs.len() as f64
    }

    #[test]
    fn parses_the_fits() {
        assert_eq!(SpaceFit::parse("center").unwrap(), SpaceFit::Center);
        assert_eq!(
            SpaceFit::parse("remove:8").unwrap(),
            SpaceFit::Remove { top: 8 }
        );
        assert_eq!(SpaceFit::parse("whiten").unwrap(), DEFAULT_FIT);
        assert_eq!(
            SpaceFit::parse("whiten:0.25").unwrap(),
            SpaceFit::Whiten { shrink: 0.25 }
        );
        for bad in [
            "",
            "whiten:0",
            "whiten:1.5",
            "remove:0",
            "remove",
            "pca:3",
            "center:1",
        ] {
            assert!(SpaceFit::parse(bad).is_err(), "{bad}");
        }
        for f in [SpaceFit::Center, SpaceFit::Remove { top: 3 }, DEFAULT_FIT] {
            assert_eq!(SpaceFit::parse(&f.name()).unwrap(), f);
        }
    }

    #[test]
    fn center_subtracts_the_mean() {
        let vecs = sample(50, 6);
        let map = fit(&vecs, SpaceFit::Center).unwrap();
        assert!(map.gains.is_empty());
        let mean0 = vecs.iter().map(|v| v[0] as f64).sum::<f64>() / 50.0;
        assert!((map.mean[0] as f64 - mean0).abs() < 1e-5);
    }

    #[test]
    fn remove_takes_out_the_dominant_direction() {
        for n in [8, 60] {
            // n <= dim goes through the Gram matrix, n > dim the covariance.
            let vecs = sample(n, 10);
            let map = fit(&vecs, SpaceFit::Remove { top: 1 }).unwrap();
            assert_eq!(map.gains, vec![-1.0]);
            // The direction found is coordinate 1.
            assert!(map.directions[1].abs() > 0.99, "{:?}", map.directions);
            // Nothing of the sample is left along it.
            let out = mapped(&map, &vecs);
            for y in &out {
                let c: f32 = y.iter().zip(&map.directions).map(|(a, b)| a * b).sum();
                assert!(c.abs() < 1e-5, "n = {n}: {c}");
            }
            // Coordinate 1 held most of the variance and holds little now.
            let share =
                |v: &[Vec<f32>]| variance(v, 1) / (0..10).map(|j| variance(v, j)).sum::<f64>();
            let (before, after) = (share(&vecs), share(&out));
            assert!(before > 0.8 && after < 0.05, "n = {n}: {before} -> {after}");
        }
    }

    #[test]
    fn whitening_evens_out_the_variances() {
        let vecs = sample(200, 8);
        let before = variance(&vecs, 1) / variance(&vecs, 5);
        let map = fit(&vecs, SpaceFit::Whiten { shrink: 0.5 }).unwrap();
        let out = mapped(&map, &vecs);
        let after = variance(&out, 1) / variance(&out, 5);
        assert!(before > 50.0, "{before}");
        // Shrunk halfway: far more even, not fully.
        assert!(after < before / 5.0 && after > 1.5, "{before} -> {after}");
        // Full shrinkage is centring only.
        let center = fit(&vecs, SpaceFit::Whiten { shrink: 1.0 }).unwrap();
        assert!(center.gains.is_empty());
    }

    #[test]
    fn whitening_from_fewer_texts_than_dimensions() {
        let vecs = sample(6, 12);
        let map = fit(&vecs, DEFAULT_FIT).unwrap();
        // At most n - 1 directions have variance after centring.
        assert!(
            !map.gains.is_empty() && map.gains.len() <= 5,
            "{:?}",
            map.gains
        );
        // The directions are orthonormal.
        let k = map.gains.len();
        for a in 0..k {
            for b in 0..k {
                let d: f32 = (0..12)
                    .map(|j| map.directions[a * 12 + j] * map.directions[b * 12 + j])
                    .sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-4, "{a} {b} {d}");
            }
        }
    }

    #[test]
    fn ledoit_wolf_shrinks_small_samples_more() {
        // Isotropic noise: the sample covariance is all estimation error,
        // so the shrinkage is near 1; with a strong direction and many
        // texts it is small.
        let iso = |n: usize| -> DMatrix<f64> {
            let mut state = 7u64;
            DMatrix::from_fn(n, 20, |_, _| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
        };
        let shrink = |x: &DMatrix<f64>| {
            let m = x.row_mean();
            let xc = DMatrix::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] - m[j]);
            let (vars, _) = principal_directions(&xc);
            ledoit_wolf_shrinkage(&xc, &vars)
        };
        assert!(shrink(&iso(30)) > 0.5, "{}", shrink(&iso(30)));
        let vecs = sample(400, 20);
        let x = DMatrix::from_fn(400, 20, |i, j| vecs[i][j] as f64);
        let strong = shrink(&x);
        assert!(strong < 0.1, "{strong}");
        let map = fit(&vecs, SpaceFit::WhitenAuto).unwrap();
        assert!(!map.gains.is_empty());
        assert_eq!(
            SpaceFit::parse("whiten:auto").unwrap(),
            SpaceFit::WhitenAuto
        );
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(fit(&[vec![1.0, 2.0]], DEFAULT_FIT).is_err());
        assert!(fit(&[vec![1.0, 2.0], vec![1.0]], DEFAULT_FIT).is_err());
    }
}
