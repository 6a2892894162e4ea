//! f32 matrix products of the CPU path without AMX (the decoder's dense
//! projections and the f32 attention kernel), on the `gemm` crate, with the
//! instruction set chosen by [`crate::cpu`].
//!
//! `gemm` picks its own kernels at run time from what the CPU reports, which
//! `KVEMBED_CPU` cannot reach. So the engine links it twice: gemm 0.19 with
//! its AVX-512 kernels (`x86-v4`), used when [`crate::cpu::avx512f`] allows
//! them, and gemm 0.18 without them (AVX2 + FMA at most, scalar below), used
//! otherwise. On an AVX2 CPU both run the same FMA kernels; under
//! `KVEMBED_CPU=x86-64-v3` an AVX-512 machine runs them too, which is what
//! makes that switch a faithful stand-in for such a CPU in tests and
//! benchmarks. (Dropping the AVX-512 kernels instead cost about 40 % of the
//! f32 path's speed on an AVX-512 machine without AMX.)

/// The strides and scalars of one product `dst = alpha * dst + beta * lhs · rhs`,
/// as `gemm::gemm` takes them (`*_cs`: column stride, `*_rs`: row stride, in
/// elements).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst_cs: isize,
    pub dst_rs: isize,
    pub read_dst: bool,
    pub lhs_cs: isize,
    pub lhs_rs: isize,
    pub rhs_cs: isize,
    pub rhs_rs: isize,
    pub alpha: f32,
    pub beta: f32,
    /// Split the product over rayon's threads (else run it on this one).
    pub parallel: bool,
}

impl Gemm {
    /// Row-major `dst[m, n] = lhs[m, k] · rhs[k, n]`, all contiguous.
    pub fn row_major(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            m,
            n,
            k,
            dst_cs: 1,
            dst_rs: n as isize,
            read_dst: false,
            lhs_cs: 1,
            lhs_rs: k as isize,
            rhs_cs: 1,
            rhs_rs: n as isize,
            alpha: 0.0,
            beta: 1.0,
            parallel: true,
        }
    }

    /// Runs the product.
    ///
    /// # Safety
    /// `dst`, `lhs` and `rhs` must be valid for every element the shape and
    /// strides address (reads of `lhs`/`rhs`, writes of `dst`, reads of
    /// `dst` too when `read_dst`), and `dst` must not overlap the inputs.
    pub unsafe fn run(&self, dst: *mut f32, lhs: *const f32, rhs: *const f32) {
        let threads = if self.parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        macro_rules! call {
            ($gemm:ident) => {
                $gemm::gemm(
                    self.m,
                    self.n,
                    self.k,
                    dst,
                    self.dst_cs,
                    self.dst_rs,
                    self.read_dst,
                    lhs,
                    self.lhs_cs,
                    self.lhs_rs,
                    rhs,
                    self.rhs_cs,
                    self.rhs_rs,
                    self.alpha,
                    self.beta,
                    false,
                    false,
                    false,
                    if threads > 1 {
                        $gemm::Parallelism::Rayon(threads)
                    } else {
                        $gemm::Parallelism::None
                    },
                )
            };
        }
        if crate::cpu::avx512f() {
            call!(gemm)
        } else {
            call!(gemm_avx2)
        }
    }
}

/// `x[rows, k] · wt[k, n]`, row-major, as a new `[rows, n]` buffer.
pub fn matmul(x: &[f32], rows: usize, k: usize, wt: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "x holds rows x k values");
    assert_eq!(wt.len(), k * n, "wt holds k x n values");
    if k == 0 {
        return vec![0.0; rows * n];
    }
    let mut out = Vec::<f32>::with_capacity(rows * n);
    // SAFETY: the shapes were checked above; `read_dst` is false, so gemm
    // writes every element of `out` without reading it, and the length is
    // set only after that.
    unsafe {
        Gemm::row_major(rows, n, k).run(out.as_mut_ptr(), x.as_ptr(), wt.as_ptr());
        out.set_len(rows * n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, k: usize, wt: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                y[r * n + c] = (0..k)
                    .map(|i| x[r * k + i] as f64 * wt[i * n + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matmul_agrees_with_the_naive_product_at_odd_shapes() {
        for &(rows, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 64, 33), (64, 96, 130)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 31) as f32 / 15.0 - 1.0)
                .collect();
            let (got, want) = (matmul(&x, rows, k, &w, n), naive(&x, rows, k, &w, n));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows}x{k}x{n}: {g} vs {w}"
                );
            }
        }
    }
}
