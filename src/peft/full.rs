//! Full fine-tuning: every weight of the model is trainable (the baseline every method is
//! compared with). A tied output layer stays tied: it is the embedding, one tensor.

use crate::error::Result;
use crate::models::CausalLm;
use crate::tensor::Tensor;

/// Make every weight a trainable leaf (sharing its data) and return them by checkpoint name.
pub fn make_trainable(model: &mut dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    model.visit_parameters(&mut |name, t| {
        // f16/bf16 storage becomes f32 to be trained; f32/f64 weights keep their dtype.
        let w = if t.dtype().is_compute() { t.clone() } else { t.to_dtype(crate::nn::COMPUTE)? };
        *t = w.requires_grad()?;
        out.push((name.to_string(), t.clone()));
        Ok(())
    })?;
    Ok(out)
}
