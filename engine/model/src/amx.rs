//! bf16 matrix products on Intel AMX tiles (x86-64 Linux, CPUs with
//! AMX-BF16, e.g. Sapphire Rapids and later).
//!
//! A weight `[out, in]` is packed once, at load, into bf16 tiles in the layout
//! `TDPBF16PS` reads (pairs of consecutive inputs interleaved per output
//! column). Each product converts the f32 activations to bf16 (round to
//! nearest even), multiplies on the tiles with f32 accumulation and returns
//! f32: only the two operands of each product are rounded, everything around
//! them (residual stream, norms, attention, pooling) stays f32.
//!
//! The tile instructions are written as inline assembly (Rust's AMX
//! intrinsics are not stable). The kernel computes a 32 x 32 block of the
//! output with the four accumulator tiles 0-3, A tiles 4-5 and B tiles 6-7,
//! stepping 32 inputs at a time; a last block of only 16 rows uses a 16 x 32
//! variant. Rows are padded to a multiple of 16 (one tile row: a short text
//! of 42 tokens computes 48 rows, not 64) and inputs and outputs to
//! multiples of 32 with zeros, so the kernels need no other edge cases; a
//! row's result never depends on the other rows of the batch.
//!
//! The kernel is used only after [`available`] has checked the CPU (CPUID)
//! and obtained the kernel's permission for the tile data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); otherwise the engine keeps its f32
//! matmul.

use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Rows, columns and inputs of one kernel block.
pub(crate) const BLOCK: usize = 32;
/// Rows of one tile: activations are padded to a multiple of this.
pub(crate) const ROW_TILE: usize = 16;
/// Rows of the activations handled by one task (four kernel blocks).
const ROWS_PER_TASK: usize = 128;
/// Output column pairs (of 32) handled by one task.
const COLS_PER_TASK: usize = 8 * BLOCK;

/// Whether this CPU and kernel let the process use AMX-BF16 and
/// `KVEMBED_CPU` does not cap it (checked once, see [`crate::cpu`]).
pub fn available() -> bool {
    crate::cpu::amx_bf16()
}

pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A weight `[n, k]` (outputs x inputs) packed for the tile kernel.
pub struct PackedBf16 {
    n: usize,
    k: usize,
    n_pad: usize,
    k_pad: usize,
    /// `[n_pad / 32][k_pad / 32][2 tiles][16 input pairs][16 outputs][2]`.
    data: Aligned<u16>,
}

impl PackedBf16 {
    /// Packs a row-major `[n, k]` f32 weight (the layout of a linear layer's
    /// `[out, in]` weight).
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedBf16 {
        assert_eq!(w.len(), n * k, "weight holds n x k values");
        Self::pack_with(n, k, |col, i| w[col * k + i])
    }

    /// Packs the transpose of a row-major `[k, n]` matrix `v`: the weight
    /// `w[col][i] = v[i][col]`, so that `x · wᵀ = x · v` (attention's
    /// probabilities times its values).
    pub fn pack_transposed(v: &[f32], k: usize, n: usize) -> PackedBf16 {
        assert_eq!(v.len(), n * k, "matrix holds k x n values");
        Self::pack_with(n, k, |col, i| v[i * n + col])
    }

    /// Packs the `[n, k]` weight whose value at output `col`, input `i` is
    /// `w(col, i)`.
    fn pack_with(n: usize, k: usize, w: impl Fn(usize, usize) -> f32 + Sync) -> PackedBf16 {
        let n_pad = round_up(n.max(1), BLOCK);
        let k_pad = round_up(k.max(1), BLOCK);
        let kb = k_pad / BLOCK;
        let mut data = Aligned::<u16>::zeroed(n_pad * k_pad);
        // One output-column pair (32 columns) per task: disjoint slices.
        data.par_chunks_mut(kb * 2 * 512)
            .enumerate()
            .for_each(|(np, chunk)| {
                for blk in 0..kb {
                    for t in 0..2 {
                        let tile = &mut chunk[(blk * 2 + t) * 512..(blk * 2 + t + 1) * 512];
                        for c in 0..16 {
                            let col = np * BLOCK + t * 16 + c;
                            if col >= n {
                                continue;
                            }
                            for r in 0..16 {
                                for p in 0..2 {
                                    let i = blk * BLOCK + 2 * r + p;
                                    if i < k {
                                        tile[r * 32 + c * 2 + p] = to_bf16(w(col, i));
                                    }
                                }
                            }
                        }
                    }
                }
            });
        PackedBf16 {
            n,
            k,
            n_pad,
            k_pad,
            data,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `x [m, k]` (row-major) times this weight's transpose: `[m, n]`
    /// row-major, f32. Panics when [`available`] is false.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_tiles(&Tiles::new(x, m, self.k))
    }

    /// [`matmul`](Self::matmul) of activations already converted.
    pub fn matmul_tiles(&self, a: &Tiles) -> Vec<f32> {
        assert!(available(), "AMX-BF16 is not available on this CPU");
        assert_eq!(a.k, self.k, "activations have this weight's inputs");
        let m = a.m;
        let m_pad = a.data.len() / self.k_pad;
        // Every value of `c` is written by a tile store before it is read:
        // it is allocated, not zeroed (the memset cost about 8 % of a pass
        // of short texts), and its length set once the stores are done.
        let mut c: Vec<f32> = Vec::with_capacity(m_pad * self.n_pad);
        let row_tasks = m_pad.div_ceil(ROWS_PER_TASK);
        let col_tasks = self.n_pad.div_ceil(COLS_PER_TASK);
        let out = SendPtr::spare(&mut c);
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            // The whole SendPtr, not its raw-pointer field, goes to the tasks.
            let out = out;
            let (rt, ct) = (t / col_tasks, t % col_tasks);
            let rows = rt * ROWS_PER_TASK..((rt + 1) * ROWS_PER_TASK).min(m_pad);
            let cols = ct * COLS_PER_TASK..((ct + 1) * COLS_PER_TASK).min(self.n_pad);
            // SAFETY: AMX is available (asserted above); every task writes
            // its own rows x columns block of `c`, which holds m_pad x n_pad
            // values; `a` holds m_pad x k_pad and the packed weight
            // n_pad x k_pad values, so every tile load stays in bounds.
            unsafe {
                let c = out.get().add(rows.start * self.n_pad + cols.start);
                self.block(
                    &a.data,
                    self.k_pad,
                    self.k_pad / BLOCK,
                    rows,
                    cols,
                    c,
                    self.n_pad,
                )
            };
        });
        // SAFETY: the tasks above stored every row (m_pad) and column
        // (n_pad) of the capacity.
        unsafe { c.set_len(m_pad * self.n_pad) };
        if self.n_pad == self.n {
            // Padding rows come last: dropping them copies nothing.
            c.truncate(m * self.n);
            c
        } else {
            let mut y = Vec::with_capacity(m * self.n);
            for row in c.chunks_exact(self.n_pad).take(m) {
                y.extend_from_slice(&row[..self.n]);
            }
            y
        }
    }

    /// `c[r][j] = Σ_i a[r][i] w[j][i]` on the current thread, for rows `rows`
    /// (starting at a multiple of 32, a multiple of 16 long) and output
    /// columns `cols` (multiples of 32, within `n_pad`),
    /// over the first `kb` steps of 32 inputs (`kb <= k_pad / 32`). `a` is in
    /// tile order (see [`to_bf16_tiles`]) with its inputs padded to `a_kpad`
    /// (at least `32 kb`; `a`'s inputs past those steps are ignored); `c`
    /// points at the block's first value (row `rows.start`, column
    /// `cols.start`) and has a row stride of `c_stride` values.
    ///
    /// # Safety
    /// AMX must be [`available`]; `a` must hold the rows' tiles and `c`
    /// must be valid for writes of every row and column of the block.
    pub(crate) unsafe fn block(
        &self,
        a: &[u16],
        a_kpad: usize,
        kb: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        c: *mut f32,
        c_stride: usize,
    ) {
        // Real checks, in release builds too: the tile loads below read raw
        // memory. (A few comparisons per block of 32 x 32 x k products.)
        assert!(
            kb * BLOCK <= self.k_pad && kb * BLOCK <= a_kpad && cols.end <= self.n_pad,
            "block outside the operands"
        );
        assert!(a.len() >= rows.end * a_kpad, "activation rows outside `a`");
        assert!(
            rows.start % BLOCK == 0 && rows.len() % ROW_TILE == 0 && cols.start % BLOCK == 0,
            "unaligned block"
        );
        #[cfg(target_arch = "x86_64")]
        {
            let cfg = TileConfig::all_16x64();
            std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
            let w_steps = self.k_pad / BLOCK;
            for np in (cols.start / BLOCK)..(cols.end / BLOCK) {
                let b = self.data.as_ptr().add(np * w_steps * 2 * 512);
                for m0 in rows.clone().step_by(BLOCK) {
                    // Rows m0..m0+16 and m0+16..m0+32: two tile rows of `a`
                    // (only the first for a last block of 16 rows).
                    let a0 = a.as_ptr().add(m0 * a_kpad);
                    let c0 = c.add((m0 - rows.start) * c_stride + np * BLOCK - cols.start);
                    if m0 + ROW_TILE == rows.end {
                        kernel_16x32(a0, b, kb, c0, c_stride * 4);
                    } else {
                        kernel_32x32(a0, a0.add(16 * a_kpad), b, kb, c0, c_stride * 4);
                    }
                }
            }
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX is x86-64 only: {a:p} {a_kpad} {kb} {rows:?} {cols:?} {c:p} {c_stride}")
    }
}

/// Throughput of an `m x k` by `k x n` product in GFLOP/s, mean over `reps`
/// runs after a warm-up, three ways: `matmul` (conversion, all threads),
/// the tile kernel alone on this thread (operands converted once), and the
/// kernel alone with every block's results written to one small,
/// cache-resident buffer (no output traffic). For `examples/amx_throughput.rs`.
/// `None` where AMX is not available.
pub fn throughput(m: usize, n: usize, k: usize, reps: usize) -> Option<[f64; 3]> {
    if !available() {
        return None;
    }
    let fill = |len: usize, seed: u32| -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    };
    let (x, w) = (fill(m * k, 1), fill(n * k, 2));
    let packed = PackedBf16::pack(&w, n, k);
    let flops = 2.0 * (m * n * k) as f64;
    let time = |f: &mut dyn FnMut()| {
        f();
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        flops / (t0.elapsed().as_secs_f64() / reps as f64) / 1e9
    };
    let full = time(&mut || {
        std::hint::black_box(packed.matmul(&x, m));
    });
    let m_pad = round_up(m, ROW_TILE);
    let a = to_bf16_tiles(&x, m, k, m_pad, packed.k_pad);
    let mut c = vec![0f32; m_pad * packed.n_pad];
    let mut small = vec![0f32; ROWS_PER_TASK * packed.n_pad];
    let mut kernel = |to_small: bool| {
        for rt in (0..m_pad).step_by(ROWS_PER_TASK) {
            let rows = rt..(rt + ROWS_PER_TASK).min(m_pad);
            for ct in (0..packed.n_pad).step_by(COLS_PER_TASK) {
                let cols = ct..(ct + COLS_PER_TASK).min(packed.n_pad);
                let (a, rows, out) = if to_small {
                    (
                        &a[rt * packed.k_pad..],
                        0..rows.len(),
                        small[ct..].as_mut_ptr(),
                    )
                } else {
                    (
                        &a[..],
                        rows.clone(),
                        c[rt * packed.n_pad + ct..].as_mut_ptr(),
                    )
                };
                // SAFETY: AMX is available; `a` holds the rows' tiles and
                // `c` (`small`) m_pad (ROWS_PER_TASK) rows of n_pad values.
                unsafe {
                    packed.block(
                        a,
                        packed.k_pad,
                        packed.k_pad / BLOCK,
                        rows,
                        cols,
                        out,
                        packed.n_pad,
                    )
                };
            }
        }
    };
    let alone = time(&mut || kernel(false));
    let no_output = time(&mut || kernel(true));
    Some([full, alone, no_output])
}

/// A buffer aligned to 64 bytes, so that every tile row (64 bytes) is one
/// cache line.
pub struct Aligned<T: Copy> {
    buf: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl<T: Copy> Aligned<T> {
    /// `len` values of all-zero bits (0.0 for floats, 0 for integers).
    pub(crate) fn zeroed(len: usize) -> Self {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        Aligned {
            buf: vec![Line([0; 64]); lines],
            len,
            _t: std::marker::PhantomData,
        }
    }

    /// `len` values for callers that write every value before reading any
    /// (the kernels only store to it first). The memory comes zeroed from
    /// the allocator (`calloc`: fresh pages are zero already, so there is
    /// no `memset` pass for large buffers), never uninitialised: every
    /// value is a valid `T` whatever the caller does.
    pub(crate) fn for_overwrite(len: usize) -> Self {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if lines == 0 {
            return Aligned::zeroed(len);
        }
        let layout = std::alloc::Layout::array::<Line>(lines).expect("buffer size overflows");
        // SAFETY: the layout has a non-zero size; a null return is handled.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut Line;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` was allocated by the global allocator with the
        // layout of `lines` Lines; all of them are initialised (zero bytes
        // are a valid Line), so length and capacity are `lines`.
        let buf = unsafe { Vec::from_raw_parts(ptr, lines, lines) };
        Aligned {
            buf,
            len,
            _t: std::marker::PhantomData,
        }
    }

    /// Makes the buffer `len` values long, reusing its memory when it is
    /// large enough. The values are whatever the buffer held (zero where
    /// it grew): callers overwrite what they read.
    pub(crate) fn set_len(&mut self, len: usize) {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if lines > self.buf.len() {
            self.buf.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }
}

impl<T: Copy> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len * size_of::<T>() initialised
        // bytes, aligned to 64 >= align_of::<T>() for the types used here.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const T, self.len) }
    }
}

impl<T: Copy> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and the buffer is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut T, self.len) }
    }
}

/// The 64-byte operand of `LDTILECFG` (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0-7 all 16 rows x 64 bytes (16 f32 or 32 bf16 per row).
    fn all_16x64() -> TileConfig {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        cfg
    }
}

/// `c[0..32][0..32] = a[0..32][0..32 kb] · b` for one output-column pair:
/// tiles 0-3 accumulate the four 16 x 16 quarters, tiles 4-5 hold the
/// upper and lower 16 rows of `a` (from the tile rows `a` and `a_low`, 1 KiB
/// per step), tiles 6-7 the two 16-column halves of `b` (2 KiB per step).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_32x32(
    a: *const u16,
    a_low: *const u16,
    b: *const u16,
    kb: usize,
    c: *mut f32,
    c_stride: usize,
) {
    let c_low = (c as *mut u8).add(16 * c_stride) as *mut f32;
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a} + {sb}*1]",
        "tileloadd tmm5, [{a2} + {sb}*1]",
        "tileloadd tmm6, [{b} + {sb}*1]",
        "tileloadd tmm7, [{b} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, 1024",
        "add {a2}, 1024",
        "add {b}, 2048",
        "dec {k}",
        "jnz 2b",
        "tilestored [{c} + {sc}*1], tmm0",
        "tilestored [{c} + {sc}*1 + 64], tmm1",
        "tilestored [{c2} + {sc}*1], tmm2",
        "tilestored [{c2} + {sc}*1 + 64], tmm3",
        a = inout(reg) a => _,
        a2 = inout(reg) a_low => _,
        b = inout(reg) b => _,
        k = inout(reg) kb => _,
        c = in(reg) c,
        c2 = in(reg) c_low,
        sb = in(reg) 64usize,
        sc = in(reg) c_stride,
        options(nostack),
    );
}

/// [`kernel_32x32`] for 16 rows: tiles 0-1 accumulate, tile 4 holds the
/// rows of `a`, tiles 6-7 the two halves of `b`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_16x32(a: *const u16, b: *const u16, kb: usize, c: *mut f32, c_stride: usize) {
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "2:",
        "tileloadd tmm4, [{a} + {sb}*1]",
        "tileloadd tmm6, [{b} + {sb}*1]",
        "tileloadd tmm7, [{b} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "add {a}, 1024",
        "add {b}, 2048",
        "dec {k}",
        "jnz 2b",
        "tilestored [{c} + {sc}*1], tmm0",
        "tilestored [{c} + {sc}*1 + 64], tmm1",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        k = inout(reg) kb => _,
        c = in(reg) c,
        sb = in(reg) 64usize,
        sc = in(reg) c_stride,
        options(nostack),
    );
}

/// f32 to bf16, round to nearest even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 back to f32 (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A SiLU-gated MLP's gate and up weights (`[n, k]` each) packed as one
/// weight for the tile kernel, so that a task's block of outputs holds both
/// halves of the same columns: output columns come in groups of
/// [`GATE_GROUP`] gate columns followed by the same up columns.
/// [`activation`](Self::activation) turns each block into
/// `silu(gate) * up` in bf16 tile order right away, so neither product is
/// ever stored in f32 (at 16 x 512 tokens each is a 50 MB buffer per layer,
/// written, then read back).
pub struct SiluGatedBf16 {
    gate_up: PackedBf16,
    n: usize,
}

/// Columns of the gate (and of up) next to each other in a [`SiluGatedBf16`]:
/// half a task's columns.
const GATE_GROUP: usize = COLS_PER_TASK / 2;

impl SiluGatedBf16 {
    /// `None` unless `n` is a multiple of [`GATE_GROUP`] (so that the
    /// activation's tiles have the down projection's padding).
    pub fn pack(gate: &[f32], up: &[f32], n: usize, k: usize) -> Option<SiluGatedBf16> {
        assert_eq!(gate.len(), n * k, "gate holds n x k values");
        assert_eq!(up.len(), n * k, "up holds n x k values");
        if n == 0 || !n.is_multiple_of(GATE_GROUP) {
            return None;
        }
        let gate_up = PackedBf16::pack_with(2 * n, k, |col, i| {
            let (group, j) = (col / (2 * GATE_GROUP), col % (2 * GATE_GROUP));
            let w = if j < GATE_GROUP { gate } else { up };
            w[(group * GATE_GROUP + j % GATE_GROUP) * k + i]
        });
        Some(SiluGatedBf16 { gate_up, n })
    }

    /// The gate's (and up's) outputs: the down projection's inputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `silu(x · gateᵀ) * (x · upᵀ)`, in tile order, ready for the down
    /// projection. Panics when [`available`] is false.
    pub fn activation(&self, a: &Tiles) -> Tiles {
        let w = &self.gate_up;
        assert!(available(), "AMX-BF16 is not available on this CPU");
        assert_eq!(a.k, w.k, "activations have this weight's inputs");
        let m_pad = a.data.len() / w.k_pad;
        // Every row of every tile (padding rows too: zero inputs give zero
        // activations) is written by the tasks below.
        let mut act = Aligned::<u16>::for_overwrite(m_pad * self.n);
        let act_ptr = SendPtr::new(&mut act);
        let row_tasks = m_pad.div_ceil(ROWS_PER_TASK);
        let col_tasks = w.n_pad / COLS_PER_TASK;
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            // The whole SendPtr, not its raw-pointer field, goes to the tasks.
            let act_ptr = act_ptr;
            let (rt, ct) = (t / col_tasks, t % col_tasks);
            let rows = rt * ROWS_PER_TASK..((rt + 1) * ROWS_PER_TASK).min(m_pad);
            let cols = ct * COLS_PER_TASK..(ct + 1) * COLS_PER_TASK;
            GATED.with_borrow_mut(|(c, row)| {
                c.resize(ROWS_PER_TASK * COLS_PER_TASK, 0.0);
                row.resize(GATE_GROUP, 0.0);
                // SAFETY: AMX is available (asserted above); `c` holds the
                // task's rows x COLS_PER_TASK values; `a` holds m_pad x k_pad
                // and the packed weight n_pad x k_pad values.
                unsafe {
                    w.block(
                        &a.data,
                        w.k_pad,
                        w.k_pad / BLOCK,
                        rows.clone(),
                        cols,
                        c.as_mut_ptr(),
                        COLS_PER_TASK,
                    )
                };
                let kb = self.n / BLOCK;
                for (i, r) in rows.enumerate() {
                    let (g, u) = c[i * COLS_PER_TASK..(i + 1) * COLS_PER_TASK].split_at(GATE_GROUP);
                    crate::fastmath::silu_mul(g, u, row);
                    // The tiles of this row group and of the task's
                    // GATE_GROUP / 32 column blocks: written by this task only.
                    let first = (r / ROW_TILE) * kb * 512 + ct * (GATE_GROUP / BLOCK) * 512;
                    // SAFETY: inside `act` (m_pad x n values); the task's rows
                    // are whole row groups (ROWS_PER_TASK is a multiple of 16)
                    // and its column blocks are its own, so no other task
                    // writes this range while the slice lives.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            act_ptr.get().add(first),
                            GATE_GROUP / BLOCK * 512,
                        )
                    };
                    row_to_tiles(dst, GATE_GROUP, r % ROW_TILE, row, 1.0);
                }
            });
        });
        Tiles {
            data: act,
            m: a.m,
            k: self.n,
        }
    }
}

thread_local! {
    /// Each worker's block of gate and up outputs and one row of activations.
    static GATED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Activations converted to bf16 in tile order, for any number of products
/// with weights of the same inputs: a layer's query, key and value
/// projections read one conversion of their input, as do the MLP's gate
/// and up projections.
pub struct Tiles {
    data: Aligned<u16>,
    m: usize,
    k: usize,
}

impl Tiles {
    /// `x [m, k]`, row-major.
    pub fn new(x: &[f32], m: usize, k: usize) -> Tiles {
        assert_eq!(x.len(), m * k, "activations hold m x k values");
        let m_pad = round_up(m.max(1), ROW_TILE);
        let k_pad = round_up(k.max(1), BLOCK);
        Tiles {
            data: to_bf16_tiles(x, m, k, m_pad, k_pad),
            m,
            k,
        }
    }
}

/// `x [m, k]` to bf16 in tile order, the padding zero: `[m_pad / 16][k_pad / 32]`
/// tiles of 16 rows x 32 values, each tile 1 KiB contiguous, so that every
/// tile load reads consecutive cache lines.
fn to_bf16_tiles(x: &[f32], m: usize, k: usize, m_pad: usize, k_pad: usize) -> Aligned<u16> {
    // Every row, padding included, is written below: no zeroing first (it
    // cost about 4 % of a 16 x 512 pass in `memset`).
    let mut a = Aligned::<u16>::for_overwrite(m_pad * k_pad);
    // One tile row (16 rows of x) per task; rows past m are zeros.
    a.par_chunks_mut(16 * k_pad)
        .enumerate()
        .for_each(|(mb, dst)| {
            for r in 0..16 {
                let i = mb * 16 + r;
                let src = if i < m {
                    &x[i * k..(i + 1) * k]
                } else {
                    &[][..]
                };
                row_to_tiles(dst, k_pad, r, src, 1.0);
            }
        });
    a
}

/// Writes row `r` of a tile-order bf16 operand (inputs padded to `k_pad`):
/// `src` scaled by `scale`, then zeros up to `k_pad`.
pub(crate) fn row_to_tiles(dst: &mut [u16], k_pad: usize, r: usize, src: &[f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512bf16() {
        // SAFETY: the feature was detected (crate::cpu).
        unsafe { row_to_tiles_avx512(dst, k_pad, r, src, scale) };
        return;
    }
    row_to_tiles_scalar(dst, k_pad, r, src, scale)
}

fn row_to_tiles_scalar(dst: &mut [u16], k_pad: usize, r: usize, src: &[f32], scale: f32) {
    let kb = k_pad / BLOCK;
    let base = (r / 16) * kb * 512 + (r % 16) * 32;
    for blk in 0..kb {
        for (j, d) in dst[base + blk * 512..base + blk * 512 + 32]
            .iter_mut()
            .enumerate()
        {
            *d = src.get(blk * BLOCK + j).map_or(0, |&x| to_bf16(x * scale));
        }
    }
}

/// [`row_to_tiles`] with AVX-512: 32 values (one tile row) per step, the
/// tail masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn row_to_tiles_avx512(dst: &mut [u16], k_pad: usize, r: usize, src: &[f32], scale: f32) {
    use std::arch::x86_64::*;
    let kb = k_pad / BLOCK;
    let base = (r / 16) * kb * 512 + (r % 16) * 32;
    assert!(
        kb == 0 || dst.len() >= base + (kb - 1) * 512 + 32,
        "row {r} lies outside the tiles"
    );
    let sc = _mm512_set1_ps(scale);
    let n = src.len();
    let load = |i: usize| -> __m512 {
        if i + 16 <= n {
            _mm512_loadu_ps(src.as_ptr().add(i))
        } else if i < n {
            _mm512_maskz_loadu_ps(((1u32 << (n - i)) - 1) as u16, src.as_ptr().add(i))
        } else {
            _mm512_setzero_ps()
        }
    };
    for blk in 0..kb {
        let i = blk * BLOCK;
        let lo = _mm512_mul_ps(load(i), sc);
        let hi = _mm512_mul_ps(load(i + 16), sc);
        // The second operand fills the low half.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(base + blk * 512) as *mut _, v);
    }
}

/// The softmax's numerators straight into the tiles: writes row `r` of a
/// tile-order bf16 operand (inputs padded to `k_pad`) with
/// `exp(src[j] - max)` ([`crate::fastmath::exp_nonpositive`]: `max` is at
/// least every `src[j]`), then zeros up to `k_pad`, and returns the sum of the
/// values (before rounding to bf16). The probabilities stay unnormalised:
/// the caller scales the product's output row by `1 / sum` instead, so the
/// exponentials are never stored in f32 and read back.
pub(crate) fn exp_row_to_tiles(
    dst: &mut [u16],
    k_pad: usize,
    r: usize,
    src: &[f32],
    max: f32,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512bf16() {
        // SAFETY: the feature was detected (crate::cpu).
        return unsafe { exp_row_to_tiles_avx512(dst, k_pad, r, src, max) };
    }
    let e: Vec<f32> = src
        .iter()
        .map(|&x| crate::fastmath::exp_nonpositive(x - max))
        .collect();
    row_to_tiles_scalar(dst, k_pad, r, &e, 1.0);
    e.iter().sum()
}

/// [`exp_row_to_tiles`] with AVX-512: 32 values (one tile row) per step,
/// the tail read as `-inf` (whose exponential is 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn exp_row_to_tiles_avx512(
    dst: &mut [u16],
    k_pad: usize,
    r: usize,
    src: &[f32],
    max: f32,
) -> f32 {
    use crate::fastmath::exp_nonpositive_avx512 as exp;
    use std::arch::x86_64::*;
    let kb = k_pad / BLOCK;
    let base = (r / 16) * kb * 512 + (r % 16) * 32;
    assert!(
        kb == 0 || dst.len() >= base + (kb - 1) * 512 + 32,
        "row {r} lies outside the tiles"
    );
    let n = src.len();
    assert!(n <= k_pad, "row {r} is longer than the tiles");
    let (neg_inf, max) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(max));
    let load = |i: usize| -> __m512 {
        if i + 16 <= n {
            _mm512_loadu_ps(src.as_ptr().add(i))
        } else if i < n {
            _mm512_mask_loadu_ps(neg_inf, ((1u32 << (n - i)) - 1) as u16, src.as_ptr().add(i))
        } else {
            neg_inf
        }
    };
    let mut acc = _mm512_setzero_ps();
    for blk in 0..kb {
        let i = blk * BLOCK;
        let v: __m512i = if i >= n {
            _mm512_setzero_si512()
        } else {
            let lo = exp(_mm512_sub_ps(load(i), max));
            let hi = exp(_mm512_sub_ps(load(i + 16), max));
            acc = _mm512_add_ps(acc, _mm512_add_ps(lo, hi));
            // The second operand fills the low half.
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
        };
        _mm512_storeu_si512(dst.as_mut_ptr().add(base + blk * 512) as *mut _, v);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The reference: the same bf16-rounded operands, multiplied in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| r(x[i * k + p]) * r(w[j * k + p])).sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    /// Buffers for kernels to overwrite are still initialised memory
    /// (zeroes), whatever their size, and 64-byte aligned for the tiles.
    #[test]
    fn buffers_for_overwrite_are_zeroed_and_aligned() {
        for len in [0, 1, 31, 32, 1000, 1 << 20] {
            let b = Aligned::<u16>::for_overwrite(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0), "len {len}");
            assert_eq!(b.as_ptr() as usize % 64, 0, "len {len}");
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies exactly between two bf16 values: ties go to even.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        // The vector conversion (one tile row) rounds the same way.
        let src: Vec<f32> = pseudo(32, 3);
        let mut fast = vec![0u16; 512];
        row_to_tiles(&mut fast, 32, 0, &src, 1.0);
        let slow: Vec<u16> = src.iter().map(|&v| to_bf16(v)).collect();
        assert_eq!(fast[..32], slow[..]);
    }

    #[test]
    fn rows_go_to_the_tile_layout_scaled_and_zero_padded() {
        let (k_pad, rows) = (96, 32);
        for len in [0, 5, 32, 45, 96] {
            let mut fast = vec![7u16; rows * k_pad];
            let mut slow = vec![7u16; rows * k_pad];
            for r in [0, 3, 17] {
                let src = pseudo(len, (r + len) as u32);
                row_to_tiles(&mut fast, k_pad, r, &src, 0.37);
                row_to_tiles_scalar(&mut slow, k_pad, r, &src, 0.37);
                for (j, x) in src.iter().enumerate() {
                    let at =
                        (r / 16) * (k_pad / 32) * 512 + (j / 32) * 512 + (r % 16) * 32 + j % 32;
                    assert_eq!(slow[at], to_bf16(x * 0.37), "len {len} row {r} col {j}");
                }
                for j in len..k_pad {
                    let at =
                        (r / 16) * (k_pad / 32) * 512 + (j / 32) * 512 + (r % 16) * 32 + j % 32;
                    assert_eq!(slow[at], 0, "padding of row {r}");
                }
            }
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn softmax_numerators_go_to_the_tiles_with_their_sum() {
        let (k_pad, rows) = (96, 32);
        for len in [0, 5, 32, 45, 96] {
            let mut tiles = vec![7u16; rows * k_pad];
            for r in [0, 3, 17] {
                let src: Vec<f32> = pseudo(len, (r + len) as u32)
                    .iter()
                    .map(|x| x * 8.0)
                    .collect();
                let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = exp_row_to_tiles(&mut tiles, k_pad, r, &src, max);
                let mut want_sum = 0f64;
                for j in 0..k_pad {
                    let at =
                        (r / 16) * (k_pad / 32) * 512 + (j / 32) * 512 + (r % 16) * 32 + j % 32;
                    let want = src.get(j).map_or(0.0, |&x| ((x - max) as f64).exp());
                    want_sum += want;
                    // Within bf16's rounding (8 significant bits).
                    assert!(
                        (from_bf16(tiles[at]) as f64 - want).abs() <= want / 256.0,
                        "len {len} row {r} col {j}"
                    );
                }
                assert!(
                    (sum as f64 - want_sum).abs() <= 1e-5 * want_sum,
                    "len {len}: {sum} vs {want_sum}"
                );
            }
        }
    }

    // The tile kernels exist only on CPUs with AMX-BF16. Elsewhere these
    // tests are reported as ignored (never as passed); `scripts/test.sh`
    // runs them with `--ignored` where `kvembed cpu` reports AMX, and there
    // they fail loudly if the tiles are unavailable. The f32 path every CPU
    // has is checked by `matmul::tests` and `attention::tests`.
    #[test]
    #[ignore = "needs AMX-BF16: scripts/test.sh runs it with --ignored where the CPU has it"]
    fn packed_gate_and_up_give_the_unfused_mlp_bit_for_bit() {
        assert!(
            available(),
            "AMX-BF16 is not available on this CPU (KVEMBED_CPU={:?})",
            std::env::var("KVEMBED_CPU").ok()
        );
        assert!(
            SiluGatedBf16::pack(&pseudo(96 * 8, 1), &pseudo(96 * 8, 2), 96, 8).is_none(),
            "96 columns: no fused path"
        );
        // Rows: one tile row, padding, and more than one task of rows;
        // columns: one task and three.
        for &(m, n, k, d) in &[(1, 128, 40, 24), (42, 384, 64, 70), (300, 256, 96, 32)] {
            let (x, gate, up, down) = (
                pseudo(m * k, 3),
                pseudo(n * k, 4),
                pseudo(n * k, 5),
                pseudo(d * n, 6),
            );
            let fused = SiluGatedBf16::pack(&gate, &up, n, k).expect("n is a multiple of 128");
            assert_eq!(fused.n(), n);
            let down = PackedBf16::pack(&down, d, n);
            let got = down.matmul_tiles(&fused.activation(&Tiles::new(&x, m, k)));
            let (g, u) = (
                PackedBf16::pack(&gate, n, k).matmul(&x, m),
                PackedBf16::pack(&up, n, k).matmul(&x, m),
            );
            let mut act = vec![0f32; m * n];
            crate::fastmath::silu_mul(&g, &u, &mut act);
            let want = down.matmul(&act, m);
            assert_eq!(got.len(), m * d);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "m{m} n{n} k{k} d{d}"
            );
            assert!(got.iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    #[ignore = "needs AMX-BF16: scripts/test.sh runs it with --ignored where the CPU has it"]
    fn tile_matmul_matches_the_rounded_reference() {
        assert!(
            available(),
            "AMX-BF16 is not available on this CPU (KVEMBED_CPU={:?})",
            std::env::var("KVEMBED_CPU").ok()
        );
        // Shapes with padding in every dimension, one that needs none, and
        // one with more rows and columns than a task holds.
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 40, 70),
            (16, 32, 32),
            (42, 64, 64),
            (32, 64, 96),
            (200, 300, 130),
            (64, 576, 576),
        ] {
            let x = pseudo(m * k, (m + n) as u32);
            let w = pseudo(n * k, k as u32);
            let packed = PackedBf16::pack(&w, n, k);
            let y = packed.matmul(&x, m);
            let want = reference(&x, &w, m, n, k);
            assert_eq!(y.len(), m * n);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "m{m} n{n} k{k} [{i}]: {a} vs {b}"
                );
            }
            // A row's result does not depend on the rest of the batch.
            let one = packed.matmul(&x[(m - 1) * k..], 1);
            assert_eq!(&one[..], &y[(m - 1) * n..]);
        }
    }
}
