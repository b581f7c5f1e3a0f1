//! DoRA (Liu et al. 2024): LoRA's update sets the direction, a trainable vector the length
//! of each output row,
//!
//! ```text
//! W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row,    m ∈ R^{out}, init m = ‖W0‖_row
//! y  = x W'ᵀ + b = (m / ‖W0 + s B A‖_row) ⊙ (x W0ᵀ + s (dropout(x) Aᵀ) Bᵀ) + b
//! ```
//!
//! The row norm is treated as a constant in backward (detached), as the paper's reference
//! code and PEFT do: gradients reach `m`, `A` and `B` only through the numerator. (With
//! dropout in training PEFT also feeds the dropped input to the `x W0ᵀ` term; here the base
//! term always sees `x`. In inference the two agree exactly.)

use super::lora::LoraLayer;
use crate::error::Result;
use crate::tensor::Tensor;

/// `‖W‖` of each row of `W: [out, in]` → `[out]`.
pub fn row_norms(w: &Tensor) -> Result<Tensor> {
    crate::autograd::with_no_grad(|| w.to_dtype(super::trainable_dtype(w.dtype()))?.sqr()?.sum(&[-1], false)?.sqrt())
}

/// The DoRA output (no bias) of `layer` with magnitude `m` on `x` (`xd`: dropped input).
pub(crate) fn forward(layer: &LoraLayer, m: &Tensor, w0: &Tensor, x: &Tensor, xd: &Tensor) -> Result<Tensor> {
    // Both terms detached: the norm has no graph, a constant in backward.
    let norm = row_norms(&w0.detach().to_dtype(layer.a.dtype())?.add(&layer.delta_weight()?)?)?;
    let y = x.lora_linear(xd, w0, &layer.a, &layer.b, layer.scale)?;
    y.mul(&m.div(&norm)?)
}
