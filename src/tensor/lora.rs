//! The LoRA linear map as one op (Hu et al. 2021; METHODS.md, "LoRA"):
//!
//! `y = x W0ᵀ + s · (xd Aᵀ) Bᵀ`, with `x [.., in]`, `xd [.., in]` the input of the low-rank
//! path (dropout applied; `x` itself without dropout), `W0 [out, in]` frozen, `A [r, in]`,
//! `B [out, r]`, `s` a scalar. The bias is not part of the op.
//!
//! One autograd node, whose backward computes only what its inputs need, and never `dW0`:
//! - `dx  = g W0`,  `dxd = s (g B) A`; when `x` and `xd` are the same tensor their sum
//!   `g W0 + s (g B) A` is computed at once (on the GPU one fused kernel over the
//!   concatenated shared dimension `[g | s·g B] · [W0 ; A]`);
//! - `dA = s (g B)ᵀ xd`,  `dB = s gᵀ (xd Aᵀ)`, with `xd Aᵀ` kept from the forward.
//!
//! [`Tensor::lora_linear_reference`] is the same map as a composition of plain ops (matmuls,
//! a scale, an add): the reference the fused kernel is tested against, and the path taken when
//! `W0` itself requires a gradient (full fine-tuning with LoRA on top).

use super::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};

const OP: &str = "lora_linear";

/// Sizes of one LoRA linear: leading axes of x, rows n (their product), in, out, rank.
struct Dims {
    lead: Vec<usize>,
    n: usize,
    k: usize,
    m: usize,
    r: usize,
}

/// Shapes, dtypes, devices and the scale of a LoRA linear; errors name every operand's shape.
fn check(x: &Tensor, xd: &Tensor, w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Dims> {
    let shapes = || format!("x {:?}, xd {:?}, w0 {:?}, a {:?}, b {:?}", x.shape(), xd.shape(), w0.shape(), a.shape(), b.shape());
    let bad = |why: &str| Error::Shape { op: OP, msg: format!("{why} (got {})", shapes()) };
    if x.rank() == 0 {
        return Err(bad("x must have at least one axis, the input features"));
    }
    if xd.shape() != x.shape() {
        return Err(bad("xd must have x's shape"));
    }
    if w0.rank() != 2 || a.rank() != 2 || b.rank() != 2 {
        return Err(bad("w0 [out, in], a [r, in] and b [out, r] must be matrices"));
    }
    let k = x.shape()[x.rank() - 1];
    let (m, r) = (w0.shape()[0], a.shape()[0]);
    if w0.shape()[1] != k {
        return Err(bad("w0 must be [out, in] with in = the last axis of x"));
    }
    if a.shape()[1] != k {
        return Err(bad("a must be [r, in] with in = the last axis of x"));
    }
    if b.shape() != [m, r] {
        return Err(bad("b must be [out, r] with out = rows of w0 and r = rows of a"));
    }
    if !x.dtype().is_compute() {
        return Err(Error::DType { op: OP, expected: "f32 or f64 input", got: x.dtype() });
    }
    for t in [xd, a, b] {
        if t.dtype() != x.dtype() {
            return Err(Error::DTypeMismatch { op: OP, lhs: x.dtype(), rhs: t.dtype() });
        }
    }
    let half_w0 = x.dtype() == DType::F32 && matches!(w0.dtype(), DType::F16 | DType::BF16 | DType::Quant(_));
    if w0.dtype() != x.dtype() && !half_w0 {
        return Err(Error::DTypeMismatch { op: OP, lhs: x.dtype(), rhs: w0.dtype() });
    }
    for t in [xd, w0, a, b] {
        if t.device() != x.device() {
            return Err(Error::DeviceMismatch { op: OP, lhs: x.device().to_string(), rhs: t.device().to_string() });
        }
    }
    if !scale.is_finite() {
        return Err(Error::InvalidArgument { op: OP, msg: format!("the scale must be finite, got {scale}") });
    }
    let lead = x.shape()[..x.rank() - 1].to_vec();
    Ok(Dims { n: lead.iter().product(), lead, k, m, r })
}

/// `Some(f())` when `needed`.
fn when(needed: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    needed.then(f).transpose()
}

impl Tensor {
    /// The LoRA linear `y = x W0ᵀ + s·(xd Aᵀ) Bᵀ` as one op (see the module docs), `self` = `x`
    /// of shape `[.., in]` (leading axes are rows), `xd` of `x`'s shape (pass `x` itself when
    /// there is no dropout), `w0 [out, in]` (f32, or f16/bf16 storage with f32 inputs),
    /// `a [r, in]`, `b [out, r]`. Returns `[.., out]`.
    ///
    /// Gradients go to `x`, `xd`, `a` and `b` as far as they require them; `w0` gets none
    /// unless it requires one, in which case the op is [`Tensor::lora_linear_reference`].
    pub fn lora_linear(&self, xd: &Tensor, w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
        let Dims { lead, n, k, m, r } = check(self, xd, w0, a, b, scale)?;
        if w0.requires_grad_flag() {
            return self.lora_linear_reference(xd, w0, a, b, scale);
        }
        // x and xd the same tensor: one input gradient `g W0 + s (g B) A`, fused.
        let same = self.id() == xd.id();
        let x = self.reshape_to(&[n, k])?;
        let xd = if same { x.clone() } else { xd.reshape_to(&[n, k])? };
        let (y, u) = x.storage_arc().lora_linear(
            x.layout(),
            &w0.storage_arc(),
            w0.layout(),
            &xd.storage_arc(),
            xd.layout(),
            &a.storage_arc(),
            a.layout(),
            &b.storage_arc(),
            b.layout(),
            scale,
        )?;
        let (need_x, need_xd) = (x.requires_grad_flag(), !same && xd.requires_grad_flag());
        let (need_a, need_b) = (a.requires_grad_flag(), b.requires_grad_flag());
        let (w0d, ad, bd) = (w0.detach(), a.detach(), b.detach());
        let xd_saved = need_a.then(|| xd.detach());
        let u_saved = need_b.then(|| Tensor::from_storage(u, &[n, r]));
        let out = Tensor::from_op(y, &[n, m], OP, &[&x, &xd, w0, a, b], move |g| {
            let (gx, gb) = if same && need_x {
                // dx + dxd = g W0 + s (g B) A: the forward primitive on g with W0ᵀ, Bᵀ, Aᵀ.
                let (dx, g_b) = g.storage_arc().lora_linear(
                    g.layout(),
                    &w0d.storage_arc(),
                    &w0d.layout().transpose(0, 1)?,
                    &g.storage_arc(),
                    g.layout(),
                    &bd.storage_arc(),
                    &bd.layout().transpose(0, 1)?,
                    &ad.storage_arc(),
                    &ad.layout().transpose(0, 1)?,
                    scale,
                )?;
                (Some(Tensor::from_storage(dx, &[n, k])), Some(Tensor::from_storage(g_b, &[n, r])))
            } else {
                (when(need_x, || g.matmul(&w0d))?, when(need_xd || need_a, || g.matmul(&bd))?)
            };
            // s (g B): [n, r], small; the scale is applied here rather than to the big results.
            let gbs = gb.filter(|_| need_xd || need_a).map(|t| t.affine(scale, 0.0)).transpose()?;
            let gxd = match &gbs {
                Some(t) if need_xd => Some(t.matmul(&ad)?),
                _ => None,
            };
            let ga = match (&gbs, &xd_saved) {
                (Some(t), Some(xd)) => Some(t.t()?.matmul(xd)?),
                _ => None,
            };
            let gbw = match &u_saved {
                Some(u) => Some(g.t()?.matmul(&u.affine(scale, 0.0)?)?),
                None => None,
            };
            Ok(vec![gx, gxd, None, ga, gbw])
        });
        let mut shape = lead;
        shape.push(m);
        out.reshape_to(&shape)
    }

    /// The LoRA linear as the plain composition `x W0ᵀ + ((xd Aᵀ) Bᵀ)·s` of matmuls, a scale
    /// and an add, on any device, with each op's own backward (so `w0` gets a gradient when
    /// it requires one). Same arguments and checks as [`Tensor::lora_linear`].
    pub fn lora_linear_reference(&self, xd: &Tensor, w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
        check(self, xd, w0, a, b, scale)?;
        let base = self.matmul(&w0.t()?)?;
        let low = xd.matmul(&a.t()?)?.matmul(&b.t()?)?.mul_scalar(scale)?;
        base.add(&low)
    }
}
