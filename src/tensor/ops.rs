//! Element-wise ops, reductions and matmul, each with its backward rule written in tensor ops.

use super::Tensor;
use crate::backend::{BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{broadcast_shapes, resolve_axis};

/// Compute ops take f32 or f64.
pub(crate) fn check_compute(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_compute() {
        Ok(())
    } else {
        Err(Error::DType { op, expected: "f32 or f64 (convert storage dtypes with to_dtype)", got: t.dtype() })
    }
}

pub(crate) fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    check_compute(op, a)?;
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, lhs: a.device().to_string(), rhs: b.device().to_string() });
    }
    Ok(())
}

/// `Some(f())` when `needed`, without running `f` otherwise.
fn when(needed: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if needed {
        f().map(Some)
    } else {
        Ok(None)
    }
}

macro_rules! unary_ops {
    ($($(#[$doc:meta])* $name:ident => $op:expr, |$x:ident, $y:ident, $g:ident| $grad:expr;)*) => {
        impl Tensor {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> Result<Tensor> {
                    self.unary_with(stringify!($name), $op, |$x: &Tensor, $y: &Tensor, $g: &Tensor| $grad)
                }
            )*
        }
    };
}

unary_ops! {
    /// `−x`
    neg => UnaryOp::Neg, |_x, _y, g| g.neg();
    /// `eˣ`
    exp => UnaryOp::Exp, |_x, y, g| g.mul(y);
    /// natural logarithm
    log => UnaryOp::Log, |x, _y, g| g.div(x);
    /// `√x`
    sqrt => UnaryOp::Sqrt, |_x, y, g| g.mul(&y.recip()?)?.affine(0.5, 0.0);
    /// `1/√x`; `d/dx = −½ y³`
    rsqrt => UnaryOp::Rsqrt, |_x, y, g| g.mul(&y.powf(3.0)?)?.affine(-0.5, 0.0);
    /// `1/x`; `d/dx = −y²`
    recip => UnaryOp::Recip, |_x, y, g| g.mul(&y.sqr()?)?.neg();
    /// `x²`
    sqr => UnaryOp::Sqr, |x, _y, g| g.mul(x)?.affine(2.0, 0.0);
    /// `|x|`; gradient `sign(x)`
    abs => UnaryOp::Abs, |x, _y, g| g.mul(&x.sign()?);
    /// −1, 0 or 1; gradient 0
    sign => UnaryOp::Sign, |_x, _y, g| g.zeros_like();
    /// `tanh x`; `d/dx = 1 − y²`
    tanh => UnaryOp::Tanh, |_x, y, g| g.mul(&y.sqr()?.affine(-1.0, 1.0)?);
    /// `σ(x) = 1/(1+e⁻ˣ)`; `d/dx = y(1−y)`
    sigmoid => UnaryOp::Sigmoid, |_x, y, g| g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?);
    /// error function; `d/dx = 2/√π e^{−x²}`
    erf => UnaryOp::Erf, |x, _y, g| g.mul(&x.sqr()?.neg()?.exp()?.affine(2.0 / std::f64::consts::PI.sqrt(), 0.0)?);
    /// `max(x, 0)`; gradient 1 where x > 0
    relu => UnaryOp::Relu, |x, _y, g| g.mul(&x.gt_scalar(0.0)?);
    /// exact GELU `x Φ(x)`; `d/dx = Φ(x) + x φ(x)`
    gelu => UnaryOp::GeluErf, |x, _y, g| {
        let cdf = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()?.affine(0.5, 0.5)?;
        let pdf = x.sqr()?.affine(-0.5, 0.0)?.exp()?.affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        g.mul(&cdf.add(&x.mul(&pdf)?)?)
    };
    /// GELU with the tanh approximation (GPT-2): `½x(1 + tanh(k(x + 0.044715x³)))`, `k = √(2/π)`
    gelu_tanh => UnaryOp::GeluTanh, |x, _y, g| {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let x2 = x.sqr()?;
        let t = x.mul(&x2.affine(0.044715, 1.0)?)?.affine(k, 0.0)?.tanh()?;
        let du = x2.affine(3.0 * 0.044715 * k, k)?;
        let d = t.affine(0.5, 0.5)?.add(&x.mul(&t.sqr()?.affine(-1.0, 1.0)?)?.mul(&du)?.affine(0.5, 0.0)?)?;
        g.mul(&d)
    };
    /// SiLU / swish `x σ(x)`; `d/dx = σ(x)(1 + x(1 − σ(x)))`
    silu => UnaryOp::Silu, |x, _y, g| x.silu_backward(g);
}

impl Tensor {
    fn unary_with(
        &self,
        name: &'static str,
        op: UnaryOp,
        grad: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Result<Tensor> {
        check_compute(name, self)?;
        let out = std::sync::Arc::new(self.storage_arc().unary(op, self.layout())?);
        // Some rules need the output: keep a graph-free handle on the same storage (no cycle).
        let y = Tensor::leaf_shared(out.clone(), self.shape());
        let x = self.detach();
        Ok(Tensor::from_op_shared(out, self.shape(), name, &[self], move |g| Ok(vec![Some(grad(&x, &y, g)?)])))
    }

    /// `xᵖ` for a scalar exponent; `d/dx = p xᵖ⁻¹`.
    pub fn powf(&self, p: f64) -> Result<Tensor> {
        self.unary_with("powf", UnaryOp::Powf(p), move |x, _y, g| g.mul(&x.powf(p - 1.0)?.affine(p, 0.0)?))
    }

    /// `a·x + b` for scalars a, b.
    pub fn affine(&self, a: f64, b: f64) -> Result<Tensor> {
        self.unary_with("affine", UnaryOp::Affine(a, b), move |_x, _y, g| g.affine(a, 0.0))
    }

    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0, v)
    }

    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(v, 0.0)
    }

    /// Clamp into `[lo, hi]`; the gradient is zero outside the range.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Tensor> {
        if lo > hi || lo.is_nan() || hi.is_nan() {
            return Err(Error::InvalidArgument { op: "clamp", msg: format!("lo {lo} must not exceed hi {hi}") });
        }
        self.unary_with("clamp", UnaryOp::Clamp(lo, hi), move |x, _y, g| g.mul(&x.ge_scalar(lo)?.mul(&x.le_scalar(hi)?)?))
    }

    fn cmp_scalar(&self, op: CmpOp, v: f64) -> Result<Tensor> {
        check_compute("compare", self)?;
        let out = self.storage_arc().unary(UnaryOp::Cmp(op, v), self.layout())?;
        Ok(Tensor::from_storage(out, self.shape()))
    }

    /// 1.0 where `x > v`, else 0.0 (no gradient).
    pub fn gt_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Gt, v)
    }
    pub fn ge_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Ge, v)
    }
    pub fn lt_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Lt, v)
    }
    pub fn le_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Le, v)
    }
    pub fn eq_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Eq, v)
    }
    pub fn ne_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(CmpOp::Ne, v)
    }

    // ----- binary, broadcasting -----------------------------------------------------------

    /// Broadcast both operands to a common shape, run `op`, and record `grad`, whose two
    /// results are summed back to each operand's own shape.
    fn binary_with(
        &self,
        rhs: &Tensor,
        name: &'static str,
        op: BinaryOp,
        grad: impl Fn(&Tensor, &Tensor, &Tensor, [bool; 2]) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
    ) -> Result<Tensor> {
        check_same(name, self, rhs)?;
        let shape = broadcast_shapes(name, self.shape(), rhs.shape())?;
        let (la, lb) = (self.layout().broadcast_to(&shape)?, rhs.layout().broadcast_to(&shape)?);
        let out = self.storage_arc().binary(op, &la, &rhs.storage_arc(), &lb)?;
        let (a, b) = (self.detach(), rhs.detach());
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        let (ra, rb) = (self.requires_grad_flag(), rhs.requires_grad_flag());
        Ok(Tensor::from_op(out, &shape, name, &[self, rhs], move |g| {
            // Only the operands that require a gradient get one computed.
            let (ga, gb) = grad(&a, &b, g, [ra, rb])?;
            let ga = match ga {
                Some(t) if ra => Some(t.sum_to_shape(&sa)?),
                _ => None,
            };
            let gb = match gb {
                Some(t) if rb => Some(t.sum_to_shape(&sb)?),
                _ => None,
            };
            Ok(vec![ga, gb])
        }))
    }

    /// `a + b` with broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "add", BinaryOp::Add, |_, _, g, n| Ok((n[0].then(|| g.clone()), n[1].then(|| g.clone()))))
    }

    /// `a − b` with broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "sub", BinaryOp::Sub, |_, _, g, n| Ok((n[0].then(|| g.clone()), when(n[1], || g.neg())?)))
    }

    /// `a ⊙ b` with broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "mul", BinaryOp::Mul, |a, b, g, n| Ok((when(n[0], || g.mul(b))?, when(n[1], || g.mul(a))?)))
    }

    /// `a / b` with broadcasting; `∂/∂b = −a/b²`.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "div", BinaryOp::Div, |a, b, g, n| {
            Ok((when(n[0], || g.div(b))?, when(n[1], || g.mul(a)?.div(&b.sqr()?)?.neg())?))
        })
    }

    /// Element-wise maximum; on ties the gradient is split evenly.
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "maximum", BinaryOp::Max, |a, b, g, n| {
            let wa = a.cmp(b, CmpOp::Gt)?.add(&a.cmp(b, CmpOp::Eq)?.affine(0.5, 0.0)?)?;
            Ok((when(n[0], || g.mul(&wa))?, when(n[1], || g.mul(&wa.affine(-1.0, 1.0)?))?))
        })
    }

    /// Element-wise minimum; on ties the gradient is split evenly.
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_with(rhs, "minimum", BinaryOp::Min, |a, b, g, n| {
            let wa = a.cmp(b, CmpOp::Lt)?.add(&a.cmp(b, CmpOp::Eq)?.affine(0.5, 0.0)?)?;
            Ok((when(n[0], || g.mul(&wa))?, when(n[1], || g.mul(&wa.affine(-1.0, 1.0)?))?))
        })
    }

    /// SiLU's backward in one pass: `g · σ(x)(1 + x(1 − σ(x)))` for `self` = `x` and the
    /// gradient `g` of `silu(x)` (same shape). Not differentiable itself (backward runs
    /// without a graph).
    pub fn silu_backward(&self, g: &Tensor) -> Result<Tensor> {
        check_same("silu_backward", self, g)?;
        if self.shape() != g.shape() {
            return Err(Error::Shape { op: "silu_backward", msg: format!("x {:?} and g {:?} differ", self.shape(), g.shape()) });
        }
        let out = self.storage_arc().binary(BinaryOp::SiluBackward, self.layout(), &g.storage_arc(), g.layout())?;
        Ok(Tensor::from_storage(out, self.shape()))
    }

    /// Element-wise comparison with broadcasting: 1.0 where it holds, else 0.0 (no gradient).
    pub fn cmp(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        check_same("compare", self, rhs)?;
        let shape = broadcast_shapes("compare", self.shape(), rhs.shape())?;
        let (la, lb) = (self.layout().broadcast_to(&shape)?, rhs.layout().broadcast_to(&shape)?);
        Ok(Tensor::from_storage(self.storage_arc().binary(BinaryOp::Cmp(op), &la, &rhs.storage_arc(), &lb)?, &shape))
    }

    /// `cond ? on_true : on_false`, all three broadcast together; `cond` is non-zero for true
    /// (any dtype).
    pub fn where_cond(cond: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        check_same("where", on_true, on_false)?;
        let shape = broadcast_shapes("where", &broadcast_shapes("where", cond.shape(), on_true.shape())?, on_false.shape())?;
        let lc = cond.layout().broadcast_to(&shape)?;
        let (lt, lf) = (on_true.layout().broadcast_to(&shape)?, on_false.layout().broadcast_to(&shape)?);
        let out = cond.storage_arc().where_cond(&lc, &on_true.storage_arc(), &lt, &on_false.storage_arc(), &lf)?;
        let c = cond.detach();
        let (st, sf) = (on_true.shape().to_vec(), on_false.shape().to_vec());
        Ok(Tensor::from_op(out, &shape, "where", &[on_true, on_false], move |g| {
            let z = g.zeros_like()?;
            Ok(vec![Some(Tensor::where_cond(&c, g, &z)?.sum_to_shape(&st)?), Some(Tensor::where_cond(&c, &z, g)?.sum_to_shape(&sf)?)])
        }))
    }

    /// `value` where `mask` is non-zero, `self` elsewhere (mask broadcasts).
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        let fill = Tensor::full(&[], value, self.dtype(), self.device())?;
        let out = Tensor::where_cond(mask, &fill, self)?;
        if out.shape() != self.shape() {
            return Err(Error::ShapeMismatch { op: "masked_fill", lhs: self.shape().to_vec(), rhs: mask.shape().to_vec() });
        }
        Ok(out)
    }

    // ----- reductions ---------------------------------------------------------------------

    fn resolve_axes(&self, op: &'static str, axes: &[isize]) -> Result<Vec<usize>> {
        let mut out: Vec<usize> = axes.iter().map(|&a| resolve_axis(op, a, self.shape())).collect::<Result<_>>()?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn kept_shape(&self, axes: &[usize]) -> Vec<usize> {
        self.shape().iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
    }

    /// Sum over `axes` (empty = no axes); `keepdim` keeps them as size 1.
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        check_compute("sum", self)?;
        let axes = self.resolve_axes("sum", axes)?;
        let kept = self.kept_shape(&axes);
        let mut storage: Option<std::sync::Arc<crate::backend::Storage>> = None;
        let mut layout = self.layout().clone();
        // Reduce the highest axis first so the lower axis indices stay valid.
        for &ax in axes.iter().rev() {
            let src = storage.as_ref().map_or_else(|| self.storage_arc(), |s| s.clone());
            let out = src.reduce(ReduceOp::Sum, &layout, ax)?;
            let mut shape = layout.shape().to_vec();
            shape.remove(ax);
            layout = crate::layout::Layout::contiguous(&shape);
            storage = Some(std::sync::Arc::new(out));
        }
        let out_shape = if keepdim { kept.clone() } else { layout.shape().to_vec() };
        let storage = match storage {
            Some(s) => std::sync::Arc::try_unwrap(s).unwrap_or_else(|_| unreachable!("sole owner")),
            None => return Ok(self.clone()),
        };
        let src = self.shape().to_vec();
        Ok(Tensor::from_op(storage, &out_shape, "sum", &[self], move |g| {
            Ok(vec![Some(g.reshape_to(&kept)?.broadcast_to(&src)?.contiguous()?)])
        }))
    }

    /// Sum of all elements (a scalar).
    pub fn sum_all(&self) -> Result<Tensor> {
        let axes: Vec<isize> = (0..self.rank() as isize).collect();
        self.sum(&axes, false)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let ax = self.resolve_axes("mean", axes)?;
        let n: usize = ax.iter().map(|&a| self.shape()[a]).product();
        self.sum(axes, keepdim)?.affine(1.0 / n as f64, 0.0)
    }

    /// Mean of all elements (a scalar).
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.numel();
        self.sum_all()?.affine(1.0 / n as f64, 0.0)
    }

    fn extreme(&self, axis: isize, keepdim: bool, op: ReduceOp, name: &'static str) -> Result<Tensor> {
        check_compute(name, self)?;
        let ax = resolve_axis(name, axis, self.shape())?;
        if self.shape()[ax] == 0 {
            return Err(Error::Shape { op: name, msg: format!("cannot reduce empty axis {ax} of shape {:?}", self.shape()) });
        }
        let out = std::sync::Arc::new(self.storage_arc().reduce(op, self.layout(), ax)?);
        let kept = self.kept_shape(&[ax]);
        let out_shape = if keepdim { kept.clone() } else { self.layout().without_axis(ax).shape().to_vec() };
        let x = self.detach();
        let y = Tensor::leaf_shared(out.clone(), &kept);
        Ok(Tensor::from_op_shared(out, &out_shape, name, &[self], move |g| {
            // The gradient goes to the positions that attain the extreme, split among ties.
            let hit = x.cmp(&y, CmpOp::Eq)?;
            let count = hit.sum(&[ax as isize], true)?;
            Ok(vec![Some(hit.div(&count)?.mul(&g.reshape_to(&kept)?)?)])
        }))
    }

    /// Maximum along `axis`.
    pub fn max(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.extreme(axis, keepdim, ReduceOp::Max, "max")
    }

    /// Minimum along `axis`.
    pub fn min(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.extreme(axis, keepdim, ReduceOp::Min, "min")
    }

    fn arg_extreme(&self, axis: isize, keepdim: bool, op: ReduceOp, name: &'static str) -> Result<Tensor> {
        check_compute(name, self)?;
        let ax = resolve_axis(name, axis, self.shape())?;
        if self.shape()[ax] == 0 {
            return Err(Error::Shape { op: name, msg: format!("cannot reduce empty axis {ax} of shape {:?}", self.shape()) });
        }
        let out = self.storage_arc().reduce(op, self.layout(), ax)?;
        let shape = if keepdim { self.kept_shape(&[ax]) } else { self.layout().without_axis(ax).shape().to_vec() };
        Ok(Tensor::from_storage(out, &shape))
    }

    /// Index of the (first) maximum along `axis`, as U32 (no gradient).
    pub fn argmax(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme(axis, keepdim, ReduceOp::ArgMax, "argmax")
    }

    /// Index of the (first) minimum along `axis`, as U32 (no gradient).
    pub fn argmin(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme(axis, keepdim, ReduceOp::ArgMin, "argmin")
    }

    // ----- matmul -------------------------------------------------------------------------

    /// Matrix product `[.., m, k] · [.., k, n] → [.., m, n]`. Batch dims broadcast; a 1-d
    /// operand is a vector (as in NumPy). Transposed views are read in place, without a copy.
    ///
    /// An f32 left operand may meet a frozen right operand kept as stored: f16/bf16, or (on the
    /// CPU) a quantised matrix `W` or `Wᵀ`. The kernels read those values directly — the GPU
    /// kernel loads half precision, the CPU GEMM decodes rows of W into its packing buffer —
    /// and accumulate in f32; no f32 copy of the weight is made. The result is f32.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let frozen_rhs = self.dtype() == DType::F32 && matches!(rhs.dtype(), DType::F16 | DType::BF16 | DType::Quant(_));
        if frozen_rhs {
            check_compute("matmul", self)?;
            if self.device() != rhs.device() {
                return Err(Error::DeviceMismatch { op: "matmul", lhs: self.device().to_string(), rhs: rhs.device().to_string() });
            }
        } else {
            check_same("matmul", self, rhs)?;
        }
        if self.rank() == 0 || rhs.rank() == 0 {
            return Err(Error::Shape {
                op: "matmul",
                msg: format!("needs operands of rank ≥ 1, got {:?} and {:?}", self.shape(), rhs.shape()),
            });
        }
        if self.rank() == 1 {
            return self.unsqueeze(0)?.matmul(rhs)?.squeeze(-2);
        }
        if rhs.rank() == 1 {
            return self.matmul(&rhs.unsqueeze(-1)?)?.squeeze(-1);
        }
        let (ra, rb) = (self.rank(), rhs.rank());
        let (m, k, k2, n) = (self.shape()[ra - 2], self.shape()[ra - 1], rhs.shape()[rb - 2], rhs.shape()[rb - 1]);
        if k != k2 {
            return Err(Error::ShapeMismatch { op: "matmul", lhs: self.shape().to_vec(), rhs: rhs.shape().to_vec() });
        }
        let batch = broadcast_shapes("matmul", &self.shape()[..ra - 2], &rhs.shape()[..rb - 2])?;
        let full_a: Vec<usize> = batch.iter().copied().chain([m, k]).collect();
        let full_b: Vec<usize> = batch.iter().copied().chain([k, n]).collect();
        let (la, lb) = (self.layout().broadcast_to(&full_a)?, rhs.layout().broadcast_to(&full_b)?);
        let out = self.storage_arc().matmul(&la, &rhs.storage_arc(), &lb)?;
        let out_shape: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
        let (a, b) = (self.detach(), rhs.detach());
        let (need_a, need_b) = (self.requires_grad_flag(), rhs.requires_grad_flag());
        Ok(Tensor::from_op(out, &out_shape, "matmul", &[self, rhs], move |g| {
            // dA = g · Bᵀ, dB = Aᵀ · g, summed over broadcast batch dims.
            let ga = if need_a { Some(g.matmul(&b.t()?)?.sum_to_shape(a.shape())?) } else { None };
            let gb = if need_b { Some(a.t()?.matmul(g)?.sum_to_shape(b.shape())?) } else { None };
            Ok(vec![ga, gb])
        }))
    }

    /// Cast helper for tests and losses: a new f32 tensor.
    pub fn to_f32(&self) -> Result<Tensor> {
        self.to_dtype(DType::F32)
    }
}
