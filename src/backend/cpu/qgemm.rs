//! `C = A · Wᵀ` with integer dot products, for a frozen GGML weight W (`Q4_0`, `Q4_1`,
//! `Q8_0`) and an f32 A quantised on the fly, as llama.cpp computes it: each row of A is
//! cut into blocks of 32 along k, and a block `x` becomes 32 int8 codes `xq = round(x/sx)`
//! (ties to even) with one scale `sx = max|x| / 127` (`x ≈ sx · xq`). A weight block of 32 codes `u` (unsigned: a Q8_0 code
//! is stored plus 128) stands for `w = d · u + f`, where
//!
//! | format | d | f |
//! |---|---|---|
//! | Q4_1 | d | m |
//! | Q4_0 | d | −8 d |
//! | Q8_0 | d | −128 d |
//!
//! so one block's contribution to `C[i][j]` is
//!
//! ```text
//!   Σ_t w_t x_t ≈ d_j sx_i Σ_t u_jt xq_it  +  f_j (sx_i Σ_t xq_it)
//! ```
//!
//! The integer sum `Σ u·xq` is what AVX-512 VNNI's `vpdpbusd` computes (4 u8·i8 products
//! into each 32-bit lane, 32 multiply-adds per 256-bit instruction, against 8 for an f32
//! FMA); the f32 side is one conversion, a multiply and two FMAs per block. The result is
//! the exact product of the weights as stored with the rounded activations (to f32 rounding;
//! each activation moves by at most sx/2), the same rounding llama.cpp does — an
//! approximation, so it is opt-in ([`enabled`]) and only for products without a gradient:
//! measured on SmolLM2-135M Q4_1, mean NLL 3.8750 → 3.8792 on 4,530 tokens of Austen.
//!
//! W is repacked once per matrix ([`panels_of`], 0.75 bytes a weight for the 4-bit formats)
//! into panels of 16 rows of W (16 output columns), each 32-bit lane holding 4 consecutive
//! codes of one column: two 256-bit vectors per group of 4 along k, 4-bit codes kept as
//! nibbles (the low nibble one group, the high nibble the next). The micro-kernel holds a
//! 6 × 16 tile as 12 integer and 12 f32 accumulators (AVX-512VL's 32 vector registers).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rayon::prelude::*;

use crate::quant::{GgmlType, QFormat, QMatrix};

/// 0: not yet read from the environment; 1 off; 2 on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether products without a gradient (evaluation, generation) take the integer path where
/// it applies; off unless `TINYTUNE_INT8_DOT=1` or [`set_enabled`].
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("TINYTUNE_INT8_DOT").is_ok_and(|v| v == "1");
            if on && !supported() {
                crate::say!(
                    "tinytune: TINYTUNE_INT8_DOT=1 has no effect here: the integer products need AVX-512 VNNI, which this CPU lacks"
                );
            }
            ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Turn the integer path on or off for the whole process (see the module docs); it applies
/// only where [`supported`] and only to products recorded without a gradient.
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Repacked weights, each beside a weak handle to its matrix: a live handle means the
/// matrix (and so its address) is the one repacked. Entries of dropped matrices are pruned
/// at the next repack.
static PANELS: Mutex<Vec<(Weak<QMatrix>, Arc<QPanels>)>> = Mutex::new(Vec::new());

/// `w` repacked ([`QPanels::new`]), once per matrix for the life of the matrix.
pub fn panels_of(w: &Arc<QMatrix>) -> Arc<QPanels> {
    let find = |list: &[(Weak<QMatrix>, Arc<QPanels>)]| {
        list.iter().find(|(m, _)| Weak::as_ptr(m) == Arc::as_ptr(w) && m.strong_count() > 0).map(|(_, p)| p.clone())
    };
    if let Some(p) = find(&PANELS.lock().unwrap_or_else(|e| e.into_inner())) {
        return p;
    }
    let packed = Arc::new(QPanels::new(w));
    let mut list = PANELS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find(&list) {
        return p;
    }
    list.retain(|(m, _)| m.strong_count() > 0);
    list.push((Arc::downgrade(w), packed.clone()));
    packed
}

/// Columns (rows of W) per panel: two 256-bit vectors of 8 lanes.
const NR: usize = 16;
/// Rows of A per micro-tile.
const MR: usize = 6;
/// Elements per block, on both sides.
const QK: usize = 32;

/// Whether this CPU runs the integer kernel (AVX-512 VNNI on 256-bit vectors, and AVX2/FMA
/// for the rest).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether W's format has an integer path.
pub fn handles(w: &QMatrix) -> bool {
    matches!(w.format(), QFormat::Ggml(GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0))
}

/// W (`n × k`, a [`handles`] format) repacked for the kernel: panel `q` holds W's rows
/// `16q..16q+16`; for each block `b` of 32 along k, its codes (`bytes_per_block` bytes) then,
/// in `d` and `f`, the 16 rows' `d` and `f` of that block. Rows past n are zero.
pub struct QPanels {
    n: usize,
    k: usize,
    nibbles: bool,
    codes: Vec<u8>,
    d: Vec<f32>,
    f: Vec<f32>,
}

impl QPanels {
    /// Bytes of codes per panel per block: 16 columns × 32 codes, as nibbles or bytes.
    fn block_bytes(&self) -> usize {
        if self.nibbles {
            NR * QK / 2
        } else {
            NR * QK
        }
    }

    /// Repack W. Panics if its format is not one [`handles`].
    pub fn new(w: &QMatrix) -> QPanels {
        let QFormat::Ggml(t) = w.format() else { panic!("qgemm: {} has no integer path", w.format().name()) };
        let (n, k) = (w.rows(), w.cols());
        let nibbles = t != GgmlType::Q8_0;
        let (nb, ts) = (k / QK, t.type_size());
        let panels = n.div_ceil(NR);
        let bb = if nibbles { NR * QK / 2 } else { NR * QK };
        let mut codes = vec![0u8; panels * nb * bb];
        let mut d = vec![0f32; panels * nb * NR];
        let mut f = vec![0f32; panels * nb * NR];
        let data = w.data();
        codes.par_chunks_mut(nb * bb).zip(d.par_chunks_mut(nb * NR)).zip(f.par_chunks_mut(nb * NR)).enumerate().for_each(
            |(q, ((codes, d), f))| {
                let mut u = [0u8; QK];
                for jj in 0..NR.min(n - q * NR) {
                    let row = q * NR + jj;
                    for b in 0..nb {
                        let blk = &data[(row * nb + b) * ts..(row * nb + b + 1) * ts];
                        let h = |o: usize| half::f16::from_le_bytes([blk[o], blk[o + 1]]).to_f32();
                        let (dd, ff) = match t {
                            GgmlType::Q4_1 => {
                                for (i, &byte) in blk[4..20].iter().enumerate() {
                                    u[i] = byte & 15;
                                    u[i + 16] = byte >> 4;
                                }
                                (h(0), h(2))
                            }
                            GgmlType::Q4_0 => {
                                for (i, &byte) in blk[2..18].iter().enumerate() {
                                    u[i] = byte & 15;
                                    u[i + 16] = byte >> 4;
                                }
                                (h(0), -8.0 * h(0))
                            }
                            _ => {
                                for (i, &byte) in blk[2..34].iter().enumerate() {
                                    u[i] = (byte as i8 as i16 + 128) as u8;
                                }
                                (h(0), -128.0 * h(0))
                            }
                        };
                        d[b * NR + jj] = dd;
                        f[b * NR + jj] = ff;
                        let out = &mut codes[b * bb..(b + 1) * bb];
                        // Group g (codes 4g..4g+4) of column jj sits in lane jj of its vector
                        // pair: byte jj·4 + t. Nibbles: groups 2p (low) and 2p+1 (high) share
                        // the 64 bytes of pair p.
                        for g in 0..QK / 4 {
                            for tt in 0..4 {
                                let v = u[4 * g + tt];
                                if nibbles {
                                    let at = (g / 2) * 64 + jj * 4 + tt;
                                    out[at] |= if g % 2 == 0 { v } else { v << 4 };
                                } else {
                                    out[g * 64 + jj * 4 + tt] = v;
                                }
                            }
                        }
                    }
                }
            },
        );
        QPanels { n, k, nibbles, codes, d, f }
    }
}

/// A (m × k, f32) quantised per block of 32 and packed in tiles of MR rows: for block b,
/// group g, row i, the 4 codes at `((b·8 + g)·MR + i)·4`; scales `sx` and `zq = sx·Σxq` at
/// `b·MR + i` of the tile. Rows past m are zero.
struct QuantA {
    codes: Vec<i8>,
    sx: Vec<f32>,
    zq: Vec<f32>,
}

fn quantize_a(m: usize, k: usize, a: &[f32], a_rs: usize) -> QuantA {
    let (tiles, nb) = (m.div_ceil(MR), k / QK);
    let mut codes = vec![0i8; tiles * MR * k];
    let mut sx = vec![0f32; tiles * MR * nb];
    let mut zq = vec![0f32; tiles * MR * nb];
    codes.par_chunks_mut(MR * k).zip(sx.par_chunks_mut(MR * nb)).zip(zq.par_chunks_mut(MR * nb)).enumerate().for_each(
        |(tile, ((codes, sx), zq))| {
            for i in 0..MR.min(m - tile * MR) {
                let row = &a[(tile * MR + i) * a_rs..(tile * MR + i) * a_rs + k];
                for b in 0..nb {
                    let x: &[f32; QK] = row[b * QK..(b + 1) * QK].try_into().expect("a block");
                    let mut q = [0i8; QK];
                    // SAFETY: callers check `supported()` (AVX2 among it) first.
                    let (s, sum) = unsafe { quantize_block(x, &mut q) };
                    for g in 0..QK / 4 {
                        let at = ((b * (QK / 4) + g) * MR + i) * 4;
                        codes[at..at + 4].copy_from_slice(&q[4 * g..4 * g + 4]);
                    }
                    sx[b * MR + i] = s;
                    zq[b * MR + i] = s * sum as f32;
                }
            }
        },
    );
    QuantA { codes, sx, zq }
}

/// One block of 32 to int8 codes: `(sx, Σ xq)`, `xq = round(x / sx)` (ties to even, as the
/// vector conversion rounds), `sx = max|x| / 127` (codes and scale zero for a zero block).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let p = x.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let a = v.map(|v| _mm256_and_ps(v, abs));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    let s = amax / 127.0;
    let inv = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let r = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
    let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 1)));
    // Packing works within 128-bit halves: the bytes come out as groups of 4 in the order
    // r0 r1 r2 r3 (first halves) then r0 r1 r2 r3 (second halves); one permute restores it.
    let b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    (s, sum)
}

/// Never called: [`supported`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block(_: &[f32; QK], _: &mut [i8; QK]) -> (f32, i32) {
    unreachable!("qgemm runs on x86-64 only")
}

/// `C = A · Wᵀ` (C m × n row-major, overwritten; A m × k with row stride `a_rs` and unit
/// column stride) with W repacked in `w`. Panics unless [`supported`].
pub fn gemm_q(m: usize, a: &[f32], a_rs: usize, w: &QPanels, c: &mut [f32]) {
    assert!(supported(), "qgemm: this CPU has no AVX-512 VNNI");
    let (n, k) = (w.n, w.k);
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let qa = quantize_a(m, k, a, a_rs);
    let nb = k / QK;
    let panels = n.div_ceil(NR);
    let bb = w.block_bytes();
    // Tasks: a few panels (their codes stay in L2) against a run of A's tiles, enough tasks
    // for every thread.
    const PANELS_PER_TASK: usize = 4;
    let tiles = m.div_ceil(MR);
    let col_tasks = panels.div_ceil(PANELS_PER_TASK);
    let row_tasks = (8 * rayon::current_num_threads()).div_ceil(col_tasks).clamp(1, tiles);
    let tiles_per_task = tiles.div_ceil(row_tasks);
    let cptr = c.as_mut_ptr() as usize;
    (0..col_tasks * row_tasks).into_par_iter().for_each(|task| {
        let (ct, rt) = (task % col_tasks, task / col_tasks);
        let mut tmp = [0f32; MR * NR];
        for tile in rt * tiles_per_task..((rt + 1) * tiles_per_task).min(tiles) {
            let rows = MR.min(m - tile * MR);
            let ac = &qa.codes[tile * MR * k..];
            let (sx, zq) = (&qa.sx[tile * MR * nb..], &qa.zq[tile * MR * nb..]);
            for q in ct * PANELS_PER_TASK..(ct * PANELS_PER_TASK + PANELS_PER_TASK).min(panels) {
                let cols = NR.min(n - q * NR);
                let (codes, d, f) = (&w.codes[q * nb * bb..], &w.d[q * nb * NR..], &w.f[q * nb * NR..]);
                // SAFETY: the CPU has the features (asserted); every pointer covers the
                // kernel's reads (nb blocks of one tile/panel); tmp holds MR×NR.
                unsafe {
                    x86::kernel(
                        nb,
                        w.nibbles,
                        ac.as_ptr(),
                        sx.as_ptr(),
                        zq.as_ptr(),
                        codes.as_ptr(),
                        d.as_ptr(),
                        f.as_ptr(),
                        tmp.as_mut_ptr(),
                    );
                }
                for i in 0..rows {
                    let at = (tile * MR + i) * n + q * NR;
                    // SAFETY: distinct tasks write distinct (row, column) blocks of C, inside
                    // m × n.
                    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr().add(i * NR), (cptr as *mut f32).add(at), cols) };
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR, QK};
    use std::arch::x86_64::*;

    /// One MR × 16 tile over `nb` blocks, into `out` (row stride 16).
    ///
    /// # Safety
    /// AVX-512 VNNI/VL, AVX2 and FMA; `a` holds nb·32·MR codes, `sx`/`zq` nb·MR, `b` the
    /// panel's nb blocks, `d`/`f` nb·16, `out` MR·16.
    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel(
        nb: usize,
        nibbles: bool,
        a: *const i8,
        sx: *const f32,
        zq: *const f32,
        b: *const u8,
        d: *const f32,
        f: *const f32,
        out: *mut f32,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let low = _mm256_set1_epi8(15);
            let bcast = |p: *const i8| _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
            for blk in 0..nb {
                let mut s = [[_mm256_setzero_si256(); 2]; MR];
                let ab = a.add(blk * QK * MR);
                if nibbles {
                    let bb = b.add(blk * NR * QK / 2);
                    for p in 0..QK / 8 {
                        let r0 = _mm256_loadu_si256(bb.add(p * 64) as *const __m256i);
                        let r1 = _mm256_loadu_si256(bb.add(p * 64 + 32) as *const __m256i);
                        let (l0, l1) = (_mm256_and_si256(r0, low), _mm256_and_si256(r1, low));
                        let (h0, h1) = (_mm256_and_si256(_mm256_srli_epi16(r0, 4), low), _mm256_and_si256(_mm256_srli_epi16(r1, 4), low));
                        for (i, si) in s.iter_mut().enumerate() {
                            let x = bcast(ab.add(((2 * p) * MR + i) * 4));
                            si[0] = _mm256_dpbusd_epi32(si[0], l0, x);
                            si[1] = _mm256_dpbusd_epi32(si[1], l1, x);
                            let x = bcast(ab.add(((2 * p + 1) * MR + i) * 4));
                            si[0] = _mm256_dpbusd_epi32(si[0], h0, x);
                            si[1] = _mm256_dpbusd_epi32(si[1], h1, x);
                        }
                    }
                } else {
                    let bb = b.add(blk * NR * QK);
                    for g in 0..QK / 4 {
                        let r0 = _mm256_loadu_si256(bb.add(g * 64) as *const __m256i);
                        let r1 = _mm256_loadu_si256(bb.add(g * 64 + 32) as *const __m256i);
                        for (i, si) in s.iter_mut().enumerate() {
                            let x = bcast(ab.add((g * MR + i) * 4));
                            si[0] = _mm256_dpbusd_epi32(si[0], r0, x);
                            si[1] = _mm256_dpbusd_epi32(si[1], r1, x);
                        }
                    }
                }
                let (d0, d1) = (_mm256_loadu_ps(d.add(blk * NR)), _mm256_loadu_ps(d.add(blk * NR + 8)));
                let (f0, f1) = (_mm256_loadu_ps(f.add(blk * NR)), _mm256_loadu_ps(f.add(blk * NR + 8)));
                // acc += d·sx·Σu·xq + f·zq, per row (sx, zq broadcast) and column (d, f).
                for (i, (ai, si)) in acc.iter_mut().zip(&s).enumerate() {
                    let sxi = _mm256_set1_ps(*sx.add(blk * MR + i));
                    let zqi = _mm256_set1_ps(*zq.add(blk * MR + i));
                    ai[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si[0]), _mm256_mul_ps(d0, sxi), ai[0]);
                    ai[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si[1]), _mm256_mul_ps(d1, sxi), ai[1]);
                    ai[0] = _mm256_fmadd_ps(f0, zqi, ai[0]);
                    ai[1] = _mm256_fmadd_ps(f1, zqi, ai[1]);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(i * NR), row[0]);
                _mm256_storeu_ps(out.add(i * NR + 8), row[1]);
            }
        }
    }
}

/// Never called: [`supported`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel(
        _: usize,
        _: bool,
        _: *const i8,
        _: *const f32,
        _: *const f32,
        _: *const u8,
        _: *const f32,
        _: *const f32,
        _: *mut f32,
    ) {
        unreachable!("qgemm runs on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_1 blocks (tinytune does not write the format; GGUF files carry it): `d = (max −
    /// min)/15`, `m = min`, element i in the low nibble of byte i, i + 16 in the high one.
    fn q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in x.chunks(32) {
            let (lo, hi) = blk.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let d = half::f16::from_f32((hi - lo) / 15.0);
            let m = half::f16::from_f32(lo);
            out.extend(d.to_le_bytes());
            out.extend(m.to_le_bytes());
            let q = |v: f32| if d.to_f32() > 0.0 { ((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0) as u8 } else { 0 };
            out.extend((0..16).map(|i| q(blk[i]) | (q(blk[i + 16]) << 4)));
        }
        out
    }

    /// The product against f64 sums of the dequantised weights times the activations rounded
    /// as the module says (computed here independently): equal up to f32 rounding, so a wrong
    /// code, scale or lane fails it; and within the rounding bound of the exact product.
    fn check(t: GgmlType, m: usize, n: usize, k: usize) {
        let w: Vec<f32> = (0..n * k).map(|i| crate::rng::normal_at(7, 0, i as u64) as f32 * 0.05).collect();
        let mut a: Vec<f32> = (0..m * k).map(|i| crate::rng::normal_at(7, 1, i as u64) as f32).collect();
        // A zero block (scale 0) and an outlier.
        a[..QK.min(k)].fill(0.0);
        a[m * k - 1] = 40.0;
        let bytes = if t == GgmlType::Q4_1 { q4_1(&w) } else { crate::quant::ggml::quantize(t, &w).unwrap() };
        let q = QMatrix::from_ggml(t, n, k, bytes).unwrap();
        let wd = q.dequantize();
        let rounded: Vec<f64> = a
            .chunks(QK)
            .flat_map(|x| {
                let s = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                x.iter().map(move |&v| if s > 0.0 { (v * (1.0 / s)).round_ties_even() as f64 * s as f64 } else { 0.0 })
            })
            .collect();
        let panels = QPanels::new(&q);
        // A wider C row stride is not supported; A with a wider row stride is.
        let a_rs = k + 3;
        let padded: Vec<f32> = a.chunks(k).flat_map(|r| r.iter().copied().chain([9.0; 3])).collect();
        let mut c = vec![f32::NAN; m * n];
        gemm_q(m, &padded, a_rs, &panels, &mut c);
        for i in 0..m {
            for j in 0..n {
                let row = |x: &dyn Fn(usize) -> f64| (0..k).map(|p| x(p) * wd[j * k + p] as f64).sum::<f64>();
                let want = row(&|p| rounded[i * k + p]);
                let exact = row(&|p| a[i * k + p] as f64);
                let scale = (0..k).map(|p| (rounded[i * k + p] * wd[j * k + p] as f64).abs()).sum::<f64>();
                let bound: f64 = (0..k).map(|p| (a[i * k + p] as f64 - rounded[i * k + p]).abs() * (wd[j * k + p] as f64).abs()).sum();
                let got = c[i * n + j] as f64;
                assert!((got - want).abs() <= 2e-6 * scale + 1e-6, "{t} {m}x{n}x{k} [{i},{j}]: {got} vs {want} (scale {scale})");
                assert!((got - exact).abs() <= bound + 2e-6 * scale + 1e-6, "{t} [{i},{j}]: {got} vs exact {exact}, bound {bound}");
            }
        }
    }

    #[test]
    fn integer_products_match_the_rounded_activations() {
        if !supported() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        for t in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            check(t, 7, 19, 64);
            check(t, 1, 16, 32);
            check(t, 13, 40, 96);
            check(t, 37, 70, 160);
        }
    }

    /// A matrix is repacked once while it lives; an equal but distinct matrix gets its own.
    #[test]
    fn repacked_once_per_matrix() {
        let w: Vec<f32> = (0..16 * 32).map(|i| i as f32 / 100.0).collect();
        let q = Arc::new(QMatrix::from_ggml(GgmlType::Q8_0, 16, 32, crate::quant::ggml::quantize(GgmlType::Q8_0, &w).unwrap()).unwrap());
        let (p1, p2) = (panels_of(&q), panels_of(&q));
        assert!(Arc::ptr_eq(&p1, &p2));
        let other = Arc::new((*q).clone());
        assert!(!Arc::ptr_eq(&panels_of(&other), &p1));
    }
}
