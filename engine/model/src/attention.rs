//! CPU attention kernel with the re-routed prefix column.
//!
//! candle's batched matmul runs one multi-threaded GEMM per (sequence, head):
//! thousands of tiny calls per forward pass whose threading overhead dwarfs
//! the arithmetic. Here every (sequence, head, query block) is one rayon task
//! running single-threaded GEMMs, with the mask (causal, sliding window, the
//! prefix column and its bias) applied in place before the softmax, so no
//! mask tensor or repeated K/V is ever materialised.
//!
//! Two product paths: f32 GEMMs (`gemm` crate), and, where the layers'
//! products run on the AMX tiles, the same two products in bf16 on the tiles
//! (`AttnShape::bf16_products`); the scale, mask and softmax are f32 in both.

use crate::amx::{round_up, PackedBf16, BLOCK as TILE, ROW_TILE};
use crate::matmul::Gemm;
use crate::parallel::SendPtr;
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
    /// Run the two products (`q·kᵀ` and `p·v`) on the AMX tiles in bf16
    /// (f32 accumulation; the scale, mask and softmax stay f32), as the
    /// layers' matrix products do. Ignored where AMX is not available.
    pub bf16_products: bool,
}

/// Query rows per task on the f32 path.
const BLOCK: usize = 256;
/// Keys per block of the f32 path's online softmax: a block's scores
/// (BLOCK x KEY_BLOCK) stay in the core's L2 cache.
const KEY_BLOCK: usize = 256;
/// Query rows per task on the tile path: its scores and probabilities
/// (rows x keys) stay in the core's L2 cache up to 4,096 keys.
const BF16_BLOCK: usize = 64;

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
    // Each kv head serves n_heads / n_kv_heads query heads: anything else
    // would index kv heads that do not exist.
    assert!(
        s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
        "{} query heads cannot share {} kv heads",
        s.n_heads,
        s.n_kv_heads
    );
    assert_eq!(q.len(), s.batch * s.n_heads * t * hd);
    assert_eq!(k.len(), s.batch * s.n_kv_heads * kv_t * hd);
    assert_eq!(v.len(), k.len());
    let real: Vec<usize> = (0..s.batch)
        .map(|b| lens.get(b).copied().unwrap_or(t).min(t))
        .collect();
    // The tile path packs each (sequence, kv head)'s keys and transposed
    // values once, as the weights of `q·kᵀ` and `p·v`, shared by its query
    // heads and blocks; only the sequence's real keys are packed.
    let packs: Option<Vec<(PackedBf16, PackedBf16)>> = (s.bf16_products && crate::amx::available())
        .then(|| {
            (0..s.batch * s.n_kv_heads)
                .into_par_iter()
                .map(|bk| {
                    let n = real[bk / s.n_kv_heads] + off;
                    let kb = &k[bk * kv_t * hd..][..n * hd];
                    let vb = &v[bk * kv_t * hd..][..n * hd];
                    (
                        PackedBf16::pack(kb, n, hd),
                        PackedBf16::pack_transposed(vb, n, hd),
                    )
                })
                .collect()
        });
    let block = if packs.is_some() { BF16_BLOCK } else { BLOCK };
    let mut out: Vec<f32> = Vec::with_capacity(s.batch * t * s.n_heads * hd);
    let out_ptr = SendPtr::spare(&mut out);
    let n_rep = s.n_heads / s.n_kv_heads;
    let blocks = t.div_ceil(block);
    (0..s.batch * s.n_heads * blocks)
        .into_par_iter()
        .for_each(|task| {
            let out_ptr = out_ptr;
            let blk = task % blocks;
            let h = (task / blocks) % s.n_heads;
            let b = task / blocks / s.n_heads;
            let start = blk * block;
            if start >= real[b] {
                return;
            }
            let end = (start + block).min(real[b]);
            let task = Task {
                // Keys past the block's last query are masked anyway: skip them.
                cols: end + off,
                rows: end - start,
                start,
                q: &q[((b * s.n_heads + h) * t + start) * hd..],
                // SAFETY: rows start..end of head h of sequence b are written
                // by this task only; the row stride keeps them inside `out`.
                dst: unsafe { out_ptr.get().add(((b * t + start) * s.n_heads + h) * hd) },
            };
            let kvh = b * s.n_kv_heads + h / n_rep;
            match &packs {
                Some(packs) => tile_block(&task, &packs[kvh], s),
                None => f32_block(&task, &k[kvh * kv_t * hd..], &v[kvh * kv_t * hd..], s),
            }
        });
    // Padding rows are zero; every other row was written by its tasks (each
    // head's part), so the buffer is allocated without zeroing.
    let row = s.n_heads * hd;
    for (b, &len) in real.iter().enumerate() {
        // SAFETY: rows len..t of sequence b lie inside the capacity.
        unsafe {
            std::ptr::write_bytes(
                out.as_mut_ptr().add((b * t + len) * row),
                0,
                (t - len) * row,
            )
        };
    }
    // SAFETY: every row is written (above and by the tasks).
    unsafe { out.set_len(s.batch * t * row) };
    out
}

/// One task: query rows `start..start + rows` of one (sequence, head),
/// against the first `cols` keys (the prefix included).
struct Task<'a> {
    start: usize,
    rows: usize,
    cols: usize,
    /// The task's first query row; rows follow each other (`head_dim` apart).
    q: &'a [f32],
    /// The task's first output row; rows are `n_heads * head_dim` apart.
    dst: *mut f32,
}

/// A task's block with f32 GEMMs; `kb`, `vb`: its kv head's keys and values.
///
/// Keys go by blocks of [`KEY_BLOCK`] with an online softmax: each block's
/// scores (rows x KEY_BLOCK, in the core's L2 cache) are exponentiated
/// against the running maximum of their row, the output rows (accumulated
/// in place, in `task.dst`) and the rows' sums rescaled where the maximum
/// grows, and divided by the sums at the end. No row of scores over every
/// key is ever materialised, and key blocks no query of the task sees
/// (before a sliding window, after the last query) are skipped.
fn f32_block(task: &Task, kb: &[f32], vb: &[f32], s: AttnShape) {
    let (rows, cols, hd) = (task.rows, task.cols, s.head_dim);
    let off = usize::from(s.prefix_bias.is_some());
    let out_rs = s.n_heads * hd;
    // The first key any of the task's queries sees, past the prefix column.
    let first = off + visible_keys(task.start, s.window).start;
    SCRATCH.with_borrow_mut(|sc| {
        let kblock = KEY_BLOCK.min(cols);
        // Every score is written by the product below (it does not read
        // them): the buffer is reused without zeroing.
        if sc.scores.len() < rows * kblock {
            sc.scores.resize(rows * kblock, 0.0);
        }
        sc.max.clear();
        sc.max.resize(rows, f32::NEG_INFINITY);
        sc.sum.clear();
        sc.sum.resize(rows, 0.0);
        let mut started = false;
        let mut c0 = 0;
        while c0 < cols {
            // The prefix column always counts; any other block is skipped
            // when it ends before the window of the task's first query.
            let c1 = (c0 + kblock).min(cols);
            if c1 <= first && !(off == 1 && c0 == 0) {
                c0 = c1;
                continue;
            }
            let n = c1 - c0;
            let scores = &mut sc.scores[..rows * n];
            // SAFETY: shapes and strides describe slices of the caller's
            // checked inputs; `task.dst` is valid for the task's rows.
            unsafe {
                Gemm {
                    m: rows,
                    n,
                    k: hd,
                    dst_cs: 1,
                    dst_rs: n as isize,
                    read_dst: false,
                    lhs_cs: 1,
                    lhs_rs: hd as isize,
                    rhs_cs: hd as isize,
                    rhs_rs: 1,
                    alpha: 0.0,
                    beta: s.scale,
                    parallel: false,
                }
                .run(scores.as_mut_ptr(), task.q.as_ptr(), kb[c0 * hd..].as_ptr());
            }
            for r in 0..rows {
                let row = &mut scores[r * n..(r + 1) * n];
                let (lo, hi) = mask_block(row, task.start + r, c0, off, s);
                let bmax = crate::fastmath::max(&row[lo..hi]);
                if bmax == f32::NEG_INFINITY {
                    // Nothing visible to this query here: its output row
                    // gets nothing from this block.
                    row.fill(0.0);
                    continue;
                }
                let m = sc.max[r].max(bmax);
                // exp(-inf) = 0: the first visible block rescales nothing.
                let rescale = crate::fastmath::exp(sc.max[r] - m);
                let sum = crate::fastmath::exp_shifted_sum(&mut row[lo..hi], m);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                sc.sum[r] = sc.sum[r] * rescale + sum;
                sc.max[r] = m;
                if started && rescale != 1.0 {
                    // SAFETY: `task.dst` is valid for the task's rows.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(task.dst.add(r * out_rs), hd) };
                    out.iter_mut().for_each(|x| *x *= rescale);
                }
            }
            // SAFETY: as above; the first block writes the output rows,
            // the next ones add to them.
            unsafe {
                Gemm {
                    m: rows,
                    n: hd,
                    k: n,
                    dst_cs: 1,
                    dst_rs: out_rs as isize,
                    read_dst: started,
                    lhs_cs: 1,
                    lhs_rs: n as isize,
                    rhs_cs: 1,
                    rhs_rs: hd as isize,
                    alpha: if started { 1.0 } else { 0.0 },
                    beta: 1.0,
                    parallel: false,
                }
                .run(task.dst, scores.as_ptr(), vb[c0 * hd..].as_ptr());
            }
            started = true;
            c0 = c1;
        }
        for (r, &sum) in sc.sum.iter().enumerate() {
            let inv = 1.0 / sum;
            // SAFETY: as above.
            let out = unsafe { std::slice::from_raw_parts_mut(task.dst.add(r * out_rs), hd) };
            out.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

/// The masks of query `i` on its scaled logits for key columns
/// `c0..c0 + row.len()` (the prefix column, where there is one, is column
/// 0; the tile path passes whole rows, `c0 = 0`): the bias added to the
/// prefix column, keys before the query's window set to `-inf`. Returns the
/// range of the row the query may see (the prefix column included); the
/// caller gives the keys after it probability 0.
fn mask_block(row: &mut [f32], i: usize, c0: usize, off: usize, s: AttnShape) -> (usize, usize) {
    let prefix = off == 1 && c0 == 0;
    if prefix {
        row[0] += s.prefix_bias.unwrap_or(0.0);
    }
    let keys = visible_keys(i, s.window);
    let hi = (off + keys.end).saturating_sub(c0).min(row.len());
    let lo = (off + keys.start).saturating_sub(c0).min(hi);
    // The prefix column is visible whatever the window: the keys between it
    // and the window go through the softmax as `-inf`.
    let from = usize::from(prefix);
    row[from..lo.max(from)].fill(f32::NEG_INFINITY);
    (if prefix { 0 } else { lo }, hi)
}

/// A task's block on the AMX tiles; `(kp, vp)`: its kv head's packed keys
/// and transposed values. Rows are padded to 16 (a tile row) and keys to
/// 32 (with zero probabilities); the padding never reaches the output.
fn tile_block(task: &Task, (kp, vp): &(PackedBf16, PackedBf16), s: AttnShape) {
    let (rows, cols, hd) = (task.rows, task.cols, s.head_dim);
    let off = usize::from(s.prefix_bias.is_some());
    let (rows_pad, cols_pad, hd_pad) = (
        round_up(rows, ROW_TILE),
        round_up(cols, TILE),
        round_up(hd, TILE),
    );
    TILES.with_borrow_mut(|sc| {
        // Query rows, scaled before rounding (as a scaled logit would be),
        // zero rows up to the tile height.
        sc.q.set_len(rows_pad * hd_pad);
        for r in 0..rows_pad {
            let src = if r < rows {
                &task.q[r * hd..(r + 1) * hd]
            } else {
                &[][..]
            };
            crate::amx::row_to_tiles(&mut sc.q, hd_pad, r, src, s.scale);
        }
        sc.scores
            .resize(sc.scores.len().max(rows_pad * cols_pad), 0.0);
        // SAFETY: AMX is available (the caller packed for it); the query
        // tiles hold rows_pad x hd_pad values, the keys' packing at least
        // cols_pad outputs (cols <= the sequence's real keys) of hd_pad
        // inputs, and `scores` rows_pad x cols_pad values.
        unsafe {
            kp.block(
                &sc.q,
                hd_pad,
                hd_pad / TILE,
                0..rows_pad,
                0..cols_pad,
                sc.scores.as_mut_ptr(),
                cols_pad,
            );
        }
        // Each row's unnormalised probabilities go to the tiles as they are
        // computed; the row's output is scaled by `1 / sum` below.
        sc.p.set_len(rows_pad * cols_pad);
        sc.inv.clear();
        for r in 0..rows_pad {
            if r < rows {
                let row = &mut sc.scores[r * cols_pad..(r + 1) * cols_pad];
                let (_, visible) = mask_block(row, task.start + r, 0, off, s);
                let max = crate::fastmath::max(&row[..visible]);
                let sum =
                    crate::amx::exp_row_to_tiles(&mut sc.p, cols_pad, r, &row[..visible], max);
                sc.inv.push(1.0 / sum);
            } else {
                crate::amx::row_to_tiles(&mut sc.p, cols_pad, r, &[], 1.0);
            }
        }
        sc.out.resize(sc.out.len().max(rows_pad * hd_pad), 0.0);
        // SAFETY: as above; the values' packing has at least cols_pad inputs
        // (the sequence's real keys, padded) and hd_pad outputs.
        unsafe {
            vp.block(
                &sc.p,
                cols_pad,
                cols_pad / TILE,
                0..rows_pad,
                0..hd_pad,
                sc.out.as_mut_ptr(),
                hd_pad,
            );
        }
        for (r, &inv) in sc.inv.iter().enumerate() {
            let src = &sc.out[r * hd_pad..r * hd_pad + hd];
            // SAFETY: `task.dst` is valid for the task's rows.
            let dst = unsafe { task.dst.add(r * s.n_heads * hd) };
            for (j, &x) in src.iter().enumerate() {
                // SAFETY: as above; j < head_dim.
                unsafe { dst.add(j).write(x * inv) };
            }
        }
    });
}

thread_local! {
    /// Each worker thread's scratch for the f32 path, reused from task to
    /// task (a fresh zeroed buffer per task cost about 6 % of a long pass in
    /// `memset`).
    static SCRATCH: std::cell::RefCell<F32Scratch> = const { std::cell::RefCell::new(F32Scratch { scores: Vec::new(), max: Vec::new(), sum: Vec::new() }) };
    /// The same for the tile path: the query tiles, the scores, the
    /// probability tiles and the output block.
    static TILES: std::cell::RefCell<TileScratch> = std::cell::RefCell::new(TileScratch::default());
}

/// The masking rule of every attention path (this module's kernels and the
/// decoder's tensor mask): query `i` sees the sequence's keys `lo..=i`,
/// causal and, with a sliding window of `w`, the last `w` of them. The
/// re-routed column before them, where there is one, is always visible and
/// its logit gets the bias.
pub(crate) fn visible_keys(i: usize, window: Option<usize>) -> std::ops::Range<usize> {
    let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
    lo..i + 1
}

/// The f32 path's scratch: a key block's scores, each row's running
/// maximum and sum.
struct F32Scratch {
    scores: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

struct TileScratch {
    q: crate::amx::Aligned<u16>,
    p: crate::amx::Aligned<u16>,
    scores: Vec<f32>,
    out: Vec<f32>,
    /// `1 / sum` of each row's probabilities.
    inv: Vec<f32>,
}

impl Default for TileScratch {
    fn default() -> Self {
        TileScratch {
            q: crate::amx::Aligned::zeroed(0),
            p: crate::amx::Aligned::zeroed(0),
            scores: Vec::new(),
            out: Vec::new(),
            inv: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops, the definition. With `s.bf16_products`, the products'
    /// operands are rounded to bf16 as the tile path rounds them: the scaled
    /// queries, the keys, the values and the unnormalised probabilities
    /// (`exp(logit - max)`; the product is divided by their sum after).
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let rnd = |x: f32| {
            if s.bf16_products {
                crate::amx::from_bf16(crate::amx::to_bf16(x))
            } else {
                x
            }
        };
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
                                let qx = q[((b * s.n_heads + h) * t + i) * hd + x];
                                let kx = rnd(k[((b * s.n_kv_heads + kvh) * kv_t + c) * hd + x]);
                                d += if s.bf16_products {
                                    rnd(qx * s.scale) * kx
                                } else {
                                    qx * kx * s.scale
                                };
                            }
                            logits[c] = d + if c < off { s.prefix_bias.unwrap() } else { 0.0 };
                        }
                    }
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for x in 0..hd {
                        let mut acc = 0f32;
                        for c in 0..kv_t {
                            acc +=
                                rnd(e[c]) * rnd(v[((b * s.n_kv_heads + kvh) * kv_t + c) * hd + x]);
                        }
                        out[((b * t + i) * s.n_heads + h) * hd + x] = acc / z;
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

    /// The product paths to test: f32, and bf16 tiles where the CPU has them.
    fn paths() -> Vec<bool> {
        if crate::amx::available() {
            vec![false, true]
        } else {
            eprintln!("AMX-BF16 not available here: testing the f32 path only");
            vec![false]
        }
    }

    #[test]
    fn matches_reference_with_prefix_window_and_gqa() {
        for bf16 in paths() {
            // Past KEY_BLOCK keys the f32 path's online softmax rescales
            // its rows (a scale of 20 puts logits past exp's range, so a
            // missing maximum would overflow) and skips the key blocks
            // before a window.
            for (prefix, window, seq, hd, scale) in [
                (None, None, 7, 8, 0.3),
                (Some(1.5), None, 9, 8, 0.3),
                (Some(-2.0), Some(3), 11, 8, 0.3),
                (Some(0.0), None, 600, 8, 0.3),
                (Some(2.0), None, 300, 64, 0.3),
                (None, Some(40), 70, 48, 0.3),
                (Some(1.0), Some(100), 700, 8, 0.3),
                (None, Some(300), 700, 16, 0.3),
                (Some(3.0), None, 600, 8, 20.0),
                (None, Some(260), 600, 8, 20.0),
            ] {
                let s = AttnShape {
                    batch: 2,
                    seq,
                    n_heads: 4,
                    n_kv_heads: 2,
                    head_dim: hd,
                    scale,
                    window,
                    prefix_bias: prefix,
                    bf16_products: bf16,
                };
                let off = usize::from(prefix.is_some());
                let q = data(2 * 4 * seq * hd, 7);
                let k = data(2 * 2 * (seq + off) * hd, 11);
                let v = data(2 * 2 * (seq + off) * hd, 13);
                let got = attention(&q, &k, &v, s, &[]);
                let want = reference(&q, &k, &v, s);
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // bf16: the kernel's exp (relative error 1e-5) can round a
                // probability to the neighbouring bf16 value of the
                // reference's libm exp.
                let tol = if bf16 { 2e-3 } else { 1e-4 };
                assert!(d < tol, "bf16 {bf16} prefix {prefix:?} window {window:?} seq {seq} hd {hd} scale {scale}: {d}");
                if bf16 {
                    // And the rounding is really there: the f32 result differs.
                    let exact = reference(
                        &q,
                        &k,
                        &v,
                        AttnShape {
                            bf16_products: false,
                            ..s
                        },
                    );
                    let e = got
                        .iter()
                        .zip(&exact)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(e > 1e-5, "bf16 path equals the f32 reference ({e})");
                }
            }
        }
    }

    /// Query heads that cannot be shared evenly by the kv heads are refused
    /// before any memory is read (the kv head index would run past `k`).
    #[test]
    #[should_panic(expected = "3 query heads cannot share 2 kv heads")]
    fn uneven_head_groups_are_refused() {
        let (seq, hd) = (4, 8);
        let s = AttnShape {
            batch: 1,
            seq,
            n_heads: 3,
            n_kv_heads: 2,
            head_dim: hd,
            scale: 0.3,
            window: None,
            prefix_bias: None,
            bf16_products: false,
        };
        let _ = attention(
            &data(3 * seq * hd, 1),
            &data(2 * seq * hd, 2),
            &data(2 * seq * hd, 3),
            s,
            &[seq],
        );
    }

    /// A padded sequence gets exactly (bit for bit) what it gets alone, and
    /// its padding rows are zero.
    #[test]
    fn padded_sequences_equal_their_unpadded_runs() {
        for (prefix, seq, real, bf16) in paths().into_iter().flat_map(|bf16| {
            [
                (None, 9, 5, bf16),
                (Some(1.0), 600, 300, bf16),
                (Some(0.5), 600, 513, bf16),
            ]
        }) {
            let (h, kvh, hd) = (4, 2, 8);
            let off = usize::from(prefix.is_some());
            let s = AttnShape {
                batch: 2,
                seq,
                n_heads: h,
                n_kv_heads: kvh,
                head_dim: hd,
                scale: 0.3,
                window: None,
                prefix_bias: prefix,
                bf16_products: bf16,
            };
            let q = data(2 * h * seq * hd, 5);
            let k = data(2 * kvh * (seq + off) * hd, 6);
            let v = data(2 * kvh * (seq + off) * hd, 8);
            let got = attention(&q, &k, &v, s, &[seq, real]);
            // Sequence 1 alone, cut to its real length.
            let cut = |x: &[f32], heads: usize, len: usize, full: usize| -> Vec<f32> {
                (0..heads)
                    .flat_map(|hh| {
                        x[((heads + hh) * full) * hd..((heads + hh) * full + len) * hd].to_vec()
                    })
                    .collect()
            };
            let s1 = AttnShape {
                batch: 1,
                seq: real,
                ..s
            };
            let alone = attention(
                &cut(&q, h, real, seq),
                &cut(&k, kvh, real + off, seq + off),
                &cut(&v, kvh, real + off, seq + off),
                s1,
                &[],
            );
            let row = h * hd;
            let batched = &got[seq * row..2 * seq * row];
            assert_eq!(
                &batched[..real * row],
                &alone[..],
                "bf16 {bf16} prefix {prefix:?} seq {seq} real {real}"
            );
            assert!(
                batched[real * row..].iter().all(|&x| x == 0.0),
                "padding rows are not zero"
            );
        }
    }
}

/// The kernel's time at the shapes of the benchmark's long and medium
/// texts (SmolLM2's heads), for tuning:
/// `cargo test --release -p kvembed-model --lib attention::speed -- --ignored --nocapture`
/// (`KVEMBED_CPU=x86-64-v3` for the AVX2 path).
#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn speed() {
        for &(batch, seq, window) in &[
            (2usize, 4096usize, None),
            (16, 512, None),
            (2, 4096, Some(1024)),
        ] {
            let (h, kvh, hd) = (9, 3, 64);
            let s = AttnShape {
                batch,
                seq,
                n_heads: h,
                n_kv_heads: kvh,
                head_dim: hd,
                scale: 0.125,
                window,
                prefix_bias: Some(1.0),
                bf16_products: false,
            };
            let val = |n: usize, m: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * m) % 1013) as f32 / 506.0 - 1.0)
                    .collect()
            };
            let q = val(batch * h * seq * hd, 7919);
            let k = val(batch * kvh * (seq + 1) * hd, 104729);
            let v = val(batch * kvh * (seq + 1) * hd, 7);
            drop(attention(&q, &k, &v, s, &[]));
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                drop(attention(&q, &k, &v, s, &[]));
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            // Causal: about half of the two products' T x T x hd.
            let flops = 2.0 * 2.0 * (batch * h * seq * seq.min(window.unwrap_or(seq)) * hd) as f64
                / if window.is_some() { 1.0 } else { 2.0 };
            eprintln!(
                "{batch}x{seq} window {window:?}: {:.1} ms, {:.1} GFLOP/s",
                secs * 1e3,
                flops / secs / 1e9
            );
        }
    }
}
