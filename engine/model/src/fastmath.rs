//! Vectorised `exp` for the CPU hot loops: the attention softmax and the
//! SiLU of the MLP. glibc's scalar `expf` took about 15 % of a forward pass
//! at 16 x 512 tokens; this polynomial (Cephes' `expf`: a range reduction by
//! ln 2 in two parts and a degree-6 polynomial, relative error below 2e-7
//! over the whole range) compiles to 16-wide AVX-512 code where the CPU has
//! it, 8-wide AVX2 otherwise.

/// `exp(x)`; exactly 0 below -87.3 (where f32 runs out of normal numbers),
/// exp(88.3) (about 2e38) above 88.3. NaN in, NaN out.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low mantissa bits of t (its ulp is 1). Read
    // it from there rather than with `n as i32`: Rust's saturating
    // float-to-int cast does not vectorise, and compiled to sixteen scalar
    // conversions per 16-wide vector.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_BITS);
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = e * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `exp(x)` for `x <= 0` (a softmax's shifted logits), to a relative error
/// below 1e-5, for values that are rounded to bf16 (8 significant bits)
/// right after: a one-step reduction by powers of 2 and a degree-4
/// polynomial for `2^f` on [-1/2, 1/2] (a least-squares fit, relative error
/// 2.7e-6), about half the work of [`exp`]. Exactly 0 below -87; NaN in,
/// NaN out; not for `x > 0`. [`exp_nonpositive_avx512`] is the same
/// computation 16 lanes at a time, bit for bit.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let t = x.max(EXP_LOW) * std::f32::consts::LOG2_E;
    let rounded = t + ROUND;
    let n = rounded - ROUND;
    let ni = (rounded.to_bits() as i32).wrapping_sub(ROUND_BITS);
    let f = t - n;
    let p = EXP2_POLY[1..]
        .iter()
        .fold(EXP2_POLY[0], |p, &c| p.mul_add(f, c));
    let y = p * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x < EXP_LOW {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// [`exp_nonpositive`] of 16 values.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp_nonpositive_avx512(
    x: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let low = _mm512_set1_ps(EXP_LOW);
    let t = _mm512_mul_ps(
        _mm512_max_ps(x, low),
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    );
    let rounded = _mm512_add_ps(t, _mm512_set1_ps(ROUND));
    let n = _mm512_sub_ps(rounded, _mm512_set1_ps(ROUND));
    let ni = _mm512_sub_epi32(_mm512_castps_si512(rounded), _mm512_set1_epi32(ROUND_BITS));
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        ni,
        _mm512_set1_epi32(127),
    )));
    let y = _mm512_mul_ps(p, scale);
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, low);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_ps(_mm512_maskz_mov_ps(!below, y), nan, x)
}

/// Below this, [`exp_nonpositive`] is 0 (`2^-125.5`: the result stays a
/// normal number above it).
const EXP_LOW: f32 = -87.0;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// The bits of 1.5 * 2^23.
const ROUND_BITS: i32 = 0x4b40_0000;
/// `2^f` on [-1/2, 1/2], highest degree first.
const EXP2_POLY: [f32; 5] = [
    9.560_510_5e-3,
    5.591_704e-2,
    2.402_498_1e-1,
    6.931_219_7e-1,
    9.999_991_7e-1,
];

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if crate::cpu::avx512f() {
                    // SAFETY: the feature was detected (crate::cpu).
                    return unsafe { avx512($($arg),*) };
                }
                if crate::cpu::avx2_fma() {
                    // SAFETY: the features were detected (crate::cpu).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch! {
    /// `x = exp(x - max)` in place; returns the sum of the results.
    pub fn exp_shifted_sum(xs: &mut [f32], max: f32) -> f32 {
        let mut sum = 0f32;
        // Sixteen partial sums let the loop vectorise (f32 addition is not
        // reassociated by the compiler otherwise).
        let mut acc = [0f32; 16];
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
                *x = exp(*x - max);
                *a += *x;
            }
        }
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        sum + acc.iter().sum::<f32>()
    }
}

dispatch! {
    /// The largest value (`-inf` for an empty slice; NaNs are skipped, as
    /// by `f32::max`). Sixteen running maxima, so the loop vectorises:
    /// `fold(f32::max)` is one serial chain.
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = xs.chunks_exact(16);
        for c in &mut chunks {
            for (&x, a) in c.iter().zip(acc.iter_mut()) {
                *a = if x > *a { x } else { *a };
            }
        }
        let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        acc.iter().fold(m, |m, &x| m.max(x))
    }
}

dispatch! {
    /// `silu(g) * u` for every element: `g / (1 + exp(-g)) * u`.
    pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `erf(x)`, absolute error below 5e-7 (Abramowitz & Stegun 7.1.26, with
/// [`exp`]); branch-free, so loops over it vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = A.iter().rev().fold(0.0, |p, &a| p * t + a) * t;
    let y = 1.0 - poly * exp(-ax * ax);
    y.copysign(x)
}

dispatch! {
    /// GELU with the exact (erf) form, in place: `x · (1 + erf(x/√2)) / 2`,
    /// as BERT's `gelu`.
    pub fn gelu_erf(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e_7_of_libm() {
        let mut worst = 0f32;
        let mut x = -8.0f32;
        while x < 8.0 {
            worst = worst.max((erf(x) - libm::erff(x)).abs());
            x += 1e-3;
        }
        assert!(worst < 5e-7, "erf off by {worst}");
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(100.0).is_finite());
    }

    #[test]
    fn exp_nonpositive_is_within_1e_5_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64 - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 1e-5, "worst relative error {worst}");
        assert!((exp_nonpositive(0.0) - 1.0).abs() < 1e-5);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let xs: Vec<f32> = (0..4096)
                .map(|i| -90.0 + i as f32 * 0.0221)
                .chain([f32::NAN, f32::NEG_INFINITY, 0.0])
                .collect();
            for c in xs.chunks(16) {
                let mut v = [0f32; 16];
                v[..c.len()].copy_from_slice(c);
                let mut out = [0f32; 16];
                // SAFETY: AVX-512F was just detected.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(
                        out.as_mut_ptr(),
                        exp_nonpositive_avx512(_mm512_loadu_ps(v.as_ptr())),
                    );
                }
                for (a, &x) in out.iter().zip(&v) {
                    assert_eq!(a.to_bits(), exp_nonpositive(x).to_bits(), "exp({x})");
                }
            }
        }
    }

    #[test]
    fn vector_forms_match_the_scalar_definitions() {
        let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 12.0).collect();
        let mut v = xs.clone();
        v[5] = f32::NEG_INFINITY;
        let mut w = v.clone();
        let sum = exp_shifted_sum(&mut w, 3.0);
        let mut want_sum = 0f64;
        for (a, b) in w.iter().zip(&v) {
            let want = ((*b - 3.0) as f64).exp();
            want_sum += want;
            assert!(
                (*a as f64 - want).abs() <= 3e-7 * want + 1e-30,
                "{a} vs {want}"
            );
        }
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        assert_eq!(w[5], 0.0);

        for n in [0, 1, 15, 16, 17, 37, 100] {
            let ys: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            let want = ys.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&ys), want, "n = {n}");
        }
        let mut ys = vec![f32::NEG_INFINITY; 40];
        ys[33] = -3.0;
        ys[2] = f32::NAN;
        assert_eq!(max(&ys), -3.0);

        let u: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let mut out = vec![0f32; 37];
        silu_mul(&xs, &u, &mut out);
        for i in 0..37 {
            let g = xs[i] as f64;
            let want = g / (1.0 + (-g).exp()) * u[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }
}
