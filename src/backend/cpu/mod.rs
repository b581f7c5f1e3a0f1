//! The CPU backend: every primitive of [`crate::backend::Storage`] as a rayon kernel.
//!
//! Kernels are generic over [`Float`] (f32, and f64 for the high-precision reference path).
//! Inputs are read through their [`Layout`], so non-contiguous views are handled everywhere:
//! contiguous inputs take a fast path over slices, the others walk their strides with
//! [`Layout::offsets_from`], one parallel chunk at a time.

pub mod attention;
pub mod gemm;
pub mod math;
pub mod qgemm;

/// Whether this CPU has AVX2, FMA and F16C (asked once): the level the hand-vectorised loops
/// outside the GEMM (attention's softmax rows, quantised block decoding and products, 16-bit
/// weight rows) are compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

/// `f()` compiled for AVX2 + FMA where the CPU has them (8 lanes and fused multiply-adds
/// instead of the baseline's SSE2), else as is: for the generic row and element loops
/// (exponentials, divisions) that the compiler vectorises. `f` must be `#[inline(always)]`
/// so it is compiled inside the AVX2 function.
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if avx2() {
            // SAFETY: checked at run time.
            return unsafe { run(f) };
        }
    }
    f()
}

use half::{bf16, f16};
use rayon::prelude::*;

use super::{BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rng;

/// Elements per parallel task for element-wise kernels: large enough to amortise the task,
/// small enough to split a 1M-element tensor across cores.
const CHUNK: usize = 1 << 14;

/// A flat host buffer of one dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    /// A quantised matrix (frozen weights; see [`crate::quant`]). Shared, as it is never
    /// written.
    Quant(std::sync::Arc<crate::quant::QMatrix>),
}

/// Conversion of every storable element type through f64 (used by casts and fills).
pub trait Elem: Copy + Send + Sync + Default + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $dt:expr, |$x:ident| $to:expr, |$v:ident| $from:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $dt;
            #[inline]
            fn to_f64(self) -> f64 {
                let $x = self;
                $to
            }
            #[inline]
            fn from_f64($v: f64) -> Self {
                $from
            }
        }
    };
}
impl_elem!(f32, DType::F32, |x| x as f64, |v| v as f32);
impl_elem!(f64, DType::F64, |x| x, |v| v);
impl_elem!(f16, DType::F16, |x| x.to_f64(), |v| f16::from_f64(v));
impl_elem!(bf16, DType::BF16, |x| x.to_f64(), |v| bf16::from_f64(v));
impl_elem!(u32, DType::U32, |x| x as f64, |v| v as u32);
impl_elem!(i32, DType::I32, |x| x as f64, |v| v as i32);

/// Run `$body` with `$v` bound to the typed vector, for every dtype; `$wrap` rebuilds a storage.
macro_rules! any_dtype {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            CpuStorage::F16($v) => $body,
            CpuStorage::BF16($v) => $body,
            CpuStorage::U32($v) => $body,
            CpuStorage::I32($v) => $body,
            CpuStorage::Quant(_) => unreachable!("callers handle quantised storage first"),
        }
    };
}

/// Run `$body` for the compute dtypes (f32, f64) and wrap the resulting Vec back; any other
/// dtype is an error naming `$op`.
macro_rules! float_op {
    ($s:expr, $op:literal, $v:ident => $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            other => return Err(Error::DType { op: $op, expected: "f32 or f64", got: other.dtype() }),
        }
    };
}

/// A typed view of a second operand that must have the same dtype as the first.
pub trait FromStorage: Sized {
    fn slice<'a>(s: &'a CpuStorage, op: &'static str) -> Result<&'a [Self]>;
}
macro_rules! impl_from_storage {
    ($t:ty, $var:ident) => {
        impl FromStorage for $t {
            fn slice<'a>(s: &'a CpuStorage, op: &'static str) -> Result<&'a [Self]> {
                match s {
                    CpuStorage::$var(v) => Ok(v),
                    other => Err(Error::DTypeMismatch { op, lhs: <$t as Elem>::DTYPE, rhs: other.dtype() }),
                }
            }
        }
    };
}
impl_from_storage!(f32, F32);
impl_from_storage!(f64, F64);

/// The error for an op that cannot read a quantised matrix through `layout`.
fn quant_view_error(op: &'static str, q: &crate::quant::QMatrix, layout: &Layout) -> Error {
    Error::InvalidArgument {
        op: "quantised tensor",
        msg: format!(
            "{op} of a {} matrix [{}, {}] viewed as {:?} (strides {:?}) is not supported: a quantised weight is read by \
             matmul (as W or Wᵀ), embedding lookup and to_dtype",
            q.format(),
            q.rows(),
            q.cols(),
            layout.shape(),
            layout.strides()
        ),
    }
}

/// Indices of an index tensor as i64 (U32 or I32 storage).
fn indices(s: &CpuStorage, layout: &Layout, op: &'static str) -> Result<Vec<i64>> {
    match s {
        CpuStorage::U32(v) => Ok(layout.offsets().map(|o| v[o] as i64).collect()),
        CpuStorage::I32(v) => Ok(layout.offsets().map(|o| v[o] as i64).collect()),
        other => Err(Error::DType { op, expected: "u32 or i32 indices", got: other.dtype() }),
    }
}

/// Check every index lies in `0..size`, returning them as usize.
fn checked_indices(idx: &[i64], size: usize, op: &'static str) -> Result<Vec<usize>> {
    idx.iter()
        .map(|&i| if i >= 0 && (i as usize) < size { Ok(i as usize) } else { Err(Error::IndexOutOfRange { op, index: i, size }) })
        .collect()
}

/// The elements selected by `layout`, contiguous in row-major order.
pub fn gather_strided<T: Copy + Send + Sync + Default>(src: &[T], layout: &Layout) -> Vec<T> {
    let n = layout.numel();
    if layout.is_contiguous() {
        return src[layout.offset()..layout.offset() + n].to_vec();
    }
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        for (o, off) in chunk.iter_mut().zip(layout.offsets_from(c * CHUNK)) {
            *o = src[off];
        }
    });
    out
}

/// Borrow the data of a contiguous layout, or copy it into a contiguous buffer.
pub(crate) fn contiguous<'a, T: Copy + Send + Sync + Default>(src: &'a [T], layout: &Layout) -> std::borrow::Cow<'a, [T]> {
    if layout.is_contiguous() {
        std::borrow::Cow::Borrowed(&src[layout.offset()..layout.offset() + layout.numel()])
    } else {
        std::borrow::Cow::Owned(gather_strided(src, layout))
    }
}

fn map<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (o, &i) in o.iter_mut().zip(i) {
            *o = f(i);
        }
    });
    out
}

#[inline(always)]
fn cmp<T: Float>(op: CmpOp, a: T, b: T) -> T {
    let r = match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    };
    if r {
        T::ONE
    } else {
        T::ZERO
    }
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    // Stable on both tails: exp of a non-positive number only, e = e^{−|x|} ∈ (0, 1]:
    // σ(|x|) = 1/(1+e) and σ(−|x|) = e/(1+e). Branch-free (a select), so loops vectorise.
    let e = (-x.abs()).exp_fast();
    let p = T::ONE / (T::ONE + e);
    if x >= T::ZERO {
        p
    } else {
        e * p
    }
}

fn unary_kernel<T: Float>(x: &[T], op: UnaryOp) -> Vec<T> {
    let c = T::from_f64;
    match op {
        UnaryOp::Neg => map(x, |v| -v),
        UnaryOp::Exp => map(x, |v| v.exp()),
        UnaryOp::Log => map(x, |v| v.ln()),
        UnaryOp::Sqrt => map(x, |v| v.sqrt()),
        UnaryOp::Rsqrt => map(x, |v| T::ONE / v.sqrt()),
        UnaryOp::Recip => map(x, |v| T::ONE / v),
        UnaryOp::Sqr => map(x, |v| v * v),
        UnaryOp::Abs => map(x, |v| v.abs()),
        UnaryOp::Sign => map(x, |v| {
            if v > T::ZERO {
                T::ONE
            } else if v < T::ZERO {
                -T::ONE
            } else {
                T::ZERO
            }
        }),
        UnaryOp::Tanh => map(x, |v| v.tanh()),
        UnaryOp::Sigmoid => map(x, sigmoid),
        UnaryOp::Erf => map(x, |v| v.erf()),
        UnaryOp::Relu => map(x, |v| if v > T::ZERO { v } else { T::ZERO }),
        UnaryOp::GeluErf => {
            let k = c(std::f64::consts::FRAC_1_SQRT_2);
            map(x, move |v| c(0.5) * v * (T::ONE + (v * k).erf()))
        }
        UnaryOp::GeluTanh => {
            let k = c((2.0 / std::f64::consts::PI).sqrt());
            map(x, move |v| c(0.5) * v * (T::ONE + (k * (v + c(0.044715) * v * v * v)).tanh()))
        }
        UnaryOp::Silu => map(x, |v| v * sigmoid(v)),
        UnaryOp::Powf(p) => {
            let p = c(p);
            map(x, move |v| v.powf(p))
        }
        UnaryOp::Affine(a, b) => {
            let (a, b) = (c(a), c(b));
            map(x, move |v| a * v + b)
        }
        UnaryOp::Clamp(lo, hi) => {
            let (lo, hi) = (c(lo), c(hi));
            map(x, move |v| {
                if v < lo {
                    lo
                } else if v > hi {
                    hi
                } else {
                    v
                }
            })
        }
        UnaryOp::Cmp(op, s) => {
            let s = c(s);
            map(x, move |v| cmp(op, v, s))
        }
    }
}

/// `a ∘ b` element-wise. The op is matched once, outside the loop, so each arm's loop is its
/// own monomorphic (vectorised) function.
fn binary_kernel<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout, op: BinaryOp) -> Vec<T> {
    match op {
        BinaryOp::Add => zip_layouts(a, la, b, lb, |a, b| a + b),
        BinaryOp::Sub => zip_layouts(a, la, b, lb, |a, b| a - b),
        BinaryOp::Mul => zip_layouts(a, la, b, lb, |a, b| a * b),
        BinaryOp::Div => zip_layouts(a, la, b, lb, |a, b| a / b),
        BinaryOp::Max => zip_layouts(a, la, b, lb, |a: T, b| a.max(b)),
        BinaryOp::Min => zip_layouts(a, la, b, lb, |a: T, b| a.min(b)),
        BinaryOp::Cmp(c) => zip_layouts(a, la, b, lb, move |a, b| cmp(c, a, b)),
        BinaryOp::SiluBackward => zip_layouts(a, la, b, lb, |x, g| {
            let s = sigmoid(x);
            g * s * (T::ONE + x * (T::ONE - s))
        }),
    }
}

/// Rows of `d` elements per rayon task for a row-wise kernel: about CHUNK elements, so that
/// short rows (a 64-wide attention head, 512 scores) are not one task each.
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// Apply `f` element-wise over two (or three) layouts of the same shape.
fn zip_layouts<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout, f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let n = la.numel();
    let mut out = vec![T::ZERO; n];
    if la.is_contiguous() && lb.is_contiguous() {
        let (a, b) = (&a[la.offset()..la.offset() + n], &b[lb.offset()..lb.offset() + n]);
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    } else if let Some((d, sa, sb)) = row_strides(la, lb) {
        // Rows contiguous or broadcast (an attention mask, a bias, a per-row scale): find each
        // row's start once, then run the row as slices (or a slice and a scalar), which
        // vectorises, instead of stepping a strided index per element.
        let r = la.rank();
        let lead = |l: &Layout| Layout::new(l.shape()[..r - 1].to_vec(), l.strides()[..r - 1].to_vec(), l.offset());
        let (ra, rb): (Vec<usize>, Vec<usize>) = (lead(la).offsets().collect(), lead(lb).offsets().collect());
        let rows_per = (CHUNK / d).max(1);
        out.par_chunks_mut(d * rows_per).enumerate().for_each(|(c, o)| {
            for (i, orow) in o.chunks_mut(d).enumerate() {
                let (oa, ob) = (ra[c * rows_per + i], rb[c * rows_per + i]);
                match (sa, sb) {
                    (1, 1) => orow.iter_mut().zip(&a[oa..oa + d]).zip(&b[ob..ob + d]).for_each(|((o, &x), &y)| *o = f(x, y)),
                    (1, _) => orow.iter_mut().zip(&a[oa..oa + d]).for_each(|(o, &x)| *o = f(x, b[ob])),
                    (_, 1) => orow.iter_mut().zip(&b[ob..ob + d]).for_each(|(o, &y)| *o = f(a[oa], y)),
                    _ => orow.iter_mut().for_each(|o| *o = f(a[oa], b[ob])),
                }
            }
        });
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            for ((o, ia), ib) in o.iter_mut().zip(la.offsets_from(c * CHUNK)).zip(lb.offsets_from(c * CHUNK)) {
                *o = f(a[ia], b[ib]);
            }
        });
    }
    out
}

/// `(last-axis length, its stride in a, in b)` when both layouts step by 0 or 1 along a
/// last axis long enough for row-wise loops to pay off; `None` otherwise.
fn row_strides(la: &Layout, lb: &Layout) -> Option<(usize, usize, usize)> {
    let r = la.rank();
    if r == 0 || lb.rank() != r {
        return None;
    }
    let (d, sa, sb) = (la.shape()[r - 1], la.strides()[r - 1], lb.strides()[r - 1]);
    (d >= 16 && sa <= 1 && sb <= 1).then_some((d, sa, sb))
}

fn reduce_kernel<T: Float, R: Copy + Send + Sync + Default>(
    x: &[T],
    layout: &Layout,
    axis: usize,
    f: impl Fn(&mut dyn Iterator<Item = T>) -> R + Sync,
) -> Vec<R> {
    let outer = layout.without_axis(axis);
    let (d, stride) = (layout.shape()[axis], layout.strides()[axis]);
    let mut out = vec![R::default(); outer.numel()];
    let chunk = (CHUNK / d.max(1)).max(1);
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        for (o, base) in o.iter_mut().zip(outer.offsets_from(c * chunk)) {
            *o = f(&mut (0..d).map(|j| x[base + j * stride]));
        }
    });
    out
}

/// Fold a contiguous slice with 8 independent accumulators (vectorisable, and a shorter
/// rounding chain than one running sum).
#[inline(always)]
pub(super) fn fold_slice<T: Float>(s: &[T], id: T, comb: impl Fn(T, T) -> T) -> T {
    let mut lanes = [id; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] = comb(lanes[i], c[i]);
        }
    }
    let tail = chunks.remainder().iter().fold(id, |a, &b| comb(a, b));
    let q = [comb(lanes[0], lanes[4]), comb(lanes[1], lanes[5]), comb(lanes[2], lanes[6]), comb(lanes[3], lanes[7])];
    comb(comb(comb(q[0], q[2]), comb(q[1], q[3])), tail)
}

/// `Σ e^{v − shift}` over a row, with 8 independent accumulators so it vectorises.
#[inline(always)]
fn sum_exp<T: Float>(row: &[T], shift: T) -> T {
    let mut lanes = [T::ZERO; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] += (c[i] - shift).exp_fast();
        }
    }
    let tail: T = chunks.remainder().iter().map(|&v| (v - shift).exp_fast()).sum();
    fold_slice(&lanes, T::ZERO, |a, b| a + b) + tail
}

/// Largest element of a row (−∞ for an empty row).
#[inline(always)]
pub(super) fn row_max<T: Float>(row: &[T]) -> T {
    fold_slice(row, T::neg_infinity(), |a, b| if b > a { b } else { a })
}

/// Sum/max/min of a contiguous input viewed as `[outer, d, inner]`, reducing `d`.
fn reduce_contiguous<T: Float>(x: &[T], shape: &[usize], axis: usize, id: T, comb: impl Fn(T, T) -> T + Sync + Send + Copy) -> Vec<T> {
    let (outer, d, inner) = split_at_axis(shape, axis);
    let mut out = vec![id; outer * inner];
    if out.is_empty() {
        return out;
    }
    if inner == 1 {
        // One contiguous row per output; a few very long rows are split across threads.
        if outer >= 2 * rayon::current_num_threads() || d <= CHUNK {
            out.par_iter_mut().enumerate().for_each(|(o, r)| *r = fold_slice(&x[o * d..(o + 1) * d], id, comb));
        } else {
            for (o, r) in out.iter_mut().enumerate() {
                // Partial results combined in chunk order, not in rayon's (work-stealing) tree:
                // the same input gives the same bits on every run (bitwise resume needs it).
                let parts: Vec<T> = x[o * d..(o + 1) * d].par_chunks(CHUNK).map(|c| fold_slice(c, id, comb)).collect();
                *r = parts.into_iter().fold(id, comb);
            }
        }
    } else {
        // Combine whole rows of `inner` elements: out[o, :] ∘= x[o, j, :], in column blocks so
        // that a single outer block (a bias gradient) still spreads over the threads.
        const COLS: usize = 1024;
        out.par_chunks_mut(inner).enumerate().for_each(|(o, acc)| {
            acc.par_chunks_mut(COLS).enumerate().for_each(|(cb, a)| {
                let n = a.len();
                for j in 0..d {
                    let start = (o * d + j) * inner + cb * COLS;
                    for (a, &v) in a.iter_mut().zip(&x[start..start + n]) {
                        *a = comb(*a, v);
                    }
                }
            })
        });
    }
    out
}

fn reduce_float<T: Float>(x: &[T], layout: &Layout, axis: usize, op: ReduceOp) -> CpuStorage
where
    Vec<T>: Into<CpuStorage>,
{
    let arg = |better: fn(T, T) -> bool| {
        move |it: &mut dyn Iterator<Item = T>| {
            let mut best: Option<(u32, T)> = None;
            for (i, v) in it.enumerate() {
                if best.is_none_or(|(_, b)| better(v, b)) {
                    best = Some((i as u32, v));
                }
            }
            best.map_or(0, |b| b.0)
        }
    };
    let max = |a: T, b: T| if b > a || b.is_nan() { b } else { a };
    let min = |a: T, b: T| if b < a || b.is_nan() { b } else { a };
    if layout.is_contiguous() {
        let x = &x[layout.offset()..layout.offset() + layout.numel()];
        match op {
            ReduceOp::Sum => return reduce_contiguous(x, layout.shape(), axis, T::ZERO, |a, b| a + b).into(),
            ReduceOp::Max => return reduce_contiguous(x, layout.shape(), axis, T::neg_infinity(), max).into(),
            ReduceOp::Min => return reduce_contiguous(x, layout.shape(), axis, -T::neg_infinity(), min).into(),
            _ => {}
        }
    }
    match op {
        ReduceOp::Sum => reduce_kernel(x, layout, axis, |it| it.fold(T::ZERO, |a, b| a + b)).into(),
        ReduceOp::Max => reduce_kernel(x, layout, axis, |it| it.fold(T::neg_infinity(), max)).into(),
        ReduceOp::Min => reduce_kernel(x, layout, axis, |it| it.fold(-T::neg_infinity(), min)).into(),
        ReduceOp::ArgMax => CpuStorage::U32(reduce_kernel(x, layout, axis, arg(|v, b| v > b))),
        ReduceOp::ArgMin => CpuStorage::U32(reduce_kernel(x, layout, axis, arg(|v, b| v < b))),
    }
}

impl From<Vec<f32>> for CpuStorage {
    fn from(v: Vec<f32>) -> Self {
        CpuStorage::F32(v)
    }
}
impl From<Vec<f64>> for CpuStorage {
    fn from(v: Vec<f64>) -> Self {
        CpuStorage::F64(v)
    }
}

/// Numbers the matmul kernel multiplies: each has its own gemm.
pub trait GemmFloat: Float {
    /// `C = A·B`, or `C += A·B` when `acc` (see [`gemm::gemm_f32_into`]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
        m: usize,
        n: usize,
        k: usize,
        a: &[Self],
        a_rs: usize,
        a_cs: usize,
        b: &[Self],
        b_rs: usize,
        b_cs: usize,
        c: &mut [Self],
        acc: bool,
    );
    #[allow(clippy::too_many_arguments)]
    fn gemm(m: usize, n: usize, k: usize, a: &[Self], a_rs: usize, a_cs: usize, b: &[Self], b_rs: usize, b_cs: usize, c: &mut [Self]) {
        Self::gemm_into(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, false)
    }
    /// B (k×n, element (p, j) at `b[p*rs + j*cs]`) packed once for [`GemmFloat::gemm_packed_into`].
    fn pack_b(k: usize, n: usize, b: &[Self], rs: usize, cs: usize) -> gemm::PackedB<Self>;
    /// `C (+)= A · B[k0..k0+k, j0..j0+n]` with a packed B (see [`gemm::gemm_f32_packed`]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_packed_into(
        m: usize,
        n: usize,
        k: usize,
        a: &[Self],
        a_rs: usize,
        a_cs: usize,
        b: &gemm::PackedB<Self>,
        k0: usize,
        j0: usize,
        c: &mut [Self],
        acc: bool,
    );
}
impl GemmFloat for f32 {
    fn gemm_into(
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
        acc: bool,
    ) {
        gemm::gemm_f32_into(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, acc)
    }
    fn pack_b(k: usize, n: usize, b: &[f32], rs: usize, cs: usize) -> gemm::PackedB<f32> {
        gemm::PackedB::f32(k, n, b, rs, cs)
    }
    fn gemm_packed_into(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &gemm::PackedB<f32>,
        k0: usize,
        j0: usize,
        c: &mut [f32],
        acc: bool,
    ) {
        gemm::gemm_f32_packed(m, n, k, a, a_rs, a_cs, b, k0, j0, c, acc)
    }
}
impl GemmFloat for f64 {
    fn gemm_into(
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
        acc: bool,
    ) {
        gemm::gemm_f64_into(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, acc)
    }
    fn pack_b(k: usize, n: usize, b: &[f64], rs: usize, cs: usize) -> gemm::PackedB<f64> {
        gemm::PackedB::f64(k, n, b, rs, cs)
    }
    fn gemm_packed_into(
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        a_rs: usize,
        a_cs: usize,
        b: &gemm::PackedB<f64>,
        k0: usize,
        j0: usize,
        c: &mut [f64],
        acc: bool,
    ) {
        gemm::gemm_f64_packed(m, n, k, a, a_rs, a_cs, b, k0, j0, c, acc)
    }
}

/// `C (rows×cols) ⊕= X · Wᵀ` for matrices read through their layouts: X `[rows, k]`, W
/// `[cols, k]` (Wᵀ read in place by swapping W's strides).
fn gemm_xwt<T: GemmFloat>(x: &[T], lx: &Layout, w: &[T], lw: &Layout, c: &mut [T], acc: bool) {
    let (rows, k, cols) = (lx.shape()[0], lx.shape()[1], lw.shape()[0]);
    let (xs, ws) = (lx.strides(), lw.strides());
    T::gemm_into(rows, cols, k, &x[lx.offset()..], xs[0], xs[1], &w[lw.offset()..], ws[1], ws[0], c, acc);
}

/// The LoRA linear on the CPU (see [`crate::backend::Storage::lora_linear`]):
/// `y = x wᵀ` into a fresh buffer, `u = xd aᵀ` (`[n, r]`), then `y += (s·u) bᵀ` accumulated
/// by the GEMM into `y` itself, so no temporary of `y`'s size and no separate scale or add
/// pass exist. Returns `(y, u)`.
#[allow(clippy::too_many_arguments)]
fn lora_kernel<T: GemmFloat>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    xd: &[T],
    lxd: &Layout,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let (n, m) = (lx.shape()[0], lw.shape()[0]);
    let mut y = vec![T::ZERO; n * m];
    gemm_xwt(x, lx, w, lw, &mut y, false);
    let u = lora_add(&mut y, xd, lxd, a, la, b, lb, scale);
    (y, u)
}

/// The low-rank part of the LoRA linear: `u = xd aᵀ`, `y += (s·u) bᵀ`; returns `u`.
#[allow(clippy::too_many_arguments)]
fn lora_add<T: GemmFloat>(y: &mut [T], xd: &[T], lxd: &Layout, a: &[T], la: &Layout, b: &[T], lb: &Layout, scale: T) -> Vec<T> {
    let (n, r) = (lxd.shape()[0], la.shape()[0]);
    let mut u = vec![T::ZERO; n * r];
    gemm_xwt(xd, lxd, a, la, &mut u, false);
    let us: Vec<T> = u.iter().map(|&v| v * scale).collect();
    gemm_xwt(&us, &Layout::contiguous(&[n, r]), b, lb, y, true);
    u
}

fn matmul_kernel<T: GemmFloat>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    let r = la.rank();
    let (m, k, n) = (la.shape()[r - 2], la.shape()[r - 1], lb.shape()[r - 1]);
    let (a_rs, a_cs, b_rs, b_cs) = (la.strides()[r - 2], la.strides()[r - 1], lb.strides()[r - 2], lb.strides()[r - 1]);
    let batch_a = Layout::new(la.shape()[..r - 2].to_vec(), la.strides()[..r - 2].to_vec(), la.offset());
    let batch_b = Layout::new(lb.shape()[..r - 2].to_vec(), lb.strides()[..r - 2].to_vec(), lb.offset());
    let mut out = vec![T::ZERO; batch_a.numel() * m * n];
    if m * n == 0 {
        return out;
    }
    let offsets: Vec<(usize, usize)> = batch_a.offsets().zip(batch_b.offsets()).collect();
    out.par_chunks_mut(m * n).zip(offsets).for_each(|(c, (oa, ob))| {
        T::gemm(m, n, k, &a[oa..], a_rs, a_cs, &b[ob..], b_rs, b_cs, c);
    });
    out
}

/// Rows of a half-precision matrix (`offset + r·rs + c` holds element (r, c)), decoded to f32.
struct HalfRows<'a, H> {
    data: &'a [H],
    offset: usize,
    rs: usize,
    rows: usize,
    cols: usize,
}

impl<H: Elem + Into<f32> + bytemuck::Pod> gemm::RowDecoder for HalfRows<'_, H> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn decode(&self, row: usize, start: usize, out: &mut [f32]) {
        let (at, len) = (self.offset + row * self.rs + start, out.len());
        for (o, &h) in out.iter_mut().zip(&self.data[at..at + len]) {
            *o = h.into();
        }
    }
    fn dot_row(&self, row: usize, a: &[&[f32]], out: &mut [f32], scratch: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2() {
                let at = self.offset + row * self.rs;
                let bits: &[u16] = bytemuck::cast_slice(&self.data[at..at + self.cols]);
                // SAFETY: the CPU has the features; every a[i] has `cols` values (the caller's).
                unsafe {
                    match H::DTYPE {
                        DType::BF16 => crate::quant::dot_x86::dot_row_half::<true>(bits, a, out),
                        _ => crate::quant::dot_x86::dot_row_half::<false>(bits, a, out),
                    }
                }
                return;
            }
        }
        self.decode(row, 0, scratch);
        for (o, x) in out.iter_mut().zip(a) {
            *o = gemm::dot(x, scratch);
        }
    }
}

impl gemm::RowDecoder for crate::quant::QMatrix {
    fn rows(&self) -> usize {
        crate::quant::QMatrix::rows(self)
    }
    fn cols(&self) -> usize {
        crate::quant::QMatrix::cols(self)
    }
    fn decode(&self, row: usize, start: usize, out: &mut [f32]) {
        crate::quant::QMatrix::decode(self, row, start, out)
    }
    fn dot_row(&self, row: usize, a: &[&[f32]], out: &mut [f32], _scratch: &mut [f32]) {
        crate::quant::QMatrix::dot_row(self, row, a, out)
    }
}

/// `A · B` for an f32 A and a frozen B that is decoded as it is packed (a quantised matrix, or
/// f16/bf16), when B's last two axes are W `[rows, cols]` with unit column stride or its
/// transpose, and its batch axes (if any) broadcast one matrix (stride 0). `None` when the
/// layout is another view (the caller converts it).
fn matmul_decoded(a: &[f32], la: &Layout, rhs: &CpuStorage, lb: &Layout) -> Result<Option<Vec<f32>>> {
    let r = la.rank();
    let (m, k, n) = (la.shape()[r - 2], la.shape()[r - 1], lb.shape()[r - 1]);
    let (bs, bst) = (&lb.strides()[r - 2..], &lb.strides()[..r - 2]);
    if bst.iter().zip(&lb.shape()[..r - 2]).any(|(&s, &d)| s != 0 && d > 1) {
        return Ok(None);
    }
    // W itself (B = W: k rows of n, row stride bs[0]) or its transpose (B = Wᵀ: n rows of k).
    let (transposed, rows, cols, rs) = if bs[1] == 1 || n == 1 {
        (false, k, n, bs[0])
    } else if bs[0] == 1 || k == 1 {
        (true, n, k, bs[1])
    } else {
        return Ok(None);
    };
    let (a_rs, a_cs) = (la.strides()[r - 2], la.strides()[r - 1]);
    let (h16, hb16);
    let dec: &dyn gemm::RowDecoder = match rhs {
        CpuStorage::Quant(q) => {
            if lb.offset() != 0 || rs != q.cols() || (rows, cols) != (q.rows(), q.cols()) {
                return Err(quant_view_error("matmul", q, lb));
            }
            q.as_ref()
        }
        CpuStorage::F16(v) => {
            h16 = HalfRows { data: v, offset: lb.offset(), rs, rows, cols };
            &h16
        }
        CpuStorage::BF16(v) => {
            hb16 = HalfRows { data: v, offset: lb.offset(), rs, rows, cols };
            &hb16
        }
        _ => return Ok(None),
    };
    let batch_a = Layout::new(la.shape()[..r - 2].to_vec(), la.strides()[..r - 2].to_vec(), la.offset());
    let mut out = vec![0f32; batch_a.numel() * m * n];
    if m * n == 0 {
        return Ok(Some(out));
    }
    if let CpuStorage::Quant(q) = rhs {
        // Evaluation and generation may multiply by int8 activations (see `qgemm`).
        if transposed
            && a_cs == 1
            && m > gemm::SKINNY_M
            && qgemm::enabled()
            && !crate::autograd::is_grad_enabled()
            && qgemm::supported()
            && qgemm::handles(q)
        {
            let panels = qgemm::panels_of(q);
            for (c, oa) in out.chunks_mut(m * n).zip(batch_a.offsets()) {
                qgemm::gemm_q(m, &a[oa..], a_rs, &panels, c);
            }
            return Ok(Some(out));
        }
    }
    let offsets: Vec<usize> = batch_a.offsets().collect();
    out.par_chunks_mut(m * n).zip(offsets).for_each(|(c, oa)| {
        gemm::gemm_f32_decoded(m, &a[oa..], a_rs, a_cs, dec, transposed, c, false);
    });
    Ok(Some(out))
}

fn softmax_kernel<T: Float>(x: &[T], d: usize, log: bool) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if d == 0 {
        return out;
    }
    out.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(rows_per_task(d)).for_each(|(o, row)| {
        with_avx2(
            #[inline(always)]
            || {
                let max = row_max(row);
                // Separate loops so each one vectorises: exponentials, then their sum.
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - max).exp_fast();
                }
                let sum = fold_slice(o, T::ZERO, |a, b| a + b);
                if log {
                    let lse = sum.ln();
                    for (o, &v) in o.iter_mut().zip(row) {
                        *o = v - max - lse;
                    }
                } else {
                    let inv = T::ONE / sum;
                    o.iter_mut().for_each(|o| *o = *o * inv);
                }
            },
        )
    });
    out
}

/// Per-row statistics of a norm: (mean, rstd); mean = 0 for RMS norm. Accumulated in f64.
#[inline]
fn row_stats<T: Float>(row: &[T], eps: f64, rms: bool) -> (f64, f64) {
    let d = row.len() as f64;
    let mean = if rms { 0.0 } else { row.iter().map(|v| v.to_f64()).sum::<f64>() / d };
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

type NormOut<T> = (Vec<T>, Vec<T>, Vec<T>);

fn norm_kernel<T: Float>(x: &[T], d: usize, w: Option<&[T]>, b: Option<&[T]>, eps: f64, rms: bool) -> NormOut<T> {
    let rows = x.len().checked_div(d).unwrap_or(0);
    let (mut y, mut mean, mut rstd) = (vec![T::ZERO; x.len()], vec![T::ZERO; rows], vec![T::ZERO; rows]);
    if d == 0 {
        return (y, mean, rstd);
    }
    let rows = y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut()));
    rows.with_min_len(rows_per_task(d)).for_each(|((y, row), (m, r))| {
        let (mu, rs) = row_stats(row, eps, rms);
        let (mu_t, rs_t) = (T::from_f64(mu), T::from_f64(rs));
        (*m, *r) = (mu_t, rs_t);
        for (j, (y, &v)) in y.iter_mut().zip(row).enumerate() {
            let mut h = (v - mu_t) * rs_t;
            if let Some(w) = w {
                h = h * w[j];
            }
            if let Some(b) = b {
                h += b[j];
            }
            *y = h;
        }
    });
    (y, mean, rstd)
}

/// Backward of layer/RMS norm. With `x̂ = (x − μ)·r` and `ĝ = g ⊙ w`:
/// layer norm `dx = r (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))`; RMS norm drops the `mean(ĝ)` term
/// (μ = 0). `dw = Σ_rows g ⊙ x̂`, `db = Σ_rows g`.
fn norm_backward_kernel<T: Float>(x: &[T], d: usize, w: Option<&[T]>, g: &[T], mean: &[T], rstd: &[T], rms: bool) -> NormOut<T> {
    let mut dx = vec![T::ZERO; x.len()];
    if d == 0 {
        return (dx, vec![], vec![]);
    }
    let dn = T::from_f64(d as f64);
    let rows = dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(g.par_chunks(d))).zip(mean.par_iter().zip(rstd.par_iter()));
    rows.with_min_len(rows_per_task(d)).for_each(|((dx, (x, g)), (&mu, &r))| {
        let (mut s_g, mut s_gx) = (T::ZERO, T::ZERO);
        for j in 0..d {
            let gh = if let Some(w) = w { g[j] * w[j] } else { g[j] };
            s_g += gh;
            s_gx += gh * (x[j] - mu) * r;
        }
        let (m_g, m_gx) = (if rms { T::ZERO } else { s_g / dn }, s_gx / dn);
        for j in 0..d {
            let gh = if let Some(w) = w { g[j] * w[j] } else { g[j] };
            dx[j] = r * (gh - m_g - (x[j] - mu) * r * m_gx);
        }
    });
    if w.is_none() {
        return (dx, vec![], vec![]);
    }
    // Parameter gradients: partial sums over blocks of rows, then one reduction.
    let rows = x.len() / d;
    let (dw, db) = (0..rows)
        .into_par_iter()
        .fold(
            || (vec![T::ZERO; d], vec![T::ZERO; d]),
            |(mut dw, mut db), i| {
                let (x, g, mu, r) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d], mean[i], rstd[i]);
                for j in 0..d {
                    dw[j] += g[j] * (x[j] - mu) * r;
                    db[j] += g[j];
                }
                (dw, db)
            },
        )
        .reduce(
            || (vec![T::ZERO; d], vec![T::ZERO; d]),
            |(mut a, mut b), (c, e)| {
                a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                b.iter_mut().zip(e).for_each(|(b, e)| *b += e);
                (a, b)
            },
        );
    (dx, dw, db)
}

/// (outer, d, inner) split of a shape around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn index_select_kernel<T: Copy + Send + Sync + Default>(x: &[T], shape: &[usize], axis: usize, idx: &[usize]) -> Vec<T> {
    let (outer, d, inner) = split_at_axis(shape, axis);
    let mut out = vec![T::default(); outer * idx.len() * inner];
    if inner == 0 || idx.is_empty() {
        return out;
    }
    out.par_chunks_mut(inner).enumerate().for_each(|(r, o)| {
        let (b, j) = (r / idx.len(), r % idx.len());
        let src = (b * d + idx[j]) * inner;
        o.copy_from_slice(&x[src..src + inner]);
    });
    out
}

fn index_add_kernel<T: Float>(g: &[T], shape: &[usize], axis: usize, idx: &[usize]) -> Vec<T> {
    let (outer, d, inner) = split_at_axis(shape, axis);
    let mut out = vec![T::ZERO; outer * d * inner];
    if inner == 0 || d == 0 {
        return out;
    }
    let n = idx.len();
    // Each outer block is independent; inside one, rows with equal indices accumulate in order.
    out.par_chunks_mut(d * inner).enumerate().for_each(|(b, o)| {
        for (j, &i) in idx.iter().enumerate() {
            let src = &g[(b * n + j) * inner..(b * n + j + 1) * inner];
            o[i * inner..(i + 1) * inner].iter_mut().zip(src).for_each(|(o, &s)| *o += s);
        }
    });
    out
}

/// Rotary embedding of the rows of `x` (row `r` starts at `rows[r]`, `dim` contiguous values;
/// its position is `r % seq`), into a fresh contiguous output: a view (the heads' transposed
/// layout) is read in place, not copied first. The rotation of pair (a, b) by the position's
/// angle: `(x_a c − x_b s, x_b c + x_a s)`, `s` negated for the inverse.
#[allow(clippy::too_many_arguments)]
fn rope_kernel<T: Float>(
    x: &[T],
    rows: &[usize],
    seq: usize,
    dim: usize,
    cos: &[T],
    sin: &[T],
    interleaved: bool,
    inverse: bool,
) -> Vec<T> {
    let mut out = vec![T::ZERO; rows.len() * dim];
    let half = dim / 2;
    if dim == 0 {
        return out;
    }
    out.par_chunks_mut(dim).zip(rows.par_iter()).enumerate().with_min_len(rows_per_task(dim)).for_each(|(r, (o, &at))| {
        let p = r % seq;
        let (x, c, s) = (&x[at..at + dim], &cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        let sign = if inverse { T::ZERO - T::ONE } else { T::ONE };
        if interleaved {
            for (i, (&c, &s)) in c.iter().zip(s).enumerate() {
                let (a, b, s) = (x[2 * i], x[2 * i + 1], s * sign);
                o[2 * i] = a * c - b * s;
                o[2 * i + 1] = b * c + a * s;
            }
        } else {
            // Halves as separate slices, so the loop vectorises.
            let (x0, x1) = x.split_at(half);
            let (o0, o1) = o.split_at_mut(half);
            for i in 0..half {
                let (a, b, s) = (x0[i], x1[i], s[i] * sign);
                o0[i] = a * c[i] - b * s;
                o1[i] = b * c[i] + a * s;
            }
        }
    });
    out
}

/// The start of every row (last axis) of `layout`, whose last axis has unit stride, in
/// row-major order.
fn row_starts(layout: &Layout) -> Vec<usize> {
    let r = layout.rank();
    Layout::new(layout.shape()[..r - 1].to_vec(), layout.strides()[..r - 1].to_vec(), layout.offset()).offsets().collect()
}

fn check_targets(t: &[i64], c: usize, ignore: i64) -> Result<()> {
    for &v in t {
        if v != ignore && (v < 0 || v as usize >= c) {
            return Err(Error::IndexOutOfRange { op: "cross_entropy", index: v, size: c });
        }
    }
    Ok(())
}

fn cross_entropy_kernel<T: Float>(x: &[T], c: usize, t: &[i64], ignore: i64) -> Vec<T> {
    let mut out = vec![T::ZERO; t.len()];
    out.par_iter_mut().zip(t.par_iter()).enumerate().for_each(|(r, (o, &t))| {
        if t == ignore {
            return;
        }
        let row = &x[r * c..(r + 1) * c];
        let max = row_max(row);
        let lse = max
            + with_avx2(
                #[inline(always)]
                || sum_exp(row, max),
            )
            .ln();
        *o = lse - row[t as usize];
    });
    out
}

fn cross_entropy_backward_kernel<T: Float>(x: &[T], c: usize, t: &[i64], g: &[T], ignore: i64) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if c == 0 {
        return out;
    }
    out.par_chunks_mut(c).zip(x.par_chunks(c)).enumerate().with_min_len(rows_per_task(c)).for_each(|(r, (o, row))| {
        if t[r] == ignore {
            return;
        }
        let max = row_max(row);
        with_avx2(
            #[inline(always)]
            || {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - max).exp_fast();
                }
                let scale = g[r] / fold_slice(o, T::ZERO, |a, b| a + b);
                o.iter_mut().for_each(|o| *o = *o * scale);
            },
        );
        o[t[r] as usize] = o[t[r] as usize] - g[r];
    });
    out
}

fn fill_with<E: Elem>(n: usize, f: impl Fn(u64) -> f64 + Sync) -> Vec<E> {
    let mut out = vec![E::default(); n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        for (j, o) in o.iter_mut().enumerate() {
            *o = E::from_f64(f((c * CHUNK + j) as u64));
        }
    });
    out
}

fn cast_to<S: Elem, D: Elem>(x: &[S], layout: &Layout) -> Vec<D> {
    let x = contiguous(x, layout);
    let mut out = vec![D::default(); x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (o, &i) in o.iter_mut().zip(i) {
            *o = D::from_f64(i.to_f64());
        }
    });
    out
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::Quant(q) => DType::Quant(q.format()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::Quant(q) => q.rows() * q.cols(),
            other => any_dtype!(other, v => v.len()),
        }
    }

    /// Bytes the buffer takes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            CpuStorage::Quant(q) => q.bytes(),
            other => other.len() * other.dtype().size_in_bytes(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(dtype: DType, n: usize) -> Self {
        Self::full(dtype, n, 0.0)
    }

    pub fn full(dtype: DType, n: usize, v: f64) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![v as f32; n]),
            DType::F64 => CpuStorage::F64(vec![v; n]),
            DType::F16 => CpuStorage::F16(vec![f16::from_f64(v); n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(v); n]),
            DType::U32 => CpuStorage::U32(vec![v as u32; n]),
            DType::I32 => CpuStorage::I32(vec![v as i32; n]),
            DType::Quant(_) => unreachable!("Tensor refuses to fill a quantised dtype"),
        }
    }

    /// The selected elements, contiguous, same dtype.
    pub fn copy_strided(&self, layout: &Layout) -> Result<CpuStorage> {
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(gather_strided(v, layout)),
            CpuStorage::F64(v) => CpuStorage::F64(gather_strided(v, layout)),
            CpuStorage::F16(v) => CpuStorage::F16(gather_strided(v, layout)),
            CpuStorage::BF16(v) => CpuStorage::BF16(gather_strided(v, layout)),
            CpuStorage::U32(v) => CpuStorage::U32(gather_strided(v, layout)),
            CpuStorage::I32(v) => CpuStorage::I32(gather_strided(v, layout)),
            CpuStorage::Quant(q) => {
                if layout.is_contiguous() && layout.offset() == 0 {
                    CpuStorage::Quant(q.clone())
                } else {
                    return Err(quant_view_error("copy", q, layout));
                }
            }
        })
    }

    /// The elements as f64, row-major (for reading values back in any dtype).
    pub fn to_f64_vec(&self, layout: &Layout) -> Vec<f64> {
        match self {
            CpuStorage::Quant(q) => cast_to::<f32, f64>(&q.dequantize(), layout),
            other => any_dtype!(other, v => cast_to::<_, f64>(v, layout)),
        }
    }

    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<CpuStorage> {
        if dtype == self.dtype() {
            return self.copy_strided(layout);
        }
        if let CpuStorage::Quant(q) = self {
            // Dequantise (merges, exports, DoRA's norms), then cast through the f32 values.
            if dtype.is_quant() {
                return Err(Error::InvalidArgument {
                    op: "to_dtype",
                    msg: format!("{} to {dtype:?}: dequantise to f32 first, then quantise (QMatrix::quantize)", q.format()),
                });
            }
            let cols = q.cols();
            // Whole rows (`narrow` on axis 0): decode only those.
            if layout.rank() == 2 && layout.strides() == [cols, 1] && layout.offset() % cols.max(1) == 0 && layout.shape()[1] == cols {
                let (r0, n) = (layout.offset() / cols.max(1), layout.shape()[0]);
                let mut out = vec![0f32; n * cols];
                for (i, o) in out.chunks_mut(cols.max(1)).enumerate() {
                    q.decode(r0 + i, 0, o);
                }
                return CpuStorage::F32(out).cast(&Layout::contiguous(layout.shape()), dtype);
            }
            return CpuStorage::F32(q.dequantize()).cast(layout, dtype);
        }
        if dtype.is_quant() {
            return Err(Error::InvalidArgument {
                op: "to_dtype",
                msg: format!("quantising to {dtype:?} takes a whole matrix: use Tensor::quantize"),
            });
        }
        Ok(any_dtype!(self, v => match dtype {
            DType::F32 => CpuStorage::F32(cast_to(v, layout)),
            DType::F64 => CpuStorage::F64(cast_to(v, layout)),
            DType::F16 => CpuStorage::F16(cast_to(v, layout)),
            DType::BF16 => CpuStorage::BF16(cast_to(v, layout)),
            DType::U32 => CpuStorage::U32(cast_to(v, layout)),
            DType::I32 => CpuStorage::I32(cast_to(v, layout)),
            DType::Quant(_) => unreachable!("checked above"),
        }))
    }

    pub fn unary(&self, op: UnaryOp, layout: &Layout) -> Result<CpuStorage> {
        Ok(float_op!(self, "unary", v => unary_kernel(&contiguous(v, layout), op)))
    }

    pub fn binary(&self, op: BinaryOp, layout: &Layout, rhs: &CpuStorage, rhs_layout: &Layout) -> Result<CpuStorage> {
        Ok(float_op!(self, "binary", v => binary_kernel(v, layout, FromStorage::slice(rhs, "binary")?, rhs_layout, op)))
    }

    pub fn where_cond(&self, layout: &Layout, t: &CpuStorage, tl: &Layout, f: &CpuStorage, fl: &Layout) -> Result<CpuStorage> {
        let cond = self.to_f64_vec(layout);
        // Select from t and f through their layouts, then apply the condition in order.
        Ok(float_op!(t, "where", tv => {
            let fv = FromStorage::slice(f, "where")?;
            let (ts, fs) = (gather_strided(tv, tl), gather_strided(fv, fl));
            (0..ts.len()).map(|i| if cond[i] != 0.0 { ts[i] } else { fs[i] }).collect()
        }))
    }

    pub fn reduce(&self, op: ReduceOp, layout: &Layout, axis: usize) -> Result<CpuStorage> {
        match self {
            CpuStorage::F32(v) => Ok(reduce_float(v, layout, axis, op)),
            CpuStorage::F64(v) => Ok(reduce_float(v, layout, axis, op)),
            other => Err(Error::DType { op: "reduce", expected: "f32 or f64", got: other.dtype() }),
        }
    }

    pub fn matmul(&self, layout: &Layout, rhs: &CpuStorage, rhs_layout: &Layout) -> Result<CpuStorage> {
        if let (CpuStorage::F32(a), CpuStorage::Quant(_) | CpuStorage::F16(_) | CpuStorage::BF16(_)) = (self, rhs) {
            if let Some(out) = matmul_decoded(a, layout, rhs, rhs_layout)? {
                return Ok(CpuStorage::F32(out));
            }
            // A half-precision view the decoder cannot read row by row: convert it.
            return self.matmul(layout, &rhs.cast(rhs_layout, DType::F32)?, &Layout::contiguous(rhs_layout.shape()));
        }
        Ok(float_op!(self, "matmul", v => matmul_kernel(v, layout, FromStorage::slice(rhs, "matmul")?, rhs_layout)))
    }

    /// The gated product `((a ⊙ gc) b + bias) ⊙ gr` and, when `keep_pre`, the value before
    /// `gr` (see [`crate::backend::Storage::gated_matmul`]): `a ⊙ gc` into a copy, the GEMM
    /// (which reads a 16-bit or quantised `b` in place), then bias and row gate in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_matmul(
        &self,
        layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
        gc: Option<&CpuStorage>,
        bias: Option<&CpuStorage>,
        gr: Option<&CpuStorage>,
        keep_pre: bool,
    ) -> Result<(CpuStorage, Option<CpuStorage>)> {
        const OP: &str = "gated_matmul";
        let (k, n) = (layout.shape()[1], b_layout.shape()[1]);
        macro_rules! run {
            ($t:ty, $var:ident, $a:expr) => {{
                let (gc, bias, gr) = (
                    gc.map(|v| <$t>::slice(v, OP)).transpose()?,
                    bias.map(|v| <$t>::slice(v, OP)).transpose()?,
                    gr.map(|v| <$t>::slice(v, OP)).transpose()?,
                );
                let product = match gc {
                    Some(gc) => {
                        let mut a = contiguous($a, layout).into_owned();
                        a.par_chunks_mut(k.max(1)).for_each(|row| row.iter_mut().zip(gc).for_each(|(v, g)| *v *= *g));
                        CpuStorage::$var(a).matmul(&Layout::contiguous(layout.shape()), b, b_layout)?
                    }
                    None => self.matmul(layout, b, b_layout)?,
                };
                let CpuStorage::$var(mut c) = product else { unreachable!("the product keeps a's dtype") };
                if let Some(bias) = bias {
                    c.par_chunks_mut(n.max(1)).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += *b));
                }
                let pre = keep_pre.then(|| c.clone());
                if let Some(gr) = gr {
                    c.par_chunks_mut(n.max(1)).for_each(|row| row.iter_mut().zip(gr).for_each(|(v, g)| *v *= *g));
                }
                Ok((CpuStorage::$var(c), pre.map(CpuStorage::$var)))
            }};
        }
        match self {
            CpuStorage::F32(a) => run!(f32, F32, a),
            CpuStorage::F64(a) => run!(f64, F64, a),
            other => Err(Error::DType { op: OP, expected: "f32 or f64", got: other.dtype() }),
        }
    }

    /// The LoRA linear `(y, u)` on rank-2 operands of one dtype (see [`lora_kernel`]).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear(
        &self,
        layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        xd: &CpuStorage,
        xd_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
        scale: f64,
    ) -> Result<(CpuStorage, CpuStorage)> {
        const OP: &str = "lora_linear";
        if let (CpuStorage::F32(_), CpuStorage::Quant(_) | CpuStorage::F16(_) | CpuStorage::BF16(_)) = (self, w) {
            // A frozen weight kept as stored: `x wᵀ` through the decoding GEMM (`w` is W, or
            // Wᵀ in the `dx` of backward; either way `matmul` reads it as a view).
            let CpuStorage::F32(mut y) = self.matmul(layout, w, &w_layout.transpose(0, 1)?)? else {
                unreachable!("an f32 matmul gives f32")
            };
            let (xd, a, b) = (f32::slice(xd, OP)?, f32::slice(a, OP)?, f32::slice(b, OP)?);
            let u = lora_add(&mut y, xd, xd_layout, a, a_layout, b, b_layout, scale as f32);
            return Ok((CpuStorage::F32(y), CpuStorage::F32(u)));
        }
        macro_rules! run {
            ($t:ty, $var:ident, $x:expr) => {{
                let (w, xd) = (<$t>::slice(w, OP)?, <$t>::slice(xd, OP)?);
                let (a, b) = (<$t>::slice(a, OP)?, <$t>::slice(b, OP)?);
                let (y, u) = lora_kernel($x, layout, w, w_layout, xd, xd_layout, a, a_layout, b, b_layout, scale as $t);
                Ok((CpuStorage::$var(y), CpuStorage::$var(u)))
            }};
        }
        match self {
            CpuStorage::F32(x) => run!(f32, F32, x),
            CpuStorage::F64(x) => run!(f64, F64, x),
            other => Err(Error::DType { op: OP, expected: "f32 or f64", got: other.dtype() }),
        }
    }

    /// Fused attention forward (see [`attention`]): `(O, log-sum-exp)`.
    pub fn flash_attention(
        &self,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
        dims: attention::Dims,
        spec: &attention::AttnSpec,
    ) -> Result<(CpuStorage, CpuStorage)> {
        const OP: &str = "flash_attention";
        macro_rules! go {
            ($q:expr, $wrap:path) => {{
                let (k, v) = (FromStorage::slice(k, OP)?, FromStorage::slice(v, OP)?);
                let (o, l) = attention::forward(&contiguous($q, lq), &contiguous(k, lk), &contiguous(v, lv), dims, spec);
                Ok(($wrap(o), $wrap(l)))
            }};
        }
        match self {
            CpuStorage::F32(q) => go!(q, CpuStorage::F32),
            CpuStorage::F64(q) => go!(q, CpuStorage::F64),
            other => Err(Error::DType { op: OP, expected: "f32 or f64", got: other.dtype() }),
        }
    }

    /// Fused attention backward: `(dQ, dK, dV)`; `o`, `lse` and `go` are contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward(
        &self,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
        o: &CpuStorage,
        lse: &CpuStorage,
        go: &CpuStorage,
        lgo: &Layout,
        dims: attention::Dims,
        spec: &attention::AttnSpec,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        const OP: &str = "flash_attention_backward";
        macro_rules! go {
            ($q:expr, $wrap:path) => {{
                let (k, v) = (FromStorage::slice(k, OP)?, FromStorage::slice(v, OP)?);
                let (o, lse, g) = (FromStorage::slice(o, OP)?, FromStorage::slice(lse, OP)?, FromStorage::slice(go, OP)?);
                let (dq, dk, dv) = attention::backward(
                    &contiguous($q, lq),
                    &contiguous(k, lk),
                    &contiguous(v, lv),
                    o,
                    lse,
                    &contiguous(g, lgo),
                    dims,
                    spec,
                );
                Ok(($wrap(dq), $wrap(dk), $wrap(dv)))
            }};
        }
        match self {
            CpuStorage::F32(q) => go!(q, CpuStorage::F32),
            CpuStorage::F64(q) => go!(q, CpuStorage::F64),
            other => Err(Error::DType { op: OP, expected: "f32 or f64", got: other.dtype() }),
        }
    }

    pub fn softmax_last(&self, layout: &Layout, log: bool) -> Result<CpuStorage> {
        let d = *layout.shape().last().unwrap_or(&1);
        Ok(float_op!(self, "softmax", v => softmax_kernel(&contiguous(v, layout), d, log)))
    }

    pub fn norm_last(
        &self,
        layout: &Layout,
        w: Option<&CpuStorage>,
        b: Option<&CpuStorage>,
        eps: f64,
        rms: bool,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        let d = *layout.shape().last().unwrap_or(&1);
        macro_rules! go {
            ($v:expr, $wrap:path) => {{
                let w = w.map(|w| FromStorage::slice(w, "norm")).transpose()?;
                let b = b.map(|b| FromStorage::slice(b, "norm")).transpose()?;
                let (y, m, r) = norm_kernel(&contiguous($v, layout), d, w, b, eps, rms);
                Ok(($wrap(y), $wrap(m), $wrap(r)))
            }};
        }
        match self {
            CpuStorage::F32(v) => go!(v, CpuStorage::F32),
            CpuStorage::F64(v) => go!(v, CpuStorage::F64),
            other => Err(Error::DType { op: "norm", expected: "f32 or f64", got: other.dtype() }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn norm_last_backward(
        &self,
        layout: &Layout,
        w: Option<&CpuStorage>,
        g: &CpuStorage,
        gl: &Layout,
        mean: &CpuStorage,
        rstd: &CpuStorage,
        rms: bool,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        let d = *layout.shape().last().unwrap_or(&1);
        macro_rules! go {
            ($v:expr, $wrap:path) => {{
                let w = w.map(|w| FromStorage::slice(w, "norm_backward")).transpose()?;
                let g = FromStorage::slice(g, "norm_backward")?;
                let (m, r) = (FromStorage::slice(mean, "norm_backward")?, FromStorage::slice(rstd, "norm_backward")?);
                let (dx, dw, db) = norm_backward_kernel(&contiguous($v, layout), d, w, &contiguous(g, gl), m, r, rms);
                Ok(($wrap(dx), $wrap(dw), $wrap(db)))
            }};
        }
        match self {
            CpuStorage::F32(v) => go!(v, CpuStorage::F32),
            CpuStorage::F64(v) => go!(v, CpuStorage::F64),
            other => Err(Error::DType { op: "norm_backward", expected: "f32 or f64", got: other.dtype() }),
        }
    }

    pub fn index_select(&self, layout: &Layout, axis: usize, idx: &CpuStorage, il: &Layout) -> Result<CpuStorage> {
        let idx = checked_indices(&indices(idx, il, "index_select")?, layout.shape()[axis], "index_select")?;
        let shape = layout.shape();
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::F64(v) => CpuStorage::F64(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::F16(v) => CpuStorage::F16(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::BF16(v) => CpuStorage::BF16(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::U32(v) => CpuStorage::U32(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::I32(v) => CpuStorage::I32(index_select_kernel(&contiguous(v, layout), shape, axis, &idx)),
            CpuStorage::Quant(q) => {
                // An embedding lookup: decode only the rows asked for.
                if axis != 0 || !layout.is_contiguous() || layout.offset() != 0 || layout.rank() != 2 {
                    return Err(quant_view_error("index_select (rows of a quantised table only)", q, layout));
                }
                let cols = q.cols();
                let mut out = vec![0f32; idx.len() * cols];
                out.par_chunks_mut(cols.max(1)).zip(&idx).for_each(|(o, &r)| q.decode(r, 0, o));
                CpuStorage::F32(out)
            }
        })
    }

    pub fn index_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &CpuStorage, il: &Layout) -> Result<CpuStorage> {
        let idx = checked_indices(&indices(idx, il, "index_add")?, shape[axis], "index_add")?;
        Ok(float_op!(self, "index_add", v => index_add_kernel(&contiguous(v, layout), shape, axis, &idx)))
    }

    pub fn gather(&self, layout: &Layout, axis: usize, idx: &CpuStorage, il: &Layout) -> Result<CpuStorage> {
        let idx = checked_indices(&indices(idx, il, "gather")?, layout.shape()[axis], "gather")?;
        // Read x through a layout with idx's shape, x's strides and a zero stride on `axis`;
        // the index then adds `idx · stride[axis]`.
        let mut strides = layout.strides().to_vec();
        let stride = std::mem::replace(&mut strides[axis], 0);
        let base = Layout::new(il.shape().to_vec(), strides, layout.offset());
        Ok(float_op!(self, "gather", v => base.offsets().zip(&idx).map(|(o, &i)| v[o + i * stride]).collect()))
    }

    pub fn scatter_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &CpuStorage, il: &Layout) -> Result<CpuStorage> {
        let idx = checked_indices(&indices(idx, il, "scatter_add")?, shape[axis], "scatter_add")?;
        let mut strides = crate::layout::contiguous_strides(shape);
        let stride = std::mem::replace(&mut strides[axis], 0);
        let base = Layout::new(il.shape().to_vec(), strides, 0);
        let n: usize = shape.iter().product();
        Ok(float_op!(self, "scatter_add", v => {
            let mut out = vec![Float::ZERO; n];
            for ((o, &i), s) in base.offsets().zip(&idx).zip(layout.offsets()) {
                out[o + i * stride] += v[s];
            }
            out
        }))
    }

    pub fn concat(parts: &[(&CpuStorage, &Layout)], axis: usize) -> Result<CpuStorage> {
        fn go<T: Copy + Send + Sync + Default>(parts: &[(&[T], &Layout)], axis: usize) -> Vec<T> {
            let shape0 = parts[0].1.shape();
            let outer: usize = shape0[..axis].iter().product();
            let inner: usize = shape0[axis + 1..].iter().product();
            let total: usize = parts.iter().map(|(_, l)| l.shape()[axis]).sum();
            let mut out = vec![T::default(); outer * total * inner];
            let mut start = 0;
            for (data, l) in parts {
                let rows = l.shape()[axis] * inner;
                let src = contiguous(data, l);
                for b in 0..outer {
                    let dst = b * total * inner + start;
                    out[dst..dst + rows].copy_from_slice(&src[b * rows..(b + 1) * rows]);
                }
                start += rows;
            }
            out
        }
        macro_rules! arm {
            ($var:ident) => {{
                let typed: Result<Vec<(&[_], &Layout)>> = parts
                    .iter()
                    .map(|(s, l)| match s {
                        CpuStorage::$var(v) => Ok((v.as_slice(), *l)),
                        o => Err(Error::DTypeMismatch { op: "concat", lhs: parts[0].0.dtype(), rhs: o.dtype() }),
                    })
                    .collect();
                CpuStorage::$var(go(&typed?, axis))
            }};
        }
        Ok(match parts[0].0 {
            CpuStorage::F32(_) => arm!(F32),
            CpuStorage::F64(_) => arm!(F64),
            CpuStorage::F16(_) => arm!(F16),
            CpuStorage::BF16(_) => arm!(BF16),
            CpuStorage::U32(_) => arm!(U32),
            CpuStorage::I32(_) => arm!(I32),
            CpuStorage::Quant(q) => return Err(quant_view_error("concat", q, parts[0].1)),
        })
    }

    pub fn rope(&self, layout: &Layout, cos: &CpuStorage, sin: &CpuStorage, interleaved: bool, inverse: bool) -> Result<CpuStorage> {
        let r = layout.rank();
        let (seq, dim) = (layout.shape()[r - 2], layout.shape()[r - 1]);
        Ok(float_op!(self, "rope", v => {
            let (c, s) = (FromStorage::slice(cos, "rope")?, FromStorage::slice(sin, "rope")?);
            if layout.strides()[r - 1] == 1 || dim <= 1 {
                rope_kernel(v, &row_starts(layout), seq, dim, c, s, interleaved, inverse)
            } else {
                let x = contiguous(v, layout);
                let rows: Vec<usize> = (0..layout.numel() / dim.max(1)).map(|i| i * dim).collect();
                rope_kernel(&x, &rows, seq, dim, c, s, interleaved, inverse)
            }
        }))
    }

    pub fn cross_entropy(&self, layout: &Layout, targets: &CpuStorage, tl: &Layout, ignore: i64) -> Result<CpuStorage> {
        let c = layout.shape()[1];
        let t = indices(targets, tl, "cross_entropy")?;
        check_targets(&t, c, ignore)?;
        Ok(float_op!(self, "cross_entropy", v => cross_entropy_kernel(&contiguous(v, layout), c, &t, ignore)))
    }

    pub fn cross_entropy_backward(
        &self,
        layout: &Layout,
        targets: &CpuStorage,
        tl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        ignore: i64,
    ) -> Result<CpuStorage> {
        let c = layout.shape()[1];
        let t = indices(targets, tl, "cross_entropy")?;
        check_targets(&t, c, ignore)?;
        Ok(float_op!(self, "cross_entropy_backward", v => {
            let g = FromStorage::slice(g, "cross_entropy_backward")?;
            cross_entropy_backward_kernel(&contiguous(v, layout), c, &t, &contiguous(g, gl), ignore)
        }))
    }

    pub fn rand_uniform(dtype: DType, n: usize, seed: u64, offset: u64, lo: f64, hi: f64) -> Result<CpuStorage> {
        let f = |i| lo + (hi - lo) * rng::uniform_at(seed, offset, i) as f64;
        match dtype {
            DType::F32 => Ok(CpuStorage::F32(fill_with(n, f))),
            DType::F64 => Ok(CpuStorage::F64(fill_with(n, f))),
            DType::F16 => Ok(CpuStorage::F16(fill_with(n, f))),
            DType::BF16 => Ok(CpuStorage::BF16(fill_with(n, f))),
            d => Err(Error::DType { op: "rand_uniform", expected: "a float dtype", got: d }),
        }
    }

    pub fn rand_normal(dtype: DType, n: usize, seed: u64, offset: u64, mean: f64, std: f64) -> Result<CpuStorage> {
        let f = |i| mean + std * rng::normal_at(seed, offset, i);
        match dtype {
            DType::F32 => Ok(CpuStorage::F32(fill_with(n, f))),
            DType::F64 => Ok(CpuStorage::F64(fill_with(n, f))),
            DType::F16 => Ok(CpuStorage::F16(fill_with(n, f))),
            DType::BF16 => Ok(CpuStorage::BF16(fill_with(n, f))),
            d => Err(Error::DType { op: "rand_normal", expected: "a float dtype", got: d }),
        }
    }
}
