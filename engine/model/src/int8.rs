//! Int8 matrix products: the layers' dense projections on CPUs without AMX.
//!
//! The weights are kept in memory as int8 with one f32 scale per output
//! column and group of [`GROUP`] inputs (about 1.03 bytes a parameter, a
//! quarter of the f32 copy they replace), and the activations are quantized on the fly, per row and per
//! group of [`GROUP`] values, to 7 bits (`-63..=63`, stored offset by 64 as
//! unsigned bytes) with one f32 scale each. A product is an integer dot
//! product per group, scaled into an f32 sum:
//!
//! `y[i, j] = Σ_g sx[i, g] · sw[j, g] · (Σ_{c ∈ g} (qx[i, c] + 64) · qw[j, c] − 64 · Σ_{c ∈ g} qw[j, c])`
//!
//! The weights are packed in panels of [`PANEL`] output columns, four input
//! values per column side by side, so that one 64-byte vector holds four
//! inputs of 16 columns: the kernels broadcast four activation bytes and
//! multiply them with a whole panel, one output column per 32-bit lane, with
//! no horizontal sums. Three kernels compute exactly the same integer sums
//! (the f32 sums differ only in their order), chosen at run time from
//! [`crate::cpu`]:
//!
//! * AVX-512 VNNI: `vpdpbusd` (64 products an instruction into i32);
//! * AVX2: `vpmaddubsw` then `vpmaddwd` (32 products; the unsigned bytes are
//!   at most 127 and the weights at most 127 in size, so a pair sum,
//!   2 · 127 · 127, stays within i16);
//! * portable Rust for everything else.
//!
//! Why per-group activation scales: a few channels of an LLM's activations
//! are tens of times larger than the rest; one scale per row would leave the
//! other values of that row a handful of levels. A group confines such a
//! channel to its own [`GROUP`] values (larger groups convert less often,
//! smaller ones share a scale with fewer values). The weights get a scale per group too, for the
//! same price: one multiplication per group and tile, not per product.
//! (Measured quality cost: docs/QUALITY.md.)

use crate::amx::Aligned;
use crate::parallel::SendPtr;
use rayon::prelude::*;

/// The unit rows are padded to: one 64-byte vector of int8 values.
pub const CHUNK: usize = 64;
/// Values per activation scale (a multiple of [`CHUNK`]; a row's last group
/// may be shorter). Within a group the kernels sum in i32 and convert once.
pub const GROUP: usize = 128;
/// Output columns per weight panel (32-bit lanes of a 512-bit vector).
pub const PANEL: usize = 16;
/// The largest quantized activation: 7 bits, so that the offset value
/// (`q + 64`, at most 127) times a weight (at most 127) twice fits an i16.
const ACT_MAX: f32 = 63.0;
/// The unsigned offset of the activations.
const OFFSET: i32 = 64;
/// Activation rows one kernel call computes (rows are padded to it).
const MR: usize = 4;
/// Panels one parallel task owns (its slice of the output columns).
const TASK_PANELS: usize = 2;

/// A row of `kp` values has this many groups.
fn groups(kp: usize) -> usize {
    kp.div_ceil(GROUP)
}

/// The values of group `g` of a row of `kp`.
fn group_range(g: usize, kp: usize) -> std::ops::Range<usize> {
    g * GROUP..((g + 1) * GROUP).min(kp)
}

/// Which kernel runs the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512Vnni,
    Avx2,
    Portable,
}

impl Kernel {
    /// The widest kernel that [`crate::cpu`] allows.
    pub fn detect() -> Kernel {
        if crate::cpu::avx512vnni() {
            Kernel::Avx512Vnni
        } else if crate::cpu::avx2_fma() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "int8-avx512vnni",
            Kernel::Avx2 => "int8-avx2",
            Kernel::Portable => "int8",
        }
    }
}

/// An `[n, k]` (`[out, in]`) weight as int8 panels with a scale per column
/// and group.
pub struct PackedI8 {
    n: usize,
    k: usize,
    /// `k` rounded up to [`CHUNK`].
    kp: usize,
    /// Panels: `[np / PANEL, kp / 4, PANEL, 4]`, zero-padded.
    q: Aligned<i8>,
    /// `[groups, np]`: `w[j, c] ≈ scale[c / GROUP, j] · q[j, c]`.
    scale: Aligned<f32>,
    /// `[groups, np]`: `64 · Σ_{c ∈ g} q[j, c]`, what the offset activations
    /// add to each group's sum.
    offset_sum: Aligned<i32>,
}

impl PackedI8 {
    /// Quantizes a row-major `[n, k]` f32 weight.
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedI8 {
        assert_eq!(w.len(), n * k, "w holds n x k values");
        let kp = k.div_ceil(CHUNK).max(1) * CHUNK;
        let np = n.div_ceil(PANEL).max(1) * PANEL;
        let groups = groups(kp);
        // Row by row first (scales, values), then into panels.
        let mut rows = vec![0i8; np * kp];
        let mut row_scales = vec![0f32; np * groups];
        rows.par_chunks_mut(kp)
            .zip(row_scales.par_chunks_mut(groups))
            .enumerate()
            .filter(|(j, _)| *j < n)
            .for_each(|(j, (qrow, scales))| {
                let row = &w[j * k..(j + 1) * k];
                for (g, s) in scales.iter_mut().enumerate() {
                    let r = group_range(g, kp);
                    let vals = &row[r.start.min(k)..r.end.min(k)];
                    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if !amax.is_finite() || vals.iter().any(|v| v.is_nan()) {
                        // A non-finite weight poisons its column, as in f32.
                        *s = f32::NAN;
                    } else if amax > 0.0 {
                        *s = amax / 127.0;
                        let inv = 127.0 / amax;
                        for (d, v) in qrow[r].iter_mut().zip(vals) {
                            *d = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
            });
        let mut scale = Aligned::<f32>::zeroed(groups * np);
        for g in 0..groups {
            for j in 0..np {
                scale[g * np + j] = row_scales[j * groups + g];
            }
        }
        let mut offset_sum = Aligned::<i32>::zeroed(groups * np);
        for g in 0..groups {
            for j in 0..np {
                offset_sum[g * np + j] = OFFSET
                    * rows[j * kp..][group_range(g, kp)]
                        .iter()
                        .map(|&v| v as i32)
                        .sum::<i32>();
            }
        }
        let mut q = Aligned::<i8>::zeroed(np * kp);
        q.par_chunks_mut(PANEL * kp)
            .enumerate()
            .for_each(|(p, panel)| {
                for (c4, block) in panel.chunks_mut(PANEL * 4).enumerate() {
                    for (l, col) in block.chunks_mut(4).enumerate() {
                        let j = p * PANEL + l;
                        col.copy_from_slice(&rows[j * kp + c4 * 4..j * kp + c4 * 4 + 4]);
                    }
                }
            });
        PackedI8 {
            n,
            k,
            kp,
            q,
            scale,
            offset_sum,
        }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (weights, scales, offset sums).
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.scale.len() + self.offset_sum.len())
    }

    /// `x[m, k] · self^T` as a new row-major `[m, n]` buffer.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&QuantRows::new(x, m, self.k, Kernel::detect()))
    }

    /// The product with activations quantized once for several weights.
    pub fn matmul_quantized(&self, x: &QuantRows) -> Vec<f32> {
        assert_eq!(x.kp, self.kp, "activations quantized for another width");
        let (m, n, kp) = (x.m, self.n, self.kp);
        let np = self.q.len() / kp;
        let mut out = Vec::<f32>::with_capacity(m * n);
        if m == 0 || n == 0 {
            return out;
        }
        let dst = SendPtr::spare(&mut out);
        let panels = np / PANEL;
        let ctx = Ctx {
            kp,
            np,
            groups: groups(kp),
        };
        (0..panels.div_ceil(TASK_PANELS))
            .into_par_iter()
            .for_each(|t| {
                let dst = dst;
                for i0 in (0..x.mp).step_by(MR) {
                    let xs = &x.q[i0 * kp..(i0 + MR) * kp];
                    let sx = &x.scale[i0 * ctx.groups..(i0 + MR) * ctx.groups];
                    let (p0, p1) = (t * TASK_PANELS, ((t + 1) * TASK_PANELS).min(panels));
                    let mut tiles = [[[0f32; PANEL]; MR]; TASK_PANELS];
                    self.tiles(x.kernel, &ctx, xs, sx, p0..p1, &mut tiles);
                    for (p, tile) in (p0..p1).zip(&tiles) {
                        let j0 = p * PANEL;
                        let cols = PANEL.min(n - j0.min(n));
                        for (di, row) in tile.iter().enumerate().take(m.saturating_sub(i0).min(MR))
                        {
                            for (dj, &v) in row[..cols].iter().enumerate() {
                                // SAFETY: (i0 + di, j0 + dj) is inside [m, n];
                                // each task writes only its own panels' columns.
                                unsafe { *dst.get().add((i0 + di) * n + j0 + dj) = v };
                            }
                        }
                    }
                }
            });
        // SAFETY: the tasks wrote every (i, j) with i < m, j < n.
        unsafe { out.set_len(m * n) };
        out
    }

    /// The tiles `[MR, PANEL]` of activation rows `xs` and panels `ps`
    /// (at most [`TASK_PANELS`]).
    fn tiles(
        &self,
        kernel: Kernel,
        ctx: &Ctx,
        xs: &[u8],
        sx: &[f32],
        ps: std::ops::Range<usize>,
        out: &mut [[[f32; PANEL]; MR]; TASK_PANELS],
    ) {
        let panel = |p: usize| &self.q[p * PANEL * ctx.kp..(p + 1) * PANEL * ctx.kp];
        let sums = |g: usize, p: usize| {
            let r = g * ctx.np + p * PANEL..g * ctx.np + (p + 1) * PANEL;
            (&self.offset_sum[r.clone()], &self.scale[r])
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was chosen by Kernel::detect (the CPU has
            // these instructions); the slices hold MR rows and whole panels.
            Kernel::Avx512Vnni if ps.len() == 2 => unsafe {
                vnni::tile(
                    ctx,
                    xs,
                    sx,
                    [panel(ps.start), panel(ps.start + 1)],
                    [ps.start, ps.start + 1],
                    &sums,
                    out,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx512Vnni => unsafe {
                vnni::tile(ctx, xs, sx, [panel(ps.start)], [ps.start], &sums, out)
            },
            _ => {
                for (p, o) in ps.zip(out.iter_mut()) {
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above.
                        Kernel::Avx2 => unsafe {
                            avx2::tile(ctx, xs, sx, panel(p), &|g| sums(g, p), o)
                        },
                        _ => portable_tile(ctx, xs, sx, panel(p), &|g| sums(g, p), o),
                    }
                }
            }
        }
    }
}

/// The shape facts the kernels share.
struct Ctx {
    kp: usize,
    np: usize,
    groups: usize,
}

/// Activation rows quantized: `x[i, c] ≈ scale[i, c / GROUP] · (q[i, c] − 64)`.
pub struct QuantRows {
    m: usize,
    /// `m` rounded up to [`MR`] (zero rows).
    mp: usize,
    kp: usize,
    kernel: Kernel,
    /// `[mp, kp]`: `q + 64`, in `1..=127` (64 for zero and padding).
    q: Aligned<u8>,
    /// `[mp, groups]`.
    scale: Vec<f32>,
}

impl QuantRows {
    /// Quantizes row-major `x[m, k]` for `kernel`.
    pub fn new(x: &[f32], m: usize, k: usize, kernel: Kernel) -> QuantRows {
        assert_eq!(x.len(), m * k, "x holds m x k values");
        let kp = k.div_ceil(CHUNK).max(1) * CHUNK;
        let mp = m.div_ceil(MR) * MR;
        let groups = groups(kp);
        let mut q = Aligned::<u8>::zeroed(mp * kp);
        let mut scale = vec![0f32; mp * groups];
        let quantize = |(i, (qrow, srow)): (usize, (&mut [u8], &mut [f32]))| {
            if i >= m {
                // Padding rows: zero activations, zero scales.
                qrow.fill(OFFSET as u8);
                return;
            }
            let row = &x[i * k..(i + 1) * k];
            for (g, s) in srow.iter_mut().enumerate() {
                let r = group_range(g, kp);
                *s = quantize_group(&row[r.start.min(k)..r.end.min(k)], &mut qrow[r]);
            }
        };
        if m * k >= 1 << 15 {
            q.par_chunks_mut(kp)
                .zip(scale.par_chunks_mut(groups))
                .enumerate()
                .for_each(quantize);
        } else {
            q.chunks_mut(kp)
                .zip(scale.chunks_mut(groups))
                .enumerate()
                .for_each(quantize);
        }
        QuantRows {
            m,
            mp,
            kp,
            kernel,
            q,
            scale,
        }
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }
}

/// Quantizes one group to `q + 64`; returns the scale. `vals` may be shorter
/// than `dst` (the row's end): the rest is zero.
fn quantize_group(vals: &[f32], dst: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { quantize_group_avx2(vals, dst) };
    }
    quantize_group_body(vals, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_group_avx2(vals: &[f32], dst: &mut [u8]) -> f32 {
    quantize_group_body(vals, dst)
}

/// Written so that the compiler vectorizes it (lane-wise maxima; a NaN or
/// infinity shows as a NaN in `v · 0`).
#[inline(always)]
fn quantize_group_body(vals: &[f32], dst: &mut [u8]) -> f32 {
    let mut amax = [0f32; 8];
    let mut poison = [0f32; 8];
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            let a = c[l].abs();
            amax[l] = if a > amax[l] { a } else { amax[l] };
            poison[l] += c[l] * 0.0;
        }
    }
    for &v in chunks.remainder() {
        amax[0] = amax[0].max(v.abs());
        poison[0] += v * 0.0;
    }
    let amax = amax.iter().fold(0f32, |a, &v| a.max(v));
    if poison.iter().any(|p| p.is_nan()) {
        // A NaN or infinity makes the products NaN, as in f32, rather
        // than a silent zero.
        dst.fill(OFFSET as u8);
        return f32::NAN;
    }
    let inv = if amax > 0.0 { ACT_MAX / amax } else { 0.0 };
    let n = vals.len();
    for (d, &v) in dst[..n].iter_mut().zip(vals) {
        // SAFETY: |v · inv| <= 63 (amax · inv = 63), so the rounded value
        // is an i32.
        *d = (unsafe { (v * inv).round_ties_even().to_int_unchecked::<i32>() } + OFFSET) as u8;
    }
    dst[n..].fill(OFFSET as u8);
    amax / ACT_MAX
}

/// The reference kernel, in plain Rust.
fn portable_tile<'a>(
    ctx: &Ctx,
    xs: &[u8],
    sx: &[f32],
    w: &[i8],
    sums: &dyn Fn(usize) -> (&'a [i32], &'a [f32]),
    out: &mut [[f32; PANEL]; MR],
) {
    for g in 0..ctx.groups {
        let r = group_range(g, ctx.kp);
        let (sums, sw) = sums(g);
        for (i, orow) in out.iter_mut().enumerate() {
            let x = &xs[i * ctx.kp..(i + 1) * ctx.kp];
            for (l, o) in orow.iter_mut().enumerate() {
                let mut dot = -sums[l];
                for c in r.clone() {
                    dot += x[c] as i32 * w[(c / 4) * PANEL * 4 + l * 4 + c % 4] as i32;
                }
                *o += sx[i * ctx.groups + g] * sw[l] * dot as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{group_range, Ctx, MR, PANEL};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2 and FMA; `xs` holds MR rows of `kp`, `w` one
    /// panel, `sums(g)` PANEL values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<'a>(
        ctx: &Ctx,
        xs: &[u8],
        sx: &[f32],
        w: &[i8],
        sums: &dyn Fn(usize) -> (&'a [i32], &'a [f32]),
        out: &mut [[f32; PANEL]; MR],
    ) {
        debug_assert!(xs.len() >= MR * ctx.kp && w.len() >= PANEL * ctx.kp);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (xp, wp) = (xs.as_ptr(), w.as_ptr());
        for g in 0..ctx.groups {
            let mut sum = [[_mm256_setzero_si256(); 2]; MR];
            for c in group_range(g, ctx.kp).step_by(4) {
                // Four inputs of the panel's 16 columns, 8 columns a vector.
                let w0 = _mm256_loadu_si256(wp.add(c * PANEL) as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(c * PANEL + 32) as *const __m256i);
                for i in 0..MR {
                    let x =
                        _mm256_set1_epi32((xp.add(i * ctx.kp + c) as *const i32).read_unaligned());
                    sum[i][0] = _mm256_add_epi32(
                        sum[i][0],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones),
                    );
                    sum[i][1] = _mm256_add_epi32(
                        sum[i][1],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones),
                    );
                }
            }
            let (sums, sw) = sums(g);
            let (sums, sw) = (sums.as_ptr(), sw.as_ptr());
            let off = [
                _mm256_loadu_si256(sums as *const __m256i),
                _mm256_loadu_si256(sums.add(8) as *const __m256i),
            ];
            let sw = [_mm256_loadu_ps(sw), _mm256_loadu_ps(sw.add(8))];
            for i in 0..MR {
                let s = _mm256_set1_ps(*sx.get_unchecked(i * ctx.groups + g));
                for h in 0..2 {
                    let d = _mm256_sub_epi32(sum[i][h], off[h]);
                    acc[i][h] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, sw[h]), acc[i][h]);
                }
            }
        }
        for i in 0..MR {
            _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i][0]);
            _mm256_storeu_ps(out[i].as_mut_ptr().add(8), acc[i][1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{group_range, Ctx, MR, PANEL};
    use std::arch::x86_64::*;

    /// `P` panels at once (each broadcast activation feeds `P` products):
    /// `w[h]` is panel `ps[h]`, `sums(g, ps[h])` its offset sums and scales.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW and AVX512-VNNI; `xs` holds MR rows of
    /// `kp`, each `w[h]` one panel, `out` at least `P` tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<'a, const P: usize>(
        ctx: &Ctx,
        xs: &[u8],
        sx: &[f32],
        w: [&[i8]; P],
        ps: [usize; P],
        sums: &dyn Fn(usize, usize) -> (&'a [i32], &'a [f32]),
        out: &mut [[[f32; PANEL]; MR]],
    ) {
        debug_assert!(
            xs.len() >= MR * ctx.kp
                && w.iter().all(|w| w.len() >= PANEL * ctx.kp)
                && out.len() >= P
        );
        let mut acc = [[_mm512_setzero_ps(); P]; MR];
        let (xp, wp) = (xs.as_ptr(), w.map(|w| w.as_ptr()));
        for g in 0..ctx.groups {
            let mut sum = [[_mm512_setzero_si512(); P]; MR];
            for c in group_range(g, ctx.kp).step_by(4) {
                let wv = wp.map(|w| _mm512_loadu_si512(w.add(c * PANEL) as *const _));
                for i in 0..MR {
                    let x =
                        _mm512_set1_epi32((xp.add(i * ctx.kp + c) as *const i32).read_unaligned());
                    for h in 0..P {
                        sum[i][h] = _mm512_dpbusd_epi32(sum[i][h], x, wv[h]);
                    }
                }
            }
            let (off, sw): ([__m512i; P], [__m512; P]) = {
                let parts = ps.map(|p| sums(g, p));
                (
                    parts.map(|(o, _)| _mm512_loadu_si512(o.as_ptr() as *const _)),
                    parts.map(|(_, w)| _mm512_loadu_ps(w.as_ptr())),
                )
            };
            for i in 0..MR {
                let s = _mm512_set1_ps(*sx.get_unchecked(i * ctx.groups + g));
                for h in 0..P {
                    // (qx + 64) · qw, less 64 · Σ qw.
                    let d = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i][h], off[h]));
                    acc[i][h] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, sw[h]), acc[i][h]);
                }
            }
        }
        for i in 0..MR {
            for h in 0..P {
                _mm512_storeu_ps(out[h][i].as_mut_ptr(), acc[i][h]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i * 7919 + seed * 104729) % 1013) as f32 / 506.0 - 1.0) * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut ks = vec![Kernel::Portable];
        if crate::cpu::avx2_fma() {
            ks.push(Kernel::Avx2);
        }
        if crate::cpu::avx512vnni() {
            ks.push(Kernel::Avx512Vnni);
        }
        ks
    }

    #[test]
    fn products_are_close_to_f32_at_odd_shapes_on_every_kernel_this_cpu_has() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (5, 64, 3),
            (17, 130, 33),
            (9, 576, 70),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = naive(&x, m, k, &w, n);
            let packed = PackedI8::pack(&w, n, k);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
            for kernel in kernels() {
                let got = packed.matmul_quantized(&QuantRows::new(&x, m, k, kernel));
                assert_eq!(got.len(), m * n);
                for (g, w) in got.iter().zip(&want) {
                    // 7-bit activations, 8-bit weights: within 2 % of the
                    // largest output.
                    assert!(
                        (g - w).abs() <= 0.02 * scale,
                        "{kernel:?} {m}x{k}x{n}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_wide_kernels_compute_the_same_integer_sums_as_the_portable_one() {
        let (m, k, n) = (7, 200, 9);
        let (x, w) = (data(m * k, 3), data(n * k, 4));
        let packed = PackedI8::pack(&w, n, k);
        let reference = packed.matmul_quantized(&QuantRows::new(&x, m, k, Kernel::Portable));
        for kernel in kernels() {
            let got = packed.matmul_quantized(&QuantRows::new(&x, m, k, kernel));
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{kernel:?}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn an_outlier_channel_spoils_only_its_own_group() {
        // One channel 1000x the others: with one scale for the row every
        // other value would round to 0; per group the others keep their
        // precision. (The weights ignore the outlier's group.)
        let (m, k, n) = (2, 3 * GROUP, 4);
        let mut x = data(m * k, 5);
        x[3] = 1000.0;
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                if i % k < GROUP {
                    0.0
                } else {
                    ((i % 13) as f32 - 6.0) / 6.0
                }
            })
            .collect();
        let want = naive(&x, m, k, &w, n);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(scale > 1.0, "the products do not vanish: {want:?}");
        let got = PackedI8::pack(&w, n, k).matmul(&x, m);
        for (g, w) in got.iter().zip(&want) {
            // (One scale for the row would round every other value to 0,
            // an error of 100 %.)
            assert!((g - w).abs() <= 0.05 * scale, "{g} vs {w}");
        }
    }

    #[test]
    fn zero_rows_give_zero_and_non_finite_activations_give_nan() {
        let (m, k, n) = (2, 10, 3);
        let mut x = vec![0f32; m * k];
        let w = data(n * k, 6);
        assert!(PackedI8::pack(&w, n, k)
            .matmul(&x, m)
            .iter()
            .all(|&v| v == 0.0));
        x[k + 2] = f32::INFINITY;
        for kernel in kernels() {
            let y = PackedI8::pack(&w, n, k).matmul_quantized(&QuantRows::new(&x, m, k, kernel));
            assert!(
                y[..n].iter().all(|&v| v == 0.0),
                "{kernel:?}: the finite row stays exact"
            );
            assert!(y[n..].iter().all(|v| v.is_nan()), "{kernel:?}: {y:?}");
        }
    }
}

/// Products a second against the f32 product at one shape, for tuning:
/// `cargo test --release -p kvembed-model --lib int8::speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn speed() {
        for &(m, k, n) in &[
            (2048usize, 576usize, 1536usize),
            (2048, 1536, 576),
            (32, 576, 1536),
            (8192, 576, 576),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1013) as f32 / 506.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 1013) as f32 / 506.0 - 1.0)
                .collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let packed = PackedI8::pack(&w, n, k);
            let kernel = Kernel::detect();
            let time = |f: &dyn Fn()| {
                f();
                let t = Instant::now();
                let reps = 5;
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let flops = 2.0 * (m * k * n) as f64;
            let f32s = time(&|| drop(crate::matmul::matmul(&x, m, k, &wt, n)));
            let quant = time(&|| drop(QuantRows::new(&x, m, k, kernel)));
            let q = QuantRows::new(&x, m, k, kernel);
            let prod = time(&|| drop(packed.matmul_quantized(&q)));
            eprintln!(
                "{m}x{k}x{n} {kernel:?}: f32 {:.1} GFLOP/s; int8 {:.1} GOP/s products, quantize {:.2} ms, whole {:.2}x f32",
                flops / f32s / 1e9,
                flops / prod / 1e9,
                quant * 1e3,
                f32s / (prod + quant)
            );
        }
    }
}
