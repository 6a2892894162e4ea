//! Corpus calibration of the embedding space: a linear map fitted on a
//! sample of a corpus (the engine fits it, `kvembed-core::space`), stored
//! with the calibration, and applied to every embedding after the model.
//!
//! Decoder embeddings are anisotropic: they share a large common component
//! and a few dominant directions, so every cosine lies in a narrow band and
//! the differences that carry meaning are small. The map removes the
//! corpus mean and rescales the components along the sample's principal
//! directions:
//!
//! `y = normalize(x' + sum_i gain_i * u_i * (u_i . x'))` with `x' = x - mean`
//!
//! where the `u_i` are orthonormal. A gain of `-1` removes a direction, a
//! gain between `-1` and `0` shrinks it, a positive one stretches it
//! (whitening does both). One map is applied to
//! documents and queries alike, so cosine, inner product and L2 distance
//! keep ranking the same way.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpaceMap {
    /// The sample's mean embedding (`dim` values).
    pub mean: Vec<f32>,
    /// `k` orthonormal directions, row-major (`k * dim` values).
    pub directions: Vec<f32>,
    /// One gain per direction, each in `[-1, 100]`.
    pub gains: Vec<f32>,
}

impl SpaceMap {
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Checks the shapes and values: a stored map may have been edited.
    pub fn validate(&self) -> Result<(), String> {
        let dim = self.mean.len();
        if dim == 0 {
            return Err("the mean is empty".into());
        }
        if self.directions.len() != self.gains.len() * dim {
            return Err(format!(
                "{} direction values for {} gains of dimension {dim}",
                self.directions.len(),
                self.gains.len()
            ));
        }
        if let Some(g) = self.gains.iter().find(|g| !(-1.0..=100.0).contains(*g)) {
            return Err(format!("gain {g} outside [-1, 100]"));
        }
        if self
            .mean
            .iter()
            .chain(&self.directions)
            .any(|x| !x.is_finite())
        {
            return Err("a value is not finite".into());
        }
        Ok(())
    }

    /// Maps one embedding in place and scales it to unit length (a vector
    /// the map sends to zero stays zero). `v.len()` must be [`Self::dim`].
    pub fn apply(&self, v: &mut [f32]) {
        let dim = self.dim();
        assert_eq!(v.len(), dim, "embedding and space map differ in dimension");
        for (x, m) in v.iter_mut().zip(&self.mean) {
            *x -= m;
        }
        // Components along every direction first (of the centred vector),
        // then the corrections: the directions are orthonormal, so the
        // order does not matter, but reading one copy keeps that exact.
        let centred = v.to_vec();
        for (u, g) in self.directions.chunks_exact(dim).zip(&self.gains) {
            let c: f32 = u.iter().zip(&centred).map(|(a, b)| a * b).sum();
            let c = c * g;
            for (x, a) in v.iter_mut().zip(u) {
                *x += c * a;
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            for x in v.iter_mut() {
                *x /= n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centres_removes_and_normalizes() {
        // Directions e0 and e1 in 3-d; remove e0, halve e1.
        let map = SpaceMap {
            mean: vec![1.0, 0.0, 0.0],
            directions: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            gains: vec![-1.0, -0.5],
        };
        map.validate().unwrap();
        let mut v = vec![3.0, 2.0, 1.0];
        map.apply(&mut v);
        // x' = (2, 2, 1) -> (0, 1, 1) -> unit.
        let s = 0.5f32.sqrt();
        for (a, b) in v.iter().zip([0.0, s, s]) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn an_identity_map_only_normalizes() {
        let map = SpaceMap {
            mean: vec![0.0; 2],
            directions: vec![],
            gains: vec![],
        };
        let mut v = vec![3.0, 4.0];
        map.apply(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn bad_maps_are_refused() {
        let ok = SpaceMap {
            mean: vec![0.0; 2],
            directions: vec![1.0, 0.0],
            gains: vec![-0.5],
        };
        assert!(ok.validate().is_ok());
        let mut m = ok.clone();
        m.gains = vec![-1.5];
        assert!(m.validate().is_err());
        let mut m = ok.clone();
        m.directions = vec![1.0];
        assert!(m.validate().is_err());
        let mut m = ok.clone();
        m.mean = vec![f32::NAN, 0.0];
        assert!(m.validate().is_err());
        let mut m = ok;
        m.mean.clear();
        assert!(m.validate().is_err());
    }
}
