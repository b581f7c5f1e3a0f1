//! Dense matrix multiplication on the CPU: `C = A · B`.
//!
//! # The formula
//!
//! For A (m×k) and B (k×n), `C[i][j] = Σ_{p<k} A[i][p] · B[p][j]`. That is `2·m·n·k` floating
//! point operations on only `m·k + k·n + m·n` numbers, so a good implementation is limited by
//! arithmetic, not by memory — *if* every number loaded from memory is reused many times while
//! it sits in a register or a cache. The naive triple loop reuses almost nothing and runs at a
//! few percent of the machine's peak; the code below follows the GotoBLAS / BLIS recipe to
//! reach close to peak.
//!
//! # The loop nest (BLIS ordering)
//!
//! ```text
//! for jc in (0..n).step_by(NC)            // 5th loop: a column block of B and C
//!   for pc in (0..k).step_by(KC)          // 4th loop: a depth slice; pack B[pc.., jc..] (KC×NC)
//!     for ic in (0..m).step_by(MC)        // 3rd loop: a row block; pack A[ic.., pc..] (MC×KC)
//!       for jr in (0..NC).step_by(NR)     // 2nd loop: one NR-wide micro-panel of packed B
//!         for ir in (0..MC).step_by(MR)   // 1st loop: one MR-tall micro-panel of packed A
//!           C[ir.., jr..] += Apanel(MR×KC) · Bpanel(KC×NR)   // the micro-kernel
//! ```
//!
//! Which block lives where (the cache sizes of the target, Zen 4: 32 KiB L1d and 1 MiB L2 per
//! core, a shared L3 of tens of MiB; the sizes are also reasonable for Intel cores):
//!
//! * **Registers**: the MR×NR tile of C (6×16 f32 = 12 AVX registers of 8 lanes) stays in
//!   registers for the whole KC-long inner product; per step `p` the kernel loads one row of
//!   the B micro-panel (2 vectors), broadcasts MR values of A one at a time, and issues
//!   MR·NR/8 = 12 fused multiply-adds. 12 independent accumulators are enough to hide the FMA
//!   latency (4 cycles × 2 FMA pipes = 8 FMAs in flight needed), and 12 + 2 + 1 = 15 of the
//!   16 ymm registers are used.
//! * **L1**: the KC×NR micro-panel of packed B (256×16×4 B = 16 KiB) is reused by every
//!   micro-panel of A in the 1st loop, so it must survive in L1 while the A micro-panels
//!   (6×256×4 B = 6 KiB each) stream through.
//! * **L2**: the MC×KC packed block of A (144×256×4 B = 144 KiB) is reused by every B
//!   micro-panel in the 2nd loop; it sits in L2 (half of it or less, so B traffic and C tiles
//!   do not evict it).
//! * **L3 / memory**: the KC×NC packed block of B (256×2048×4 B = 2 MiB) is reused by every
//!   row block in the 3rd loop.
//!
//! KC also sets how often the C tile goes through memory: each C element is loaded and stored
//! once per KC-long inner product, so a larger KC amortises that traffic better, up to the L1
//! limit above.
//!
//! # Packing
//!
//! Before use, blocks of A and B are copied ("packed") into contiguous scratch buffers in
//! exactly the order the micro-kernel reads them, which (a) makes every kernel load sequential
//! and unit-stride whatever the operand strides were (a transposed or broadcast operand costs
//! only its packing, which is O(size) against O(size·other dim) compute), (b) avoids TLB and
//! cache-associativity trouble from large strides, and (c) zero-pads ragged edges so the kernel
//! always computes a full MR×NR tile.
//!
//! * Packed A: row panels of MR rows. Panel `q` holds rows `q·MR..q·MR+MR`; inside it, column
//!   `p` is the MR consecutive values `A[q·MR + 0..MR][p]`: `apack[q·MR·KC + p·MR + r]`.
//! * Packed B: column panels of NR columns. Panel `q` holds columns `q·NR..q·NR+NR`; inside it,
//!   row `p` is the NR consecutive values `B[p][q·NR + 0..NR]`: `bpack[q·NR·KC + p·NR + j]`.
//!
//! Rows/columns beyond the matrix are packed as zeros; the kernel then computes a full tile
//! into a small stack buffer and only the valid part is copied to C.
//!
//! A B that many products reuse can be packed once, whole ([`PackedB`]: the same panels with
//! all k rows, so panel `q` row `p` is at `q·NR·k + p·NR`); a product with it
//! ([`gemm_f32_packed`]) reads any rows of any panels in place and packs only A. The fused
//! attention packs each head's keys and values so, for all its query tiles.
//!
//! # Parallelism
//!
//! The output is cut into a few rectangles per rayon thread (halving the longer of m and n
//! each time, at multiples of the register tile, down to a minimum amount of work), and each
//! rectangle runs the whole sequential loop nest above with its own scratch buffers, so tasks
//! never synchronise. Cutting along n makes each task re-pack the A rows it needs (and along m,
//! the B columns); that duplication is O(size of the operand) against O(m·n·k / tasks)
//! arithmetic. Having several tasks per thread lets rayon's work stealing balance cores that
//! are slowed by other work. No task waits on another except through `rayon::join`, so calling
//! this from inside an outer rayon loop is fine: rayon runs the halves on whatever thread is
//! free (or inline), and never deadlocks.
//!
//! # Dispatch
//!
//! On x86-64 the micro-kernels are selected at run time with `is_x86_feature_detected!`
//! ([`F32Kernel::best`]): AVX-512 (12×32) on Intel CPUs that have it, AVX2 + FMA (6×16)
//! otherwise — on Zen 4 AVX-512 runs 512-bit FMAs as two 256-bit halves, so it has the same
//! peak as AVX2 there. On AArch64 (Apple silicon, Graviton) a NEON kernel (8×12: 24
//! accumulators of 4 lanes, `fmla` by lane of A so A needs no broadcast) is always there.
//! Everywhere else a portable kernel written with plain arrays is used, which the compiler
//! auto-vectorises for the target. Tiny products skip all of this and use a
//! direct loop. The unit tests run every kernel the CPU has.

use std::cell::Cell;
use std::ops::{Add, Mul};

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

/// Run `$body` with the register tile (`$mr`×`$nr`, constants) and the cache plan (`$plan`) of
/// the f32 kernel family `$kernel`: the one place that maps a family to its micro-kernel.
macro_rules! with_f32_kernel {
    ($kernel:expr, |$plan:ident, $mr:ident, $nr:ident| $body:expr) => {
        match $kernel {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => {
                const $mr: usize = 12;
                const $nr: usize = 32;
                let $plan = f32_plan($mr, $nr, x86::kernel_f32_12x32);
                $body
            }
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx2 => {
                const $mr: usize = 6;
                const $nr: usize = 16;
                let $plan = f32_plan($mr, $nr, x86::kernel_f32_6x16);
                $body
            }
            #[cfg(target_arch = "aarch64")]
            F32Kernel::Neon => {
                const $mr: usize = 8;
                const $nr: usize = 12;
                let $plan = f32_plan($mr, $nr, neon::kernel_f32_8x12);
                $body
            }
            _ => {
                const $mr: usize = 4;
                const $nr: usize = 16;
                let $plan = PORTABLE_F32;
                $body
            }
        }
    };
}

/// [`with_f32_kernel!`] for f64: AVX2 + FMA (6×8) where the CPU has them, else the portable
/// kernel (4×8).
macro_rules! with_f64_kernel {
    (|$plan:ident, $mr:ident, $nr:ident| $body:expr) => {
        match f64_avx2() {
            #[cfg(target_arch = "x86_64")]
            true => {
                const $mr: usize = 6;
                const $nr: usize = 8;
                let $plan = Plan { kc: 256, mc: 96, nc: 1024, kernel: x86::kernel_f64_6x8 };
                $body
            }
            _ => {
                const $mr: usize = 4;
                const $nr: usize = 8;
                let $plan = Plan { kc: 256, mc: 96, nc: 1024, kernel: kernel_portable::<f64, 4, 8> };
                $body
            }
        }
    };
}

/// Whether the f64 AVX2 + FMA kernel runs on this CPU.
fn f64_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The f32 micro-kernel family: AVX-512 (a 12×32 tile in 24 zmm accumulators), AVX2 + FMA
/// (6×16 in 12 ymm), NEON on 64-bit ARM (8×12 in 24 q registers: Apple silicon, Graviton), or
/// the portable one (4×16, auto-vectorised). [`F32Kernel::best`] picks AVX-512 on Intel CPUs
/// that have it (two 512-bit FMA pipes: twice AVX2's peak) and AVX2 elsewhere on x86-64: AMD's
/// Zen 4 runs a 512-bit FMA as two 256-bit halves, and measured there the 12×32 kernel was no
/// faster than the 6×16 one (170–190 against 155–200 GFLOP/s, within this machine's noise);
/// NEON on every AArch64 CPU (it is part of the architecture). `TINYTUNE_GEMM=avx512|avx2|
/// neon|portable` forces one (for comparisons in one run: `TINYTUNE_GEMM=avx2 cargo bench
/// --bench ops`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    Avx512,
    Avx2,
    Neon,
    Portable,
}

impl F32Kernel {
    /// Whether this CPU runs the kernel (a feature check, no allocation: every product asks).
    pub fn runs(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "aarch64")]
            F32Kernel::Neon => true,
            F32Kernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The kernels this CPU can run, widest first.
    pub fn available() -> Vec<F32Kernel> {
        [F32Kernel::Avx512, F32Kernel::Avx2, F32Kernel::Neon, F32Kernel::Portable].into_iter().filter(|k| k.runs()).collect()
    }

    /// The kernel for this CPU (see the type), or the one `TINYTUNE_GEMM` names if this CPU
    /// runs it (read once).
    pub fn best() -> F32Kernel {
        static BEST: std::sync::OnceLock<F32Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let available = F32Kernel::available();
            let asked = match std::env::var("TINYTUNE_GEMM").ok().as_deref() {
                Some("avx512") => Some(F32Kernel::Avx512),
                Some("avx2") => Some(F32Kernel::Avx2),
                Some("neon") => Some(F32Kernel::Neon),
                Some("portable") => Some(F32Kernel::Portable),
                _ => None,
            };
            let wide = available.iter().copied().find(|&k| k != F32Kernel::Avx512 || intel());
            asked.filter(|k| available.contains(k)).or(wide).unwrap_or(F32Kernel::Portable)
        })
    }
}

/// Whether the CPU's vendor string (CPUID leaf 0) is "GenuineIntel".
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (the intrinsic is safe in newer Rust).
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
        vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// C = A · B for one matrix: A is m×k, B is k×n, read through element strides
/// (element (i,p) of A is `a[i*a_rs + p*a_cs]`; (p,j) of B is `b[p*b_rs + j*b_cs]`), so a
/// transposed operand is read in place by swapping its strides. C is row-major contiguous m×n
/// (`c[i*n + j]`) and is overwritten. Internally parallel with rayon (it may be called from
/// inside an outer rayon parallel loop over batches; that stays correct and does not deadlock).
///
/// Panics only if a slice is shorter than the shape and strides require.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(m: usize, n: usize, k: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize, c: &mut [f32]) {
    gemm_f32_into(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, false)
}

/// [`gemm_f32`], adding `A · B` to C (`C += A·B`) when `accumulate`, instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_into(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_f32_with(F32Kernel::best(), m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, accumulate)
}

/// [`gemm_f32_into`] with the micro-kernel family `kernel` (one of [`F32Kernel::available`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_with(
    kernel: F32Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(kernel.runs(), "gemm: {kernel:?} does not run on this CPU");
    with_f32_kernel!(kernel, |plan, MR, NR| gemm_generic::<f32, MR, NR>(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, plan, accumulate))
}

/// A matrix whose rows are decoded on demand — a quantised or half-precision frozen weight
/// `W` (`rows × cols`, row-major). The product reads it only through this, one row segment at
/// a time, straight into the packing buffer; no full f32 copy of W ever exists.
pub trait RowDecoder: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Elements `start .. start + out.len()` of row `row`.
    fn decode(&self, row: usize, start: usize, out: &mut [f32]);
    /// `out[i] = W[row] · a[i]` (each `a[i]` of `cols` values), for decoding a token; by
    /// default the row decoded into `scratch` (`cols` values), then dot products. A format
    /// with a fused block dot product overrides it.
    fn dot_row(&self, row: usize, a: &[&[f32]], out: &mut [f32], scratch: &mut [f32]) {
        self.decode(row, 0, scratch);
        for (o, x) in out.iter_mut().zip(a) {
            *o = dot(x, scratch);
        }
    }
}

/// `C (+)= A · Wᵀ` (`transposed`, the forward `x Wᵀ` of a linear: k = W.cols, n = W.rows) or
/// `C (+)= A · W` (the `dx = g · W` of its backward: k = W.rows, n = W.cols), with W read
/// through a [`RowDecoder`]. A is m×k through strides as in [`gemm_f32`]; C is m×n.
///
/// The blocked product is the one of [`gemm_f32`]: only the packing of B changes, which
/// decodes each KC×NR panel from W's rows instead of copying it. Decoding costs O(k·n) per
/// row block of A against O(m·n·k) arithmetic. Few rows (decoding one token) skip packing and
/// decode each row of W once.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_decoded(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    w: &dyn RowDecoder,
    transposed: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    let (k, n) = if transposed { (w.cols(), w.rows()) } else { (w.rows(), w.cols()) };
    if !check_or_settle(m, n, k, a, a_rs, a_cs, c, accumulate) {
        return;
    }
    let c = &mut c[..m * n];
    let b = BOperand::Decoded { w, transposed };
    if m <= SKINNY_M {
        gemm_skinny_decoded(m, n, k, a, a_rs, a_cs, w, transposed, c, accumulate);
        return;
    }
    with_f32_kernel!(F32Kernel::best(), |plan, MR, NR| run_blocked::<f32, MR, NR>(m, n, k, a, a_rs, a_cs, b, c, plan, accumulate))
}

/// [`gemm_skinny`] for a decoded W: `C[i][j] = A[i]·W[j]` decodes each row of W once for all
/// m rows of A (transposed), or `C[i] += A[i][p]·W[p]` one decoded row segment at a time.
#[allow(clippy::too_many_arguments)]
fn gemm_skinny_decoded(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    w: &dyn RowDecoder,
    transposed: bool,
    c: &mut [f32],
    acc: bool,
) {
    use rayon::prelude::*;
    let arows: Vec<Vec<f32>> = (0..m).map(|i| (0..k).map(|p| a[i * a_rs + p * a_cs]).collect()).collect();
    if !acc {
        c.fill(0.0);
    }
    // Columns of C per task: whole 256-element blocks of every format when not transposed;
    // transposed, whole rows of W, four tasks per thread so that the threads finish together
    // (k and v projections have only 192 rows: one 256-column task would leave a core idle).
    let cols = if transposed { n.div_ceil(4 * rayon::current_num_threads()).max(16) } else { 256 };
    let cp = SendPtr(c.as_mut_ptr());
    (0..n.div_ceil(cols)).into_par_iter().for_each(|blk| {
        let (j0, j1) = (blk * cols, ((blk + 1) * cols).min(n));
        let cp = &cp;
        // SAFETY: tasks write disjoint column ranges j0..j1 of C's m rows (C is m×n, checked
        // by the caller).
        let at = |i: usize, j: usize| unsafe { &mut *cp.0.add(i * n + j) };
        if transposed {
            let refs: Vec<&[f32]> = arows.iter().map(|r| r.as_slice()).collect();
            let (mut row, mut dots) = (vec![0f32; k], vec![0f32; m]);
            for j in j0..j1 {
                w.dot_row(j, &refs, &mut dots, &mut row);
                for (i, d) in dots.iter().enumerate() {
                    *at(i, j) += d;
                }
            }
        } else {
            let mut seg = vec![0f32; j1 - j0];
            for p in 0..k {
                w.decode(p, j0, &mut seg);
                for (i, ar) in arows.iter().enumerate() {
                    let ap = ar[p];
                    for (jj, &v) in seg.iter().enumerate() {
                        *at(i, j0 + jj) += ap * v;
                    }
                }
            }
        }
    });
}

/// A dot product with eight independent partial sums, so it vectorises.
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = cx.remainder().iter().zip(cy.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in cx.zip(cy) {
        for l in 0..8 {
            partial[l] += a[l] * b[l];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Same as [`gemm_f32`] in double precision (used as the reference path for gradient checks).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f64(m: usize, n: usize, k: usize, a: &[f64], a_rs: usize, a_cs: usize, b: &[f64], b_rs: usize, b_cs: usize, c: &mut [f64]) {
    gemm_f64_into(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, false)
}

/// [`gemm_f64`], adding to C when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f64_into(
    m: usize,
    n: usize,
    k: usize,
    a: &[f64],
    a_rs: usize,
    a_cs: usize,
    b: &[f64],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f64],
    accumulate: bool,
) {
    with_f64_kernel!(|plan, MR, NR| gemm_generic::<f64, MR, NR>(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, plan, accumulate))
}

/// B (k×n) packed once into the micro-kernel's column panels, for a B that many products
/// reuse — the keys and values of one attention head, multiplied by every tile of queries of
/// every head that shares them. Layout: panel `q` holds columns `q·NR..q·NR + NR` of all k
/// rows, `B[p][q·NR + j]` at `q·NR·k + p·NR + j` (zero past column n), so any rows
/// `k0..k0 + kb` of a panel are one contiguous run and a product over them reads B in place:
/// it packs only A. NR is the tile width of the kernel this CPU runs (16 for AVX2).
pub struct PackedB<T> {
    data: Vec<T>,
    /// Index of the first panel in `data` (a 64-byte boundary, as the packing scratch).
    start: usize,
    k: usize,
    n: usize,
    nr: usize,
}

impl<T> PackedB<T> {
    /// Rows of B.
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns of B.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// The panel width: the first column of a product with this B is a multiple of it.
    pub fn panel_width(&self) -> usize {
        self.nr
    }

    /// Row `p` of panel `q`.
    ///
    /// # Safety
    /// `q < ceil(n/NR)` and `p < k` (or `p == k` for an empty run).
    unsafe fn panel(&self, q: usize, p: usize) -> *const T {
        // SAFETY: by the contract the offset is inside `data`.
        unsafe { self.data.as_ptr().add(self.start + q * self.nr * self.k + p * self.nr) }
    }
}

/// Pack B (element (p, j) at `b[p*rs + j*cs]`) for panels of width `NR`.
fn pack_whole<T: Elem, const NR: usize>(k: usize, n: usize, b: &[T], rs: usize, cs: usize) -> PackedB<T> {
    let len = n.div_ceil(NR) * NR * k;
    if len == 0 {
        return PackedB { data: Vec::new(), start: 0, k, n, nr: NR };
    }
    assert!(matches!(last_index(k, n, rs, cs), Some(l) if l < b.len()), "gemm: B slice too short for its shape");
    let pad = ALIGN / std::mem::size_of::<T>();
    let mut data: Vec<T> = Vec::with_capacity(len + pad);
    let start = data.as_ptr().align_offset(ALIGN).min(pad);
    // SAFETY: `start + len ≤ capacity`; `pack_b` writes every element of the
    // ceil(n/NR)·NR·k panels (zeros past column n) and reads B inside its checked shape, so
    // the first `start + len` elements are initialised once the padding is written too.
    unsafe {
        pack_b::<T, NR>(k, n, b, 0, rs, cs, data.as_mut_ptr().add(start));
        for i in 0..start {
            data.as_mut_ptr().add(i).write(T::ZERO);
        }
        data.set_len(start + len);
    }
    PackedB { data, start, k, n, nr: NR }
}

impl PackedB<f32> {
    /// Pack B (k×n, element (p, j) at `b[p*rs + j*cs]`) for this CPU's f32 kernel
    /// ([`F32Kernel::best`]).
    pub fn f32(k: usize, n: usize, b: &[f32], rs: usize, cs: usize) -> PackedB<f32> {
        with_f32_kernel!(F32Kernel::best(), |_plan, _MR, NR| pack_whole::<_, NR>(k, n, b, rs, cs))
    }
}

impl PackedB<f64> {
    /// Pack B for this CPU's f64 kernel.
    pub fn f64(k: usize, n: usize, b: &[f64], rs: usize, cs: usize) -> PackedB<f64> {
        with_f64_kernel!(|_plan, _MR, NR| pack_whole::<_, NR>(k, n, b, rs, cs))
    }
}

/// The checks every product starts with: C holds m×n, A's last element lies inside its
/// slice; with nothing to multiply (m, n or k zero) C is settled here (zeroed when not
/// accumulating) and the result is false. Every unchecked read of A below is in bounds by it.
#[allow(clippy::too_many_arguments)]
fn check_or_settle<T: Elem>(m: usize, n: usize, k: usize, a: &[T], a_rs: usize, a_cs: usize, c: &mut [T], acc: bool) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    let mn = m.checked_mul(n).expect("gemm: m*n overflows usize");
    assert!(c.len() >= mn, "gemm: C has {} elements, needs {}", c.len(), mn);
    if k == 0 {
        if !acc {
            c[..mn].fill(T::ZERO);
        }
        return false;
    }
    assert!(matches!(last_index(m, k, a_rs, a_cs), Some(l) if l < a.len()), "gemm: A slice too short for its shape");
    true
}

/// [`check_or_settle`] for a product with a packed B, whose rows `k0..k0+k` and columns
/// `j0..j0+n` must exist, `j0` starting a panel.
#[allow(clippy::too_many_arguments)]
fn packed_checks<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &PackedB<T>,
    k0: usize,
    j0: usize,
    c: &mut [T],
    acc: bool,
) -> bool {
    assert!(k0 + k <= b.k && j0 + n <= b.n, "gemm: rows {k0}..{} and columns {j0}..{} of a packed {}×{} B", k0 + k, j0 + n, b.k, b.n);
    assert!(j0.is_multiple_of(b.nr), "gemm: column {j0} of a packed B does not start a panel of {}", b.nr);
    check_or_settle(m, n, k, a, a_rs, a_cs, c, acc)
}

/// `C (+)= A · B[k0..k0+k, j0..j0+n]` with B packed once ([`PackedB::f32`]); A is m×k through
/// strides, C is m×n contiguous, as in [`gemm_f32_into`]. `j0` is a multiple of
/// [`PackedB::panel_width`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_packed(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &PackedB<f32>,
    k0: usize,
    j0: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    if !packed_checks(m, n, k, a, a_rs, a_cs, b, k0, j0, c, accumulate) {
        return;
    }
    let op = BOperand::Packed { b, k0, j0 };
    let c = &mut c[..m * n];
    with_f32_kernel!(F32Kernel::best(), |plan, MR, NR| {
        assert_eq!(b.nr, NR, "gemm: B packed in panels of {} for another kernel than this CPU's", b.nr);
        run_blocked::<f32, MR, NR>(m, n, k, a, a_rs, a_cs, op, c, plan, accumulate)
    })
}

/// [`gemm_f32_packed`] in double precision ([`PackedB::f64`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f64_packed(
    m: usize,
    n: usize,
    k: usize,
    a: &[f64],
    a_rs: usize,
    a_cs: usize,
    b: &PackedB<f64>,
    k0: usize,
    j0: usize,
    c: &mut [f64],
    accumulate: bool,
) {
    if !packed_checks(m, n, k, a, a_rs, a_cs, b, k0, j0, c, accumulate) {
        return;
    }
    let op = BOperand::Packed { b, k0, j0 };
    let c = &mut c[..m * n];
    with_f64_kernel!(|plan, MR, NR| run_blocked::<f64, MR, NR>(m, n, k, a, a_rs, a_cs, op, c, plan, accumulate))
}

// ---------------------------------------------------------------------------------------------
// Element type, kernel plans and dispatch
// ---------------------------------------------------------------------------------------------

/// The two element types; `ZERO` fills padding and ragged edges.
trait Elem: Copy + Send + Sync + 'static + Add<Output = Self> + Mul<Output = Self> {
    const ZERO: Self;
}

impl Elem for f32 {
    const ZERO: f32 = 0.0;
}

impl Elem for f64 {
    const ZERO: f64 = 0.0;
}

/// A micro-kernel: given `kc`, a packed MR×kc A micro-panel `a` and a packed kc×NR B
/// micro-panel `b`, it computes the MR×NR product tile and stores it at `c` (row stride `ldc`),
/// overwriting C when `accumulate` is false and adding to it when true.
///
/// Safety contract for callers: `a` is valid for `MR·kc` reads, `b` for `kc·NR` reads, and
/// `c` for reads and writes of the MR×NR tile with row stride `ldc`; the CPU supports the
/// features the kernel was compiled for.
type Kernel<T> = unsafe fn(usize, *const T, *const T, *mut T, usize, bool);

/// The data caches a core sees, in bytes: L1d, L2 and its share of L3 (read once from Linux's
/// `/sys/devices/system/cpu/cpu0/cache`; Zen 4's 32 KiB / 1 MiB / 4 MiB elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caches {
    pub l1d: usize,
    pub l2: usize,
    pub l3_share: usize,
}

impl Caches {
    pub fn of_this_cpu() -> Caches {
        static C: std::sync::OnceLock<Caches> = std::sync::OnceLock::new();
        *C.get_or_init(|| Caches::from_sysfs(std::path::Path::new("/sys/devices/system/cpu/cpu0/cache")).unwrap_or(Caches::ZEN4))
    }

    /// Zen 4 (the machine the constants were measured on): 32 KiB L1d, 1 MiB L2, 32 MiB of L3
    /// shared by 8 cores.
    pub const ZEN4: Caches = Caches { l1d: 32 << 10, l2: 1 << 20, l3_share: 4 << 20 };

    /// From a sysfs cache directory (`index*/level`, `type`, `size`, `shared_cpu_list`; the
    /// CPU's `topology/thread_siblings_list` beside it).
    pub fn from_sysfs(dir: &std::path::Path) -> Option<Caches> {
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        let size = |s: &str| -> Option<usize> {
            let (num, mult) = match s.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            num.parse::<usize>().ok().map(|n| n * mult)
        };
        // CPUs sharing a cache, from a list like "0-7" or "0,8".
        let sharing = |s: &str| -> usize {
            s.split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b.trim().parse::<usize>().unwrap_or(0).saturating_sub(a.trim().parse().unwrap_or(0)) + 1,
                    None => 1,
                })
                .sum::<usize>()
                .max(1)
        };
        // Hardware threads per core (`../topology/thread_siblings_list` beside `cache`), so the
        // L3 is shared out among cores, not SMT threads.
        let smt = read(dir.join("../topology/thread_siblings_list")).map_or(1, |s| sharing(&s));
        let (mut l1d, mut l2, mut l3) = (None, None, None);
        for i in 0..8 {
            let ix = dir.join(format!("index{i}"));
            let (Some(level), Some(kind), Some(sz)) = (read(ix.join("level")), read(ix.join("type")), read(ix.join("size"))) else {
                continue;
            };
            let Some(sz) = size(&sz) else { continue };
            match (level.as_str(), kind.as_str()) {
                ("1", "Data") => l1d = Some(sz),
                ("2", "Unified" | "Data") => l2 = Some(sz),
                ("3", "Unified") => l3 = Some(sz / read(ix.join("shared_cpu_list")).map_or(1, |s| (sharing(&s) / smt).max(1))),
                _ => {}
            }
        }
        let (l1d, l2) = (l1d?, l2?);
        Some(Caches { l1d, l2, l3_share: l3.unwrap_or(l2) })
    }

    /// Cache blocks (KC, MC, NC) for an MR×NR f32 kernel (see the header): the KC×NR B
    /// micro-panel takes at most 3/4 of L1d and KC is a multiple of 64 (256 for AVX2's 6×16
    /// and 192 for AVX-512's 12×32 on a 32 KiB L1d); the MC×KC A block about a seventh of L2
    /// (MC = 144 for 1 MiB, 256-deep, measured best on Zen 4: the B panels streaming through
    /// and the C tiles must not evict it), a multiple of MR; the KC×NC B block a half of this
    /// core's L3 share, 512..=2048 columns (2048 measured best on Zen 4), a multiple of NR.
    pub fn blocks(&self, mr: usize, nr: usize) -> (usize, usize, usize) {
        let kc = (self.l1d * 3 / 4 / (4 * nr) / 64 * 64).clamp(64, 512);
        let kc = if nr <= 16 { kc.min(256) } else { kc };
        let mc = ((self.l2 / 7 / (4 * kc)) / mr * mr).clamp(2 * mr, 1024 / mr * mr);
        // Rounded to NR after the clamp: 512 and 2048 are not multiples of every NR (12).
        let nc = (self.l3_share / 2 / (4 * kc)).clamp(512, 2048) / nr * nr;
        (kc, mc, nc)
    }
}

/// The register tiles of the f32 micro-kernels: AVX2, AVX-512, NEON.
const F32_TILES: [(usize, usize); 3] = [(6, 16), (12, 32), (8, 12)];

/// The cache blocks of the f32 kernel `mr`×`nr` (one of [`F32_TILES`]) on this CPU (computed
/// once).
#[allow(dead_code)] // each target uses its own tiles
fn f32_plan(mr: usize, nr: usize, kernel: Kernel<f32>) -> Plan<f32> {
    static BLOCKS: std::sync::OnceLock<[(usize, usize, usize); 3]> = std::sync::OnceLock::new();
    let b = BLOCKS.get_or_init(|| {
        let c = Caches::of_this_cpu();
        F32_TILES.map(|(mr, nr)| c.blocks(mr, nr))
    });
    let i = F32_TILES.iter().position(|&t| t == (mr, nr)).expect("blocks for every f32 kernel's tile");
    let (kc, mc, nc) = b[i];
    Plan { kc, mc, nc, kernel }
}

/// The portable f32 kernel's plan (constants: it runs where nothing is known of the caches).
const PORTABLE_F32: Plan<f32> = Plan { kc: 256, mc: 128, nc: 2048, kernel: kernel_portable::<f32, 4, 16> };

/// Largest MR·NR of any kernel below (sizes the edge-tile stack buffer).
const MAX_TILE: usize = 384;

/// Cache block sizes and micro-kernel for one element type on the running CPU. The register
/// tile MR×NR is a const generic parameter of the driver instead, so that the packing loops
/// have constant trip counts and compile to straight vector moves.
#[derive(Clone, Copy)]
struct Plan<T> {
    kc: usize,
    mc: usize,
    nc: usize,
    kernel: Kernel<T>,
}

/// Below this many multiply-adds (m·n·k) the direct loop wins: packing and thread start-up
/// would cost more than they save.
const SMALL_MNK: usize = 32 * 1024;

/// A product of fewer multiply-adds than this (tens of µs of work) runs on one thread; above
/// it, it is cut into one task per thread at least.
const MIN_SPLIT_MNK: usize = 1 << 20;

/// Beyond one task per thread, a product is cut into more (up to [`TASKS_PER_THREAD`] each)
/// only while every task keeps at least this many multiply-adds (about 0.1 ms of work).
const MIN_TASK_MNK: usize = 4 << 20;

/// How many tasks per rayon thread a large product is cut into.
const TASKS_PER_THREAD: usize = 4;

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

/// Largest index `(rows-1)*rs + (cols-1)*cs` touched by a rows×cols operand, or `None` on
/// overflow (which means no slice could be long enough).
fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)
}

#[allow(clippy::too_many_arguments)]
fn gemm_generic<T: Elem, const MR: usize, const NR: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    c: &mut [T],
    plan: Plan<T>,
    acc: bool,
) {
    if !check_or_settle(m, n, k, a, a_rs, a_cs, c, acc) {
        return;
    }
    let c = &mut c[..m * n];
    // With A's check above, this makes every unchecked read below in bounds: all indices read
    // are i*rs + p*cs with i, p inside the shape, hence at most the last index.
    let b_last = last_index(k, n, b_rs, b_cs);
    assert!(matches!(b_last, Some(l) if l < b.len()), "gemm: B slice too short for its shape");

    if m.saturating_mul(n).saturating_mul(k) < SMALL_MNK {
        gemm_small(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, acc);
        return;
    }
    if m <= SKINNY_M && (b_rs == 1 || b_cs == 1) {
        gemm_skinny(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, acc);
        return;
    }

    run_blocked::<T, MR, NR>(m, n, k, a, a_rs, a_cs, BOperand::Strided { b, rs: b_rs, cs: b_cs }, c, plan, acc);
}

/// The blocked, parallel product for any B operand (shapes and bounds already checked).
#[allow(clippy::too_many_arguments)]
fn run_blocked<T: Elem, const MR: usize, const NR: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: BOperand<'_, T>,
    c: &mut [T],
    plan: Plan<T>,
    acc: bool,
) {
    let op = Operands { a, a_rs, a_cs, b, c: SendPtr(c.as_mut_ptr()), ldc: n, k, acc };
    // A few tasks per thread rather than exactly one: rayon's work stealing then evens out
    // cores that are slowed by other work, for a few percent of duplicated packing. But one
    // task per thread already from MIN_SPLIT_MNK on: the rank-r products of LoRA (~2 M
    // multiply-adds) ran on one core.
    let threads = rayon::current_num_threads().max(1);
    let work = m.saturating_mul(n).saturating_mul(k);
    let leaves = if work < 2 * MIN_SPLIT_MNK { 1 } else { (work / MIN_TASK_MNK).clamp(threads, threads * TASKS_PER_THREAD) };
    split::<T, MR, NR>(&op, &plan, 0, m, 0, n, leaves);
}

/// Direct loop for tiny products: row i of C accumulates `A[i][p] · B[p][..]` over p, which
/// the compiler vectorises along j when B rows are contiguous.
#[allow(clippy::too_many_arguments)]
fn gemm_small<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    c: &mut [T],
    acc: bool,
) {
    for (i, crow) in c.chunks_exact_mut(n).enumerate().take(m) {
        if !acc {
            crow.fill(T::ZERO);
        }
        for p in 0..k {
            let aip = a[i * a_rs + p * a_cs];
            if b_cs == 1 {
                let brow = &b[p * b_rs..p * b_rs + n];
                for (cj, &bj) in crow.iter_mut().zip(brow) {
                    *cj = *cj + aip * bj;
                }
            } else {
                for (j, cj) in crow.iter_mut().enumerate() {
                    *cj = *cj + aip * b[p * b_rs + j * b_cs];
                }
            }
        }
    }
}

/// Up to this many rows of A, products skip packing (see [`gemm_skinny`]).
pub(crate) const SKINNY_M: usize = 4;

/// A few rows times a large matrix — decoding one token, `x · Wᵀ` with `x` of 1..4 rows. Packing
/// B would copy the whole weight matrix to use each element only `m` times, so instead each C
/// element is a dot product over a contiguous column of B (`b_rs == 1`, the `x · Wᵀ` case), or
/// each C row accumulates contiguous rows of B (`b_cs == 1`). Columns of C are split across
/// threads in blocks.
#[allow(clippy::too_many_arguments)]
fn gemm_skinny<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    c: &mut [T],
    acc: bool,
) {
    use rayon::prelude::*;
    const COLS: usize = 128;
    for (i, crow) in c.chunks_exact_mut(n).enumerate().take(m) {
        let arow: Vec<T> = (0..k).map(|p| a[i * a_rs + p * a_cs]).collect();
        crow.par_chunks_mut(COLS).enumerate().for_each(|(blk, cc)| {
            let j0 = blk * COLS;
            if b_rs == 1 {
                for (jj, cj) in cc.iter_mut().enumerate() {
                    let col = &b[(j0 + jj) * b_cs..(j0 + jj) * b_cs + k];
                    // Eight independent partial sums so the loop vectorises.
                    let mut partial = [T::ZERO; 8];
                    let (ca, cb) = (arow.chunks_exact(8), col.chunks_exact(8));
                    let (ra, rb) = (ca.remainder(), cb.remainder());
                    for (x, y) in ca.zip(cb) {
                        for l in 0..8 {
                            partial[l] = partial[l] + x[l] * y[l];
                        }
                    }
                    let mut sum = ra.iter().zip(rb).fold(T::ZERO, |s, (&x, &y)| s + x * y);
                    for v in partial {
                        sum = sum + v;
                    }
                    *cj = if acc { *cj + sum } else { sum };
                }
            } else {
                if !acc {
                    cc.fill(T::ZERO);
                }
                for (p, &ap) in arow.iter().enumerate() {
                    let brow = &b[p * b_rs + j0..p * b_rs + j0 + cc.len()];
                    for (cj, &bj) in cc.iter_mut().zip(brow) {
                        *cj = *cj + ap * bj;
                    }
                }
            }
        });
    }
}

/// A raw pointer to C that may cross threads. Tasks write disjoint rectangles of C (see
/// [`split`]), which is what makes sharing it sound.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced inside disjoint rectangles of C, one task each,
// and the owning `&mut [T]` borrow outlives all tasks (they finish before `gemm_generic`
// returns).
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; sharing the pointer value lets each task write its own rectangle.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// The right operand: a strided slice, or (f32 only) rows decoded on demand.
enum BOperand<'s, T> {
    Strided {
        b: &'s [T],
        rs: usize,
        cs: usize,
    },
    /// B = Wᵀ (`transposed`) or W, with W read through a [`RowDecoder`].
    Decoded {
        w: &'s dyn RowDecoder,
        transposed: bool,
    },
    /// Rows `k0..` and columns `j0..` (a multiple of the panel width) of a B packed once.
    Packed {
        b: &'s PackedB<T>,
        k0: usize,
        j0: usize,
    },
}

/// Everything about one product that is shared by all tasks.
struct Operands<'s, T> {
    a: &'s [T],
    a_rs: usize,
    a_cs: usize,
    b: BOperand<'s, T>,
    c: SendPtr<T>,
    ldc: usize,
    k: usize,
    /// Add to C instead of overwriting it.
    acc: bool,
}

/// Recursively cut the rectangle `rows i0..i1, cols j0..j1` of C into `leaves` pieces (halving
/// the longer side at a multiple of the register tile) and run them with `rayon::join`.
///
/// Cutting along n means each task packs its own columns of B and all of A (and vice versa);
/// the duplicated packing is O(m·k) against O(m·n·k/leaves) arithmetic, and in exchange the
/// tasks never synchronise.
#[allow(clippy::too_many_arguments)]
fn split<T: Elem, const MR: usize, const NR: usize>(
    op: &Operands<'_, T>,
    plan: &Plan<T>,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    leaves: usize,
) {
    let (m, n) = (i1 - i0, j1 - j0);
    let work = m.saturating_mul(n).saturating_mul(op.k);
    if leaves >= 2 && work >= 2 * MIN_SPLIT_MNK {
        let left = leaves / 2;
        // Cut `len` at a multiple of `unit` near the fraction left/leaves, never empty.
        let cut_at = |len: usize, unit: usize| {
            let units = len.div_ceil(unit);
            ((units * left / leaves).max(1) * unit).min(len - 1)
        };
        if n >= m && n > NR {
            let cut = j0 + cut_at(n, NR);
            rayon::join(
                || split::<T, MR, NR>(op, plan, i0, i1, j0, cut, left),
                || split::<T, MR, NR>(op, plan, i0, i1, cut, j1, leaves - left),
            );
            return;
        }
        if m > MR {
            let cut = i0 + cut_at(m, MR);
            rayon::join(
                || split::<T, MR, NR>(op, plan, i0, cut, j0, j1, left),
                || split::<T, MR, NR>(op, plan, cut, i1, j0, j1, leaves - left),
            );
            return;
        }
    }
    let kc = plan.kc.min(op.k);
    let a_len = plan.mc.min(m).div_ceil(MR) * MR * kc;
    let b_len = if matches!(op.b, BOperand::Packed { .. }) { 0 } else { plan.nc.min(n).div_ceil(NR) * NR * kc };
    with_scratch::<T, _>(a_len, b_len, |apack, bpack| {
        // SAFETY: this rectangle of C is touched by this task only (the recursion above hands
        // out disjoint rectangles); `apack`/`bpack` hold a_len/b_len elements, the sizes
        // `gemm_serial` requires.
        unsafe { gemm_serial::<T, MR, NR>(op, plan, i0, i1, j0, j1, apack, bpack) }
    });
}

thread_local! {
    /// Per-thread packing buffer, reused across calls so that large products do not pay for
    /// fresh (page-faulting) allocations every time. Taken out while in use, so a re-entrant
    /// call on the same thread simply allocates its own.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Bytes of alignment for the packed buffers: one cache line, so that kernel loads of a packed
/// row never straddle two lines.
const ALIGN: usize = 64;

/// Run `f` with two 64-byte-aligned buffers of `a_len` and `b_len` elements.
fn with_scratch<T: Elem, R>(a_len: usize, b_len: usize, f: impl FnOnce(*mut T, *mut T) -> R) -> R {
    // Round the A part up to whole cache lines so the B part is aligned too.
    let a_bytes = (a_len * std::mem::size_of::<T>()).div_ceil(ALIGN) * ALIGN;
    let bytes = a_bytes + b_len * std::mem::size_of::<T>() + ALIGN;
    let mut buf = SCRATCH.try_with(|s| s.take()).unwrap_or_default();
    if buf.len() < bytes {
        buf = vec![0u8; bytes];
    }
    let base = buf.as_mut_ptr();
    let off = base.align_offset(ALIGN);
    // SAFETY: `off < ALIGN` and `a_bytes + b_len*size_of::<T>() + ALIGN <= buf.len()`, so both
    // pointers and the regions after them stay inside `buf`; the offsets are multiples of 64
    // from a 64-aligned address, so they are aligned for T. `buf` lives until after `f`.
    let (pa, pb) = unsafe {
        let pa = base.add(off);
        (pa as *mut T, pa.add(a_bytes) as *mut T)
    };
    let r = f(pa, pb);
    let _ = SCRATCH.try_with(|s| {
        // Keep the larger of ours and whatever a re-entrant call may have left.
        let other = s.take();
        s.set(if other.len() > buf.len() { other } else { std::mem::take(&mut buf) });
    });
    r
}

/// The five-loop blocked product for the rectangle `rows i0..i1, cols j0..j1` of C.
///
/// # Safety
/// No other thread touches that rectangle of C while this runs; `apack` holds
/// `ceil(min(MC,m)/MR)·MR·min(KC,k)` elements and `bpack` `ceil(min(NC,n)/NR)·NR·min(KC,k)`;
/// the operand slices were bounds-checked against the full shape by `gemm_generic`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial<T: Elem, const MR: usize, const NR: usize>(
    op: &Operands<'_, T>,
    plan: &Plan<T>,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    apack: *mut T,
    bpack: *mut T,
) {
    let Plan { kc, mc, nc, kernel } = *plan;
    let k = op.k;
    let mut tile = [T::ZERO; MAX_TILE];
    debug_assert!(MR * NR <= MAX_TILE);
    for jc in (j0..j1).step_by(nc) {
        let nb = nc.min(j1 - jc);
        for pc in (0..k).step_by(kc) {
            let kb = kc.min(k - pc);
            // The first B micro-panel of this block and the distance between panels.
            let (b_block, b_stride): (*const T, usize) = match op.b {
                BOperand::Strided { b, rs, cs } => {
                    // SAFETY: bpack is big enough for nb (≤ NC) columns of kb (≤ KC) rows; all
                    // source indices lie inside the bounds-checked shape of B.
                    unsafe { pack_b::<T, NR>(kb, nb, b, pc * rs + jc * cs, rs, cs, bpack) };
                    (bpack, NR * kb)
                }
                BOperand::Decoded { w, transposed } => {
                    // SAFETY: as above; the decoded rows and segments lie inside W's shape.
                    unsafe { pack_b_decoded::<T, NR>(kb, nb, pc, jc, w, transposed, bpack) };
                    (bpack, NR * kb)
                }
                // SAFETY: j0 + jc is a multiple of NR (j0 is, and the splits and NC are) and
                // rows k0 + pc.. k0 + pc + kb of those panels exist (checked on entry).
                BOperand::Packed { b, k0, j0 } => (unsafe { b.panel((j0 + jc) / NR, k0 + pc) }, NR * b.k),
            };
            for ic in (i0..i1).step_by(mc) {
                let mb = mc.min(i1 - ic);
                // SAFETY: as for B, with mb ≤ MC rows.
                unsafe { pack_a::<T, MR>(mb, kb, op.a, ic * op.a_rs + pc * op.a_cs, op.a_rs, op.a_cs, apack) };
                for jr in (0..nb).step_by(NR) {
                    let cols = NR.min(nb - jr);
                    // SAFETY: panel jr/NR of this block is inside the packed B.
                    let bp = unsafe { b_block.add(jr / NR * b_stride) };
                    for ir in (0..mb).step_by(MR) {
                        let rows = MR.min(mb - ir);
                        // SAFETY: in-bounds panel offset, as above.
                        let ap = unsafe { apack.add(ir * kb) };
                        let (ci, cj) = (ic + ir, jc + jr);
                        // SAFETY: (ci, cj) is inside this task's rectangle of the m×n C.
                        let cp = unsafe { op.c.0.add(ci * op.ldc + cj) };
                        if rows == MR && cols == NR {
                            // Full tile: the kernel reads/writes C in place.
                            // SAFETY: the whole MR×NR tile lies inside our rectangle; the
                            // panels hold kb steps; the plan's kernel matches this CPU.
                            unsafe { kernel(kb, ap, bp, cp, op.ldc, pc > 0 || op.acc) };
                        } else {
                            // Ragged edge: compute the full tile into `tile`, copy the valid
                            // part. SAFETY: `tile` holds MR·NR ≤ MAX_TILE elements, ldc = NR.
                            unsafe { kernel(kb, ap, bp, tile.as_mut_ptr(), NR, false) };
                            for r in 0..rows {
                                for j in 0..cols {
                                    let t = tile[r * NR + j];
                                    // SAFETY: r < rows and j < cols keep us inside C's tile.
                                    unsafe {
                                        let d = cp.add(r * op.ldc + j);
                                        *d = if pc > 0 || op.acc { *d + t } else { t };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Pack an mb×kb block of A (element (i,p) at `a[off + i*rs + p*cs]`) into row panels of
/// height MR: `dst[q*MR*kb + p*MR + r] = A[q*MR + r][p]`, zero past row mb.
///
/// The destination is written sequentially (p outer, r inner); the MR source rows are read as
/// MR parallel streams, each sequential when A is row-major, or one stream when A is stored
/// transposed.
///
/// # Safety
/// `dst` is valid for `ceil(mb/MR)*MR*kb` writes; every `off + i*rs + p*cs` (i < mb, p < kb)
/// is a valid index of `a`.
unsafe fn pack_a<T: Elem, const MR: usize>(mb: usize, kb: usize, a: &[T], off: usize, rs: usize, cs: usize, dst: *mut T) {
    for q in 0..mb.div_ceil(MR) {
        let rows = MR.min(mb - q * MR);
        let base = off + q * MR * rs;
        // SAFETY (whole block): writes are at q*MR*kb + p*MR + r < ceil(mb/MR)*MR*kb, reads
        // are at valid A indices (r < rows), both by the function's contract.
        unsafe {
            let d = dst.add(q * MR * kb);
            if rows == MR {
                for p in 0..kb {
                    let col: [T; MR] = std::array::from_fn(|r| *a.get_unchecked(base + r * rs + p * cs));
                    std::ptr::write_unaligned(d.add(p * MR) as *mut [T; MR], col);
                }
            } else {
                for p in 0..kb {
                    for r in 0..MR {
                        let v = if r < rows { *a.get_unchecked(base + r * rs + p * cs) } else { T::ZERO };
                        *d.add(p * MR + r) = v;
                    }
                }
            }
        }
    }
}

/// Pack a kb×nb block of B (element (p,j) at `b[off + p*rs + j*cs]`) into column panels of
/// width NR: `dst[q*NR*kb + p*NR + j] = B[p][q*NR + j]`, zero past column nb.
///
/// # Safety
/// `dst` is valid for `ceil(nb/NR)*NR*kb` writes; every `off + p*rs + j*cs` (p < kb, j < nb)
/// is a valid index of `b`.
unsafe fn pack_b<T: Elem, const NR: usize>(kb: usize, nb: usize, b: &[T], off: usize, rs: usize, cs: usize, dst: *mut T) {
    /// Rows of B handled per step in the transposed case (one cache line of f32 per column).
    const PB: usize = 16;
    for q in 0..nb.div_ceil(NR) {
        let cols = NR.min(nb - q * NR);
        let base = off + q * NR * cs;
        // SAFETY (whole block): writes are at q*NR*kb + p*NR + j < ceil(nb/NR)*NR*kb, reads
        // at valid B indices (j < cols, p < kb), both by the function's contract.
        unsafe {
            let d = dst.add(q * NR * kb);
            if cols < NR {
                for p in 0..kb {
                    for j in 0..NR {
                        let v = if j < cols { *b.get_unchecked(base + p * rs + j * cs) } else { T::ZERO };
                        *d.add(p * NR + j) = v;
                    }
                }
            } else if cs == 1 {
                // Row-major B: each packed row is one contiguous NR-element copy.
                for p in 0..kb {
                    let row = std::ptr::read_unaligned(ptr_at(b, base + p * rs) as *const [T; NR]);
                    std::ptr::write_unaligned(d.add(p * NR) as *mut [T; NR], row);
                }
            } else if rs < cs {
                // Column-contiguous B (the `x · Wᵀ` case): transpose PB×NR sub-blocks, reading
                // PB consecutive values down each of the NR columns, so both the reads (NR
                // short sequential runs) and the writes (PB·NR contiguous values) stay within a
                // few cache lines.
                let mut p0 = 0;
                while p0 < kb {
                    let pn = PB.min(kb - p0);
                    for j in 0..NR {
                        let src = base + j * cs + p0 * rs;
                        for pp in 0..pn {
                            *d.add((p0 + pp) * NR + j) = *b.get_unchecked(src + pp * rs);
                        }
                    }
                    p0 += pn;
                }
            } else {
                for p in 0..kb {
                    let row: [T; NR] = std::array::from_fn(|j| *b.get_unchecked(base + p * rs + j * cs));
                    std::ptr::write_unaligned(d.add(p * NR) as *mut [T; NR], row);
                }
            }
        }
    }
}

/// [`pack_b`] for B = Wᵀ or W decoded from W's rows: the kb×nb block at (pc, jc) into column
/// panels of width NR. For Wᵀ, panel column j is row `jc + j` of W, elements `pc..pc+kb`; for
/// W, panel row p is row `pc + p` of W, elements `jc..jc+nb`. Only f32 has decoders (the f64
/// path never sees one).
///
/// # Safety
/// `dst` is valid for `ceil(nb/NR)*NR*kb` writes; the block lies inside B's shape.
unsafe fn pack_b_decoded<T: Elem, const NR: usize>(
    kb: usize,
    nb: usize,
    pc: usize,
    jc: usize,
    w: &dyn RowDecoder,
    transposed: bool,
    dst: *mut T,
) {
    assert!(std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>(), "decoded operands are f32");
    let dst = dst as *mut f32;
    let panels = nb.div_ceil(NR);
    // SAFETY (whole block): every write is at q*NR*kb + p*NR + j with q < panels, p < kb,
    // j < NR, inside the contract's length.
    unsafe {
        if transposed {
            let mut row = vec![0f32; kb];
            for q in 0..panels {
                let d = dst.add(q * NR * kb);
                for j in 0..NR {
                    let col = q * NR + j;
                    if col < nb {
                        w.decode(jc + col, pc, &mut row);
                        for (p, &v) in row.iter().enumerate() {
                            *d.add(p * NR + j) = v;
                        }
                    } else {
                        for p in 0..kb {
                            *d.add(p * NR + j) = 0.0;
                        }
                    }
                }
            }
        } else {
            let mut seg = vec![0f32; panels * NR];
            for p in 0..kb {
                w.decode(pc + p, jc, &mut seg[..nb]);
                for q in 0..panels {
                    std::ptr::copy_nonoverlapping(seg.as_ptr().add(q * NR), dst.add(q * NR * kb + p * NR), NR);
                }
            }
        }
    }
}

/// Pointer to `s[i]` without a bounds check.
///
/// # Safety
/// `i < s.len()`.
#[inline(always)]
unsafe fn ptr_at<T>(s: &[T], i: usize) -> *const T {
    // SAFETY: by the contract, `i` is in bounds.
    unsafe { s.as_ptr().add(i) }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels
// ---------------------------------------------------------------------------------------------

/// Portable micro-kernel: an MR×NR accumulator array updated with one rank-1 product per step
/// (`acc[r][j] += a[r] · b[j]`). With constant MR and NR the loops unroll completely and the
/// compiler keeps `acc` in vector registers. Used on CPUs without AVX2+FMA and on non-x86.
///
/// # Safety
/// See [`Kernel`].
unsafe fn kernel_portable<T: Elem, const MR: usize, const NR: usize>(
    kc: usize,
    a: *const T,
    b: *const T,
    c: *mut T,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[T::ZERO; NR]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so both rows are inside the packed panels (kernel contract).
        let (av, bv) = unsafe {
            (std::ptr::read_unaligned(a.add(p * MR) as *const [T; MR]), std::ptr::read_unaligned(b.add(p * NR) as *const [T; NR]))
        };
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] = acc[r][j] + av[r] * bv[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            // SAFETY: (r, j) is inside the MR×NR tile at c (kernel contract).
            unsafe {
                let d = c.add(r * ldc + j);
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    //! The NEON micro-kernel (part of every AArch64 CPU: no run-time check needed).
    use std::arch::aarch64::*;

    /// f32 8×12 kernel: C tile = 8 rows × 3 q registers (4 lanes each) = 24 accumulators, with
    /// the 2 registers of A's column and the 3 of B's row 29 of the 32 vector registers.
    ///
    /// Per step p: load A's 8 values `A[0..8][p]` (2 registers) and B's row `B[p][0..12]`
    /// (3), then for each row r multiply B's row by lane r of A (`fmla v.4s, b.4s, a.s[r]`,
    /// no broadcast instruction) into that row's three accumulators: 24 fused multiply-adds of
    /// 4 lanes per 5 loads.
    ///
    /// # Safety
    /// See [`super::Kernel`].
    pub(super) unsafe fn kernel_f32_8x12(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = 8;
        const NR: usize = 12;
        // SAFETY (whole body): the packed panels hold kc steps of MR (A) and NR (B) values,
        // and c addresses a writable 8×12 tile with row stride ldc (kernel contract).
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 3]; MR];
            let (mut ap, mut bp) = (a, b);
            for _ in 0..kc {
                let (a0, a1) = (vld1q_f32(ap), vld1q_f32(ap.add(4)));
                let bv = [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8))];
                // Row r: acc[r][j] += bv[j] · A[r][p], A[r][p] being lane r % 4 of a0 or a1.
                macro_rules! row {
                    ($r:literal, $a:ident, $lane:literal) => {
                        for j in 0..3 {
                            acc[$r][j] = vfmaq_laneq_f32::<$lane>(acc[$r][j], bv[j], $a);
                        }
                    };
                }
                row!(0, a0, 0);
                row!(1, a0, 1);
                row!(2, a0, 2);
                row!(3, a0, 3);
                row!(4, a1, 0);
                row!(5, a1, 1);
                row!(6, a1, 2);
                row!(7, a1, 3);
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * ldc);
                for (j, &v) in row.iter().enumerate() {
                    let v = if accumulate { vaddq_f32(v, vld1q_f32(cr.add(4 * j))) } else { v };
                    vst1q_f32(cr.add(4 * j), v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 + FMA and AVX-512 micro-kernels. Only reached after `is_x86_feature_detected!`
    //! confirmed the features.
    use std::arch::x86_64::*;

    /// f32 6×16 kernel: C tile = 6 rows × 2 ymm (8 lanes each) = 12 accumulators.
    ///
    /// Per step p: load B row p (2 ymm), then for each of the 6 rows broadcast `A[r][p]` and
    /// FMA it into both accumulators of that row. The step loop is unrolled by the compiler;
    /// all loads are unit-stride from the packed panels.
    ///
    /// # Safety
    /// See [`super::Kernel`]; additionally the CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_f32_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = 6;
        const NR: usize = 16;
        // SAFETY (whole body): the packed panels hold kc steps of MR (A) and NR (B) values,
        // and c addresses a writable 6×16 tile with row stride ldc (kernel contract); the
        // features are enabled on this CPU (caller's dispatch).
        unsafe {
            // Start fetching the C tile now; it is needed only after the kc loop, and
            // without this the final loads of C would stall on a cache miss every tile.
            for r in 0..MR {
                let cr = c.add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(cr);
                _mm_prefetch::<_MM_HINT_T0>(cr.add(NR * 4 - 1));
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(r));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * ldc);
                let (mut v0, mut v1) = (row[0], row[1]);
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr.add(8)));
                }
                _mm256_storeu_ps(cr, v0);
                _mm256_storeu_ps(cr.add(8), v1);
            }
        }
    }

    /// f32 12×32 kernel (AVX-512): C tile = 12 rows × 2 zmm (16 lanes each) = 24 accumulators,
    /// with the 2 B vectors and the broadcast 27 of the 32 zmm registers. The scheme of the 6×16
    /// kernel: per step p, B row p in two loads, each A value broadcast (folded into the FMA's
    /// memory operand) and multiplied into its row's two accumulators — 24 FMAs of 16 lanes per
    /// 2 + 12 loads, against 12 FMAs of 8 per 2 + 6 for AVX2.
    ///
    /// # Safety
    /// See [`super::Kernel`]; additionally the CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_f32_12x32(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = 12;
        const NR: usize = 32;
        // SAFETY (whole body): as for `kernel_f32_6x16`, with MR = 12, NR = 32.
        unsafe {
            for r in 0..MR {
                let cr = c.add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(cr);
                _mm_prefetch::<_MM_HINT_T0>(cr.add(NR * 4 - 1));
            }
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * ldc);
                let (mut v0, mut v1) = (row[0], row[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(cr));
                    v1 = _mm512_add_ps(v1, _mm512_loadu_ps(cr.add(16)));
                }
                _mm512_storeu_ps(cr, v0);
                _mm512_storeu_ps(cr.add(16), v1);
            }
        }
    }

    /// f64 6×8 kernel: 6 rows × 2 ymm (4 lanes each), same scheme as the f32 kernel.
    ///
    /// # Safety
    /// See [`super::Kernel`]; additionally the CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_f64_6x8(kc: usize, a: *const f64, b: *const f64, c: *mut f64, ldc: usize, accumulate: bool) {
        const MR: usize = 6;
        const NR: usize = 8;
        // SAFETY (whole body): as for `kernel_f32_6x16`.
        unsafe {
            let mut acc = [[_mm256_setzero_pd(); 2]; MR];
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let b0 = _mm256_loadu_pd(bp);
                let b1 = _mm256_loadu_pd(bp.add(4));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_sd(&*ap.add(r));
                    row[0] = _mm256_fmadd_pd(av, b0, row[0]);
                    row[1] = _mm256_fmadd_pd(av, b1, row[1]);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * ldc);
                let (mut v0, mut v1) = (row[0], row[1]);
                if accumulate {
                    v0 = _mm256_add_pd(v0, _mm256_loadu_pd(cr));
                    v1 = _mm256_add_pd(v1, _mm256_loadu_pd(cr.add(4)));
                }
                _mm256_storeu_pd(cr, v0);
                _mm256_storeu_pd(cr.add(4), v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cache sizes from a sysfs-like directory, and the blocks they give: Zen 4's measured
    /// constants for its caches, larger blocks for larger caches, and none without sizes.
    #[test]
    fn cache_blocks_follow_the_cache_sizes() {
        let dir = std::env::temp_dir().join(format!("tinytune-caches-{}", std::process::id())).join("cache");
        let write = |i: usize, level: &str, kind: &str, size: &str, shared: &str| {
            let ix = dir.join(format!("index{i}"));
            std::fs::create_dir_all(&ix).unwrap();
            for (f, v) in [("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)] {
                std::fs::write(ix.join(f), format!("{v}\n")).unwrap();
            }
        };
        write(0, "1", "Data", "32K", "0");
        write(1, "1", "Instruction", "32K", "0");
        write(2, "2", "Unified", "1024K", "0");
        write(3, "3", "Unified", "32768K", "0-7");
        let zen4 = Caches::from_sysfs(&dir).unwrap();
        assert_eq!(zen4, Caches { l1d: 32 << 10, l2: 1 << 20, l3_share: 4 << 20 });
        // With SMT the L3 is shared by 8 cores of 16 threads: still 4 MiB a core.
        let topo = dir.join("../topology");
        std::fs::create_dir_all(&topo).unwrap();
        std::fs::write(topo.join("thread_siblings_list"), "0,8\n").unwrap();
        write(3, "3", "Unified", "32768K", "0-15");
        assert_eq!(Caches::from_sysfs(&dir).unwrap(), zen4);
        std::fs::remove_dir_all(&topo).unwrap();
        write(3, "3", "Unified", "32768K", "0-7");
        assert_eq!(zen4.blocks(6, 16), (256, 144, 2048), "AVX2 on Zen 4: the measured constants");
        // AVX-512 (run on Intel only): the same bytes of A in L2 (192×192 ≈ 144×256), unmeasured.
        assert_eq!(zen4.blocks(12, 32), (192, 192, 2048));
        // A core with a 48 KiB L1d and 2 MiB L2 (recent Intel): a deeper AVX-512 panel, a taller A block.
        write(0, "1", "Data", "48K", "0");
        write(2, "2", "Unified", "2M", "0");
        let big = Caches::from_sysfs(&dir).unwrap();
        assert_eq!(big.blocks(12, 32), (256, 288, 2048));
        assert_eq!(big.blocks(6, 16).0, 256);
        // Every block a multiple of its kernel's tile (NEON's 12 divides neither clamp bound).
        for caches in [
            zen4,
            big,
            Caches { l1d: 64 << 10, l2: 4 << 20, l3_share: 256 << 10 },
            Caches { l1d: 128 << 10, l2: 12 << 20, l3_share: 12 << 20 },
        ] {
            for (mr, nr) in F32_TILES {
                let (kc, mc, nc) = caches.blocks(mr, nr);
                assert!(kc % 64 == 0 && mc % mr == 0 && nc % nr == 0 && nc >= nr, "{caches:?} {mr}x{nr}: {kc} {mc} {nc}");
            }
        }
        std::fs::remove_dir_all(dir.join("index2")).unwrap();
        assert_eq!(Caches::from_sysfs(&dir), None, "no L2 size: no description");
        std::fs::remove_dir_all(dir.parent().unwrap()).ok();
    }

    /// Deterministic pseudo-random values in [-1, 1) (xorshift), so tests need no RNG crate.
    fn fill(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    /// Naive triple loop in f64 through the same strides.
    #[allow(clippy::too_many_arguments)]
    fn reference(m: usize, n: usize, k: usize, a: &[f64], a_rs: usize, a_cs: usize, b: &[f64], b_rs: usize, b_cs: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Length of a buffer that holds exactly the elements a rows×cols operand touches.
    fn needed(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    }

    /// Layout of an operand: row-major, column-major (transposed in place), or broadcast.
    #[derive(Clone, Copy, Debug)]
    enum Lay {
        Row,
        Col,
        BcastRows,
        BcastAll,
    }

    fn strides(lay: Lay, rows: usize, cols: usize) -> (usize, usize) {
        match lay {
            Lay::Row => (cols, 1),
            Lay::Col => (1, rows),
            Lay::BcastRows => (0, 1),
            Lay::BcastAll => (0, 0),
        }
    }

    fn check(m: usize, n: usize, k: usize, la: Lay, lb: Lay) {
        let (a_rs, a_cs) = strides(la, m, k);
        let (b_rs, b_cs) = strides(lb, k, n);
        let a = fill(needed(m, k, a_rs, a_cs), (m * 31 + k) as u64);
        let b = fill(needed(k, n, b_rs, b_cs), (n * 17 + k + 5) as u64);
        let want = reference(m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs);
        // Each output is a k-term sum of products of values in [-1, 1): rounding errors grow
        // like sqrt(k)·eps (random-walk), times a generous constant.
        let tol = |eps: f64| 16.0 * eps * (k.max(1) as f64).sqrt();

        let mut c64 = vec![f64::NAN; m * n];
        gemm_f64(m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs, &mut c64);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        for idx in 0..m * n {
            let (g64, w) = (c64[idx], want[idx]);
            assert!((g64 - w).abs() <= tol(f64::EPSILON), "f64 {m}x{n}x{k} {la:?}/{lb:?} at {idx}: {g64} vs {w}");
        }
        // Every f32 kernel family this CPU runs (AVX-512, AVX2, portable).
        for kernel in F32Kernel::available() {
            let mut c32 = vec![f32::NAN; m * n];
            gemm_f32_with(kernel, m, n, k, &a32, a_rs, a_cs, &b32, b_rs, b_cs, &mut c32, false);
            for idx in 0..m * n {
                let (g32, w) = (c32[idx] as f64, want[idx]);
                // f32 inputs are rounded too, so compare to the exact product of the rounded
                // values loosely: sqrt(k)-scaled f32 epsilon, with a margin.
                assert!((g32 - w).abs() <= tol(f32::EPSILON as f64), "f32 {kernel:?} {m}x{n}x{k} {la:?}/{lb:?} at {idx}: {g32} vs {w}");
            }
        }
    }

    /// A product with a packed B — any rows `k0..k0+k`, columns from a panel's first — equals
    /// the strided product over the same part of B, in f64 and f32, overwriting or adding,
    /// with B packed from each layout, ragged panels, large enough to split across threads.
    #[test]
    fn packed_b_products_equal_the_strided_ones() {
        for (kb, nb, lb) in [(64, 53, Lay::Row), (64, 53, Lay::Col), (300, 97, Lay::Col), (37, 700, Lay::Row), (530, 600, Lay::Col)] {
            let (b_rs, b_cs) = strides(lb, kb, nb);
            let b = fill(needed(kb, nb, b_rs, b_cs), (kb * 7 + nb) as u64);
            let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let (p64, p32) = (PackedB::f64(kb, nb, &b, b_rs, b_cs), PackedB::f32(kb, nb, &b32, b_rs, b_cs));
            assert_eq!((p32.rows(), p32.cols()), (kb, nb));
            let w = p32.panel_width();
            for (m, k0, k, jp) in [(1, 0, kb, 0), (7, 3, kb - 3, 1), (64, kb / 2, kb - kb / 2, 0), (301, 0, kb, nb / w / 2)] {
                let (j0_64, j0_32) = (jp * 8, jp * w);
                for (j0, tol, is32) in [(j0_64, 1e-12, false), (j0_32, 1e-4, true)] {
                    let n = nb - j0;
                    let a = fill(m * k, (m + k) as u64);
                    let want = reference(m, n, k, &a, k, 1, &b[k0 * b_rs + j0 * b_cs..], b_rs, b_cs);
                    let c0 = fill(m * n, 9);
                    for acc in [false, true] {
                        let got: Vec<f64> = if is32 {
                            let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
                            let mut c: Vec<f32> = c0.iter().map(|&x| x as f32).collect();
                            gemm_f32_packed(m, n, k, &a32, k, 1, &p32, k0, j0, &mut c, acc);
                            c.iter().map(|&x| x as f64).collect()
                        } else {
                            let mut c = c0.clone();
                            gemm_f64_packed(m, n, k, &a, k, 1, &p64, k0, j0, &mut c, acc);
                            c
                        };
                        for i in 0..m * n {
                            let expect = want[i] + if acc { c0[i] } else { 0.0 };
                            assert!(
                                (got[i] - expect).abs() <= tol * (k as f64).sqrt(),
                                "{kb}x{nb} {lb:?} m {m} rows {k0}+{k} cols {j0}+{n} f32 {is32} acc {acc} at {i}: {} vs {expect}",
                                got[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "does not start a panel")]
    fn packed_b_columns_start_a_panel() {
        let b = vec![1f32; 64 * 40];
        let p = PackedB::f32(64, 40, &b, 40, 1);
        let mut c = vec![0f32; 2 * 39];
        gemm_f32_packed(2, 39, 64, &[1f32; 128], 64, 1, &p, 0, 1, &mut c, false);
    }

    #[test]
    fn awkward_shapes_all_layouts() {
        let shapes = [
            (1, 1, 1),
            (0, 3, 4),
            (3, 0, 4),
            (3, 4, 0),
            (0, 0, 0),
            (1, 17, 1),
            (7, 13, 5),
            (6, 16, 256),
            (33, 65, 17),
            (129, 31, 257),
            (13, 300, 70),
            (70, 5, 300),
        ];
        let lays = [Lay::Row, Lay::Col];
        for &(m, n, k) in &shapes {
            for &la in &lays {
                for &lb in &lays {
                    check(m, n, k, la, lb);
                }
            }
        }
    }

    #[test]
    fn broadcast_strides() {
        for &(m, n, k) in &[(5, 7, 3), (40, 70, 60), (100, 90, 80)] {
            check(m, n, k, Lay::BcastRows, Lay::Row);
            check(m, n, k, Lay::Row, Lay::BcastRows);
            check(m, n, k, Lay::BcastAll, Lay::Col);
            check(m, n, k, Lay::Col, Lay::BcastAll);
        }
    }

    #[test]
    fn large_and_transposed() {
        check(300, 200, 400, Lay::Row, Lay::Row);
        check(300, 200, 400, Lay::Row, Lay::Col);
        check(130, 2100, 300, Lay::Col, Lay::Row); // crosses the NC block
    }

    /// A few rows times a large matrix takes the unpacked skinny path (decoding one token).
    #[test]
    fn skinny_products() {
        for &(m, n, k) in &[(1, 1536, 576), (2, 300, 200), (3, 129, 257), (4, 70, 600)] {
            for &la in &[Lay::Row, Lay::Col, Lay::BcastRows] {
                for &lb in &[Lay::Row, Lay::Col, Lay::BcastRows, Lay::BcastAll] {
                    check(m, n, k, la, lb);
                }
            }
        }
    }

    /// A frozen weight read through a decoder (here f32 rows cut at any point): the decoded
    /// product in both orders (`A Wᵀ`, `A W`) equals the strided one, through the blocked path
    /// and the skinny one, with the kernel this CPU picks (NEON when built for AArch64).
    #[test]
    fn decoded_products_equal_the_dense_ones() {
        struct Rows(usize, usize, Vec<f32>);
        impl RowDecoder for Rows {
            fn rows(&self) -> usize {
                self.0
            }
            fn cols(&self) -> usize {
                self.1
            }
            fn decode(&self, row: usize, start: usize, out: &mut [f32]) {
                out.copy_from_slice(&self.2[row * self.1 + start..row * self.1 + start + out.len()]);
            }
        }
        for (m, rows, cols) in [(3, 40, 33), (70, 130, 75), (150, 61, 300)] {
            let w: Vec<f32> = fill(rows * cols, 9).iter().map(|&x| x as f32).collect();
            let dec = Rows(rows, cols, w.clone());
            for transposed in [true, false] {
                let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
                let a: Vec<f32> = fill(m * k, 3).iter().map(|&x| x as f32).collect();
                // B = Wᵀ (element (p, j) at w[j·cols + p]) or W (at w[p·cols + j]).
                let (b_rs, b_cs) = if transposed { (1, cols) } else { (cols, 1) };
                let mut want = vec![0f32; m * n];
                gemm_f32(m, n, k, &a, k, 1, &w, b_rs, b_cs, &mut want);
                let mut got = vec![1f32; m * n];
                gemm_f32_decoded(m, &a, k, 1, &dec, transposed, &mut got, false);
                for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{rows}x{cols} transposed={transposed} [{i}]: {x} vs {y}");
                }
            }
        }
    }

    /// `accumulate` adds the product to what C holds, on every path (tiny, skinny, blocked with
    /// ragged edges and several k blocks), f32 and f64.
    #[test]
    fn accumulate_adds_to_c() {
        for &(m, n, k) in &[(3, 5, 4), (2, 300, 200), (33, 65, 17), (130, 70, 600), (4, 6, 0)] {
            for &(la, lb) in &[(Lay::Row, Lay::Col), (Lay::Col, Lay::Row)] {
                let (a_rs, a_cs) = strides(la, m, k);
                let (b_rs, b_cs) = strides(lb, k, n);
                let a = fill(needed(m, k, a_rs, a_cs), 3);
                let b = fill(needed(k, n, b_rs, b_cs), 4);
                let c0 = fill(m * n, 5);
                let prod = reference(m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs);
                let tol = 16.0 * (k.max(1) as f64).sqrt();
                let mut c64 = c0.clone();
                gemm_f64_into(m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs, &mut c64, true);
                let (a32, b32): (Vec<f32>, Vec<f32>) = (a.iter().map(|&x| x as f32).collect(), b.iter().map(|&x| x as f32).collect());
                for i in 0..m * n {
                    let want = c0[i] + prod[i];
                    assert!((c64[i] - want).abs() <= tol * f64::EPSILON, "f64 {m}x{n}x{k} at {i}: {} vs {want}", c64[i]);
                }
                for kernel in F32Kernel::available() {
                    let mut c32: Vec<f32> = c0.iter().map(|&x| x as f32).collect();
                    gemm_f32_with(kernel, m, n, k, &a32, a_rs, a_cs, &b32, b_rs, b_cs, &mut c32, true);
                    for i in 0..m * n {
                        let want = c0[i] + prod[i];
                        assert!(
                            (c32[i] as f64 - want).abs() <= tol * f32::EPSILON as f64,
                            "f32 {kernel:?} {m}x{n}x{k} at {i}: {} vs {want}",
                            c32[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn k_zero_overwrites_with_zeros() {
        let mut c = vec![7.0f32; 6];
        gemm_f32(2, 3, 0, &[], 0, 0, &[], 0, 0, &mut c);
        assert!(c.iter().all(|&x| x == 0.0));
        let mut c = vec![7.0f64; 6];
        gemm_f64(2, 3, 0, &[], 1, 1, &[], 1, 1, &mut c);
        assert!(c.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn nested_in_rayon_loop() {
        use rayon::prelude::*;
        let (m, n, k) = (64, 96, 80);
        let a: Vec<f32> = fill(m * k, 1).iter().map(|&x| x as f32).collect();
        let b: Vec<f32> = fill(k * n, 2).iter().map(|&x| x as f32).collect();
        let mut first = vec![0.0f32; m * n];
        gemm_f32(m, n, k, &a, k, 1, &b, n, 1, &mut first);
        let outs: Vec<Vec<f32>> = (0..8)
            .into_par_iter()
            .map(|_| {
                let mut c = vec![0.0f32; m * n];
                gemm_f32(m, n, k, &a, k, 1, &b, n, 1, &mut c);
                c
            })
            .collect();
        for c in outs {
            assert_eq!(c, first);
        }
    }
}
