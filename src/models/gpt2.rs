//! GPT-2: learned absolute positions, pre-LayerNorm blocks, multi-head attention from one
//! fused `c_attn` projection, a GELU (tanh) MLP, a final LayerNorm and an LM head tied to the
//! token embedding.
//!
//! ```text
//! h₀ = E_tok[ids] + E_pos[0..t]
//! a  = h + c_proj(Attn(split₃(c_attn(LN₁(h)))))
//! h' = a + c_proj(gelu_tanh(c_fc(LN₂(a))))
//! logits = LN_f(h_L) E_tokᵀ
//! ```
//! GPT-2 checkpoints store their projections as `Conv1D` weights of shape `[in, out]`
//! (`y = x W + b`); they are transposed once at load into the `[out, in]` layout of
//! [`Linear`], so all models share one linear layer (and one site type for adapters).

use super::CausalLm;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::config::RawConfig;
use crate::io::Weights;
use crate::nn::{Activation, BlockConfig, Decoder, DecoderBlock, Embedding, Linear, Mlp, Norm, Qkv, SelfAttention, COMPUTE};
use crate::tensor::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
}

impl Gpt2Config {
    pub fn from_raw(raw: &RawConfig) -> Result<Gpt2Config> {
        let n_embd = raw.usize("n_embd")?;
        let n_head = raw.usize("n_head")?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(raw.error(format!("n_embd {n_embd} must be divisible by n_head {n_head}")));
        }
        let act = raw.str_or("activation_function", "gelu_new")?;
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(raw.error(format!("field 'activation_function' = '{act}' is not supported (gelu_new)")));
        }
        raw.reject_unless("scale_attn_by_inverse_layer_idx", |v| v == &serde_json::Value::Bool(false), "not implemented")?;
        raw.reject_unless("scale_attn_weights", |v| v == &serde_json::Value::Bool(true), "unscaled attention is not implemented")?;
        raw.reject_unless("reorder_and_upcast_attn", |v| v == &serde_json::Value::Bool(false), "not implemented")?;
        let n_positions = raw.usize("n_positions")?;
        if n_positions == 0 || n_positions > super::MAX_CONTEXT {
            return Err(raw.error(format!("field 'n_positions' = {n_positions} is outside 1..={}", super::MAX_CONTEXT)));
        }
        let layer_norm_epsilon = raw.f64_or("layer_norm_epsilon", 1e-5)?;
        if !(layer_norm_epsilon.is_finite() && layer_norm_epsilon > 0.0 && layer_norm_epsilon < 1.0) {
            return Err(raw.error(format!("field 'layer_norm_epsilon' = {layer_norm_epsilon} must be a small positive number")));
        }
        let (vocab_size, n_layer) = (raw.usize("vocab_size")?, raw.usize("n_layer")?);
        let n_inner = raw.opt_usize("n_inner")?.unwrap_or(n_embd.saturating_mul(4));
        for (k, v) in [("vocab_size", vocab_size), ("n_embd", n_embd), ("n_inner", n_inner)] {
            if v == 0 || v > 1 << 24 {
                return Err(raw.error(format!("field '{k}' = {v} is outside 1..={}", 1 << 24)));
            }
        }
        if n_layer > 1 << 12 {
            return Err(raw.error(format!("field 'n_layer' = {n_layer} is implausibly large")));
        }
        Ok(Gpt2Config { vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, layer_norm_epsilon })
    }
}

pub struct Gpt2 {
    pub config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    decoder: Decoder,
    lm_head: Linear,
}

/// Checkpoints may or may not carry the `transformer.` prefix.
fn resolve(w: &dyn Weights, name: &str) -> String {
    let full = format!("transformer.{name}");
    if w.contains(&full) {
        full
    } else {
        name.to_string()
    }
}

fn conv1d(w: &dyn Weights, name: &str, inp: usize, out: usize, dev: &Device) -> Result<Linear> {
    let weight = w.get(&resolve(w, &format!("{name}.weight")), &[inp, out], COMPUTE, dev)?.t()?.contiguous()?;
    let bias = w.get(&resolve(w, &format!("{name}.bias")), &[out], COMPUTE, dev)?;
    Ok(Linear::new(format!("transformer.{name}"), weight, Some(bias)))
}

fn layer_norm(w: &dyn Weights, name: &str, d: usize, eps: f64, dev: &Device) -> Result<Norm> {
    Ok(Norm::Layer {
        name: format!("transformer.{name}"),
        weight: w.get(&resolve(w, &format!("{name}.weight")), &[d], COMPUTE, dev)?,
        bias: w.get(&resolve(w, &format!("{name}.bias")), &[d], COMPUTE, dev)?,
        eps,
    })
}

impl Gpt2Config {
    /// The shared block's configuration: multi-head attention, positions from the
    /// embeddings, a plain GELU (tanh) MLP.
    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            heads: self.n_head,
            kv_heads: self.n_head,
            head_dim: self.n_embd / self.n_head,
            rope: None,
            act: Activation::GeluTanh,
            window: None,
            local: None,
            attn_scale: None,
        }
    }
}

impl Gpt2 {
    pub fn load(config: Gpt2Config, w: &dyn Weights, dev: &Device) -> Result<Gpt2> {
        let c = &config;
        let d = c.n_embd;
        let wte = Embedding { name: "transformer.wte".into(), weight: w.get(&resolve(w, "wte.weight"), &[c.vocab_size, d], COMPUTE, dev)? };
        let wpe =
            Embedding { name: "transformer.wpe".into(), weight: w.get(&resolve(w, "wpe.weight"), &[c.n_positions, d], COMPUTE, dev)? };
        let mut blocks = Vec::new();
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            let conv = |name: &str, inp: usize, out: usize| conv1d(w, &format!("{p}.{name}"), inp, out, dev);
            blocks.push(DecoderBlock {
                name: format!("transformer.{p}"),
                index: i,
                attn_norm: layer_norm(w, &format!("{p}.ln_1"), d, c.layer_norm_epsilon, dev)?,
                attn: SelfAttention {
                    name: format!("transformer.{p}.attn"),
                    qkv: Qkv::Fused(conv("attn.c_attn", d, 3 * d)?),
                    o: conv("attn.c_proj", d, d)?,
                    q_norm: None,
                    k_norm: None,
                },
                post_attn_norm: None,
                mlp_norm: layer_norm(w, &format!("{p}.ln_2"), d, c.layer_norm_epsilon, dev)?,
                mlp: Mlp {
                    name: format!("transformer.{p}.mlp"),
                    gate: None,
                    up: conv("mlp.c_fc", d, c.n_inner)?,
                    down: conv("mlp.c_proj", c.n_inner, d)?,
                },
                post_mlp_norm: None,
                local: false,
                hooks: Vec::new(),
            });
        }
        let norm = layer_norm(w, "ln_f", d, c.layer_norm_epsilon, dev)?;
        let lm_head = Linear::new("lm_head", wte.weight.clone(), None);
        Ok(Gpt2 {
            decoder: Decoder { config: c.block_config(), blocks, norm, checkpointing: false, inputs: Vec::new() },
            config,
            wte,
            wpe,
            lm_head,
        })
    }
}

impl CausalLm for Gpt2 {
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.wte.forward(ids)
    }

    /// Plus the learned positions `start..start + t`.
    fn embed_positions(&self, h: Tensor, start: usize) -> Result<Tensor> {
        let (t, c) = (h.shape()[1], &self.config);
        if start + t > c.n_positions {
            return Err(Error::Shape { op: "gpt2.forward", msg: format!("position {} exceeds n_positions {}", start + t, c.n_positions) });
        }
        let pos = Tensor::arange(start as f64, (start + t) as f64, 1.0, crate::DType::U32, h.device())?;
        h.add(&self.wpe.forward(&pos)?)
    }

    fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.decoder.linears_mut()
    }

    fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("transformer.wte.weight", &mut self.wte.weight)?;
        f("transformer.wpe.weight", &mut self.wpe.weight)?;
        self.decoder.visit_parameters(f)?;
        self.lm_head.weight = self.wte.weight.clone();
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.config.n_embd
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config.n_positions)
    }

    fn architecture(&self) -> &'static str {
        "gpt2"
    }

    fn config_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.n_inner,
            "n_positions": c.n_positions,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "torch_dtype": "float32",
        })
    }
}
