//! Prompt tuning (Lester et al. 2021), the degenerate case of prefix tuning: `p` trainable
//! virtual-token embeddings put before the embedded input; the frozen model reads them as
//! ordinary tokens.
//!
//! ```text
//! h₀ = [P ; E[ids]] (+ positions 0..p+t),   P = prompt_embeddings ∈ R^{p×hidden}
//! ```
//!
//! As PEFT: the virtual tokens take positions `0..p`, are never padding, and the loss and the
//! NLL cover the real tokens only (the model returns the real tokens' states). Init: random
//! `N(0, 1)` (PEFT's `nn.Embedding` default), the token embeddings of a text (its ids repeated
//! to fill `p`, as PEFT's `TEXT` init), or those of `p` tokens drawn from the vocabulary
//! (`SAMPLE_VOCAB`). Saved as PEFT's `PROMPT_TUNING`: `prompt_embeddings [p, hidden]`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, MethodConfig, Registration, Settings};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::InputHook;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// How the virtual tokens start.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    Random,
    /// The embeddings of these token ids (a text, tokenized), repeated to fill `p`.
    Text {
        ids: Vec<u32>,
        text: String,
    },
    /// The embeddings of `p` token ids drawn uniformly from the vocabulary.
    SampleVocab,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig { num_virtual_tokens: 20, init: PromptInit::Random }
    }
}

/// The virtual tokens.
#[derive(Debug)]
pub struct PromptHook {
    pub embeddings: Tensor,
}

impl InputHook for PromptHook {
    fn virtual_tokens(&self) -> Result<Tensor> {
        Ok(self.embeddings.clone())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Prompt tuning attached to a model.
#[derive(Debug)]
pub struct PromptAdapter {
    pub config: PromptConfig,
    pub hook: Arc<PromptHook>,
    layers: usize,
    heads: usize,
}

impl PromptAdapter {
    pub fn attach(model: &mut dyn CausalLm, config: PromptConfig, seed: u64) -> Result<PromptAdapter> {
        let (p, d) = (config.num_virtual_tokens, model.hidden_size());
        let w = &model.lm_head().weight;
        let (dt, dev) = (super::trainable_dtype(w.dtype()), w.device().clone());
        let mut rng = Rng::new(super::mix(seed, 0x9A0E_717E));
        let ids = |ids: Vec<u32>| -> Result<Tensor> {
            let t = Tensor::from_vec(ids, &[1, p], &dev)?;
            crate::autograd::with_no_grad(|| model.embed_tokens(&t)?.reshape(&[p as isize, d as isize])?.to_dtype(dt))
        };
        let embeddings = match &config.init {
            PromptInit::Random => Tensor::randn(&[p, d], 0.0, 1.0, dt, &dev, &mut rng)?,
            PromptInit::Text { ids: text, .. } => {
                if text.is_empty() {
                    return Err(Error::InvalidArgument { op: "prompt tuning", msg: "the init text has no tokens".into() });
                }
                ids(text.iter().copied().cycle().take(p).collect())?
            }
            PromptInit::SampleVocab => {
                let v = model.vocab_size() as f64;
                let draws = Tensor::rand_uniform(&[p], 0.0, v, crate::DType::F64, &Device::Cpu, &mut rng)?.to_vec_f64()?;
                ids(draws.into_iter().map(|x| (x as usize).min(model.vocab_size() - 1) as u32).collect())?
            }
        };
        Self::install(model, config, embeddings)
    }

    fn install(model: &mut dyn CausalLm, config: PromptConfig, embeddings: Tensor) -> Result<PromptAdapter> {
        let (p, d) = (config.num_virtual_tokens, model.hidden_size());
        if p == 0 {
            return Err(Error::InvalidArgument { op: "prompt tuning", msg: "num_virtual_tokens must be at least 1".into() });
        }
        if let Some(ctx) = model.max_positions().filter(|&c| p >= c) {
            return Err(Error::InvalidArgument {
                op: "prompt tuning",
                msg: format!("num_virtual_tokens = {p} leaves no room for a token in the model's context of {ctx} positions"),
            });
        }
        if embeddings.shape() != [p, d] {
            return Err(Error::Shape {
                op: "prompt tuning",
                msg: format!(
                    "prompt_embeddings has shape {:?}, this model needs [{p}, {d}] (num_virtual_tokens × hidden size)",
                    embeddings.shape()
                ),
            });
        }
        if !model.decoder().inputs.is_empty() {
            return Err(Error::InvalidArgument { op: "prompt tuning", msg: "the model already has virtual tokens attached".into() });
        }
        let hook = Arc::new(PromptHook { embeddings: embeddings.contiguous()?.requires_grad()? });
        model.decoder_mut().inputs.push(hook.clone());
        let (layers, heads) = (model.num_layers(), model.decoder().config.heads);
        Ok(PromptAdapter { config, hook, layers, heads })
    }
}

impl MethodConfig for PromptConfig {
    fn name(&self) -> &'static str {
        "prompt"
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(PromptAdapter::attach(model, self.clone(), seed)?))
    }

    fn fingerprint(&self) -> Value {
        let init = match &self.init {
            PromptInit::Random => json!("random"),
            PromptInit::SampleVocab => json!("sample_vocab"),
            PromptInit::Text { ids, .. } => json!({ "text_ids": ids }),
        };
        json!({ "num_virtual_tokens": self.num_virtual_tokens, "prompt_init": init })
    }

    /// Prompt tuning needs large steps (Lester et al. train with 0.3; PEFT's examples 3e-2).
    fn default_lr(&self) -> f64 {
        3e-2
    }
}

impl Method for PromptAdapter {
    fn name(&self) -> &'static str {
        "prompt"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![("prompt_embeddings".into(), self.hook.embeddings.clone())]
    }

    fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("prompt_embeddings".into(), self.hook.embeddings.detach())])
    }

    fn num_sites(&self) -> usize {
        1
    }

    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value {
        let (init, text) = match &self.config.init {
            PromptInit::Random => ("RANDOM", Value::Null),
            PromptInit::SampleVocab => ("SAMPLE_VOCAB", Value::Null),
            PromptInit::Text { text, .. } => ("TEXT", json!(text)),
        };
        json!({
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "token_dim": model.hidden_size(),
            "num_transformer_submodules": 1,
            "num_attention_heads": self.heads,
            "num_layers": self.layers,
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": text,
        })
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        model.decoder_mut().inputs.retain(|h| !super::is_same(h, &self.hook));
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const PROMPT: Registration = Registration {
    name: "prompt",
    about: "trainable virtual-token embeddings before the input (prompt tuning)",
    peft_type: "PROMPT_TUNING",
    settings: &["num-virtual-tokens", "prompt-init", "prompt-init-text", "prompt-init-ids"],
    configure: |s: &Settings| {
        let p = s.usize("num-virtual-tokens")?.unwrap_or(20);
        let text = s.str("prompt-init-text")?;
        let init = match (s.str("prompt-init")?.as_deref(), text) {
            (None | Some("random"), None) => PromptInit::Random,
            (Some("vocab"), None) => PromptInit::SampleVocab,
            (None | Some("text"), Some(text)) => {
                let ids = s.usizes("prompt-init-ids")?.ok_or_else(|| Error::InvalidArgument {
                    op: "prompt tuning",
                    msg: "--prompt-init-text needs the text's token ids (the CLI tokenizes it)".into(),
                })?;
                PromptInit::Text { ids: ids.into_iter().map(|i| i as u32).collect(), text }
            }
            (Some("text"), None) => {
                return Err(Error::InvalidArgument { op: "--prompt-init", msg: "text needs --prompt-init-text".into() });
            }
            (Some(o), t) => {
                return Err(Error::InvalidArgument {
                    op: "--prompt-init",
                    msg: format!(
                        "'{o}'{} (random, text with --prompt-init-text, or vocab)",
                        if t.is_some() { " with --prompt-init-text" } else { "" }
                    ),
                });
            }
        };
        if p == 0 {
            return Err(Error::InvalidArgument { op: "prompt tuning", msg: "--num-virtual-tokens must be at least 1".into() });
        }
        Ok(Arc::new(PromptConfig { num_virtual_tokens: p, init }))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("PROMPT_TUNING"),
    load,
};

/// Attach a saved PEFT `PROMPT_TUNING` adapter: `prompt_embeddings [p, hidden]`.
fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
        ],
        &["tokenizer_name_or_path", "tokenizer_kwargs"],
    );
    if files.usize("num_transformer_submodules")?.is_some_and(|n| n != 1) {
        return Err(files.config_error("field 'num_transformer_submodules' must be 1 (decoder-only models)"));
    }
    if let Some(k) = files.keys.iter().find(|k| *k != "prompt_embeddings") {
        return Err(files.weights_error(format!("tensor '{k}' is not part of a prompt-tuning adapter (prompt_embeddings)")));
    }
    let table = files.tensor("prompt_embeddings", device)?;
    let p = files.usize("num_virtual_tokens")?.unwrap_or(table.shape().first().copied().unwrap_or(0));
    let table = table.to_dtype(super::trainable_dtype(model.lm_head().weight.dtype()))?;
    let adapter = PromptAdapter::install(model, PromptConfig { num_virtual_tokens: p, init: PromptInit::Random }, table)
        .map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(adapter))
}
