//! Full fine-tuning: every weight of the model is trainable (the baseline every method is
//! compared with). A tied output layer stays tied: it is the embedding, one tensor.

use serde_json::{json, Value};

use super::method::{Method, MethodConfig, Registration};
use crate::error::Result;
use crate::models::CausalLm;
use crate::tensor::Tensor;

/// Make every weight a trainable leaf (sharing its data) and return them by checkpoint name.
pub fn make_trainable(model: &mut dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    model.visit_parameters(&mut |name, t| {
        // f16/bf16 storage becomes f32 to be trained; f32/f64 weights keep their dtype.
        let w = t.to_dtype(super::trainable_dtype(t.dtype()))?;
        *t = w.requires_grad()?;
        out.push((name.to_string(), t.clone()));
        Ok(())
    })?;
    Ok(out)
}

/// Full fine-tuning as a method: its config and what it attached (every weight, trainable).
#[derive(Debug, Clone, Default)]
pub struct Full;

/// The weights [`Full`] made trainable.
#[derive(Debug)]
pub struct FullModel {
    params: Vec<(String, Tensor)>,
}

impl MethodConfig for Full {
    fn name(&self) -> &'static str {
        "full"
    }

    fn attach(&self, model: &mut dyn CausalLm, _seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(FullModel { params: make_trainable(model)? }))
    }

    fn fingerprint(&self) -> Value {
        json!({})
    }

    fn default_lr(&self) -> f64 {
        2e-5
    }
}

impl Method for FullModel {
    fn name(&self) -> &'static str {
        "full"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.clone()
    }

    fn num_sites(&self) -> usize {
        self.params.len()
    }

    /// The result is the model itself (`saves_model`); only a classification head is saved
    /// as an adapter beside it.
    fn adapter_config(&self, _model: &mut dyn CausalLm) -> Value {
        json!({ "peft_type": "NONE" })
    }

    fn saves_model(&self) -> bool {
        true
    }

    /// The weights are the model's own: nothing to take off.
    fn remove(&self, _model: &mut dyn CausalLm) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const FULL: Registration = Registration {
    name: "full",
    about: "every weight trainable (the baseline); the result is a whole model",
    peft_type: "NONE",
    settings: &[],
    configure: |_| Ok(std::sync::Arc::new(Full)),
    // A full fine-tune is saved as a model, never as an adapter.
    recognises: |_| false,
    load: |_, files, _| Err(files.config_error("a full fine-tune is a model directory, not an adapter")),
};
