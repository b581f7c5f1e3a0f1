//! Gradient checkpointing: trade compute for activation memory.
//!
//! `checkpoint(inputs, f)` runs `f` without recording its graph and keeps only `inputs`. In
//! backward it runs `f` again with recording on (from detached copies of the inputs), back-
//! propagates the incoming gradient through that fresh graph — which adds the gradients of any
//! trainable tensor `f` reads into their `grad` — and hands the inputs' gradients on. A
//! transformer block wrapped this way holds one `[batch, seq, dim]` tensor between forward and
//! backward instead of every intermediate of the block.
//!
//! `f` must compute the same function both times: randomness inside it (dropout) must come
//! from a state that does not advance between the forward and the recomputation.

use std::sync::Arc;

use super::{backward_with_grad, enable_grad, is_grad_enabled, with_no_grad};
use crate::error::Result;
use crate::tensor::Tensor;

/// The recomputable function of a [`checkpoint`].
pub type CheckpointFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// `f(inputs)`, storing only `inputs` for backward (see the module documentation). With
/// recording off this is just `f(inputs)`.
pub fn checkpoint(inputs: &[Tensor], f: CheckpointFn) -> Result<Tensor> {
    if !is_grad_enabled() {
        return f(inputs);
    }
    let out = with_no_grad(|| f(inputs))?;
    let saved: Vec<Tensor> = inputs.to_vec();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    Ok(Tensor::from_op_always(&out, "checkpoint", &refs, move |g| {
        let _on = enable_grad();
        let leaves = saved
            .iter()
            .map(|t| if t.requires_grad_flag() { t.detach().requires_grad() } else { Ok(t.detach()) })
            .collect::<Result<Vec<_>>>()?;
        let y = f(&leaves)?;
        if y.requires_grad_flag() {
            backward_with_grad(&y, g)?;
        }
        Ok(leaves.iter().map(|l| l.grad()).collect())
    }))
}
