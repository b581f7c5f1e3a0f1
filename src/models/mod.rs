//! Transformer language models loaded from Hugging Face checkpoints.

pub mod eval;
pub mod generate;
pub mod gpt2;
pub mod llama;

pub use eval::{sequence_nll, NllReport};
pub use generate::{generate, GenerateOptions, KvCache, Sampling};

use std::path::Path;

use crate::backend::Device;
use crate::error::Result;
use crate::io::config::RawConfig;
use crate::io::Checkpoint;
use crate::tensor::Tensor;

/// A causal language model: token ids in, next-token logits out.
pub trait CausalLm {
    /// `ids: [batch, seq]` (U32) → logits `[batch, seq, vocab]`. `keep: [batch, seq]` marks
    /// real tokens (1) and padding (0), or `None` when every row is full.
    fn forward(&self, ids: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        self.forward_cached(ids, keep, None)
    }
    /// Like `forward`, continuing from the keys and values in `cache` (positions start at
    /// `cache.len()`) and appending this step's to it. With a cache, `keep` covers the cached
    /// positions and the new ones: `[batch, cache.len() + seq]`.
    fn forward_cached(&self, ids: &Tensor, keep: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// Number of transformer blocks (the size of a [`KvCache`]).
    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The `model_type` of its config.
    fn architecture(&self) -> &'static str;
}

/// Load a Hugging Face model directory (`config.json` + safetensors weights).
pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Box<dyn CausalLm>> {
    let dir = dir.as_ref();
    let config_path = dir.join("config.json");
    let raw = RawConfig::read(&config_path)?;
    let weights = Checkpoint::open(dir)?;
    match raw.model_type()?.as_str() {
        "llama" | "LlamaForCausalLM" | "qwen2" | "Qwen2ForCausalLM" | "mistral" | "MistralForCausalLM" => {
            let cfg = llama::LlamaConfig::from_raw(&raw)?;
            Ok(Box::new(llama::Llama::load(cfg, &weights, device)?))
        }
        "gpt2" | "GPT2LMHeadModel" => {
            let cfg = gpt2::Gpt2Config::from_raw(&raw)?;
            Ok(Box::new(gpt2::Gpt2::load(cfg, &weights, device)?))
        }
        other => Err(raw.error(format!("unknown architecture '{other}' (tinytune runs llama-family and gpt2 models)"))),
    }
}
