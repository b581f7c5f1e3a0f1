//! FineGates' gated linear as one op (Svirsky et al.; METHODS.md, "FineGates"):
//!
//! `y = ((x ⊙ z_c) Wᵀ + b) ⊙ z_r`, with `x [.., in]`, `W [out, in]` frozen, `b [out]`, the
//! column gates `z_c [in]` and the row gates `z_r [out]`, each of `b`, `z_c`, `z_r` optional.
//! The forward is one gated product ([`crate::backend::Storage::gated_matmul`]: on the GPU one
//! kernel with the column gates in its prologue and the bias and row gates in its epilogue).
//!
//! One autograd node; with `g = dL/dy`, `pre = (x ⊙ z_c) Wᵀ + b` (kept from the forward only
//! when `z_r` needs a gradient) and `u = (g ⊙ z_r) W` (the same gated product on `g`):
//! - `dx = u ⊙ z_c` — when `z_c` needs no gradient, `dx` is that product with `z_c` in its
//!   epilogue, one kernel; otherwise `u` is made once and serves `dx` and `dz_c`;
//! - `dz_c = Σ_rows x ⊙ u`,  `dz_r = Σ_rows g ⊙ pre`,  `db = z_r ⊙ Σ_rows g`.
//!
//! `dW` is never computed: a `W` that requires a gradient takes
//! [`Tensor::gated_linear_reference`], the composition of plain ops that the fused op is
//! tested against.

use super::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};

const OP: &str = "gated_linear";

/// Shapes, dtypes and devices of a gated linear; errors name every operand's shape.
fn check(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, zc: Option<&Tensor>, zr: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let opt = |t: Option<&Tensor>| t.map_or("none".to_string(), |t| format!("{:?}", t.shape()));
    let shapes = || format!("x {:?}, w {:?}, bias {}, z_c {}, z_r {}", x.shape(), w.shape(), opt(bias), opt(zc), opt(zr));
    let bad = |why: &str| Error::Shape { op: OP, msg: format!("{why} (got {})", shapes()) };
    if x.rank() == 0 {
        return Err(bad("x must have at least one axis, the input features"));
    }
    if w.rank() != 2 {
        return Err(bad("w must be a matrix [out, in]"));
    }
    let k = x.shape()[x.rank() - 1];
    let m = w.shape()[0];
    if w.shape()[1] != k {
        return Err(bad("w must be [out, in] with in = the last axis of x"));
    }
    for (t, len, what) in [(bias, m, "bias must be [out]"), (zc, k, "z_c must be [in]"), (zr, m, "z_r must be [out]")] {
        if t.is_some_and(|t| t.shape() != [len]) {
            return Err(bad(what));
        }
    }
    if !x.dtype().is_compute() {
        return Err(Error::DType { op: OP, expected: "f32 or f64 input", got: x.dtype() });
    }
    for t in [bias, zc, zr].into_iter().flatten() {
        if t.dtype() != x.dtype() {
            return Err(Error::DTypeMismatch { op: OP, lhs: x.dtype(), rhs: t.dtype() });
        }
    }
    let stored_w = x.dtype() == DType::F32 && matches!(w.dtype(), DType::F16 | DType::BF16 | DType::Quant(_));
    if w.dtype() != x.dtype() && !stored_w {
        return Err(Error::DTypeMismatch { op: OP, lhs: x.dtype(), rhs: w.dtype() });
    }
    for t in [Some(w), bias, zc, zr].into_iter().flatten() {
        if t.device() != x.device() {
            return Err(Error::DeviceMismatch { op: OP, lhs: x.device().to_string(), rhs: t.device().to_string() });
        }
    }
    Ok((x.numel() / k.max(1), k, m))
}

impl Tensor {
    /// The gated linear `((x ⊙ z_c) Wᵀ + b) ⊙ z_r` as one op (see the module docs), `self` =
    /// `x [.., in]`, `w [out, in]` (f32, or f16/bf16/quantised storage with f32 inputs),
    /// `bias [out]`, `zc [in]`, `zr [out]`, each optional. Returns `[.., out]`.
    ///
    /// Gradients go to `x`, `bias`, `zc` and `zr` as far as they require them; `w` gets none
    /// unless it requires one, in which case the op is [`Tensor::gated_linear_reference`].
    pub fn gated_linear(&self, w: &Tensor, bias: Option<&Tensor>, zc: Option<&Tensor>, zr: Option<&Tensor>) -> Result<Tensor> {
        let (n, k, m) = check(self, w, bias, zc, zr)?;
        if w.requires_grad_flag() {
            return self.gated_linear_reference(w, bias, zc, zr);
        }
        let x = self.reshape_to(&[n, k])?;
        // The kernels read the vectors as plain slices from their buffers' start.
        let compact = |t: Option<&Tensor>| t.map(Tensor::compact).transpose();
        let (bias, zc, zr) = (compact(bias)?, compact(zc)?, compact(zr)?);
        let (need_x, need_zc) = (x.requires_grad_flag(), zc.as_ref().is_some_and(Tensor::requires_grad_flag));
        let need_zr = zr.as_ref().is_some_and(Tensor::requires_grad_flag);
        let need_b = bias.as_ref().is_some_and(Tensor::requires_grad_flag);
        let storage = |t: &Option<Tensor>| t.as_ref().map(Tensor::storage_arc);
        let (sb, sc, sr) = (storage(&bias), storage(&zc), storage(&zr));
        let (y, pre) = x.storage_arc().gated_matmul(
            x.layout(),
            &w.storage_arc(),
            &w.layout().transpose(0, 1)?,
            sc.as_deref(),
            sb.as_deref(),
            sr.as_deref(),
            need_zr,
        )?;
        let pre = pre.map(|p| Tensor::from_storage(p, &[n, m]));
        let wd = w.detach();
        let (zcd, zrd) = (zc.as_ref().map(Tensor::detach), zr.as_ref().map(Tensor::detach));
        let x_saved = need_zc.then(|| x.detach());
        let mut inputs = vec![&x, w];
        inputs.extend([bias.as_ref(), zc.as_ref(), zr.as_ref()].into_iter().flatten());
        let slots = (bias.is_some(), zc.is_some(), zr.is_some());
        let out = Tensor::from_op(y, &[n, m], OP, &inputs, move |g| {
            let (zcs, zrs) = (zcd.as_ref().map(Tensor::storage_arc), zrd.as_ref().map(Tensor::storage_arc));
            // (g ⊙ z_r) W, with z_c in the epilogue when no gradient of z_c needs u itself.
            let product = |epilogue: Option<&crate::backend::Storage>| -> Result<Tensor> {
                let (t, _) =
                    g.storage_arc().gated_matmul(g.layout(), &wd.storage_arc(), wd.layout(), zrs.as_deref(), None, epilogue, false)?;
                Ok(Tensor::from_storage(t, &[n, k]))
            };
            let (gx, gzc) = if need_zc {
                let u = product(None)?;
                let dzc = x_saved.as_ref().expect("kept when z_c needs a gradient").mul(&u)?.sum(&[0], false)?;
                let dx = if need_x { Some(u.mul(zcd.as_ref().expect("z_c is given"))?) } else { None };
                (dx, Some(dzc))
            } else if need_x {
                (Some(product(zcs.as_deref())?), None)
            } else {
                (None, None)
            };
            let gzr = match &pre {
                Some(pre) => Some(g.mul(pre)?.sum(&[0], false)?),
                None => None,
            };
            let gb = if need_b {
                let col = g.sum(&[0], false)?;
                Some(match &zrd {
                    Some(zr) => col.mul(zr)?,
                    None => col,
                })
            } else {
                None
            };
            let mut grads = vec![gx, None];
            if slots.0 {
                grads.push(gb);
            }
            if slots.1 {
                grads.push(gzc);
            }
            if slots.2 {
                grads.push(gzr);
            }
            Ok(grads)
        });
        let mut shape = self.shape()[..self.rank() - 1].to_vec();
        shape.push(m);
        out.reshape_to(&shape)
    }

    /// The gated linear as the plain composition `((x ⊙ z_c) Wᵀ + b) ⊙ z_r` of a broadcast
    /// multiply, a matmul, an add and a multiply, each with its own backward (so `w` gets a
    /// gradient when it requires one). Same arguments and checks as [`Tensor::gated_linear`].
    pub fn gated_linear_reference(&self, w: &Tensor, bias: Option<&Tensor>, zc: Option<&Tensor>, zr: Option<&Tensor>) -> Result<Tensor> {
        check(self, w, bias, zc, zr)?;
        let x = match zc {
            Some(z) => self.mul(z)?,
            None => self.clone(),
        };
        let y = x.matmul(&w.t()?)?;
        let y = match bias {
            Some(b) => y.add(b)?,
            None => y,
        };
        match zr {
            Some(z) => y.mul(z),
            None => Ok(y),
        }
    }
}
