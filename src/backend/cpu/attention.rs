//! Fused attention on the CPU (flash attention by query tiles): the `[tq, tk]` score matrix of
//! a head is never materialised, only a tile of `TILE` query rows against the keys they may
//! see, in a scratch buffer reused for the tile's softmax.
//!
//! ```text
//! forward, per (batch b, query head h, tile of query rows I), kv head g = h / (h / h_kv):
//!   S    = scale · Q_I K_gᵀ                 keys limited to the range the tile's rows may see
//!   S_ij = −∞ where query i may not see key j (causal, window, padding; a prefix is seen by all)
//!   L_i  = max_j S_ij + log Σ_j e^{S_ij − max}          saved for backward (log-sum-exp)
//!   P    = e^{S − L};   O_I = P V_g
//!   a row that sees no key at all averages every value (P = 1/tk), as the composed
//!   attention's finite mask bias gives
//! backward, per (batch b, kv head g), its query heads and tiles in turn (so dK, dV of g have
//! one writer), P recomputed from S and L:
//!   dV_g += Pᵀ dO_I;   dP = dO_I V_gᵀ;   D_i = Σ_c dO_ic O_ic
//!   dS = P ⊙ (dP − D) · scale;   dQ_I = dS K_g;   dK_g += dSᵀ Q_I
//!   (dS = 0 on a row that sees no key: its output does not depend on the scores. The
//!   composed attention differentiates through its finite mask bias there and gives such a
//!   row's scores a gradient; both agree wherever a row sees a key.)
//! ```
//!
//! Memory: O and L are kept (O(T) per head); the scratch is `TILE × tk` per task. The products
//! are the blocked GEMM's, with K and V of each kv head (and their transposes) packed once into
//! its panels ([`PackedB`]) and read in place by every query tile of every head sharing them,
//! instead of being packed again for each tile's product; the row work (scale, mask, exp,
//! normalise) is one pass over the tile.
//! Tested against the composed `softmax(q kᵀ/√d + bias) v` (tests/attention.rs).

use rayon::prelude::*;

use super::gemm::PackedB;
use super::{fold_slice, row_max, GemmFloat};
use crate::dtype::Float;

/// Query rows per task.
const TILE: usize = 64;

/// Above this many query rows, the keys and values of each kv head are packed into the GEMM's
/// panels once and every tile of every query head that shares them reads them in place; at
/// this many or fewer (decoding a token against a KV cache) a product reads them unpacked,
/// since packing would copy the whole cache for one use.
const PACK_ABOVE_ROWS: usize = 4;

/// K or V of one kv head (or its transpose) as the right operand of the tile products.
enum Rhs<'a, T: GemmFloat> {
    Packed(PackedB<T>),
    InPlace { b: &'a [T], rs: usize, cs: usize },
}

impl<'a, T: GemmFloat> Rhs<'a, T> {
    /// B (k×n, element (p, j) at `b[p*rs + j*cs]`), packed when `pack`.
    fn new(pack: bool, k: usize, n: usize, b: &'a [T], rs: usize, cs: usize) -> Self {
        if pack {
            Rhs::Packed(T::pack_b(k, n, b, rs, cs))
        } else {
            Rhs::InPlace { b, rs, cs }
        }
    }

    /// A product's first column is a multiple of this (the packed panels' width).
    fn align(&self) -> usize {
        match self {
            Rhs::Packed(p) => p.panel_width(),
            Rhs::InPlace { .. } => 1,
        }
    }

    /// `C (+)= A · B[k0..k0+k, j0..j0+n]`, A m×k row-major with row stride `lda`.
    #[allow(clippy::too_many_arguments)]
    fn mul(&self, m: usize, n: usize, k: usize, a: &[T], lda: usize, k0: usize, j0: usize, c: &mut [T], acc: bool) {
        match self {
            Rhs::Packed(p) => T::gemm_packed_into(m, n, k, a, lda, 1, p, k0, j0, c, acc),
            Rhs::InPlace { b, rs, cs } => T::gemm_into(m, n, k, a, lda, 1, &b[k0 * rs + j0 * cs..], *rs, *cs, c, acc),
        }
    }
}

/// Which keys each query sees (the rule of `nn::Mask`, with the prefix and the padding made
/// explicit), and the score scale.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnSpec {
    /// Multiplies `q·k` (usually `1/√d`).
    pub scale: f64,
    pub causal: bool,
    /// Real positions before the first query (from a KV cache).
    pub offset: usize,
    /// A query sees at most the `window` latest real keys, itself included.
    pub window: Option<usize>,
    /// `[batch, offset + tq]`: false for a padding position; `None`: no padding.
    pub keep: Option<Vec<bool>>,
    /// `[offset + tq]`, the same for every batch row: the first real position of the sequence
    /// each position belongs to, when several sequences are packed into one row (causal only;
    /// nondecreasing, `starts[j] ≤ j`): a query sees no key before its sequence's start.
    pub starts: Option<std::sync::Arc<Vec<usize>>>,
}

/// Shapes of one attention: `q: [b, h, tq, d]`, `k, v: [b, hk, tk, d]`, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub hk: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
}

impl Dims {
    /// The forward's two products, `2 · 2·tq·tk·d` per head, halved by a causal mask (for the
    /// profile).
    pub fn product_flops(&self, causal: bool) -> f64 {
        4.0 * (self.b * self.h * self.tq * self.tk * self.d) as f64 / if causal { 2.0 } else { 1.0 }
    }
}

impl AttnSpec {
    /// Keys `tk − offset − tq` before the real ones: a prefix every query sees.
    fn prefix(&self, dims: &Dims) -> usize {
        dims.tk - self.offset - dims.tq
    }

    /// The real keys `[lo, hi)` query `i` may see before padding is applied.
    fn real_range(&self, i: usize, dims: &Dims) -> (usize, usize) {
        let pos = self.offset + i;
        let real = dims.tk - self.prefix(dims);
        let hi = if self.causal { (pos + 1).min(real) } else { real };
        let lo = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let lo = self.starts.as_ref().map_or(lo, |s| lo.max(s[pos])).min(hi);
        (lo, hi)
    }

    /// The fraction of (query, key) pairs the rule lets through, padding aside: what the GPU
    /// kernels' traffic counts scale by (they skip the rows of keys a query cannot see).
    pub(crate) fn visible_fraction(&self, dims: &Dims) -> f64 {
        let p = self.prefix(dims);
        let seen: usize = (0..dims.tq)
            .map(|i| {
                p + {
                    let (lo, hi) = self.real_range(i, dims);
                    hi - lo
                }
            })
            .sum();
        seen as f64 / (dims.tq * dims.tk).max(1) as f64
    }

    fn kept(&self, b: usize, j: usize, dims: &Dims) -> bool {
        let real = dims.tk - self.prefix(dims);
        self.keep.as_ref().is_none_or(|k| k[b * real + j])
    }

    /// Whether query `i` of row `b` sees any key.
    fn sees_any(&self, b: usize, i: usize, dims: &Dims) -> bool {
        if self.prefix(dims) > 0 {
            return true;
        }
        let (lo, hi) = self.real_range(i, dims);
        (lo..hi).any(|j| self.kept(b, j, dims))
    }

    /// The keys (indices into all `tk`) the rows `i0..i1` of batch row `b` need: the union of
    /// what they see, or every key when one of them sees none (it averages them all).
    fn key_range(&self, b: usize, i0: usize, i1: usize, dims: &Dims) -> (usize, usize) {
        if (i0..i1).any(|i| !self.sees_any(b, i, dims)) {
            return (0, dims.tk);
        }
        let p = self.prefix(dims);
        let (lo, _) = self.real_range(i0, dims);
        let (_, hi) = self.real_range(i1 - 1, dims);
        (if p > 0 { 0 } else { lo + p }, hi + p)
    }

    /// Scale a tile's scores `s: [rows, kmax − kmin]` (rows `i0..`) and set the keys each row
    /// may not see to −∞.
    fn mask_tile<T: Float>(&self, s: &mut [T], b: usize, i0: usize, kmin: usize, kn: usize, dims: &Dims) {
        let p = self.prefix(dims);
        let scale = T::from_f64(self.scale);
        let col = |jj: usize| jj.clamp(kmin, kmin + kn) - kmin;
        for (r, row) in s.chunks_mut(kn).enumerate() {
            row.iter_mut().for_each(|x| *x = *x * scale);
            // Real keys j are columns p + j − kmin; the prefix columns are all seen.
            let (lo, hi) = self.real_range(i0 + r, dims);
            row[col(p)..col(p + lo)].iter_mut().for_each(|x| *x = T::neg_infinity());
            row[col(p + hi)..].iter_mut().for_each(|x| *x = T::neg_infinity());
            if self.keep.is_some() {
                for j in lo..hi {
                    let c = p + j;
                    if c >= kmin && c < kmin + kn && !self.kept(b, j, dims) {
                        row[c - kmin] = T::neg_infinity();
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch for the tiles' score matrices, reused across calls: a fresh buffer
    /// per tile would be allocated on every worker thread and fault its pages in anew.
    static SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Run `f` with a zeroed scratch slice of `n` elements of `T` (f32 or f64).
fn with_scratch<T: Float, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let words = (n * std::mem::size_of::<T>()).div_ceil(8);
    let mut buf = SCRATCH.try_with(|s| s.take()).unwrap_or_default();
    if buf.len() < words {
        buf = vec![0.0; words];
    }
    // SAFETY: T is f32 or f64 (plain floats, every bit pattern valid, alignment ≤ 8 = f64's);
    // `words · 8 ≥ n · size_of::<T>()` bytes lie inside `buf`, which outlives the slice.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut T, n) };
    slice.iter_mut().for_each(|x| *x = T::ZERO);
    let r = f(slice);
    let _ = SCRATCH.try_with(|s| {
        let other = s.take();
        s.set(if other.len() > buf.len() { other } else { buf });
    });
    r
}

/// Turn one masked score row into probabilities in place; returns its log-sum-exp (−∞ for a
/// row that sees nothing, which becomes uniform).
#[inline(always)]
fn softmax_row<T: Float>(row: &mut [T], tk: usize) -> T {
    let m = row_max(row);
    if m == T::neg_infinity() {
        let u = T::ONE / T::from_f64(tk as f64);
        row.iter_mut().for_each(|x| *x = u);
        return T::neg_infinity();
    }
    row.iter_mut().for_each(|x| *x = (*x - m).exp_fast());
    let l = fold_slice(row, T::ZERO, |a, b| a + b);
    let inv = T::ONE / l;
    row.iter_mut().for_each(|x| *x = *x * inv);
    m + l.ln()
}

/// Softmax of every masked row of a tile in place, log-sum-exps into `lse`.
#[inline(always)]
fn softmax_rows<T: Float>(s: &mut [T], kn: usize, tk: usize, lse: &mut [T]) {
    for (r, row) in s.chunks_mut(kn).enumerate() {
        lse[r] = softmax_row(row, tk);
    }
}

/// [`softmax_rows`] compiled for AVX2 + FMA where the CPU has them (the exponentials in 8
/// lanes instead of SSE2's 4).
fn softmax_tile<T: Float>(s: &mut [T], kn: usize, tk: usize, lse: &mut [T]) {
    super::with_avx2(
        #[inline(always)]
        || softmax_rows(s, kn, tk, lse),
    )
}

/// Backward's row work on a tile: `p` from the scores and `L` (uniform on a row that sees no
/// key), then `ds = p (dP − D) · scale` in place of `dP` (0 on such a row).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows<T: Float>(p: &mut [T], ds: &mut [T], kn: usize, tk: usize, lse: &[T], go: &[T], o: &[T], d: usize, scale: T) {
    for (r, (pr, dr)) in p.chunks_mut(kn).zip(ds.chunks_mut(kn)).enumerate() {
        let l = lse[r];
        if l == T::neg_infinity() {
            let u = T::ONE / T::from_f64(tk as f64);
            pr.iter_mut().for_each(|x| *x = u);
            // A row that sees no key averages the values whatever the scores.
            dr.iter_mut().for_each(|x| *x = T::ZERO);
            continue;
        }
        pr.iter_mut().for_each(|x| *x = (*x - l).exp_fast());
        let dsum = (0..d).fold(T::ZERO, |a, c| a + go[r * d + c] * o[r * d + c]);
        for (x, &pv) in dr.iter_mut().zip(pr.iter()) {
            *x = pv * (*x - dsum) * scale;
        }
    }
}

/// [`backward_rows`] compiled for AVX2 + FMA where the CPU has them.
#[allow(clippy::too_many_arguments)]
fn backward_tile<T: Float>(p: &mut [T], ds: &mut [T], kn: usize, tk: usize, lse: &[T], go: &[T], o: &[T], d: usize, scale: T) {
    super::with_avx2(
        #[inline(always)]
        || backward_rows(p, ds, kn, tk, lse, go, o, d, scale),
    )
}

/// Forward: `(O [b, h, tq, d], L [b, h, tq])`.
pub fn forward<T: GemmFloat>(q: &[T], k: &[T], v: &[T], dims: Dims, spec: &AttnSpec) -> (Vec<T>, Vec<T>) {
    let Dims { b, h, hk, tq, tk, d } = dims;
    let rep = h / hk;
    let mut o = vec![T::ZERO; q.len()];
    let mut lse = vec![T::ZERO; q.len() / d.max(1)];
    if q.is_empty() || d == 0 {
        return (o, lse);
    }
    // Kᵀ (B[p, j] = k[j·d + p]) and V of each kv head, packed once for all its query tiles.
    let pack = tq > PACK_ABOVE_ROWS;
    let kv: Vec<(Rhs<T>, Rhs<T>)> = (0..b * hk)
        .into_par_iter()
        .map(|g| {
            let (kg, vg) = (&k[g * tk * d..(g + 1) * tk * d], &v[g * tk * d..(g + 1) * tk * d]);
            (Rhs::new(pack, d, tk, kg, 1, d), Rhs::new(pack, tk, d, vg, d, 1))
        })
        .collect();
    o.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (o_bh, l_bh))| {
        let (bi, hi) = (bh / h, bh % h);
        let (kt, vg) = &kv[bi * hk + hi / rep];
        let qh = &q[bh * tq * d..(bh + 1) * tq * d];
        o_bh.par_chunks_mut(TILE * d).zip(l_bh.par_chunks_mut(TILE)).enumerate().for_each(|(t, (o_t, l_t))| {
            let (i0, rows) = (t * TILE, l_t.len());
            let (kmin, kmax) = spec.key_range(bi, i0, i0 + rows, &dims);
            // From a panel's first key: the keys before kmin are masked like any unseen key.
            let kmin = kmin / kt.align() * kt.align();
            let kn = kmax - kmin;
            with_scratch(rows * kn, |s: &mut [T]| {
                // S = Q_I K[kmin..kmax]ᵀ.
                kt.mul(rows, kn, d, &qh[i0 * d..], d, 0, kmin, s, false);
                spec.mask_tile(s, bi, i0, kmin, kn, &dims);
                softmax_tile(s, kn, tk, l_t);
                vg.mul(rows, d, kn, s, kn, kmin, 0, o_t, false);
            });
        });
    });
    (o, lse)
}

/// Backward: `(dQ, dK, dV)` from the forward's inputs, `O`, `L` and `dO`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: GemmFloat>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    go: &[T],
    dims: Dims,
    spec: &AttnSpec,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, h, hk, tq, tk, d } = dims;
    let rep = h / hk;
    let mut dq = vec![T::ZERO; q.len()];
    let (mut dk, mut dv) = (vec![T::ZERO; k.len()], vec![T::ZERO; v.len()]);
    if q.is_empty() || d == 0 || b * hk == 0 {
        return (dq, dk, dv);
    }
    // One task per (batch, kv head): it owns dK, dV of that head and dQ of its query heads.
    let per_g = tk * d;
    dq.par_chunks_mut(rep * tq * d).zip(dk.par_chunks_mut(per_g).zip(dv.par_chunks_mut(per_g))).enumerate().for_each(
        |(g, (dq_g, (dk_g, dv_g)))| {
            let bi = g / hk;
            let (kg, vg) = (&k[g * per_g..(g + 1) * per_g], &v[g * per_g..(g + 1) * per_g]);
            // Kᵀ, Vᵀ and K of this kv head, packed once for its query heads' tiles.
            let pack = tq > PACK_ABOVE_ROWS;
            let (kt, vt, kk) = (Rhs::new(pack, d, tk, kg, 1, d), Rhs::new(pack, d, tk, vg, 1, d), Rhs::new(pack, tk, d, kg, d, 1));
            for r in 0..rep {
                let bh = g * rep + r;
                let rows = bh * tq * d..(bh + 1) * tq * d;
                let (qh, oh, goh) = (&q[rows.clone()], &o[rows.clone()], &go[rows]);
                let lh = &lse[bh * tq..(bh + 1) * tq];
                let dq_h = &mut dq_g[r * tq * d..(r + 1) * tq * d];
                for i0 in (0..tq).step_by(TILE) {
                    let rows = TILE.min(tq - i0);
                    let (kmin, kmax) = spec.key_range(bi, i0, i0 + rows, &dims);
                    let kmin = kmin / kt.align() * kt.align();
                    let kn = kmax - kmin;
                    let (q_i, o_i, go_i) = (&qh[i0 * d..(i0 + rows) * d], &oh[i0 * d..(i0 + rows) * d], &goh[i0 * d..(i0 + rows) * d]);
                    with_scratch(2 * rows * kn, |buf: &mut [T]| {
                        let (p, ds) = buf.split_at_mut(rows * kn);
                        // P, recomputed.
                        kt.mul(rows, kn, d, q_i, d, 0, kmin, p, false);
                        spec.mask_tile(p, bi, i0, kmin, kn, &dims);
                        // dP = dO_I V[kmin..kmax]ᵀ, then P and dS from it in one pass.
                        vt.mul(rows, kn, d, go_i, d, 0, kmin, ds, false);
                        let lse_i = &lh[i0..i0 + rows];
                        backward_tile(p, ds, kn, tk, lse_i, go_i, o_i, d, T::from_f64(spec.scale));
                        // dV[kmin..kmax] += Pᵀ dO_I.
                        T::gemm_into(kn, d, rows, p, 1, kn, go_i, d, 1, &mut dv_g[kmin * d..kmax * d], true);
                        // dQ_I = dS K[kmin..kmax];  dK[kmin..kmax] += dSᵀ Q_I.
                        kk.mul(rows, d, kn, ds, kn, kmin, 0, &mut dq_h[i0 * d..(i0 + rows) * d], false);
                        T::gemm_into(kn, d, rows, ds, 1, kn, q_i, d, 1, &mut dk_g[kmin * d..kmax * d], true);
                    });
                }
            }
        },
    );
    (dq, dk, dv)
}
