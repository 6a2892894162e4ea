//! CPU attention kernel with the re-routed prefix column.
//!
//! candle's batched matmul runs one multi-threaded GEMM per (sequence, head):
//! thousands of tiny calls per forward pass whose threading overhead dwarfs
//! the arithmetic. Here every (sequence, head, query block) is one rayon task
//! running single-threaded GEMMs, with the mask (causal, sliding window, the
//! prefix column and its bias) applied in place before the softmax, so no
//! mask tensor or repeated K/V is ever materialised.

use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    /// Query positions per sequence (padded length).
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// `Some(bias)`: key column 0 is the re-routed prefix, visible to every
    /// query, with `bias` added to its scaled logit.
    pub prefix_bias: Option<f32>,
}

const BLOCK: usize = 256;

/// An output pointer shared by rayon tasks that each write a disjoint part
/// of the output (here and in the AMX matmul); it is only used while the
/// output is borrowed by the parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: see above: writers never overlap, and no task outlives the loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `q`: `[B, H, T, hd]`; `k`, `v`: `[B, Hkv, T + prefix, hd]`, all contiguous.
/// `lens[b]`: the real (unpadded) length of sequence `b` (missing: `T`).
/// Returns `[B, T, H * hd]`, ready for the output projection; the rows of
/// padding positions are zero.
///
/// Only real positions are computed, so every matrix product has the same
/// shape whether a sequence runs alone or padded in a batch: a text's
/// result does not depend on its batch-mates, bit for bit. (Products whose
/// shapes depended on the padded length differed in the last bits, which
/// bf16 rounding downstream can amplify to 1e-3.)
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, lens: &[usize]) -> Vec<f32> {
    let off = usize::from(s.prefix_bias.is_some());
    let (t, hd) = (s.seq, s.head_dim);
    let kv_t = t + off;
    assert_eq!(q.len(), s.batch * s.n_heads * t * hd);
    assert_eq!(k.len(), s.batch * s.n_kv_heads * kv_t * hd);
    assert_eq!(v.len(), k.len());
    let mut out = vec![0f32; s.batch * t * s.n_heads * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let n_rep = s.n_heads / s.n_kv_heads;
    let blocks = t.div_ceil(BLOCK);
    let row_stride = s.n_heads * hd;
    (0..s.batch * s.n_heads * blocks).into_par_iter().for_each(|task| {
        let out_ptr = out_ptr;
        let blk = task % blocks;
        let h = (task / blocks) % s.n_heads;
        let b = task / blocks / s.n_heads;
        let kvh = h / n_rep;
        let start = blk * BLOCK;
        let real = lens.get(b).copied().unwrap_or(t).min(t);
        if start >= real {
            return;
        }
        let end = (start + BLOCK).min(real);
        let rows = end - start;
        // Keys past the block's last query are masked anyway: skip them.
        let cols = end + off;
        let qb = &q[((b * s.n_heads + h) * t + start) * hd..];
        let kb = &k[(b * s.n_kv_heads + kvh) * kv_t * hd..];
        let vb = &v[(b * s.n_kv_heads + kvh) * kv_t * hd..];
        let mut scores = vec![0f32; rows * cols];
        // SAFETY: shapes and strides describe slices checked above.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                hd,
                scores.as_mut_ptr(),
                1,
                cols as isize,
                false,
                qb.as_ptr(),
                1,
                hd as isize,
                kb.as_ptr(),
                hd as isize,
                1,
                0.0,
                s.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for r in 0..rows {
            let i = start + r;
            let row = &mut scores[r * cols..(r + 1) * cols];
            if let Some(bias) = s.prefix_bias {
                row[0] += bias;
            }
            let lo = match s.window {
                Some(w) => (i + 1).saturating_sub(w),
                None => 0,
            };
            // Keys after the query get probability 0 outright; keys before
            // the window's start go through the softmax as -inf.
            let visible = (off + i + 1).min(cols);
            row[visible..].fill(0.0);
            let row = &mut row[..visible];
            for x in &mut row[off..off + lo] {
                *x = f32::NEG_INFINITY;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / crate::fastmath::exp_shifted_sum(row, max);
            row.iter_mut().for_each(|x| *x *= inv);
        }
        // SAFETY: rows start..end of head h of sequence b are written by this
        // task only; strides stay inside `out`.
        unsafe {
            let dst = out_ptr.0.add(((b * t + start) * s.n_heads + h) * hd);
            gemm::gemm(
                rows,
                hd,
                cols,
                dst,
                1,
                row_stride as isize,
                false,
                scores.as_ptr(),
                1,
                cols as isize,
                vb.as_ptr(),
                1,
                hd as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops, the definition.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let off = usize::from(s.prefix_bias.is_some());
        let (t, hd) = (s.seq, s.head_dim);
        let kv_t = t + off;
        let mut out = vec![0f32; s.batch * t * s.n_heads * hd];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                let kvh = h / (s.n_heads / s.n_kv_heads);
                for i in 0..t {
                    let mut logits = vec![f32::NEG_INFINITY; kv_t];
                    for c in 0..kv_t {
                        let visible = if c < off {
                            true
                        } else {
                            let j = c - off;
                            j <= i && s.window.is_none_or(|w| i - j < w)
                        };
                        if visible {
                            let mut d = 0f32;
                            for x in 0..hd {
                                d += q[((b * s.n_heads + h) * t + i) * hd + x]
                                    * k[((b * s.n_kv_heads + kvh) * kv_t + c) * hd + x];
                            }
                            logits[c] = d * s.scale + if c < off { s.prefix_bias.unwrap() } else { 0.0 };
                        }
                    }
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for x in 0..hd {
                        let mut acc = 0f32;
                        for c in 0..kv_t {
                            acc += e[c] / z * v[((b * s.n_kv_heads + kvh) * kv_t + c) * hd + x];
                        }
                        out[((b * t + i) * s.n_heads + h) * hd + x] = acc;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 2000) as f32 / 1000.0) - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_with_prefix_window_and_gqa() {
        for (prefix, window, seq) in
            [(None, None, 7), (Some(1.5), None, 9), (Some(-2.0), Some(3), 11), (Some(0.0), None, 600)]
        {
            let s = AttnShape {
                batch: 2,
                seq,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                scale: 0.3,
                window,
                prefix_bias: prefix,
            };
            let off = usize::from(prefix.is_some());
            let q = data(2 * 4 * seq * 8, 7);
            let k = data(2 * 2 * (seq + off) * 8, 11);
            let v = data(2 * 2 * (seq + off) * 8, 13);
            let got = attention(&q, &k, &v, s, &[]);
            let want = reference(&q, &k, &v, s);
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "prefix {prefix:?} window {window:?} seq {seq}: {d}");
        }
    }

    /// A padded sequence gets exactly (bit for bit) what it gets alone, and
    /// its padding rows are zero.
    #[test]
    fn padded_sequences_equal_their_unpadded_runs() {
        for (prefix, seq, real) in [(None, 9, 5), (Some(1.0), 600, 300), (Some(0.5), 600, 513)] {
            let (h, kvh, hd) = (4, 2, 8);
            let off = usize::from(prefix.is_some());
            let s = AttnShape { batch: 2, seq, n_heads: h, n_kv_heads: kvh, head_dim: hd, scale: 0.3, window: None, prefix_bias: prefix };
            let q = data(2 * h * seq * hd, 5);
            let k = data(2 * kvh * (seq + off) * hd, 6);
            let v = data(2 * kvh * (seq + off) * hd, 8);
            let got = attention(&q, &k, &v, s, &[seq, real]);
            // Sequence 1 alone, cut to its real length.
            let cut = |x: &[f32], heads: usize, len: usize, full: usize| -> Vec<f32> {
                (0..heads).flat_map(|hh| x[((heads + hh) * full) * hd..((heads + hh) * full + len) * hd].to_vec()).collect()
            };
            let s1 = AttnShape { batch: 1, seq: real, ..s };
            let alone = attention(
                &cut(&q, h, real, seq),
                &cut(&k, kvh, real + off, seq + off),
                &cut(&v, kvh, real + off, seq + off),
                s1,
                &[],
            );
            let row = h * hd;
            let batched = &got[seq * row..2 * seq * row];
            assert_eq!(&batched[..real * row], &alone[..], "prefix {prefix:?} seq {seq} real {real}");
            assert!(batched[real * row..].iter().all(|&x| x == 0.0), "padding rows are not zero");
        }
    }
}
